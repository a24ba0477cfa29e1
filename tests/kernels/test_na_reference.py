"""Sanity checks of the neighborhood-attention oracle ``na_reference`` itself."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels.neighborhood import semantics
from attnzoo.kernels.neighborhood.reference import na_reference


def _inputs(B, H, Hkv, S, D, E=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, *S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, *S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, *S, D, generator=g, dtype=torch.float64)
    ek = torch.randn(B, Hkv, E, D, generator=g, dtype=torch.float64)
    ev = torch.randn(B, Hkv, E, D, generator=g, dtype=torch.float64)
    return q, k, v, ek, ev


def _sdpa(q, k, v, is_causal=False):
    """SDPA over the flattened tokens, kv heads repeated for GQA; returns (B, H, *S, D)."""
    B, H, *_, D = q.shape
    flat = lambda t: t.repeat_interleave(H // t.shape[1], 1).reshape(B, H, -1, D)
    return F.scaled_dot_product_attention(flat(q), flat(k), flat(v), is_causal=is_causal).reshape(q.shape)


@pytest.mark.parametrize(
    ("S", "stride", "Hkv"), [((7,), (1,), 2), ((4, 5), (1, 1), 2), ((4, 5), (2, 3), 1), ((3, 2, 4), (1, 2, 2), 2)]
)
def test_full_window_equals_sdpa(S, stride, Hkv):
    """kernel_size == extent, non-causal: every query sees every token (stride cannot change that)."""
    q, k, v, _, _ = _inputs(2, 2, Hkv, S, 8)
    n = len(S)
    out = na_reference(q, k, v, S, (1,) * n, stride, (False,) * n)
    torch.testing.assert_close(out, _sdpa(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 3])
def test_causal_full_window_equals_sdpa_causal(stride):
    q, k, v, _, _ = _inputs(2, 4, 2, (11,), 8)
    out = na_reference(q, k, v, (11,), (1,), (stride,), (True,))
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True), rtol=1e-10, atol=1e-10)


def test_one_query_by_hand_with_extra_and_rpb():
    """Query (0, 4) of a 5x6 map, k=3x3: rows {0,1,2}, cols {3,4,5}; 3 extra keys; GQA head 3 -> kv head 1."""
    q, k, v, ek, ev = _inputs(1, 4, 2, (5, 6), 8, E=3)
    rpb = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = na_reference(q, k, v, (3, 3), (1, 1), (1, 1), (False, False), rpb=rpb, extra_k=ek, extra_v=ev, scale=0.3)

    h, kvh, (qi, qj) = 3, 1, (0, 4)
    keys = [(r, c) for r in (0, 1, 2) for c in (3, 4, 5)]
    logits = [q[0, h, qi, qj] @ k[0, kvh, r, c] * 0.3 + rpb[h, r - qi + 2, c - qj + 2] for r, c in keys]
    logits += [q[0, h, qi, qj] @ ek[0, kvh, e] * 0.3 for e in range(3)]
    values = [v[0, kvh, r, c] for r, c in keys] + [ev[0, kvh, e] for e in range(3)]
    p = torch.stack(logits).softmax(0)
    expected = (p[:, None] * torch.stack(values)).sum(0)
    torch.testing.assert_close(out[0, h, qi, qj], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("S", "ks", "ds", "ss", "cs"),
    [
        ((7, 9), (3, 4), (2, 1), (1, 2), (False, False)),
        ((5, 4, 6), (2, 3, 3), (2, 1, 2), (2, 1, 3), (True, False, False)),
    ],
)
def test_all_queries_by_loop(S, ks, ds, ss, cs):
    """Every query by an explicit loop: neighbours from the mask, bias from coordinates, extra keys appended."""
    q, k, v, ek, ev = _inputs(1, 2, 1, S, 4, E=2, seed=2)
    rpb = torch.randn(2, *(2 * x - 1 for x in ks), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = na_reference(q, k, v, ks, ds, ss, cs, rpb=rpb, extra_k=ek, extra_v=ev)
    mask = semantics.neighborhood_mask(S, ks, ds, ss, cs)
    coords = list(itertools.product(*(range(L) for L in S)))
    scale = 4**-0.5
    for h in range(2):
        for qn, qc in enumerate(coords):
            keys = [coords[t] for t in mask[qn].nonzero().flatten().tolist()]
            bias = [
                rpb[(h, *(t // d - i // d + kk - 1 for t, i, d, kk in zip(kc, qc, ds, ks, strict=True)))] for kc in keys
            ]
            logits = [q[(0, h, *qc)] @ k[(0, 0, *kc)] * scale + b for kc, b in zip(keys, bias, strict=True)]
            logits += [q[(0, h, *qc)] @ ek[0, 0, e] * scale for e in range(2)]
            values = [v[(0, 0, *kc)] for kc in keys] + [ev[0, 0, e] for e in range(2)]
            expected = (torch.stack(logits).softmax(0)[:, None] * torch.stack(values)).sum(0)
            torch.testing.assert_close(out[(0, h, *qc)], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("S", "ks", "ds", "cs"), [((6, 7), (3, 5), (1, 1), (False, False)), ((9,), (3,), (2,), (True,))]
)
def test_large_self_bias_returns_own_value(S, ks, ds, cs):
    """A huge rpb entry at relative offset 0 on every axis makes each query copy its own value."""
    q, k, v, _, _ = _inputs(1, 2, 2, S, 8)
    rpb = torch.zeros(2, *(2 * x - 1 for x in ks), dtype=torch.float64)
    rpb[(slice(None), *(x - 1 for x in ks))] = 1e3
    out = na_reference(q, k, v, ks, ds, (1,) * len(S), cs, rpb=rpb)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-12)


def test_constant_rpb_is_softmax_invariant_without_extra():
    q, k, v, ek, ev = _inputs(1, 2, 2, (5, 6), 8, E=2)
    args = ((3, 2), (1, 2), (1, 1), (False, False))
    rpb = torch.full((2, 5, 3), 2.5, dtype=torch.float64)
    torch.testing.assert_close(na_reference(q, k, v, *args, rpb=rpb), na_reference(q, k, v, *args))
    # With extra keys (no bias on them) the same constant moves weight onto the neighborhood.
    with_extra = dict(extra_k=ek, extra_v=ev)
    assert not torch.allclose(
        na_reference(q, k, v, *args, rpb=rpb, **with_extra), na_reference(q, k, v, *args, **with_extra)
    )


def test_gradcheck():
    q, k, v, ek, ev = _inputs(1, 2, 1, (3, 4), 3, E=2)
    rpb = torch.randn(2, 3, 5, dtype=torch.float64)
    tensors = tuple(t.requires_grad_() for t in (q, k, v, rpb, ek, ev))

    def fn(q, k, v, rpb, ek, ev):
        return na_reference(q, k, v, (2, 3), (1, 1), (1, 2), (True, False), rpb=rpb, extra_k=ek, extra_v=ev)

    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)
    assert math.isfinite(fn(*tensors).sum().item())
