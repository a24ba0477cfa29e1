"""The ``torch`` implementation of fused neighborhood attention: exact, any device, the CPU default.

Memory is linear in the token count and no (N, N) matrix is ever formed. How:

* **Dilation → groups.** Each axis splits into its ``d`` interleaved dilation groups; within a group the
  neighborhood has dilation 1. Groups may differ in length by one (``d`` not dividing ``L``): every group
  is tiled on its own, with its own length, so the clamped windows are exact.
* **Query tiles, key boxes.** A group axis is cut into query tiles of ``tq`` consecutive group indices
  (the last one padded); each tile gets the key box ``[b0, b0 + w)`` covering the union of its queries'
  windows, where ``w`` is the largest such union on that axis, so every box has the same size. A
  multi-axis tile is the product of its per-axis tiles. Index tensors (query slot ↔ token, box → token),
  the additive (tiles, Tq, box) mask and the bias-table index are built once per (shape, config, device)
  and cached.
* **Batched matmuls.** Queries and boxes are gathered with ``index_select``; scores are one batched
  ``matmul`` over (batch·kv-head, tile) with the GQA query heads of a kv head stacked in the rows, then
  masked, soft-maxed (max-subtracted ``exp2`` of base-2 scores, normaliser applied to the output) and
  multiplied by V.
  Extra (global/register) tokens are appended to the token axis of K/V and to every box as always-visible
  columns. Tiles are processed in chunks that keep the score block under ``_CHUNK_ELEMENTS``.
* **Backward** recomputes P per chunk from the saved LSE (padded query rows get LSE = +inf, so P = 0 and
  they contribute nothing); dV, dK are scattered back to their tokens with ``index_add_`` and the
  relative-position-bias gradient into the bias table the same way; dQ is gathered back like the output.

Everything is computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from attnzoo.kernels.neighborhood import semantics
from attnzoo.kernels.precision import LN2, LOG2E, compute_dtype

# Score-block elements held at once (per chunk of tiles): ~64 MB of fp32 scores.
_CHUNK_ELEMENTS = 1 << 24



def default_tiles(spatial: tuple[int, ...], kernel_size: tuple[int, ...]) -> tuple[int, ...]:
    """Query-tile length per axis (in group indices; capped at the group length when the plan is built).

    A box has ``tq + k - 1`` keys per axis (stride 1), so small tiles waste fewer scores but gather more
    key rows per query and make smaller matmuls; these sizes are tuned for 2 CPU threads.
    """
    n = len(spatial)
    if n == 1:
        return (max(16, min(128, 2 * kernel_size[0])),)
    return (8,) * n if n == 2 else (4,) * n


class _Plan(NamedTuple):
    tiles: int  # T: number of (multi-axis) query tiles
    tq: int  # queries per tile (product of the per-axis tile lengths)
    box: int  # neighborhood keys per tile's box (product of the per-axis box widths)
    q_index: torch.Tensor  # (T*G*Tq,) long: token (in the (G*N) stacked-heads axis) of each query slot
    q_valid: torch.Tensor  # (T, G*Tq) bool: slot holds a real query (else padding)
    inv_index: torch.Tensor  # (G*N,) long: slot of each (head-in-group, token)
    k_index: torch.Tensor  # (T*(box+E),) long: token (in the N+E axis) of each box column
    mask: torch.Tensor  # (T, 1, Tq, box+E) additive 0 / -inf, compute dtype
    rel_index: torch.Tensor | None  # (T*Tq*box,) long: flat index into the bias table (when rpb is used)


def _axis_tiles(length: int, k: int, d: int, s: int, causal: bool, tile: int):
    """Per-axis tiling over all dilation groups: (query token, query valid, key token, visible, rel index)."""
    lmax = -(-length // d)
    n_tiles = -(-lmax // min(tile, lmax))
    tq = -(-lmax // n_tiles)  # balanced: tiles of the longest group are as even as possible
    r_list, t_list = [], []
    for r in range(d):
        lg = (length - r + d - 1) // d
        for t in range(-(-lg // tq)):
            r_list.append(r)
            t_list.append(t)
    r_t, t_t = torch.tensor(r_list), torch.tensor(t_list)
    lg_t = ((length - r_t + d - 1) // d)[:, None]
    j = t_t[:, None] * tq + torch.arange(tq)  # (Ta, tq) group index of each query slot
    q_ok = j < lg_t
    jc = torch.minimum(j, lg_t - 1)  # padded slots repeat the last real query (valid token, masked later)
    lo, hi = semantics.window(jc, lg_t, k, s, causal)
    w = int((hi.amax(1) - lo.amin(1)).max())
    b0 = torch.clamp_min(torch.minimum(lo.amin(1, keepdim=True), lg_t - w), 0)
    kg = b0 + torch.arange(w)  # (Ta, w) group index of each box column
    k_ok = kg < lg_t
    vis = (q_ok[:, :, None] & k_ok[:, None, :] & (kg[:, None, :] >= lo[:, :, None])
           & (kg[:, None, :] < hi[:, :, None]))
    q_tok = r_t[:, None] + d * jc
    k_tok = r_t[:, None] + d * torch.minimum(kg, lg_t - 1)
    rel = kg[:, None, :] - jc[:, :, None] + (k - 1)
    return q_tok, q_ok, k_tok, vis, rel


def _place(x: torch.Tensor, slots: tuple[int, ...], ndim: int) -> torch.Tensor:
    """View ``x`` with its dims at positions ``slots`` of an ``ndim``-dim broadcast layout."""
    shape = [1] * ndim
    for dim, slot in enumerate(slots):
        shape[slot] = x.shape[dim]
    return x.reshape(shape)


@functools.lru_cache(maxsize=16)
def _plan(spatial: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...],
          causal: tuple[bool, ...], tiles: tuple[int, ...], extra: int, group: int, with_rel: bool,
          device: str, dtype: torch.dtype) -> _Plan:
    n = len(spatial)
    axes = [_axis_tiles(*args) for args in zip(spatial, kernel_size, dilation, stride, causal, tiles, strict=True)]
    tok_stride = [math.prod(spatial[a + 1:]) for a in range(n)]
    rel_stride = [math.prod(2 * k - 1 for k in kernel_size[a + 1:]) for a in range(n)]
    q_tok = q_ok = k_tok = vis = rel = None
    for a, (qt, qo, kt, vi, re) in enumerate(axes):
        qt2, qo2 = _place(qt * tok_stride[a], (a, n + a), 2 * n), _place(qo, (a, n + a), 2 * n)
        kt2 = _place(kt * tok_stride[a], (a, n + a), 2 * n)
        vi3, re3 = _place(vi, (a, n + a, 2 * n + a), 3 * n), _place(re * rel_stride[a], (a, n + a, 2 * n + a), 3 * n)
        if a == 0:
            q_tok, q_ok, k_tok, vis, rel = qt2, qo2, kt2, vi3, re3
        else:
            q_tok, q_ok, k_tok, vis, rel = q_tok + qt2, q_ok & qo2, k_tok + kt2, vis & vi3, rel + re3
    n_tiles = math.prod(ax[0].shape[0] for ax in axes)
    tq = math.prod(ax[0].shape[1] for ax in axes)
    box = math.prod(ax[2].shape[1] for ax in axes)
    q_tok, q_ok = q_tok.reshape(n_tiles, tq), q_ok.reshape(n_tiles, tq)
    k_tok, vis = k_tok.reshape(n_tiles, box), vis.reshape(n_tiles, tq, box)
    if with_rel:
        rel = rel.reshape(n_tiles, tq, box).masked_fill(~vis, 0).reshape(-1)
    vis = vis | ~q_ok[:, :, None]  # padded query rows see their whole box: finite LSE, result discarded
    n_tok = math.prod(spatial)

    slots = torch.arange(n_tiles * tq).reshape(n_tiles, tq)
    inv = torch.empty(n_tok, dtype=torch.long)
    inv[q_tok[q_ok]] = slots[q_ok]
    heads = torch.arange(group)
    q_index = (heads[None, :, None] * n_tok + q_tok[:, None, :]).reshape(-1)
    q_valid = q_ok[:, None, :].expand(n_tiles, group, tq).reshape(n_tiles, group * tq)
    inv_index = ((inv // tq) * (group * tq) + (inv % tq) + heads[:, None] * tq).reshape(-1)
    k_index = torch.cat([k_tok, (n_tok + torch.arange(extra)).expand(n_tiles, extra)], 1).reshape(-1)
    mask = torch.zeros(n_tiles, 1, tq, box + extra, dtype=dtype)
    mask[:, 0, :, :box].masked_fill_(~vis, float("-inf"))
    rel_index = rel if with_rel else None

    def dev(t):
        return None if t is None else t.to(device)

    return _Plan(n_tiles, tq, box, dev(q_index), dev(q_valid), dev(inv_index), dev(k_index), dev(mask), dev(rel_index))


def plan_for(q_shape, kv_heads: int, kernel_size, dilation, stride, causal, extra: int, with_rel: bool, device,
             dtype: torch.dtype, tiles=None) -> _Plan:
    """The cached tiling plan for inputs of shape ``q_shape`` = (B, H, *S, D)."""
    spatial = tuple(int(x) for x in q_shape[2:-1])
    ks = tuple(int(x) for x in kernel_size)
    tiles = tuple(tiles) if tiles is not None else default_tiles(spatial, ks)
    return _plan(spatial, ks, tuple(int(x) for x in dilation), tuple(int(x) for x in stride),
                 tuple(bool(x) for x in causal), tiles, int(extra), int(q_shape[1]) // kv_heads, bool(with_rel),
                 str(device), compute_dtype(dtype))


def _check(stride, rpb):
    if rpb is not None and any(int(s) > 1 for s in stride):
        raise ValueError(f"rpb: a relative position bias needs stride 1 on every axis, got stride={list(stride)}")


def _chunks(plan: _Plan, rows: int):
    """Tile ranges whose score block (``rows`` × tiles × Tq·G × box) stays within the budget."""
    width = plan.q_valid.shape[1] * plan.k_index.numel() // plan.tiles
    step = max(1, min(plan.tiles, _CHUNK_ELEMENTS // max(1, rows * width)))
    return [(a, min(plan.tiles, a + step)) for a in range(0, plan.tiles, step)]


def _kv_tokens(t: torch.Tensor, extra: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor:
    """(B, H_kv, *S, D) [+ (B, H_kv, E, D)] -> (B*H_kv, N + E, D) in the compute dtype."""
    b, h, d = t.shape[0], t.shape[1], t.shape[-1]
    flat = t.reshape(b * h, -1, d)
    if extra is not None and extra.shape[2] > 0:
        flat = torch.cat([flat, extra.reshape(b * h, -1, d).to(flat.dtype)], 1)
    return flat.to(cdt)


def _scores(qt, kt, plan: _Plan, a: int, b: int, batch: int, kv_heads: int, table):
    """Masked (+ biased) base-2 scores (B*H_kv, tiles, G*Tq, box+E) of tiles [a, b); ``qt`` is pre-scaled."""
    s = torch.matmul(qt, kt.transpose(-1, -2))
    nt, g = b - a, qt.shape[2] // plan.tq
    s6 = s.view(batch, kv_heads, nt, g, plan.tq, s.shape[-1])
    s6.add_(plan.mask[a:b])
    if table is not None:  # bias (H, tiles·Tq·box) -> (H_kv, tiles, G, Tq, box), broadcast over the batch
        per = plan.tq * plan.box
        bias = table.index_select(1, plan.rel_index[a * per:b * per]).view(kv_heads, g, nt, plan.tq, plan.box)
        s6[..., :plan.box].add_(bias.permute(0, 2, 1, 3, 4))
    return s


def _gather_rows(x: torch.Tensor, index: torch.Tensor, plan: _Plan, a: int, b: int) -> torch.Tensor:
    """Rows of ``x`` (BH, M, ...) for the slots of tiles [a, b) -> (BH, b - a, slots per tile, ...)."""
    per = index.numel() // plan.tiles
    out = x.index_select(1, index[a * per:b * per])
    return out.view(x.shape[0], b - a, per, *x.shape[2:])


def _bias_table(rpb, cdt):
    """(H, 2k0-1, ...) -> (H, table) in base-2 units, or None."""
    return None if rpb is None else rpb.reshape(rpb.shape[0], -1).to(cdt) * LOG2E


def na_fwd(q, k, v, kernel_size, dilation, stride, causal, scale: float, rpb, extra_k, extra_v):
    """Neighborhood attention forward: ``out`` (B, H, *S, Dv) in q.dtype and ``lse`` (B, H, *S).

    q: (B, H, *S, D), k: (B, H_kv, *S, D), v: (B, H_kv, *S, Dv); rpb: (H, 2k0-1, ...) or None;
    extra_k/extra_v: (B, H_kv, E, D / Dv) or None (tokens every query sees, no bias). ``lse`` is float32
    (float64 for float64 inputs).
    """
    _check(stride, rpb)
    cdt = compute_dtype(q.dtype)
    batch, kv_heads, dim = q.shape[0], k.shape[1], q.shape[-1]
    extra = 0 if extra_k is None else extra_k.shape[2]
    plan = plan_for(q.shape, kv_heads, kernel_size, dilation, stride, causal, extra, rpb is not None, q.device, q.dtype)
    bh = batch * kv_heads
    q3 = q.reshape(bh, -1, dim)  # (B*H_kv, G*N, D): the G query heads of a kv head stacked
    kf, vf = _kv_tokens(k, extra_k, cdt), _kv_tokens(v, extra_v, cdt)
    table = _bias_table(rpb, cdt)

    outs, lses = [], []
    for a, b in _chunks(plan, bh):
        qt = _gather_rows(q3, plan.q_index, plan, a, b).to(cdt).mul_(scale * LOG2E)
        s = _scores(qt, _gather_rows(kf, plan.k_index, plan, a, b), plan, a, b, batch, kv_heads, table)
        m = s.amax(-1, keepdim=True)
        p = s.sub_(m).exp2_()
        denom = p.sum(-1, keepdim=True)
        outs.append(torch.matmul(p, _gather_rows(vf, plan.k_index, plan, a, b)).div_(denom))
        lses.append(m.add_(denom.log2_()).mul_(LN2))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, 1)
    out = o.view(bh, -1, v.shape[-1]).index_select(1, plan.inv_index).to(q.dtype).view(*q.shape[:-1], v.shape[-1])
    lse = lse.view(bh, -1).index_select(1, plan.inv_index).view(q.shape[:-1])
    return out, lse


def na_bwd(do, q, k, v, out, lse, kernel_size, dilation, stride, causal, scale: float, rpb, extra_k, extra_v):
    """Gradients ``(dq, dk, dv, drpb, dextra_k, dextra_v)`` recomputed from the saved ``lse``.

    ``drpb``/``dextra_*`` are None where the input was None.
    """
    _check(stride, rpb)
    cdt = compute_dtype(q.dtype)
    batch, heads, kv_heads, dim = q.shape[0], q.shape[1], k.shape[1], q.shape[-1]
    extra = 0 if extra_k is None else extra_k.shape[2]
    plan = plan_for(q.shape, kv_heads, kernel_size, dilation, stride, causal, extra, rpb is not None, q.device, q.dtype)
    bh, group = batch * kv_heads, heads // kv_heads
    n_tok = math.prod(q.shape[2:-1])
    dim_v = v.shape[-1]
    q3, do3 = q.reshape(bh, -1, dim), do.reshape(bh, -1, dim_v)
    delta3 = (do3.to(cdt) * out.reshape(bh, -1, dim_v).to(cdt)).sum(-1)  # (B*H_kv, G*N)
    lse3 = lse.reshape(bh, -1).to(cdt) * LOG2E
    kf, vf = _kv_tokens(k, extra_k, cdt), _kv_tokens(v, extra_v, cdt)
    table = _bias_table(rpb, cdt)

    dk_acc = torch.zeros(bh, n_tok + extra, dim, dtype=cdt, device=q.device)
    dv_acc = torch.zeros(bh, n_tok + extra, dim_v, dtype=cdt, device=q.device)
    drpb = None if rpb is None else torch.zeros(heads, rpb[0].numel(), dtype=cdt, device=q.device)
    dqs = []
    box_e = plan.box + extra
    for a, b in _chunks(plan, bh):
        nt = b - a
        qt = _gather_rows(q3, plan.q_index, plan, a, b).to(cdt).mul_(scale * LOG2E)
        dot = _gather_rows(do3, plan.q_index, plan, a, b).to(cdt)
        kt = _gather_rows(kf, plan.k_index, plan, a, b)
        vt = _gather_rows(vf, plan.k_index, plan, a, b)
        lse_t = _gather_rows(lse3, plan.q_index, plan, a, b).masked_fill_(~plan.q_valid[a:b], float("inf"))
        delta_t = _gather_rows(delta3, plan.q_index, plan, a, b)
        p = _scores(qt, kt, plan, a, b, batch, kv_heads, table).sub_(lse_t[..., None]).exp2_()
        dv_t = torch.matmul(p.transpose(-1, -2), dot)  # (BH, nt, box+E, Dv)
        ds = torch.matmul(dot, vt.transpose(-1, -2)).sub_(delta_t[..., None]).mul_(p)
        del p
        dqs.append(torch.matmul(ds, kt).mul_(scale))
        dk_t = torch.matmul(ds.transpose(-1, -2), qt).mul_(LN2)  # qt carries scale·log2 e
        rows = plan.k_index[a * box_e:b * box_e]
        # index_add_ along dim 1 runs serially; along dim 0 it is parallel and erratic on a busy 2-core CPU.
        dk_acc.index_add_(1, rows, dk_t.view(bh, nt * box_e, dim))
        dv_acc.index_add_(1, rows, dv_t.view(bh, nt * box_e, dim_v))
        if drpb is not None:
            d6 = ds.view(batch, kv_heads, nt, group, plan.tq, box_e)[..., :plan.box].sum(0)
            # (H_kv, nt, G, Tq, box) -> (H, nt·Tq·box), summed into the table along its flat bias index
            src = d6.transpose(1, 2).reshape(heads, nt * plan.tq * plan.box)
            per = plan.tq * plan.box
            drpb.index_add_(1, plan.rel_index[a * per:b * per], src)
        del ds

    dq_t = dqs[0] if len(dqs) == 1 else torch.cat(dqs, 1)
    dq = dq_t.view(bh, -1, dim).index_select(1, plan.inv_index).to(q.dtype).view(q.shape)

    def split(acc, t, e):
        if e is None:
            return acc.reshape(t.shape).to(t.dtype), None
        # Separate copies: a custom op's outputs must not alias one another.
        main = acc[:, :n_tok].reshape(t.shape).to(t.dtype, memory_format=torch.contiguous_format, copy=True)
        return main, acc[:, n_tok:].reshape(e.shape).to(e.dtype, copy=True)

    dk, dek = split(dk_acc, k, extra_k)
    dv, dev = split(dv_acc, v, extra_v)
    if drpb is not None:
        drpb = drpb.reshape(rpb.shape).to(rpb.dtype)
    return dq, dk, dv, drpb, dek, dev
