"""attnzoo DaViT: stage shapes and feature_info, window attention against strided neighborhood attention, both block
halves against their explicit composition (float64), timm ``davit_tiny`` weights -> the same logits and gradients,
image-size and argument errors."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models)
from attnzoo.kernels.neighborhood import na2d
from attnzoo.zoo.davit import DaVit, DaVitBlock, WindowAttention2d, davit_rules
from tests.blocks.helpers import assert_matches_formula, randomize
from tests.kernels.helpers import rel_err
from tests.zoo.helpers import run_against_float64

# name -> (reductions, channels, heads, blocks per stage); mini runs for real, the others on the meta device
MODELS = {
    "attnzoo_davit_mini": ((2, 4, 8), (32, 64, 128), (1, 2, 4), (1, 2, 1)),
    "attnzoo_davit_tiny": ((4, 8, 16, 32), (96, 192, 384, 768), (3, 6, 12, 24), (1, 1, 3, 1)),
    "attnzoo_davit_small": ((4, 8, 16, 32), (96, 192, 384, 768), (3, 6, 12, 24), (1, 1, 9, 1)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_feature_info_heads_and_block_composition(name):
    reductions, channels, heads, depths = MODELS[name]
    model = timm.create_model(name, device="meta")
    assert [f["reduction"] for f in model.feature_info] == list(reductions)
    assert [f["num_chs"] for f in model.feature_info] == list(channels)
    assert [len(s.blocks) for s in model.stages] == list(depths)
    for stage, h in zip(model.stages, heads, strict=True):
        assert all([half.mixer for half in block] == ["window", "channel"] for block in stage.blocks)
        assert {half.attn.num_heads for block in stage.blocks for half in block} == {h}


@pytest.mark.parametrize("spatial", ["window", "na"])
def test_mini_stage_shapes_on_odd_sizes(spatial):
    torch.manual_seed(0)
    model = timm.create_model("attnzoo_davit_mini", spatial=spatial).eval()
    H, W = 29, 45  # odd, not multiples of the strides or windows: every map is ceil(side / reduction)
    x = torch.randn(2, 1, H, W)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        logits = model.forward_head(final)
    for r, c, feat in zip(*MODELS["attnzoo_davit_mini"][:2], intermediates, strict=True):
        assert feat.shape == (2, c, math.ceil(H / r), math.ceil(W / r))
    assert final.shape == intermediates[-1].shape and logits.shape == (2, 10)
    assert model.attn_name == f"{spatial} + channel"
    # both spatial attentions share the qkv / proj layout: a checkpoint moves between them unchanged
    other = timm.create_model("attnzoo_davit_mini", spatial="na" if spatial == "window" else "window")
    other.load_state_dict(model.state_dict(), strict=True)


def _window_attention(p, x, num_heads, window):
    """x (B, H, W, C) float64 -> qkv -> strided neighborhood attention (kernel = stride = window, reference) -> proj."""
    B, H, W, C = x.shape
    qkv = F.linear(x, p["qkv.weight"], p["qkv.bias"]).reshape(B, H, W, 3, num_heads, C // num_heads)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)
    out = na2d(q, k, v, window, 1, window, backend="reference")
    return F.linear(out.movedim(1, -2).reshape(B, H, W, C), p["proj.weight"], p["proj.bias"])


def test_window_attention_is_strided_neighborhood_attention():
    """On a 10x8 map with 4x3 windows (neither side a multiple): the last window of each axis is shifted inward."""
    torch.manual_seed(0)
    attn = randomize(WindowAttention2d(12, 3, (4, 3)))
    assert_matches_formula(attn, [torch.randn(2, 10, 8, 12)], lambda p, x: _window_attention(p, x, 3, (4, 3)))


def _channel_attention(p, x, num_heads):
    """x (B, H, W, C) float64: per head, the D channels attend to each other over the N = H·W tokens."""
    B, H, W, C = x.shape
    qkv = F.linear(x.reshape(B, H * W, C), p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v = qkv.reshape(B, H * W, 3, num_heads, C // num_heads).permute(2, 0, 3, 4, 1)  # (B, heads, D, N) each
    scores = torch.softmax(p["attn.temperature"] * q @ k.transpose(-1, -2), dim=-1)  # (B, heads, D, D)
    out = (scores @ v).permute(0, 3, 1, 2).reshape(B, H, W, C)
    return F.linear(out, p["attn.proj.weight"], p["attn.proj.bias"])


def _block(p, x, mixer, num_heads, window):
    """A DaViT half written out: cpe -> LayerNorm -> attention -> residual, cpe -> LayerNorm -> MLP -> residual."""
    C = x.shape[-1]

    def cpe(name, t):
        conv = F.conv2d(t.permute(0, 3, 1, 2), p[f"{name}.proj.weight"], p[f"{name}.proj.bias"], padding=1, groups=C)
        return t + conv.permute(0, 2, 3, 1)

    def norm(name, t):
        return F.layer_norm(t, (C,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

    x = cpe("cpe1", x)
    if mixer == "channel":
        x = x + _channel_attention(p, norm("norm1", x), num_heads)
    else:
        attn = {k.removeprefix("attn."): v for k, v in p.items() if k.startswith("attn.")}
        x = x + _window_attention(attn, norm("norm1", x), num_heads, window)
    x = cpe("cpe2", x)
    h = F.gelu(F.linear(norm("norm2", x), p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
    return x + F.linear(h, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


@pytest.mark.parametrize("mixer", ["window", "channel"])
def test_block_halves_match_explicit_composition(mixer):
    torch.manual_seed(0)
    blk = randomize(DaVitBlock(16, 2, mixer, window_size=3, mlp_ratio=2.0))
    x = torch.randn(2, 7, 5, 16)  # 7x5 map: 3x3 windows shifted at both far borders
    assert_matches_formula(blk, [x], lambda p, t: _block(p, t, mixer, 2, 3))


def test_timm_davit_checkpoint_same_logits_and_gradients_float64(tmp_path):
    """A narrow timm davit_tiny (16-128 channels, 2x2 windows on a 64 px image: maps 16, 8, 4, 2; biases and norms
    perturbed so every term shows) saved to a file and loaded through ``create_model``: logits and every parameter's
    gradient against timm's model run in float64."""
    torch.manual_seed(0)
    narrow = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), window_size=2)
    ref = timm.create_model("davit_tiny", **narrow)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "davit_tiny.pth"
    torch.save(ref.state_dict(), path)
    model = timm.create_model("attnzoo_davit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **narrow)
    channel_qkv = [f"stages.{i}.blocks.{j}.1.attn.qkv.{t}" for i, d in enumerate((1, 1, 3, 1)) for j in range(d)
                   for t in ("weight", "bias")]
    assert sorted(davit_rules(ref.state_dict(), model)[1]) == sorted(channel_qkv)
    x = torch.randn(2, 3, 64, 64)
    out, expected, grads, ref_grads = run_against_float64(model, ref, x)
    assert rel_err(out, expected) <= 1e-5
    assert set(grads) - set(ref_grads) == {f"stages.{i}.blocks.{j}.1.attn.temperature" for i, d in
                                           enumerate((1, 1, 3, 1)) for j in range(d)}

    def timm_order(name, grad):  # a channel attention's qkv rows are timm's [q | k | v] as [k | v | q]
        if ".1.attn.qkv." not in name:
            return grad
        k, v, q = grad.chunk(3)
        return torch.cat([q, k, v])

    errors = {n: rel_err(timm_order(n, grads[n]), ref_grads[n]) for n in ref_grads}
    assert max(errors.values()) <= 1e-5, errors
    with torch.no_grad():  # guard: the comparison sees the channel attentions' layout (timm's rows unconverted)
        model.load_state_dict({**model.state_dict(), **torch.load(path)})
        assert rel_err(model(x), expected) > 1e-2


@pytest.mark.parametrize(
    ("name", "size", "match"),
    [
        ("attnzoo_davit_mini", (24, 30), r"24x30 image is too small for this DaViT model \(window attention with "
                                         r"window_size 7 at stride 2, 7 at stride 4, 4 at stride 8\); accepted image "
                                         r"sizes: height >= 25, width >= 25"),
        ("attnzoo_davit_tiny", (224, 192), r"224x192 .*accepted image sizes: height >= 193, width >= 193"),
    ],
)
def test_bad_image_size_names_accepted_sizes(name, size, match):
    model = timm.create_model(name, device="meta")  # the check runs before any arithmetic
    features = timm.create_model(name, features_only=True, device="meta")
    x = torch.randn(1, model.in_chans, *size, device="meta")
    for forward in (model, model.forward_features, features):
        with pytest.raises(ValueError, match=match):
            forward(x)
    # the smallest accepted image runs
    side = model.min_image_side
    assert model(torch.randn(1, model.in_chans, side, side, device="meta")).shape == (1, model.num_classes)


def test_bad_arguments_name_the_accepted_values():
    with pytest.raises(ValueError, match=r"spatial='swin' is not supported; expected one of \('window', 'na'\)"):
        DaVit(spatial="swin")
    with pytest.raises(ValueError, match=r"down_kernel_size=4 is not supported; expected one of \(2, 3\)"):
        DaVit(down_kernel_size=4, device="meta")
    with pytest.raises(ValueError, match=r"window_size=\(7, 7\) must give one entry per stage"):
        DaVit(window_size=(7, 7), device="meta")
    with pytest.raises(ValueError, match=r"a 3x8 map is smaller than window_size=\(4, 4\); accepted maps: "
                                         r"height >= 4, width >= 4"):
        WindowAttention2d(8, 2, 4)(torch.randn(1, 3, 8, 8))
