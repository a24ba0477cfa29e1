"""attnzoo CrossViT: feature_info and branch shapes, the multi-scale block against its explicit composition
(float64), timm ``crossvit_tiny_240`` weights -> the same logits and gradients, the branch attention by name,
image-size and argument errors."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm

import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models)
from attnzoo.zoo.convert import load_converted
from attnzoo.zoo.crossvit import CrossVit, MultiScaleBlock, crossvit_rules
from tests.blocks.helpers import assert_matches_formula, randomize
from tests.kernels.helpers import rel_err
from tests.zoo.helpers import run_against_float64


@pytest.mark.parametrize(("name", "channels", "reductions"), [
    ("attnzoo_crossvit_tiny", (96,) * 3 + (192,) * 3, (12,) * 3 + (16,) * 3),
    ("attnzoo_crossvit_small", (192,) * 3 + (384,) * 3, (12,) * 3 + (16,) * 3),
])
def test_feature_info_is_branch_major(name, channels, reductions):
    model = timm.create_model(name, device="meta")
    assert [f["num_chs"] for f in model.feature_info] == list(channels)
    assert [f["reduction"] for f in model.feature_info] == list(reductions)
    assert model.num_features == model.head_hidden_size == channels[0] + channels[-1]


def test_mini_features_intermediates_and_heads():
    torch.manual_seed(0)
    model = timm.create_model("attnzoo_crossvit_mini").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        tokens = model.forward_intermediates(x, indices=[1, -1], output_fmt="NLC", intermediates_only=True)
        features = model.forward_features(x)
        logits, pooled = model(x), model.forward_head(features, pre_logits=True)
    # patch maps of branch 0 (patch 4: 7x7) after blocks 0, 1, then branch 1 (patch 7: 4x4)
    assert [m.shape for m in maps] == [(2, 32, 7, 7)] * 2 + [(2, 64, 4, 4)] * 2
    assert [t.shape for t in tokens] == [(2, 49, 32), (2, 16, 64)]
    torch.testing.assert_close(tokens[1], maps[3].flatten(2).transpose(1, 2))
    torch.testing.assert_close(final, features)
    assert features.shape == (2, 1, 1, 96) and pooled.shape == (2, 96) and logits.shape == (2, 10)
    # the logits: the mean of each branch head on its class token (the 32 + 64 channels of the features)
    heads = model.get_classifier()
    torch.testing.assert_close(logits, (heads[0](pooled[:, :32]) + heads[1](pooled[:, 32:])) / 2)
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).shape == (2, 1, 1, 96)


def _ln(p, name, x):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], 1e-6)


def _attention(q, k, v, heads):
    """q (B, N, C), k / v (B, M, C) float64 -> softmax multi-head attention (B, N, C)."""
    B, N, C = q.shape
    q, k, v = (t.reshape(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    scores = torch.softmax(q @ k.transpose(-1, -2) * (C // heads) ** -0.5, dim=-1)
    return (scores @ v).transpose(1, 2).reshape(B, N, C)


def _vit_block(p, name, x, heads):
    qkv = F.linear(_ln(p, f"{name}.norm1", x), p[f"{name}.attn.qkv.weight"], p[f"{name}.attn.qkv.bias"])
    q, k, v = qkv.chunk(3, dim=-1)
    x = x + F.linear(_attention(q, k, v, heads), p[f"{name}.attn.proj.weight"], p[f"{name}.attn.proj.bias"])
    h = F.gelu(F.linear(_ln(p, f"{name}.norm2", x), p[f"{name}.mlp.fc1.weight"], p[f"{name}.mlp.fc1.bias"]))
    return x + F.linear(h, p[f"{name}.mlp.fc2.weight"], p[f"{name}.mlp.fc2.bias"])


def _multiscale_block(p, xs, depths, heads):
    """CrossViT's MultiScaleBlock written out (timm's formula): branch ViT blocks, then branch i's class token,
    projected (LN, GELU, linear) to branch j = i + 1's width, attends to itself + branch j's patches (pre-norm
    cross attention with branch j's heads, residual) and is projected back."""
    xs = list(xs)
    for b, depth in enumerate(depths):
        for j in range(depth):
            xs[b] = _vit_block(p, f"blocks.{b}.{j}", xs[b], heads[b])
    outs = []
    for i in range(len(xs)):
        j = (i + 1) % len(xs)

        def proj(name, t):
            return F.linear(F.gelu(_ln(p, f"{name}.0", t)), p[f"{name}.2.weight"], p[f"{name}.2.bias"])

        cls = proj(f"projs.{i}", xs[i][:, :1])
        tokens = _ln(p, f"fusion.{i}.norm1", torch.cat([cls, xs[j][:, 1:]], dim=1))
        a = f"fusion.{i}.attn"
        q = F.linear(tokens[:, :1], p[f"{a}.q.weight"], p[f"{a}.q.bias"])
        k, v = F.linear(tokens, p[f"{a}.kv.weight"], p[f"{a}.kv.bias"]).chunk(2, dim=-1)
        cls = cls + F.linear(_attention(q, k, v, heads[j]), p[f"{a}.proj.weight"], p[f"{a}.proj.bias"])
        outs.append(torch.cat([proj(f"revert_projs.{i}", cls), xs[i][:, 1:]], dim=1))
    return torch.cat([t.flatten(1) for t in outs], dim=1)


def test_multiscale_block_matches_explicit_composition():
    torch.manual_seed(0)
    depths, heads = (1, 2), (2, 4)
    blk = randomize(MultiScaleBlock((8, 16), heads, depths, ((3, 3), (2, 2)), (2.0, 2.0), (0.0, 0.0), "softmax", {},
                                    True, 0.0, LayerNorm, None))
    xs = [torch.randn(2, 1 + 9, 8), torch.randn(2, 1 + 4, 16)]

    def both(a, b):
        return torch.cat([t.flatten(1) for t in blk([a, b])], dim=1)

    assert_matches_formula(both, xs, lambda p, a, b: _multiscale_block(p, [a, b], depths, heads),
                           params=dict(blk.named_parameters()))


NARROW_TIMM = dict(embed_dim=(24, 48), depth=((1, 2, 0),))  # timm's depth: (branch 0, branch 1, fusion 0 = one)
NARROW = dict(embed_dim=(24, 48), depth=((1, 2),))


def _narrow_timm_crossvit_tiny(**kwargs):
    """timm's crossvit_tiny_240 at 24 / 48 channels, one multi-scale block of 1 + 2 blocks (random init; biases and
    norms perturbed so every term shows)."""
    torch.manual_seed(0)
    ref = timm.create_model("crossvit_tiny_240", **NARROW_TIMM, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return ref


def test_timm_crossvit_tiny_240_checkpoint_gives_the_same_logits(tmp_path):
    """timm's crossvit_tiny_240 layout (its branch 1 sees the image resized to 224 px) saved to a file and loaded
    through ``create_model`` with the same ``img_scale``: the logits of timm's model run in float64."""
    ref = _narrow_timm_crossvit_tiny()
    path = tmp_path / "crossvit_tiny_240.pth"
    torch.save(ref.state_dict(), path)
    model = timm.create_model("attnzoo_crossvit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              img_scale=(1.0, 224 / 240), **NARROW).eval()
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        expected = ref.double().eval()(x.double())
        assert rel_err(model(x), expected) <= 1e-5
        # guard: the comparison sees the fusion (its keys and values swapped move the logits)
        for blk in model.blocks:
            for fusion in blk.fusion:
                fusion.attn.kv.weight.copy_(fusion.attn.kv.weight.roll(fusion.attn.dim, 0))
        assert rel_err(model(x), expected) > 1e-2


def test_timm_crossvit_same_logits_and_gradients_float64():
    """Every parameter's gradient against timm's model run in float64, both models at ``img_scale=(1, 1)`` (the
    zoo's default): the resize is a parameter-free op on the input, and its float32 rounding alone moves the large-patch
    conv's weight gradient by ~1e-5 relative in timm's own float32 model."""
    ref = _narrow_timm_crossvit_tiny(img_scale=(1.0, 1.0))
    model = timm.create_model("attnzoo_crossvit_tiny", **NARROW)
    report = load_converted(model, ref.state_dict())
    assert report.new == report.dropped == () and all(".fusion." in k for k in report.adapted)
    out, expected, grads, ref_grads = run_against_float64(model, ref, torch.randn(2, 3, 240, 240))
    assert rel_err(out, expected) <= 1e-5
    ref_grads, _ = crossvit_rules(ref_grads, model)  # timm's names and wk / wv rows -> ours, like the weights
    assert grads.keys() == ref_grads.keys()
    errors = {n: rel_err(grads[n], ref_grads[n]) for n in grads}
    assert max(errors.values()) <= 1e-5, errors


def test_branch_attention_by_name():
    torch.manual_seed(0)
    dense = timm.create_model("attnzoo_crossvit_mini")
    na = timm.create_model("attnzoo_crossvit_mini", attn="na", attn_kwargs=dict(kernel_size=3)).eval()
    na.load_state_dict(dense.state_dict(), strict=True)  # the same weights layout for every attention
    assert na.attn_name == "na + cross" and dense.attn_name == "softmax + cross"
    with torch.no_grad():
        assert na(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bad_image_sizes_name_the_accepted_ones():
    model = timm.create_model("attnzoo_crossvit_mini", device="meta")
    features = timm.create_model("attnzoo_crossvit_mini", features_only=True, device="meta")
    x = torch.randn(1, 1, 32, 28, device="meta")
    for forward in (model, model.forward_features, features):
        with pytest.raises(ValueError, match=r"a 32x28 image does not fit this CrossViT .*accepted image size: 28x28 "
                                             r"only"):
            forward(x)
    with pytest.raises(ValueError, match=r"img_size=\(30, 30\) with img_scale=\(1.0, 1.0\) gives branch 0 a 30x30 "
                                         r"image, not a positive multiple of its patch_size=4; accepted img_size: "
                                         r"height and width multiples of 28"):
        timm.create_model("attnzoo_crossvit_mini", img_size=30, device="meta")
    with pytest.raises(ValueError, match=r"gives branch 1 a 210x210 image.* multiple of its patch_size=16; accepted "
                                         r"img_size: sides whose int\(side \* 0.875\) is a positive multiple of 16"):
        CrossVit(img_scale=(1.0, 0.875), device="meta")
    # a local branch attention that cannot run on a branch's patch grid: the image sizes it accepts
    with pytest.raises(ValueError, match=r"img_size=\(28, 28\) gives a 7x7 token grid at stride 4, on which "
                                         r"attn='halo' cannot run; accepted img_size: height a multiple of 12"):
        timm.create_model("attnzoo_crossvit_mini", attn="halo", attn_kwargs=dict(block_size=3, halo_size=1),
                          device="meta")


def test_bad_arguments_name_the_accepted_values():
    with pytest.raises(ValueError, match=r"global_pool='avg' is not supported; expected one of \('token', ''\)"):
        CrossVit(global_pool="avg", device="meta")
    with pytest.raises(ValueError, match=r"depth=\(\(1, 4, 0\),\) must give, per multi-scale block, 2 branch depths "
                                         r">= 1"):
        CrossVit(depth=((1, 4, 0),), device="meta")
    model = timm.create_model("attnzoo_crossvit_mini", device="meta")
    with pytest.raises(ValueError, match=r"global_pool='max' is not supported"):
        model.reset_classifier(10, "max")
