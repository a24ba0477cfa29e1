"""attnzoo_vit_*: the token attentions against a masked dense float64 formula, the timm model API per attention,
and the errors for attentions / image sizes / options the model cannot take."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import attnzoo  # noqa: F401
from attnzoo.blocks.factory import ATTENTIONS as FACTORY_ATTENTIONS
from attnzoo.zoo.vit import VisionTransformer
from tests.kernels.helpers import leaf64, rel_err

GRID = 8  # 32 px images, 4 px patches
ATTENTIONS = {
    "softmax": {},
    "sigmoid": {},
    "na": dict(kernel_size=3, rel_pos_bias=True),
    "halo": dict(block_size=4, halo_size=1),
}


def small_vit(attn: str, **kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    return VisionTransformer(**{**args, "attn": attn, "attn_kwargs": ATTENTIONS.get(attn, {}), **kwargs})


def _visible(attn: str, options: dict) -> torch.Tensor:
    """(N, N) bool over [class token, row-major 8x8 patches]: which keys each query sees (brute force)."""
    n = 1 + GRID * GRID
    visible = torch.ones(n, n, dtype=torch.bool)
    if attn in ("softmax", "sigmoid"):
        return visible
    pos = [(i // GRID, i % GRID) for i in range(GRID * GRID)]
    for qi, (qx, qy) in enumerate(pos):
        for ki, (kx, ky) in enumerate(pos):
            if attn == "na":  # NATTEN window: start clamp(j - k//2, 0, L - k), k keys per axis
                k = options["kernel_size"]
                sx, sy = (min(max(j - k // 2, 0), GRID - k) for j in (qx, qy))
                seen = sx <= kx < sx + k and sy <= ky < sy + k
            else:  # halo (mask mode): the block's window grown by the halo, clipped to the grid
                b, h = options["block_size"], options["halo_size"]
                seen = all(j // b * b - h <= t < j // b * b + b + h for j, t in ((qx, kx), (qy, ky)))
            visible[1 + qi, 1 + ki] = seen
    if attn == "halo":
        visible[1:, 0] = False  # patches do not see the class token under halo attention
    return visible


def _rpb_bias(rpb: torch.Tensor, k: int) -> torch.Tensor:
    """(H, N, N) logit bias of NAT's table at (key - query + k - 1) per axis; 0 on the class-token row/column."""
    bias = torch.zeros(rpb.shape[0], 1 + GRID * GRID, 1 + GRID * GRID, dtype=rpb.dtype)
    for qi in range(GRID * GRID):
        for ki in range(GRID * GRID):
            dx, dy = ki // GRID - qi // GRID + k - 1, ki % GRID - qi % GRID + k - 1
            if 0 <= dx < 2 * k - 1 and 0 <= dy < 2 * k - 1:
                bias[:, 1 + qi, 1 + ki] = rpb[:, dx, dy]
    return bias


def _dense_reference(attn: str, params: dict, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The block's output from its weights by the dense formula: scores masked to the visible keys."""
    B, N, C = x.shape
    D = C // num_heads
    qkv = x @ params["qkv.weight"].T + params["qkv.bias"]
    q, k, v = qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) * D**-0.5
    if "rpb" in params:
        s = s + _rpb_bias(params["rpb"], ATTENTIONS[attn]["kernel_size"])
    if attn == "sigmoid":
        p = torch.sigmoid(s - torch.log(torch.tensor(float(N), dtype=s.dtype)))
    else:
        p = s.masked_fill(~_visible(attn, ATTENTIONS[attn]), float("-inf")).softmax(-1)
    out = (p @ v).transpose(1, 2).reshape(B, N, C)
    return out @ params["proj.weight"].T + params["proj.bias"]


