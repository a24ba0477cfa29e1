"""Detection data: the composed Fashion-MNIST canvases (tight boxes, determinism, splits) and COCO-json data."""

import json

import numpy as np
import pytest
import torch

from attnzoo.train.data.composed_detection import compose_canvas
from attnzoo.train.data.detection import CocoDetectionDataModule, FashionDetectionDataModule, collate_detection
from attnzoo.train.data.image_files import write_image_file
from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON

needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)


def _items(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """n 28 x 28 items with a filled rectangle each (some rows / columns blank around it), labels 0..n-1."""
    items = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        items[i, 2 + i : 20 + i, 4 : 26 - i] = 50 + 30 * i
    return items, torch.arange(n)


def _check_canvas(canvas: torch.Tensor, target: dict, max_objects: int) -> None:
    """Boxes inside the canvas, tight on their item's pixels (non-zero first/last row and column), disjoint, and
    covering every non-zero pixel."""
    _, height, width = canvas.shape
    boxes = target["boxes"].long().tolist()
    assert 1 <= len(boxes) <= max_objects and target["labels"].dtype == torch.int64
    covered = torch.zeros(height, width, dtype=torch.int64)
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        patch = canvas[0, y1:y2, x1:x2]
        assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
        covered[y1:y2, x1:x2] += 1
    assert covered.max() == 1 and not canvas[0][covered == 0].any()
    assert torch.equal(target["boxes"], target["boxes"].round())  # pixel edges


def test_composed_canvases_have_tight_boxes():
    items, labels = _items()
    for i in range(20):
        canvas, target = compose_canvas(items, labels, np.random.default_rng(i), 84, 4, (0.5, 2.5))
        assert canvas.shape == (1, 84, 84) and canvas.dtype == torch.uint8
        _check_canvas(canvas, target, 4)


@needs_fmnist
def test_fashion_detection_splits_are_seeded():
    dm = FashionDetectionDataModule(batch_size=2, canvas_size=56, scale_range=(0.5, 1.5), train_size=6, val_size=3,
                                    test_size=3, seed=7)  # fmt: skip
    again = FashionDetectionDataModule(batch_size=2, canvas_size=56, scale_range=(0.5, 1.5), train_size=6, seed=7)
    other = FashionDetectionDataModule(batch_size=2, canvas_size=56, scale_range=(0.5, 1.5), train_size=6, seed=8)
    train, val, test = (dm.load_split(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 3, 3)
    for ds in (train, val, test):
        for i in range(len(ds)):
            _check_canvas(*ds[i], max_objects=4)
    same = again.load_split("train")
    assert all(torch.equal(train[i][0], same[i][0]) and torch.equal(train[i][1]["boxes"], same[i][1]["boxes"])
               for i in range(6))  # fmt: skip
    assert not torch.equal(train[0][0], other.load_split("train")[0][0])
    assert not torch.equal(train[0][0], val[0][0]) and not torch.equal(val[0][0], test[0][0])
    info = dm.data_info
    assert info["in_chans"] == 1 and info["img_size"] == [56, 56] and len(info["class_names"]) == 10
    assert 0 < info["mean"][0] < 0.3 and info["std"][0] > 0


@needs_fmnist
def test_fashion_detection_batches():
    dm = FashionDetectionDataModule(batch_size=4, canvas_size=56, scale_range=(0.5, 1.5), train_size=8, val_size=4)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 56, 56) and images.dtype == torch.uint8 and len(targets) == 4
    normalized, same = dm.on_after_batch_transfer((images, targets), 0)
    mean, std = dm.data_info["mean"][0], dm.data_info["std"][0]
    assert torch.allclose(normalized, (images.float() / 255 - mean) / std) and same is targets
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 1, 56, 56) and all(set(t) == {"boxes", "labels"} for t in targets)


def test_fashion_detection_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"scale_range=\(0.5, 3.0\) must satisfy .* 28 x high <= canvas_size=56"):
        FashionDetectionDataModule(canvas_size=56, scale_range=(0.5, 3.0))
    with pytest.raises(ValueError, match="max_objects=0 must be >= 1"):
        FashionDetectionDataModule(max_objects=0)
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz .* not found in"):
        FashionDetectionDataModule(root=str(tmp_path)).load_split("train")


def test_collate_keeps_sizes():
    a, b = torch.zeros(1, 4, 6, dtype=torch.uint8), torch.zeros(1, 5, 6, dtype=torch.uint8)
    images, rest = collate_detection([(a, "x"), (a, "y")])
    assert images.shape == (2, 1, 4, 6) and rest == ["x", "y"]
    images, _ = collate_detection([(a, "x"), (b, "y")])
    assert isinstance(images, list) and [i.shape for i in images] == [a.shape, b.shape]


