"""The fast PyTorch neighborhood-attention path (``torch_impl.na_fwd`` / ``na_bwd``) against the float64
oracle (``reference.na_reference``, differentiated by autograd), plus its memory-linearity."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.kernels.neighborhood import semantics, torch_impl
from attnzoo.kernels.neighborhood.reference import na_reference
from attnzoo.kernels.precision import lse_dtype
from tests.kernels.helpers import assert_path_matches, leaf64, poison_allocations, randn

# name: (grid, kernel_size, dilation, stride, causal, H, H_kv, E extra tokens, rpb)
CASES = {
    "1d_odd_rpb": ((37,), (5,), (1,), (1,), (False,), 2, 2, 0, True),
    "1d_even_dil_not_dividing_rpb": ((41,), (4,), (3,), (1,), (False,), 2, 2, 0, True),
    "1d_causal_stride_dil": ((40,), (6,), (2,), (3,), (True,), 2, 1, 0, False),
    "1d_stride_gqa_extra": ((33,), (7,), (1,), (2,), (False,), 4, 2, 3, False),
    "1d_k_equals_extent": ((9,), (9,), (1,), (1,), (False,), 2, 2, 1, True),
    "2d_rpb": ((13, 11), (5, 3), (1, 1), (1, 1), (False, False), 2, 2, 0, True),
    "2d_even_dil_not_dividing_rpb_extra": ((14, 17), (4, 3), (3, 5), (1, 1), (False, False), 4, 2, 2, True),
    "2d_causal_axis_stride_gqa_extra": ((12, 15), (3, 4), (1, 2), (2, 3), (True, False), 4, 2, 2, False),
    "2d_causal_both_rpb": ((10, 9), (4, 5), (1, 1), (1, 1), (True, True), 2, 2, 0, True),
    "2d_k_equals_extent_rpb": ((7, 9), (7, 9), (1, 1), (1, 1), (False, False), 2, 1, 0, True),
    "2d_multi_tile_rpb": ((30, 27), (7, 6), (2, 1), (1, 1), (False, False), 2, 2, 0, True),
    "3d_dil_stride_causal_mqa": ((6, 7, 9), (3, 4, 5), (2, 1, 1), (1, 2, 1), (False, False, True), 3, 1, 0, False),
    "3d_rpb_extra": ((5, 8, 7), (3, 3, 4), (1, 2, 1), (1, 1, 1), (False, False, True), 2, 2, 1, True),
}


def _lse_oracle(q, k, grid, ks, dil, st, causal, scale, rpb, ek):
    """float64 log-sum-exp of every query's visible logits (the reference returns only the output)."""
    B, H, n, D = q.shape[0], q.shape[1], math.prod(grid), q.shape[-1]
    g = H // k.shape[1]
    q, k = q.reshape(B, H, n, D), k.repeat_interleave(g, 1).reshape(B, H, n, D)
    s = q @ k.transpose(-1, -2) * scale
    if rpb is not None:
        idx = torch.zeros(1, 1, dtype=torch.long)
        for L, kk, d in zip(grid, ks, dil, strict=True):
            r = semantics.relative_index(L, kk, d).clamp(0, 2 * kk - 2)
            idx = (idx[:, None, :, None] * (2 * kk - 1) + r[None, :, None, :]).reshape(idx.shape[0] * L, -1)
        s = s + rpb.reshape(H, -1)[:, idx]
    s = s.masked_fill(~semantics.neighborhood_mask(grid, ks, dil, st, causal), float("-inf"))
    if ek is not None:
        s = torch.cat([s, q @ ek.repeat_interleave(g, 1).transpose(-1, -2) * scale], -1)
    return s.logsumexp(-1).reshape(B, H, *grid)


