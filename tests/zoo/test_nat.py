"""attnzoo NAT / DiNAT: stage shapes and feature_info, the NAT block against its explicit composition (float64),
DiNAT's dilation schedule, image-size errors, backends, and the model-specific parts of timm's contract."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models)
from attnzoo.kernels.neighborhood import na2d
from attnzoo.zoo.nat import NatBlock, dinat_dilations
from tests.kernels.helpers import rel_err

# name -> (reductions, channels, heads per stage); mini at 28 px runs for real, the others on the meta device
MODELS = {
    "attnzoo_nat_mini": ((2, 4, 8), (32, 64, 128), (1, 2, 4)),
    "attnzoo_dinat_mini": ((2, 4, 8), (32, 64, 128), (1, 2, 4)),
    "attnzoo_nat_tiny": ((4, 8, 16, 32), (64, 128, 256, 512), (2, 4, 8, 16)),
    "attnzoo_dinat_tiny": ((4, 8, 16, 32), (64, 128, 256, 512), (2, 4, 8, 16)),
    "attnzoo_nat_small": ((4, 8, 16, 32), (96, 192, 384, 768), (3, 6, 12, 24)),
    "attnzoo_dinat_small": ((4, 8, 16, 32), (96, 192, 384, 768), (3, 6, 12, 24)),
}


def _create(name: str, **kwargs):
    device = "cpu" if "mini" in name else "meta"
    return timm.create_model(name, device=device, **kwargs).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_feature_info_and_heads(name):
    reductions, channels, heads = MODELS[name]
    model = _create(name)
    assert [f["reduction"] for f in model.feature_info] == list(reductions)
    assert [f["num_chs"] for f in model.feature_info] == list(channels)
    assert [s.blocks[0].attn.num_heads for s in model.stages] == list(heads)


@pytest.mark.parametrize("name", ["attnzoo_nat_mini", "attnzoo_dinat_mini", "attnzoo_nat_tiny", "attnzoo_dinat_tiny"])
def test_stage_shapes(name):
    reductions, channels, _ = MODELS[name]
    model = _create(name)
    chans, side = model.pretrained_cfg["input_size"][0], model.pretrained_cfg["input_size"][1]
    H, W = side, side + 13  # non-square, not a multiple of the strides: every map is ceil(side / reduction)
    x = torch.randn(1, chans, H, W, device=next(model.parameters()).device)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        nhwc = model.forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)
        logits = model.forward_head(final)
    for r, c, feat in zip(reductions, channels, intermediates, strict=True):
        assert feat.shape == (1, c, math.ceil(H / r), math.ceil(W / r))
    last = (1, math.ceil(H / reductions[-1]), math.ceil(W / reductions[-1]), channels[-1])
    assert final.shape == nhwc[0].shape == last  # forward_features' layout: channels-last
    assert logits.shape == (1, model.num_classes)


def _manual_block(blk: NatBlock, x: torch.Tensor) -> torch.Tensor:
    """NatBlock written out in float64: LayerNorm -> qkv -> na2d (reference) with rpb -> proj -> layer scale ->
    residual, then LayerNorm -> fc1 -> GELU -> fc2 -> layer scale -> residual."""
    p = {name: t.double() for name, t in blk.named_parameters()}
    attn, C = blk.attn, x.shape[-1]
    h = F.layer_norm(x, (C,), p["norm1.weight"], p["norm1.bias"], blk.norm1.eps)
    qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).unflatten(-1, (3, attn.num_heads, attn.head_dim))
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)  # (3, B, heads, X, Y, D)
    out = na2d(q, k, v, attn.kernel_size, attn.dilation, rpb=p["attn.rpb"], backend="reference")
    out = F.linear(out.movedim(1, -2).flatten(-2), p["attn.proj.weight"], p["attn.proj.bias"])
    x = x + p["ls1.gamma"] * out
    h = F.layer_norm(x, (C,), p["norm2.weight"], p["norm2.bias"], blk.norm2.eps)
    h = F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return x + p["ls2.gamma"] * h


def test_block_matches_explicit_composition():
    torch.manual_seed(0)
    blk = NatBlock(32, 4, kernel_size=5, dilation=(2, 1), mlp_ratio=2.0, layer_scale_init_value=0.5)
    with torch.no_grad():  # visible, distinct layer scales, norms and biases
        for p in blk.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 11, 10, 32, requires_grad=True)  # 11 x 10 map: kernel 5 x dilation 2 fits the height
    x64 = x.detach().double().requires_grad_()
    g = torch.randn(2, 11, 10, 32)
    out, ref = blk(x), _manual_block(blk, x64)
    assert rel_err(out, ref) <= 1e-5
    params = dict(blk.named_parameters())
    grads = torch.autograd.grad((out * g).sum(), [x, *params.values()])
    # the float64 composition reads the same fp32 parameters (through .double()), so it differentiates them too
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), [x64, *params.values()])
    for name, got, want in zip(["x", *params], grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-5, name


def test_dinat_dilation_schedule():
    # DiNAT-Tiny at 224 px (its paper's configuration): local and dilated blocks alternate, dilation map // 7
    schedule = dinat_dilations((3, 4, 18, 5), 7, 224)
    assert [[d[0] for d in stage] for stage in schedule] == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    assert all(d[0] == d[1] for stage in schedule for d in stage)
    # per axis on non-square images; larger images dilate more (384 px: 13, 6, 3, 1)
    assert dinat_dilations((2, 2), 7, (224, 448))[0][1] == (8, 16)
    assert [s[1][0] for s in dinat_dilations((2, 2, 2, 2), 7, 384)] == [13, 6, 3, 1]
    # clamped to the map: kernel * dilation never exceeds a stage's map, at any image size
    kernels = (7, 7, 4)
    for size in (28, 100, 193, 250, 517):
        for i, stage in enumerate(dinat_dilations((2, 2, 2), kernels, size, stem_stride=2)):
            extent = math.ceil(size / (2 * 2**i))
            assert all(kernels[i] * max(d) <= extent for d in stage), (size, i)
    with pytest.raises(ValueError, match=r"img_size=\(20, 20\) gives a 5x5 map at stride 4.*accepted img_size: "
                                         r"height and width >= 25"):
        dinat_dilations((2, 2, 2), (7, 7, 4), 20, stem_stride=2)


def test_dinat_models_use_the_schedule_for_img_size():
    model = _create("attnzoo_dinat_mini")
    assert [[b.attn.dilation for b in s.blocks] for s in model.stages] == [[(1, 1), (2, 2)], [(1, 1)] * 2, [(1, 1)] * 2]
    assert model.attn_name == "dilated na" and _create("attnzoo_nat_mini").attn_name == "na"
    model = _create("attnzoo_dinat_tiny", img_size=(384, 224))
    assert [s.blocks[1].attn.dilation for s in model.stages] == [(13, 8), (6, 4), (3, 2), (1, 1)]
    assert all(b.attn.dilation == (1, 1) for s in model.stages for b in s.blocks[::2])


@pytest.mark.parametrize(
    "name, kwargs, size, match",
    [
        ("attnzoo_nat_mini", {}, (24, 28), r"24x28 .*7x7 at stride 2, 7x7 at stride 4, 4x4 at stride 8.*"
                                           r"accepted image sizes: height >= 25, width >= 25$"),
        ("attnzoo_dinat_mini", {}, (28, 26), r"14x14 at stride 2.*height >= 27, width >= 27; the dilations were "
                                             r"derived from img_size"),
        ("attnzoo_nat_tiny", {}, (224, 192), r"224x192 .*height >= 193, width >= 193$"),
        ("attnzoo_dinat_tiny", {}, (220, 224), r"56x56 at stride 4.*height >= 221, width >= 221"),
        ("attnzoo_dinat_tiny", {"img_size": (200, 256)}, (192, 256), r"height >= 193, width >= 249"),
    ],
)
def test_bad_image_size_names_accepted_sizes(name, kwargs, size, match):
    model = _create(name, **kwargs)
    x = torch.randn(1, model.in_chans, *size, device=next(model.parameters()).device)
    for forward in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError, match=match):
            forward(x)


def test_smallest_accepted_image_runs():
    with torch.no_grad():
        assert _create("attnzoo_nat_mini")(torch.randn(1, 1, 25, 25)).shape == (1, 10)


def test_torch_backend_matches_reference_with_gradients():
    torch.manual_seed(0)
    model = timm.create_model("attnzoo_dinat_mini", attn_backend="torch")
    oracle = timm.create_model("attnzoo_dinat_mini", attn_backend="reference")
    oracle.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 28, 28)
    out, ref = model(x), oracle(x)
    assert rel_err(out, ref) <= 1e-5
    out.square().sum().backward()
    ref.square().sum().backward()
    expected = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert rel_err(p.grad, expected[name].grad) <= 1e-4, name


def test_attn_backend_reaches_every_block():
    # The Triton backend is not run on a whole model here: under the CPU interpreter NAT-Mini alone takes ~15 s.
    # tests/kernels and tests/blocks check the NA kernel and block on Triton; this checks the model's plumbing.
    model = _create("attnzoo_nat_tiny", attn_backend="triton")
    assert {b.attn.backend for s in model.stages for b in s.blocks} == {"triton"}


def test_layer_scale_and_drop_path():
    blocks = [b for s in _create("attnzoo_nat_small", drop_path_rate=0.3).stages for b in s.blocks]
    assert all(b.ls1.init_values == b.ls2.init_values == 1e-5 and b.ls1.gamma.shape == b.norm1.weight.shape
               for b in blocks)
    probs = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]  # the first block's is 0: an Identity
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.3) and probs == sorted(probs)
    assert isinstance(_create("attnzoo_nat_tiny").stages[0].blocks[0].ls1, torch.nn.Identity)  # no layer scale


def test_grad_checkpointing_prune_and_head():
    torch.manual_seed(0)
    model = timm.create_model("attnzoo_nat_mini")
    x = torch.randn(1, 1, 28, 28)
    model(x).square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, expected[name]) <= 1e-6, name

    model.eval()
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        model.prune_intermediate_layers([1])
        assert len(model.stages) == 2 and isinstance(model.norm, torch.nn.Identity)
        assert torch.equal(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], taps[1])
        assert torch.equal(model(x), taps[1].permute(0, 2, 3, 1))  # no head, no pooling: the NHWC tap
        model.reset_classifier(5, "avg")
        assert model(x).shape == (1, 5) and model.get_classifier().in_features == 64


def test_no_weight_decay_and_group_matcher():
    from timm.models._manipulate import group_parameters

    model = _create("attnzoo_dinat_tiny")
    rpb = {name for name, _ in model.named_parameters() if name.endswith("attn.rpb")}
    assert len(rpb) == 30 and model.no_weight_decay() == rpb
    fine = group_parameters(model, model.group_matcher())
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1 and len(fine) == 1 + 30 + 1  # stem, stages or blocks, final norm (+ head)
