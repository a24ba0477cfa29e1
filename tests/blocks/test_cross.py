"""Cross-attention blocks: CrossAttention vs SDPA with the same key-padding mask (forward and every gradient),
fully-padded rows, the zero-init gate, CrossViT fusion vs timm's with copied weights, the attentive pooling
head (formula, variable-length equivalence, shapes), argument and input errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.crossvit import MultiScaleBlock

from attnzoo.blocks import AttentivePoolingHead, CrossAttention, CrossViTFusion
from attnzoo.blocks.cross import timm_crossvit_fusion_state_dict
from tests.blocks.helpers import assert_matches_formula, randomize
from tests.kernels.helpers import rel_err


def random_padding(lengths: list[int], total: int) -> torch.Tensor:
    """(B, total) bool key-padding mask, True past each sample's length."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def cross_attention_formula(num_heads: int, mask: torch.Tensor, qk_norm: bool = False, prefix: str = ""):
    """``[tanh(gate) *] proj(SDPA(q(x), k(ctx), v(ctx), attn_mask=~mask))`` from a parameter dict; kv rows [k | v]."""
    def formula(p, x, ctx):
        B, N, C = x.shape
        D = C // num_heads

        def heads(t):
            return t.reshape(B, -1, num_heads, D).transpose(1, 2)

        q = heads(F.linear(x, p[prefix + "q.weight"], p.get(prefix + "q.bias")))
        k, v = map(heads, F.linear(ctx, p[prefix + "kv.weight"], p.get(prefix + "kv.bias")).chunk(2, dim=-1))
        if qk_norm:
            q = F.layer_norm(q, (D,), p[prefix + "q_norm.weight"], p[prefix + "q_norm.bias"])
            k = F.layer_norm(k, (D,), p[prefix + "k_norm.weight"], p[prefix + "k_norm.bias"])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
        out = F.linear(out.transpose(1, 2).reshape(B, N, C), p[prefix + "proj.weight"], p[prefix + "proj.bias"])
        return torch.tanh(p[prefix + "gate"]) * out if prefix + "gate" in p else out

    return formula


# ---- CrossAttention ----


@pytest.mark.parametrize(
    ("qk_norm", "gate", "qkv_bias"), [(False, False, True), (True, True, True), (False, True, False)])
def test_cross_attention_vs_sdpa_with_mask(qk_norm, gate, qkv_bias):
    torch.manual_seed(0)
    blk = randomize(CrossAttention(32, num_heads=4, kv_dim=24, qkv_bias=qkv_bias, qk_norm=qk_norm, gate=gate))
    assert blk.q.weight.shape == (32, 32) and blk.kv.weight.shape == (64, 24)
    mask = random_padding([9, 4, 1], 9)
    mask[0, 2] = True  # a hole inside the sequence, not only right padding
    x, ctx = torch.randn(3, 5, 32), torch.randn(3, 9, 24)
    assert_matches_formula(lambda x, ctx: blk(x, ctx, mask), [x, ctx], cross_attention_formula(4, mask, qk_norm),
                           params=dict(blk.named_parameters()))


def test_padded_context_tokens_are_ignored():
    torch.manual_seed(0)
    blk = randomize(CrossAttention(16, num_heads=2))
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    mask = random_padding([4, 6], 6)
    changed = ctx.clone()
    changed[0, 4:] = torch.randn(2, 16) * 100
    with torch.no_grad():
        assert torch.equal(blk(x, ctx, mask), blk(x, changed, mask))
        assert rel_err(blk(x[:1], ctx[:1, :4]), blk(x, ctx, mask)[:1]) <= 1e-6  # = the unpadded sequence


def test_fully_padded_rows_give_zero_attention():
    # A query that sees no key gets a zero attention output (SDPA would give NaN): the block returns proj's bias,
    # and no gradient reaches that sample's inputs.
    torch.manual_seed(0)
    blk = randomize(CrossAttention(16, num_heads=2, gate=True))
    x, ctx = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
    mask = random_padding([0, 5], 5)
    out = blk(x, ctx, mask)
    out.square().sum().backward()
    expected = (torch.tanh(blk.gate) * blk.proj.bias).expand(3, 16)
    assert torch.allclose(out[0], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(x.grad[0], torch.zeros(3, 16)) and torch.equal(ctx.grad[0], torch.zeros(5, 16))
    assert x.grad[1].abs().sum() > 0 and ctx.grad[1].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in blk.parameters())


