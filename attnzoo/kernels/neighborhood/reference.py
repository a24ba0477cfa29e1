"""The simplest exact formula for neighborhood attention: the test oracle, never a production path."""

from __future__ import annotations

import math

import torch

from attnzoo.kernels.neighborhood import semantics


def _rpb_bias(rpb: torch.Tensor, shape, kernel_size, dilation) -> torch.Tensor:
    """(H, N, N) bias: ``rpb[h, idx0[i0, t0], idx1[i1, t1], ...]`` over the flattened grid.

    Indices of pairs outside the neighborhood are clamped into the table; those logits are masked anyway.
    """
    flat = torch.zeros(1, 1, dtype=torch.long, device=rpb.device)
    for L, k, d in zip(shape, kernel_size, dilation, strict=True):
        idx = semantics.relative_index(L, k, d, device=rpb.device).clamp(0, 2 * k - 2)
        flat = (flat[:, None, :, None] * (2 * k - 1) + idx[None, :, None, :]).reshape(flat.shape[0] * L, -1)
    return rpb.reshape(rpb.shape[0], -1)[:, flat]


def na_reference(
    q, k, v, kernel_size, dilation, stride, is_causal, rpb=None, extra_k=None, extra_v=None, scale=None
) -> torch.Tensor:
    """q: (B, H, *S, D), k: (B, H_kv, *S, D), v: (B, H_kv, *S, Dv) -> (B, H, *S, Dv); materializes (N, N) scores.

    Each query sees its NATTEN neighborhood (``semantics.neighborhood_mask``) plus the E extra keys
    ``extra_k``/``extra_v`` (B, H_kv, E, D / Dv), one softmax over both. ``rpb`` (H, 2k0-1[, 2k1-1[, 2k2-1]])
    is added to the neighborhood logits at the per-axis ``semantics.relative_index``; extra keys get no bias.
    """
    B, H, *S, D = q.shape
    n, group = math.prod(S), H // k.shape[1]
    q = q.reshape(B, H, n, D)
    k = k.repeat_interleave(group, 1).reshape(B, H, n, D)
    v = v.repeat_interleave(group, 1).reshape(B, H, n, v.shape[-1])
    scale = D**-0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if rpb is not None:
        s = s + _rpb_bias(rpb, S, kernel_size, dilation).to(s.dtype)
    visible = semantics.neighborhood_mask(S, kernel_size, dilation, stride, is_causal, device=q.device)
    s = s.masked_fill(~visible, float("-inf"))
    if extra_k is not None:
        ek, ev = extra_k.repeat_interleave(group, 1), extra_v.repeat_interleave(group, 1)
        s = torch.cat([s, (q @ ek.transpose(-1, -2)) * scale], -1)
        v = torch.cat([v, ev], -2)
    return (s.softmax(-1) @ v).reshape(B, H, *S, v.shape[-1])
