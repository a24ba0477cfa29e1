"""Detectors on zoo backbones (attnzoo.zoo.detection): every builder learns, boxes stay in input-image pixels,
sizes follow the backbone, bad targets and sizes are refused; DETR's Hungarian matching and set loss."""

import itertools

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from attnzoo.zoo.detection import DETECTORS, DETR, DetectionTransform, create_detector, evaluation_losses
from attnzoo.zoo.detection.matcher import hungarian_match, matching_cost
from attnzoo.zoo.detection.set_loss import SetCriterion

NUM_CLASSES = 5
# attnzoo_nat_mini cut to one 16-channel block per stage; its stride-4 and stride-8 levels (DETR: stride 8).
TINY = dict(in_chans=1, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 2), out_indices=(1, 2))
OPTIONS = {"fcos": dict(fpn_channels=32), "retinanet": dict(fpn_channels=32), "faster_rcnn": dict(fpn_channels=32),
           "detr": dict(dim=32, num_heads=2, depth=2, num_queries=8)}  # fmt: skip


def _detector(arch: str, model_name: str = "attnzoo_nat_mini", **backbone) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {**TINY, "out_indices": (2,)} if arch == "detr" else TINY
    return create_detector(arch, model_name, NUM_CLASSES, backbone_kwargs={**kwargs, **backbone}, **OPTIONS[arch])


def _target(boxes: list, labels: list) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


# Two 32 x 40 images (not a multiple of the pyramid's 16 px: the batch is padded), the second without objects.
IMAGES = torch.randn(2, 1, 32, 40, generator=torch.Generator().manual_seed(1))
TARGETS = [_target([[3, 4, 19, 21], [20, 16, 38, 31]], [1, 3]), _target([], [])]


def _in_image(boxes: torch.Tensor, height: int, width: int) -> bool:
    return bool(((boxes >= 0).all() & (boxes[:, 0::2] <= width).all() & (boxes[:, 1::2] <= height).all()).item())