def test_gate_is_zero_at_init():
    torch.manual_seed(0)
    blk = CrossAttention(16, num_heads=2, gate=True)
    assert blk.gate.shape == () and blk.gate.item() == 0.0
    x, ctx = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 5, 16)
    out = blk(x, ctx)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.randn_like(out))
    assert blk.gate.grad.abs() > 0  # d tanh(a)/da = 1 at 0: the gate starts learning at once
    assert x.grad.abs().sum() == 0 and all(p.grad.abs().sum() == 0 for n, p in blk.named_parameters() if n != "gate")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backend_is_forwarded(backend):
    # The oracle and the Triton kernel (the interpreter on CPU) agree with the default path, masks included.
    torch.manual_seed(0)
    blk = CrossAttention(16, num_heads=2, kv_dim=8, qk_norm=True).eval()
    other = CrossAttention(16, num_heads=2, kv_dim=8, qk_norm=True, backend=backend).eval()
    other.load_state_dict(blk.state_dict())
    x, ctx, mask = torch.randn(2, 5, 16), torch.randn(2, 7, 8), random_padding([3, 0], 7)
    with torch.no_grad():
        assert rel_err(other(x, ctx, mask), blk(x, ctx, mask)) <= 1e-5


def test_meta_device():
    blk = CrossAttention(16, num_heads=2, kv_dim=8, qk_norm=True, gate=True, device="meta")
    out = blk(torch.empty(2, 3, 16, device="meta"), torch.empty(2, 7, 8, device="meta"),
              torch.zeros(2, 7, dtype=torch.bool, device="meta"))
    assert out.shape == (2, 3, 16) and out.device.type == "meta"


# ---- CrossViT fusion ----


@pytest.mark.parametrize(("dims", "heads"), [((16, 32), (2, 4)), ((16, 32, 24), (2, 4, 3))])
def test_crossvit_fusion_matches_timm(dims, heads):
    # timm's MultiScaleBlock = per-branch transformer blocks, then the fusion: run its blocks, then ours, in fp32
    # against timm's whole block in float64.
    torch.manual_seed(0)
    n = len(dims)
    ref = randomize(MultiScaleBlock(dims, patches=(4,) * n, depth=(1,) * n + (0,), num_heads=heads,
                                    mlp_ratio=(2.0,) * n, qkv_bias=True, drop_path=[0.0])).double()
    fusion = CrossViTFusion(dims, heads, qkv_bias=True).eval()
    fusion.load_state_dict(timm_crossvit_fusion_state_dict(ref.state_dict()), strict=True)
    blocks = copy.deepcopy(ref.blocks).float()
    xs = [torch.randn(2, 1 + p, d) for p, d in zip((9, 4, 6), dims, strict=False)]
    xs32 = [x.clone().requires_grad_() for x in xs]
    xs64 = [x.double().requires_grad_() for x in xs]
    inner = [blk(x) for blk, x in zip(blocks, xs32, strict=True)]
    outs = fusion(inner)
    refs = ref(xs64)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(refs, [g.double() for g in grads])
    errors = {f"out {i}": rel_err(o, r) for i, (o, r) in enumerate(zip(outs, refs, strict=True))}
    errors |= {f"grad x{i}": rel_err(a.grad, b.grad) for i, (a, b) in enumerate(zip(xs32, xs64, strict=True))}
    ref_grads = timm_crossvit_fusion_state_dict({n: p.grad for n, p in ref.named_parameters()})
    errors |= {f"grad {n}": rel_err(p.grad, ref_grads[n]) for n, p in fusion.named_parameters()}
    assert max(errors.values()) <= 1e-5, errors
    assert all(torch.equal(o[:, 1:], t[:, 1:]) for o, t in zip(outs, inner, strict=True))  # patch tokens pass through


# ---- Attentive pooling head ----


def pooling_formula(mask: torch.Tensor):
    """z = query + attn(query, LN(x)); z = z + fc2(gelu(fc1(LN_mlp(z)))); head(mean_q z)."""
    attend = cross_attention_formula(4, mask, prefix="attn.")

    def formula(p, x):
        query = p["query"].expand(x.shape[0], -1, -1)
        z = query + attend(p, query, F.layer_norm(x, (32,), p["norm.weight"], p["norm.bias"]))
        h = F.layer_norm(z, (32,), p["norm_mlp.weight"], p["norm_mlp.bias"])
        z = z + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])
        return F.linear(z.mean(1), p["head.weight"], p["head.bias"])

    return formula


def test_attentive_pooling_formula():
    torch.manual_seed(0)
    head = randomize(AttentivePoolingHead(32, num_queries=3, num_heads=4, num_classes=7))
    mask = random_padding([10, 6], 10)
    assert_matches_formula(lambda x: head(x, mask), [torch.randn(2, 10, 32)], pooling_formula(mask),
                           params=dict(head.named_parameters()))