@pytest.mark.parametrize("attn", list(ATTENTIONS))
def test_token_attention_matches_masked_dense_float64(attn):
    blk = small_vit(attn).blocks[0].attn
    if attn == "na":
        torch.nn.init.normal_(blk.rpb, std=0.5)  # large enough to matter
    x = torch.randn(2, 1 + GRID * GRID, 32, requires_grad=True)
    out = blk(x)
    params = {n: leaf64(p) for n, p in blk.named_parameters()}
    x64 = leaf64(x)
    ref = _dense_reference(attn, params, x64, blk.num_heads)
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn_like(out)
    names = ["x", *params]
    grads = torch.autograd.grad(out, [x, *blk.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x64, *params.values()], g.double())
    errors = {n: rel_err(a, b) for n, a, b in zip(names, grads, ref_grads, strict=True)}
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("attn", list(ATTENTIONS))
def test_model_api_per_attention(attn):
    model = small_vit(attn).eval()  # two blocks
    x = torch.randn(2, 1, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1, 1 + GRID * GRID, 32)  # NHWC 1 x N strip
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape for t in inter] == [(2, 32, GRID, GRID)] * 2
    tokens = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(tokens[0], inter[-1].flatten(2).transpose(1, 2))
    logits = model(x)
    torch.testing.assert_close(logits, model.forward_head(feats))
    torch._dynamo.reset()  # a fresh cache: the other attentions' compiles of this class are not recompiles
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), logits, rtol=1e-5, atol=1e-6)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), logits)


@pytest.mark.parametrize("attn", list(FACTORY_ATTENTIONS))
def test_fx_feature_extraction_per_attention(attn):
    """timm's FX feature extraction (its battery's forward_fx test) traces the model under every attention; the
    blocks that check shapes eagerly are FX leaves."""
    model = small_vit(attn).eval()
    x = torch.randn(2, 1, 32, 32)
    _, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    out = next(iter(fx_model(x).values()))
    torch.testing.assert_close(out, model(x))


def test_pooling_and_classifier_reset():
    model = small_vit("softmax", class_token=False, global_pool="avg").eval()
    x = torch.randn(2, 1, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1, GRID * GRID, 32)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), model.fc_norm(feats[:, 0].mean(1)))
    model.reset_classifier(0, "")
    assert model(x).shape == feats.shape
    model.reset_classifier(3)
    assert model.global_pool == "" and model.head.out_features == 3


def test_prune_keeps_the_taken_blocks():
    model = small_vit("na", depth=3)
    x = torch.randn(1, 1, 32, 32)
    expected = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.blocks) == 2 and model.num_classes == 0
    torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True), expected)


def test_unknown_attention_lists_the_choices():
    with pytest.raises(ValueError, match=r"attn='nope' is not a registered attention; accepted values: \[.*'halo'.*"
                                         r"'na'.*'sigmoid'.*'softmax'"):
        timm.create_model("attnzoo_vit_tiny_patch4_28", attn="nope")


@pytest.mark.parametrize(("attn", "options", "accepted"), [
    ("halo", dict(block_size=7), r"height a multiple of 28, width a multiple of 28"),
    ("na", dict(kernel_size=9), r"height >= 36, width >= 36"),
    ("na", dict(kernel_size=3, dilation=3), r"height >= 36, width >= 36"),
])
def test_image_size_the_attention_cannot_take(attn, options, accepted):
    match = rf"img_size=\(32, 32\) gives a 8x8 token grid at stride 4, on which attn='{attn}' cannot run; " \
            rf"accepted img_size: {accepted} \(pixels\)"
    with pytest.raises(ValueError, match=match):
        timm.create_model("attnzoo_vit_tiny_patch4_28", img_size=32, attn=attn, attn_kwargs=options)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"img_size=\(30, 30\) must be positive multiples of patch_size=4"):
        timm.create_model("attnzoo_vit_tiny_patch4_28", img_size=30)
    with pytest.raises(ValueError, match=r"global_pool='max' is not supported; expected one of \('', 'token', 'avg'\)"):
        timm.create_model("attnzoo_vit_tiny_patch4_28", global_pool="max")
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True"):
        timm.create_model("attnzoo_vit_tiny_patch4_28", class_token=False)
    with pytest.raises(TypeError, match="kernel_size"):  # an option the dense attention does not take
        timm.create_model("attnzoo_vit_tiny_patch4_28", attn_kwargs=dict(kernel_size=3))
    model = timm.create_model("attnzoo_vit_tiny_patch4_28")
    with pytest.raises(ValueError, match=r"output_fmt='NHWC' is not supported; expected one of \('NCHW', 'NLC'\)"):
        model.forward_intermediates(torch.randn(1, 1, 28, 28), output_fmt="NHWC")