def _check(case: str, dtype: torch.dtype, monkeypatch, batch: int = 2, dim: int = 16, value_dim: int = 16):
    grid, ks, dil, st, causal, H, Hkv, E, use_rpb = CASES[case]
    q = randn(batch, H, *grid, dim, dtype=dtype, device="cpu")
    k = randn(batch, Hkv, *grid, dim, dtype=dtype, device="cpu")
    v = randn(batch, Hkv, *grid, value_dim, dtype=dtype, device="cpu")
    do = randn(batch, H, *grid, value_dim, dtype=dtype, device="cpu")
    rpb = randn(H, *(2 * x - 1 for x in ks), dtype=dtype, device="cpu") if use_rpb else None
    ek = randn(batch, Hkv, E, dim, dtype=dtype, device="cpu") if E else None
    ev = randn(batch, Hkv, E, value_dim, dtype=dtype, device="cpu") if E else None
    scale = dim**-0.5
    params = (list(ks), list(dil), list(st), list(causal), scale)

    inputs = (q, k, v, rpb, ek, ev)
    leaves = [None if t is None else leaf64(t) for t in inputs]
    ref = na_reference(*leaves[:3], ks, dil, st, causal, leaves[3], leaves[4], leaves[5], scale)
    present = [t for t in leaves if t is not None]
    ref_grads = torch.autograd.grad(ref, present, do.double())
    with torch.no_grad():
        ref_lse = _lse_oracle(leaves[0], leaves[1], grid, ks, dil, st, causal, scale, leaves[3], leaves[4])

    poison_allocations(monkeypatch)
    out, lse = torch_impl.na_fwd(q, k, v, *params, rpb, ek, ev)
    grads = torch_impl.na_bwd(do, q, k, v, out, lse, *params, rpb, ek, ev)
    assert out.dtype == dtype and out.shape == (*q.shape[:-1], value_dim)
    assert lse.dtype == lse_dtype(dtype) and lse.shape == q.shape[:-1]
    names = ("dq", "dk", "dv", "drpb", "dextra_k", "dextra_v")
    assert_path_matches(f"{case} {dtype}", dtype, names, inputs, grads, (out, lse), (ref, ref_lse), ref_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, monkeypatch):
    _check(case, dtype, monkeypatch)


@pytest.mark.parametrize("value_dim", [8, 40])
@pytest.mark.parametrize("case", ["2d_multi_tile_rpb", "1d_stride_gqa_extra"])
def test_value_head_dim_differs(case, value_dim, monkeypatch):
    _check(case, torch.float32, monkeypatch, value_dim=value_dim)


@pytest.mark.parametrize("case", ["2d_even_dil_not_dividing_rpb_extra", "3d_dil_stride_causal_mqa"])
def test_float64_is_exact(case, monkeypatch):
    _check(case, torch.float64, monkeypatch, batch=1)


@pytest.mark.parametrize("case", ["2d_multi_tile_rpb", "1d_stride_gqa_extra"])
def test_chunked_over_tiles(case, monkeypatch):
    """A tiny score budget forces one tile per chunk: same results."""
    monkeypatch.setattr(torch_impl, "_CHUNK_ELEMENTS", 1)
    _check(case, torch.float32, monkeypatch, batch=1)


@pytest.mark.parametrize("tiles", [(3, 5), (16, 2), (1, 1)])
def test_any_tile_shape(tiles, monkeypatch):
    """Tiles that pad (3, 5), exceed a group (16) or degenerate to single queries (1) are all exact."""
    monkeypatch.setattr(torch_impl, "default_tiles", lambda spatial, kernel_size: tiles)
    _check("2d_even_dil_not_dividing_rpb_extra", torch.float32, monkeypatch, batch=1)


def _plan_numel(side: int) -> int:
    plan = torch_impl.plan_for((1, 4, side, side, 32), 4, (7, 7), (1, 1), (1, 1), (False, False), 0, True, "cpu",
                               torch.float32)
    return sum(t.numel() for t in plan[3:] if t is not None)


def test_memory_is_linear_in_tokens(monkeypatch):
    """Cached index/mask tensors and the largest score block grow like the token count (4× for 2× the side)."""
    assert _plan_numel(64) <= 4.2 * _plan_numel(32)

    largest = [0]
    matmul = torch.matmul

    def recording_matmul(a, b, **kw):
        out = matmul(a, b, **kw)
        largest[0] = max(largest[0], out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    sizes = {}
    for side in (32, 64):
        q, k, v, do = (torch.randn(1, 4, side, side, 32) for _ in range(4))
        params = ([7, 7], [1, 1], [1, 1], [False, False], 32**-0.5, None, None, None)
        largest[0] = 0
        out, lse = torch_impl.na_fwd(q, k, v, *params)
        torch_impl.na_bwd(do, q, k, v, out, lse, *params)
        sizes[side] = largest[0]
    assert 0 < sizes[64] <= 4.2 * sizes[32]
    assert sizes[64] < (64 * 64) ** 2  # far from an N×N score matrix


def test_rpb_with_stride_is_rejected():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="stride"):
        torch_impl.na_fwd(q, q, q, [3], [1], [2], [False], 1.0, torch.zeros(2, 5), None, None)