@pytest.mark.parametrize(("num_classes", "mlp_ratio"), [(0, 4.0), (5, 0.0)])
def test_attentive_pooling_shapes(num_classes, mlp_ratio):
    head = AttentivePoolingHead(32, num_queries=4, num_heads=4, num_classes=num_classes, mlp_ratio=mlp_ratio)
    assert head.query.shape == (1, 4, 32) and (head.mlp is None) == (mlp_ratio == 0)
    x = torch.randn(3, 11, 32)
    assert head.pool(x).shape == (3, 4, 32)
    assert head(x).shape == (3, num_classes or 32)


def test_attentive_pooling_mask_equals_unpadded():
    # Padding with a mask gives each sample exactly the result of its unpadded tokens; an all-padded sample
    # gets the queries plus the attention projection's bias (then the MLP).
    torch.manual_seed(0)
    head = randomize(AttentivePoolingHead(16, num_queries=2, num_heads=2))
    x = torch.randn(3, 8, 16, requires_grad=True)
    mask = random_padding([8, 3, 0], 8)
    pooled = head.pool(x, mask)
    pooled.sum().backward()
    with torch.no_grad():
        for b, length in ((0, 8), (1, 3)):
            assert rel_err(pooled[b], head.pool(x[b : b + 1, :length])[0]) <= 1e-6
        empty = head.query[0] + head.attn.proj.bias
        assert rel_err(pooled[2], empty + head.mlp(head.norm_mlp(empty))) <= 1e-6
    assert torch.equal(x.grad[1, 3:], torch.zeros(5, 16)) and x.grad[1, :3].abs().sum() > 0


# ---- Errors ----


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CrossAttention(30, num_heads=4), r"num_heads=4 must be a positive divisor of dim=30"),
        (lambda: CrossAttention(32, kv_dim=0), r"kv_dim=0 must be an integer >= 1"),
        (lambda: CrossAttention(32, attn_drop=0.1), r"attn_drop=0.1 is not supported: the fused attention kernel"),
        (lambda: CrossAttention(32, proj_drop=1.5), r"proj_drop=1.5 must be in \[0, 1\)"),
        (lambda: CrossAttention(32, backend="cuda"), r"backend='cuda' is not a known backend"),
        (lambda: CrossViTFusion((16, 32), (2,)), r"dims=\(16, 32\) and num_heads=\(2,\) must have one entry per"),
        (lambda: CrossViTFusion((16,), (2,)), r"dims=\(16,\) and num_heads=\(2,\) must have one entry per branch"),
        (lambda: CrossViTFusion((16, 30), (2, 4)), r"num_heads=4 must be a positive divisor of dim=30"),
        (lambda: AttentivePoolingHead(32, num_queries=0), r"num_queries=0 must be an integer >= 1"),
        (lambda: AttentivePoolingHead(32, num_classes=-1), r"num_classes=-1 must be an integer >= 0"),
        (lambda: AttentivePoolingHead(30, num_heads=4), r"num_heads=4 must be a positive divisor of dim=30"),
    ],
)
def test_bad_args(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_inputs():
    blk = CrossAttention(16, num_heads=2, kv_dim=8)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    cases = [
        ((x, ctx, torch.zeros(2, 6, dtype=torch.bool)),
         r"key_padding_mask must be a bool tensor of shape \(B, M\)=\(2, 5\); got torch.bool \(2, 6\)"),
        ((x, ctx, torch.zeros(2, 5)),
         r"key_padding_mask must be a bool tensor of shape \(B, M\)=\(2, 5\); got torch.float32 \(2, 5\)"),
        ((x, torch.randn(2, 5, 16)), r"context must have shape \(B=2, tokens, C=8\); got \(2, 5, 16\)"),
        ((x, torch.randn(3, 5, 8)), r"context must have shape \(B=2, tokens, C=8\); got \(3, 5, 8\)"),
        ((torch.randn(2, 16), ctx), r"x must have shape \(B, tokens, C=16\); got \(2, 16\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            blk(*args)
    fusion = CrossViTFusion((16, 8), (2, 2))
    with pytest.raises(ValueError, match=r"xs must hold one tensor per branch \(2\); got 1"):
        fusion([torch.randn(2, 4, 16)])
    with pytest.raises(ValueError, match=r"xs\[1\] must have shape \(B=2, tokens, C=8\); got \(2, 4, 16\)"):
        fusion([torch.randn(2, 4, 16), torch.randn(2, 4, 16)])
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \(B, M\)=\(2, 4\)"):
        AttentivePoolingHead(16, num_heads=2)(torch.randn(2, 4, 16), torch.zeros(4, 2, dtype=torch.bool))
