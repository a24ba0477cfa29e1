"""The shared q/k/v projection: heads-first views of the packed projection whose gradients autograd assembles
straight into the packed layout."""

import pytest
import torch
from torch.profiler import profile

from attnzoo.blocks import MultiHeadSelfAttention, NeighborhoodAttention2d


def _packed_output(module):
    """A forward hook on ``module`` that keeps its outputs: (the list they go to, the hook handle)."""
    kept = []
    handle = module.register_forward_hook(lambda m, args, out: kept.append(out))
    return kept, handle


@pytest.mark.parametrize(("block", "shape"), [
    (lambda: MultiHeadSelfAttention(32, 4), (2, 5, 32)),
    (lambda: MultiHeadSelfAttention(32, 4, num_kv_heads=2), (2, 5, 32)),
    (lambda: NeighborhoodAttention2d(32, 4, kernel_size=3), (2, 4, 6, 32)),
])
def test_packed_gradient_is_one_stack(block, shape):
    """q, k, v are views (B, H, *S, D) of the packed projection; the gradients reach it in one stack along the
    packed dim, contiguous, with no transposing copy after it, and equal the per-part gradients."""
    blk = block()
    packed = blk.qkv if blk.num_kv_heads == blk.num_heads else blk.kv
    kept, handle = _packed_output(packed)
    q, k, v = blk.project_qkv(torch.randn(shape))
    handle.remove()
    parts = (q, k, v) if packed is getattr(blk, "qkv", None) else (k, v)
    heads, D = parts[0].shape[1], parts[0].shape[-1]
    assert all(t.shape == (shape[0], heads, *shape[1:-1], D) for t in parts)
    grads = [torch.randn_like(t) for t in parts]
    with profile() as prof:
        (g_packed,) = torch.autograd.grad(parts, kept[0], grads)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert "aten::stack" in ops
    assert not {"aten::clone", "aten::copy_", "aten::contiguous"} & set(ops), ops
    assert g_packed.is_contiguous()
    expect = torch.stack([g.movedim(1, -2) for g in grads], dim=-3).reshape(g_packed.shape)
    assert torch.equal(g_packed, expect)