@pytest.mark.parametrize("arch", DETECTORS)
def test_detector_trains_and_detects(arch):
    det = _detector(arch).train()
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = sum(det(IMAGES, TARGETS).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    det.eval()
    with torch.no_grad():
        found = det(list(IMAGES))
    assert len(found) == 2
    for d in found:
        assert set(d) == {"boxes", "labels", "scores"} and d["boxes"].shape == (len(d["labels"]), 4)
        assert _in_image(d["boxes"], 32, 40)
        assert ((d["labels"] >= 0) & (d["labels"] < NUM_CLASSES)).all()


# the padding multiple: every level's stride (FCOS's default extra levels P6, P7 reach stride 32; Faster R-CNN's
# max-pool level 16; DETR reads the stride-8 map)
@pytest.mark.parametrize("arch,multiple", [("fcos", 32), ("faster_rcnn", 16), ("detr", 8)])
def test_boxes_stay_in_input_pixels(arch, multiple):
    det = _detector(arch).eval()
    images = [torch.randn(1, 28, 44), torch.randn(1, 36, 30)]
    batch, targets = det.transform(images, [_target([[1.5, 2, 30, 27]], [4]), _target([], [])])
    # no resize: the sizes and boxes are the inputs', the batch only zero-padded at the bottom/right
    padded = tuple(-(-side // multiple) * multiple for side in (36, 44))
    assert batch.image_sizes == [(28, 44), (36, 30)] and batch.tensors.shape == (2, 1, *padded)
    assert torch.equal(batch.tensors[0, :, :28, :44], images[0]) and not batch.tensors[0, :, 28:].any()
    assert torch.equal(targets[0]["boxes"], torch.tensor([[1.5, 2, 30, 27]]))
    assert torch.equal(targets[0]["labels"], torch.tensor([4 + (arch == "faster_rcnn")]))  # its background is 0
    with torch.no_grad():
        found = det(images)
    assert _in_image(found[0]["boxes"], 28, 44) and _in_image(found[1]["boxes"], 36, 30)


def test_halo_backbone_size_multiple():
    # attnzoo_halonet_mini needs multiples of 14 px; its levels are at strides 2 and 4, the pool level at 8
    det = create_detector("fcos", "attnzoo_halonet_mini", NUM_CLASSES, backbone_kwargs=dict(in_chans=1,
                          out_indices=(0, 1)), fpn_channels=32, extra_blocks="pool").eval()  # fmt: skip
    assert det.backbone.strides == [2, 4, 8] and det.transform.size_divisible == 56
    with torch.no_grad():
        found = det([torch.randn(1, 30, 70)])  # padded to 56 x 112
    assert _in_image(found[0]["boxes"], 30, 70)


@pytest.mark.parametrize("arch", ["fcos", "detr"])
def test_image_too_small_names_accepted_sizes(arch):
    det = _detector(arch).eval()
    with pytest.raises(ValueError, match=r"images\[1\] is 20x40 .*attnzoo_nat_mini takes images with height >= 28, "
                                         r"width >= 28"):  # fmt: skip
        det([torch.randn(1, 32, 32), torch.randn(1, 20, 40)])


@pytest.mark.parametrize("arch", DETECTORS)
def test_bad_targets(arch):
    det = _detector(arch).train()
    with pytest.raises(ValueError, match=r"targets\[0\] box 1 is \[30.0, 5.0, 10.0, 20.0\].*0 <= x1 < x2 <= 40"):
        det(IMAGES, [_target([[1, 1, 9, 9], [30, 5, 10, 20]], [0, 1]), _target([], [])])
    with pytest.raises(ValueError, match=r"targets\[1\] box 0 is \[1.0, 1.0, 41.0, 9.0\]"):  # past the right edge
        det(IMAGES, [_target([], []), _target([[1, 1, 41, 9]], [0])])
    with pytest.raises(ValueError, match=r"targets\[0\] label 0 is 5; accepted labels: 0 to 4"):
        det(IMAGES, [_target([[1, 1, 9, 9]], [5]), _target([], [])])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be an int64"):
        det(IMAGES, [{"boxes": torch.ones(1, 4), "labels": torch.zeros(1)}, _target([], [])])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"detector='yolo' is not a zoo detector; accepted values: \['fcos', "):
        create_detector("yolo", "attnzoo_nat_mini", NUM_CLASSES, backbone_kwargs=TINY)
    with pytest.raises(ValueError, match=r"fpn_channels=48 must be a multiple of 32 for FCOS"):
        create_detector("fcos", "attnzoo_nat_mini", NUM_CLASSES, backbone_kwargs=TINY, fpn_channels=48)
    with pytest.raises(ValueError, match=r"extra_blocks='p6'; accepted values: \['pool', 'p6p7', None\]"):
        create_detector("retinanet", "attnzoo_nat_mini", NUM_CLASSES, backbone_kwargs=TINY, extra_blocks="p6")
    with pytest.raises(ValueError, match=r"an image has 9 boxes, more than num_queries=8"):
        _detector("detr").train()(IMAGES[:1], [_target([[i, i, i + 9, i + 9] for i in range(9)], [0] * 9)])


def test_evaluation_losses_keep_layers_in_eval_mode():
    det = _detector("faster_rcnn").eval()
    seen = []
    det.backbone.body.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    with torch.no_grad():
        losses = evaluation_losses(det, IMAGES, TARGETS)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert seen == [False] and not any(m.training for m in det.modules())


def _giou(a: list, b: list) -> float:
    """Generalized IoU of two (x1, y1, x2, y2) boxes, written out."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _random_sets(gen: torch.Generator, q: int, n: int, k: int = 3) -> tuple:
    logits = torch.randn(q, k + 1, generator=gen)
    boxes = torch.cat([torch.rand(q, 2, generator=gen) * 0.6 + 0.2, torch.rand(q, 2, generator=gen) * 0.3 + 0.05], 1)
    labels = torch.randint(0, k, (n,), generator=gen)
    targets = torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2, generator=gen) * 0.3 + 0.05], 1)
    return logits, boxes, labels, targets


def test_matching_cost_terms():
    logits, boxes, labels, targets = _random_sets(torch.Generator().manual_seed(0), 4, 3)
    cost = matching_cost(logits, boxes, labels, targets, class_weight=1.0, l1_weight=5.0, giou_weight=2.0)
    prob = logits.softmax(-1)
    xyxy, txyxy = box_convert(boxes, "cxcywh", "xyxy").tolist(), box_convert(targets, "cxcywh", "xyxy").tolist()
    for i, j in itertools.product(range(4), range(3)):
        expected = -prob[i, labels[j]] + 5.0 * (boxes[i] - targets[j]).abs().sum() - 2.0 * _giou(xyxy[i], txyxy[j])
        assert cost[i, j].item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("q,n", [(1, 1), (3, 2), (4, 4), (5, 3), (5, 0)])
def test_hungarian_matches_brute_force(q, n):
    gen = torch.Generator().manual_seed(q * 10 + n)
    for _ in range(5):
        cost = matching_cost(*_random_sets(gen, q, n), class_weight=1.0, l1_weight=5.0, giou_weight=2.0)
        rows, cols = hungarian_match(cost)
        assert sorted(cols.tolist()) == list(range(n)) and len(set(rows.tolist())) == n  # one query per target
        best = min(sum(cost[p, j].item() for j, p in enumerate(perm)) for perm in itertools.permutations(range(q), n))
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_set_loss_is_invariant_to_prediction_order():
    gen = torch.Generator().manual_seed(3)
    criterion = SetCriterion(num_classes=3)
    sets = [_random_sets(gen, 6, n) for n in (3, 0)]  # an image with 3 objects, one with none
    logits, boxes = torch.stack([s[0] for s in sets]), torch.stack([s[1] for s in sets])
    targets = [{"labels": s[2], "boxes": s[3]} for s in sets]
    loss = criterion([(logits, boxes)], targets)
    assert set(loss) == {"loss_ce", "loss_bbox", "loss_giou"} and all(v > 0 for v in loss.values())
    for _ in range(3):
        perm = torch.randperm(6, generator=gen)
        shuffled = criterion([(logits[:, perm], boxes[:, perm])], targets)
        for k in loss:
            assert shuffled[k].item() == pytest.approx(loss[k].item(), rel=1e-5), k
    # aux loss: every decoder layer's loss is added
    twice = criterion([(logits, boxes), (logits, boxes)], targets)
    assert all(twice[k].item() == pytest.approx(2 * loss[k].item(), rel=1e-5) for k in loss)


def test_detr_has_no_resize_transform():
    det = _detector("detr")
    assert isinstance(det, DETR) and isinstance(det.transform, DetectionTransform)
    assert det.stride == 8 and det.transform.size_divisible == 8


def test_detr_masks_cells_in_the_padding():
    from attnzoo.zoo.detection.detr import _padding_mask

    # 28 x 44 and 36 x 30 images padded to 40 x 48 (stride 8: a 5 x 6 grid): 4 x 6 and 5 x 4 cells hold image pixels
    mask = _padding_mask([(28, 44), (36, 30)], (5, 6), 8, torch.device("cpu")).view(2, 5, 6)
    expected = torch.ones(2, 5, 6, dtype=torch.bool)
    expected[0, :4, :6] = False
    expected[1, :5, :4] = False
    assert torch.equal(mask, expected)
    assert _padding_mask([(40, 48)], (5, 6), 8, torch.device("cpu")) is None  # nothing padded: no mask