def _coco(root, name: str, sizes: list, annotations: list, categories=((3, "cat"), (1, "dog"))) -> dict:
    """Write the images (gray, 8-bit) and the instances json of one split; returns its CocoSplit."""
    folder = root / name
    folder.mkdir()
    images = []
    for i, (h, w) in enumerate(sizes):
        write_image_file(folder / f"{i}.png", torch.full((1, h, w), 10 * (i + 1), dtype=torch.uint8))
        images.append({"id": 100 + i, "file_name": f"{i}.png", "height": h, "width": w})
    anns = [{"id": j, "image_id": 100 + i, "category_id": c, "bbox": bbox, **extra}
            for j, (i, c, bbox, extra) in enumerate(annotations)]  # fmt: skip
    data = {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for i, n in categories]}
    (root / f"{name}.json").write_text(json.dumps(data))
    return {"images": str(folder), "annotations": str(root / f"{name}.json")}


def test_coco_json_data(tmp_path):
    annotations = [
        (0, 3, [2, 3, 10, 5], {}),  # cat -> label 1 (categories in id order: dog, cat)
        (0, 1, [30, 20, 20, 20], {}),  # past the right and bottom edges: clipped to (30, 20, 40, 30)
        (0, 1, [0, 0, 5, 5], {"iscrowd": 1}),  # a crowd: left out
        (2, 1, [1, 1, 3, 3], {}),
    ]  # image 1 has no objects
    train = _coco(tmp_path, "train", [(30, 40), (30, 40), (24, 20)], annotations)
    val = _coco(tmp_path, "val", [(30, 40)], [(0, 3, [1, 1, 4, 4], {})])
    dm = CocoDetectionDataModule(train=train, val=val, batch_size=3)
    info = dm.data_info
    assert info["class_names"] == ["dog", "cat"] and info["in_chans"] == 1 and len(info["mean"]) == 1
    dm.setup("fit")
    image, target = dm.train_set[0]
    assert image.shape == (1, 30, 40)
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [30, 20, 40, 30]]))
    assert target["labels"].tolist() == [1, 0]
    assert dm.train_set[1][1]["boxes"].shape == (0, 4)  # an image without objects
    images, targets = collate_detection([dm.train_set[i] for i in range(3)])
    assert isinstance(images, list) and len(targets) == 3  # sizes differ: a list
    normalized, _ = dm.on_after_batch_transfer((images, targets), 0)
    assert [tuple(x.shape) for x in normalized] == [(1, 30, 40), (1, 30, 40), (1, 24, 20)]


@pytest.mark.parametrize("annotation,error", [
    ((0, 3, [5, 5, -2, 4], {}), r"annotation 0 in .*train.json has bbox \[5, 5, -2, 4\]: width and height must be > 0"),
    ((0, 3, [50, 5, 2, 4], {}), r"annotation 0 .* has bbox \[50, 5, 2, 4\], outside its 30x40"),
    ((0, 7, [1, 1, 2, 2], {}), r"annotation 0 .* has category_id 7; the categories' ids: \[1, 3\]"),
    ((4, 3, [1, 1, 2, 2], {}), r"annotation 0 .* refers to image_id 104, which is not in its images"),
])  # fmt: skip
def test_coco_json_bad_annotations(tmp_path, annotation, error):
    train = _coco(tmp_path, "train", [(30, 40)], [annotation])
    with pytest.raises(ValueError, match=error):
        _ = CocoDetectionDataModule(train=train, val=train).data_info


def test_coco_json_other_errors(tmp_path):
    train = _coco(tmp_path, "train", [(30, 40)], [(0, 3, [1, 1, 4, 4], {})])
    (tmp_path / "train" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image '0.png' \(id 100\) of .*train.json is not in"):
        _ = CocoDetectionDataModule(train=train, val=train).data_info
    val = _coco(tmp_path, "val", [(30, 40)], [(0, 3, [1, 1, 4, 4], {})], categories=((3, "cat"),))
    good = _coco(tmp_path, "good", [(30, 40)], [(0, 3, [1, 1, 4, 4], {})])
    dm = CocoDetectionDataModule(train=good, val=val)
    with pytest.raises(ValueError, match=r"val.json has categories \['cat'\], the training data \['dog', 'cat'\]"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"no test split: set data.init_args.test"):
        dm.setup("test")
