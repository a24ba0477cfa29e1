"""The ``torch`` implementation of halo attention: exact, any device, the CPU default.

The (batch·kv-head) axis is cut into chunks whose scores stay in cache; every chunk reuses the same work
buffers (allocated once per call: fresh multi-MB allocations per chunk would cost more in page faults than
the arithmetic). Per chunk:

* **Blocks and windows.** The queries are copied block-major, (n, nbx·nby, G·bq², D), with the G query heads
  of a kv head stacked in the rows (GQA never repeats K/V). K and V are copied into a zero-bordered buffer and
  their overlapping ``win``² windows copied out of a strided view of it, (n, nbx·nby, win², D).
* **Scores.** One batched ``matmul`` over (n, block). K carries ``scale·log2 e`` so the scores are in base 2
  and exponentiated with ``exp2`` (ATen's vectorised exp2 runs at one speed for every input, -inf included).
* **Relative positions without a gather.** ``T = q @ [rel_h; rel_w]ᵀ`` is one (rows, 2·(2win−1)) matmul. The
  height term of query (ix, iy) at window row jx is ``T[ix, iy, jx − ix + win − 1]``, affine in (ix, iy, jx):
  a zero-copy ``as_strided`` (skew) view of T; the width term likewise. Both land in A (rows, 2·win) and are
  spread over the window by one GEMM, ``S += A @ E`` with the constant 0/1 matrix E (2·win, win²).
  ``pad_mode="mask"`` adds a per-block (nbx·nby, 1, win²) 0/-inf mask.
* **Softmax** with the max subtracted, the normaliser applied to the (rows, D) output; the LSE is saved.
* **Backward** recomputes P from the LSE. The dV/dK windows come from one matmul each (the G stacked heads sum
  inside it) and are folded back onto the map with ``ceil(win / block)`` strided adds per axis, the padding
  dropped. ``dA = dS @ Eᵀ`` (window row/column sums of dS) is scattered through the same skew views into
  dT (rows, 2·(2win−1)); then ``drel = dTᵀ @ q`` and ``dq += dT @ rel``.

Everything is computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from attnzoo.kernels.precision import LN2, LOG2E, compute_dtype

# Score elements per chunk (2 MB of fp32 scores: fastest on a 2-core CPU with 1 MB L2 per core).
_CHUNK_ELEMENTS = 1 << 19



class _Geom(NamedTuple):
    batch: int
    kv_heads: int
    group: int  # query heads per kv head
    x: int
    y: int
    bs: int  # key block size
    hs: int  # halo
    win: int  # window side, bs + 2·hs
    bq: int  # query block side
    nbx: int
    nby: int
    dim: int
    dim_v: int

    @property
    def blocks(self) -> int:
        return self.nbx * self.nby

    @property
    def rows(self) -> int:  # query rows per block (G stacked heads)
        return self.group * self.bq * self.bq

    @property
    def keys(self) -> int:  # window positions
        return self.win * self.win


def _geometry(q, k, v, block_size, halo_size) -> _Geom:
    batch, heads, xq, yq, dim = q.shape
    kv_heads, x, y = k.shape[1], k.shape[2], k.shape[3]
    bs, hs = int(block_size), int(halo_size)
    if bs < 1 or hs < 0:
        raise ValueError(f"halo: need block_size >= 1 and halo_size >= 0, got {bs}, {hs}")
    if x % bs or y % bs:
        raise ValueError(f"halo: the map {x}×{y} must be divisible by block_size={bs}")
    if heads % kv_heads:
        raise ValueError(f"halo: {heads} query heads is not a multiple of {kv_heads} kv heads")
    r = x // xq if xq else 0
    if r < 1 or x != r * xq or y != r * yq or bs % r:
        raise ValueError(f"halo: query grid {xq}×{yq} is not the {x}×{y} map downsampled by a divisor of {bs}")
    return _Geom(batch, kv_heads, heads // kv_heads, x, y, bs, hs, bs + 2 * hs, bs // r, x // bs, y // bs, dim,
                 v.shape[-1])


def _chunks(g: _Geom) -> list[tuple[int, int]]:
    """Ranges of the (batch·kv-head) axis whose scores stay within ``_CHUNK_ELEMENTS``."""
    total = g.batch * g.kv_heads
    step = max(1, min(total, _CHUNK_ELEMENTS // max(1, g.blocks * g.rows * g.keys)))
    return [(a, min(total, a + step)) for a in range(0, total, step)]


class _Work:
    """Per-call work buffers sized for the largest chunk; ``get(name, n)`` is the first ``n`` (contiguous)."""

    def __init__(self, n: int, dtype: torch.dtype, device):
        self.n, self.dtype, self.device = n, dtype, device
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, *shape: int, zero: bool = False) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None:
            alloc = torch.zeros if zero else torch.empty
            buf = self.bufs[name] = alloc(self.n, *shape, dtype=self.dtype, device=self.device)
        return buf[:n]


def _q_view(t: torch.Tensor, g: _Geom) -> torch.Tensor:
    """(B, H, Xq, Yq, C) -> (B·H_kv, nbx, nby, G, bq, bq, C) view (block-major)."""
    t = t.reshape(g.batch * g.kv_heads, g.group, g.nbx, g.bq, g.nby, g.bq, t.shape[-1])
    return t.permute(0, 2, 4, 1, 3, 5, 6)


def _q_blocks(t, g: _Geom, a: int, b: int, out: torch.Tensor, mul: float | None = None) -> torch.Tensor:
    """Rows of chunk [a, b) of (B, H, Xq, Yq, C), times ``mul``, into ``out`` -> (n, nbx·nby, G·bq², C)."""
    src = _q_view(t, g)[a:b]
    dst = out.view(src.shape)
    if mul is None:
        dst.copy_(src)
    else:
        torch.mul(src, mul, out=dst)
    return out.view(b - a, g.blocks, g.rows, t.shape[-1])


def _kv_windows(t, g: _Geom, a: int, b: int, pad: torch.Tensor, out: torch.Tensor, mul: float | None = None):
    """Windows of chunk [a, b) of (B, H_kv, X, Y, C) -> ``out`` (n, nbx·nby, win², C), times ``mul``.

    ``pad`` (n, X + 2hs, Y + 2hs, C) has a zero border (never written) and receives the chunk's interior."""
    n, c = b - a, t.shape[-1]
    pad[:, g.hs:g.hs + g.x, g.hs:g.hs + g.y] = t.reshape(g.batch * g.kv_heads, g.x, g.y, c)[a:b]
    yp = g.y + 2 * g.hs
    src = pad.as_strided((n, g.nbx, g.nby, g.win, g.win, c),
                         (pad.stride(0), g.bs * yp * c, g.bs * c, yp * c, c, 1), pad.storage_offset())
    dst = out.view(src.shape)
    if mul is None:
        dst.copy_(src)
    else:
        torch.mul(src, mul, out=dst)
    return out


def _fold_axis(w: torch.Tensor, nb: int, g: _Geom, acc: torch.Tensor) -> torch.Tensor:
    """Sum (..., nb, win, F) windows (stride ``bs``) into ``acc`` (..., nb + pieces − 1, bs, F): window position
    j of block b lands at padded coordinate ``b·bs + j``. The window is cut into block-sized pieces and piece p
    of every block is added to block b + p at once; piece 0 initialises."""
    pieces = acc.shape[-3] - nb + 1
    acc[..., :nb, :, :] = w[..., :g.bs, :]
    if pieces > 1:
        acc[..., nb:, :, :] = 0
    for p in range(1, pieces):
        width = min(g.bs, g.win - p * g.bs)
        acc[..., p:p + nb, :width, :] += w[..., p * g.bs:p * g.bs + width, :]
    return acc.flatten(-3, -2)


def _fold_windows(w: torch.Tensor, g: _Geom, acc_y: torch.Tensor, acc_x: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``_kv_windows``: (n, nbx·nby, win², C) window values summed onto their (n, X, Y, C) keys."""
    n, c = w.shape[0], w.shape[-1]
    w = w.view(n, g.nbx, g.nby, g.win, g.win, c).permute(0, 1, 3, 2, 4, 5)  # (n, nbx, win_x, nby, win_y, C)
    cols = _fold_axis(w, g.nby, g, acc_y)[..., g.hs:g.hs + g.y, :]  # along y: (n, nbx, win_x, Y, C)
    rows = _fold_axis(cols.flatten(-2), g.nbx, g, acc_x)[:, g.hs:g.hs + g.x]  # along x: (n, X, Y·C)
    return rows.unflatten(-1, (g.y, c))


def _fold_buffers(work: _Work, name: str, g: _Geom, n: int, c: int):
    pieces = -(-g.win // g.bs)
    return (work.get(name + "_y", n, g.nbx, g.win, g.nby + pieces - 1, g.bs, c),
            work.get(name + "_x", n, g.nbx + pieces - 1, g.bs, g.y * c))


def _skews(t: torch.Tensor, g: _Geom, n: int):
    """Views (n, nbx, nby, G, bq, bq, win) of the contiguous (n, blocks, rows, 2·(2win−1)) per-query table
    ``t``: height ``[..., ix, iy, jx] = t[..., ix, iy, jx − ix + win − 1]`` and width
    ``[..., ix, iy, jy] = t[..., ix, iy, (2win − 1) + jy − iy + win − 1]``."""
    rw = t.shape[-1]
    sq = g.bq * g.bq * rw
    st = (g.blocks * g.group * sq, g.nby * g.group * sq, g.group * sq, sq)
    size = (n, g.nbx, g.nby, g.group, g.bq, g.bq, g.win)
    off = t.storage_offset() + g.win - 1
    h = t.as_strided(size, (*st, g.bq * rw - 1, rw, 1), off)
    w = t.as_strided(size, (*st, g.bq * rw, rw - 1, 1), off + 2 * g.win - 1)
    return h, w


def _pad_mask(g: _Geom, device, cdt: torch.dtype) -> torch.Tensor:
    """Additive 0/-inf mask (nbx·nby, 1, win²) of the window positions outside the map."""

    def outside(nb: int, length: int) -> torch.Tensor:
        pos = torch.arange(nb, device=device)[:, None] * g.bs - g.hs + torch.arange(g.win, device=device)
        return (pos < 0) | (pos >= length)

    out = outside(g.nbx, g.x)[:, None, :, None] | outside(g.nby, g.y)[None, :, None, :]  # (nbx, nby, win, win)
    mask = torch.zeros(out.shape, dtype=cdt, device=device).masked_fill_(out, -math.inf)
    return mask.view(g.blocks, 1, g.keys)


@functools.lru_cache(maxsize=32)
def _spread(win: int, cdt: torch.dtype, device: str) -> torch.Tensor:
    """(2·win, win²) 0/1 matrix E: row jx hits the window positions (jx, ·), row win + jy hits (·, jy); so
    ``[h | w] @ E`` is ``h[jx] + w[jy]`` at (jx, jy)."""
    e = torch.zeros(2, win, win, win, dtype=cdt)
    j = torch.arange(win)
    e[0, j, j, :] = 1
    e[1, j, :, j] = 1
    return e.view(2 * win, win * win).to(device)


def _rel_table(rel_h, rel_w, dim: int, win: int, cdt: torch.dtype, device):
    """[rel_h; rel_w] (2·(2win−1), D) in base-2 units (zeros for a missing one), or None without either."""
    if rel_h is None and rel_w is None:
        return None
    z = torch.zeros(2 * win - 1, dim, dtype=cdt, device=device)
    h = z if rel_h is None else rel_h.to(cdt)
    w = z if rel_w is None else rel_w.to(cdt)
    return torch.cat([h, w]) * LOG2E


class _Ctx(NamedTuple):
    g: _Geom
    cdt: torch.dtype
    scale: float
    table: torch.Tensor | None  # (2·(2win−1), D) base-2 units
    spread: torch.Tensor | None  # (2·win, win²)
    mask: torch.Tensor | None  # (nbx·nby, 1, win²)
    chunks: list[tuple[int, int]]
    work: _Work


def _setup(q, k, v, block_size, halo_size, pad_mode, rel_h, rel_w, scale) -> _Ctx:
    if pad_mode not in ("zeros", "mask"):
        raise ValueError(f"pad_mode must be 'zeros' or 'mask', got {pad_mode!r}")
    g = _geometry(q, k, v, block_size, halo_size)
    cdt = compute_dtype(q.dtype)
    scale = g.dim**-0.5 if scale is None else float(scale)
    table = _rel_table(rel_h, rel_w, g.dim, g.win, cdt, q.device)
    spread = None if table is None else _spread(g.win, cdt, str(q.device))
    mask = _pad_mask(g, q.device, cdt) if pad_mode == "mask" and g.hs > 0 else None
    chunks = _chunks(g)
    return _Ctx(g, cdt, scale, table, spread, mask, chunks, _Work(chunks[0][1], cdt, q.device))


def _scores(ctx: _Ctx, qc, kw, n: int) -> torch.Tensor:
    """Base-2 logits (n, nbx·nby, rows, win²) of a chunk (``kw`` carries scale·log2 e, ``qc`` is plain)."""
    g, work = ctx.g, ctx.work
    s = torch.matmul(qc, kw.transpose(-1, -2), out=work.get("s", n, g.blocks, g.rows, g.keys))
    if ctx.table is not None:
        t = torch.matmul(qc, ctx.table.transpose(0, 1), out=work.get("t", n, g.blocks, g.rows, ctx.table.shape[0]))
        th, tw = _skews(t, g, n)
        rel = work.get("a", n, g.nbx, g.nby, g.group, g.bq, g.bq, 2 * g.win)
        rel[..., :g.win] = th
        rel[..., g.win:] = tw
        s.view(-1, g.keys).addmm_(rel.view(-1, 2 * g.win), ctx.spread)
    if ctx.mask is not None:
        s.add_(ctx.mask)
    return s


def halo_fwd(q, k, v, block_size, halo_size, pad_mode, rel_h, rel_w, scale):
    """Halo attention forward: ``out`` (B, H, Xq, Yq, Dv) in q.dtype and ``lse`` (B, H, Xq, Yq).

    q: (B, H, Xq, Yq, D), k: (B, H_kv, X, Y, D), v: (B, H_kv, X, Y, Dv); rel_h/rel_w: (2·win − 1, D) or None.
    ``lse`` is float32 (float64 for float64 inputs).
    """
    ctx = _setup(q, k, v, block_size, halo_size, pad_mode, rel_h, rel_w, scale)
    g, work = ctx.g, ctx.work
    out = torch.empty(*q.shape[:-1], g.dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=ctx.cdt, device=q.device)
    out_v, lse_v = _q_view(out, g), _q_view(lse.unsqueeze(-1), g)
    xp, yp = g.x + 2 * g.hs, g.y + 2 * g.hs
    for a, b in ctx.chunks:
        n = b - a
        qc = _q_blocks(q, g, a, b, work.get("q", n, g.blocks, g.rows, g.dim))
        kw = _kv_windows(k, g, a, b, work.get("kpad", n, xp, yp, g.dim, zero=True),
                         work.get("kw", n, g.blocks, g.keys, g.dim), ctx.scale * LOG2E)
        s = _scores(ctx, qc, kw, n)
        m = torch.amax(s, -1, keepdim=True, out=work.get("m", n, g.blocks, g.rows, 1))
        p = s.sub_(m).exp2_()
        denom = torch.sum(p, -1, keepdim=True, out=work.get("l", n, g.blocks, g.rows, 1))
        vw = _kv_windows(v, g, a, b, work.get("vpad", n, xp, yp, g.dim_v, zero=True),
                         work.get("vw", n, g.blocks, g.keys, g.dim_v))
        o = torch.matmul(p, vw, out=work.get("o", n, g.blocks, g.rows, g.dim_v)).div_(denom)
        shape = (n, g.nbx, g.nby, g.group, g.bq, g.bq, -1)
        out_v[a:b] = o.view(shape)
        lse_v[a:b] = m.add_(denom.log2_()).mul_(LN2).view(shape)
    return out, lse


def halo_bwd(do, q, k, v, out, lse, block_size, halo_size, pad_mode, rel_h, rel_w, scale):
    """Gradients ``(dq, dk, dv, drel_h, drel_w)`` recomputed from the saved ``lse``; drel_* None for a None table."""
    ctx = _setup(q, k, v, block_size, halo_size, pad_mode, rel_h, rel_w, scale)
    g, work, cdt, table = ctx.g, ctx.work, ctx.cdt, ctx.table
    # contiguous whatever the inputs' strides: the views below must alias them
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dq_v = _q_view(dq, g)
    dk_v = dk.view(g.batch * g.kv_heads, g.x, g.y, g.dim)
    dv_v = dv.view(g.batch * g.kv_heads, g.x, g.y, g.dim_v)
    dtable = None if table is None else torch.zeros_like(table)
    xp, yp = g.x + 2 * g.hs, g.y + 2 * g.hs
    # per-query scalars laid out like q: the LSE in base 2 and delta = rowsum(dO ∘ O)
    lse_delta = torch.stack([lse.to(cdt) * LOG2E, (do.to(cdt) * out.to(cdt)).sum(-1)], -1)
    for a, b in ctx.chunks:
        n = b - a
        qc = _q_blocks(q, g, a, b, work.get("q", n, g.blocks, g.rows, g.dim))
        dob = _q_blocks(do, g, a, b, work.get("do", n, g.blocks, g.rows, g.dim_v))
        ld = _q_blocks(lse_delta, g, a, b, work.get("ld", n, g.blocks, g.rows, 2))
        kw = _kv_windows(k, g, a, b, work.get("kpad", n, xp, yp, g.dim, zero=True),
                         work.get("kw", n, g.blocks, g.keys, g.dim), ctx.scale * LOG2E)
        vw = _kv_windows(v, g, a, b, work.get("vpad", n, xp, yp, g.dim_v, zero=True),
                         work.get("vw", n, g.blocks, g.keys, g.dim_v))
        p = _scores(ctx, qc, kw, n).sub_(ld[..., :1]).exp2_()
        dvw = torch.matmul(p.transpose(-1, -2), dob, out=work.get("dvw", n, g.blocks, g.keys, g.dim_v))
        dv_v[a:b] = _fold_windows(dvw, g, *_fold_buffers(work, "fv", g, n, g.dim_v))
        ds = torch.matmul(dob, vw.transpose(-1, -2), out=work.get("ds", n, g.blocks, g.rows, g.keys))
        ds.sub_(ld[..., 1:]).mul_(p)
        dkw = torch.matmul(ds.transpose(-1, -2), qc, out=work.get("dkw", n, g.blocks, g.keys, g.dim))
        dk_v[a:b] = _fold_windows(dkw.mul_(ctx.scale), g, *_fold_buffers(work, "fk", g, n, g.dim))
        # kw carries scale·log2 e
        dqc = torch.matmul(ds, kw, out=work.get("dq", n, g.blocks, g.rows, g.dim)).mul_(LN2)
        if table is not None:
            # window-row and window-column sums of dS, (rows, 2·win), scattered into the table layout; the
            # skew views always hit the same entries of dT, whose others stay zero from its allocation
            da = work.get("da", n, g.nbx, g.nby, g.group, g.bq, g.bq, 2 * g.win)
            torch.mm(ds.view(-1, g.keys), ctx.spread.transpose(0, 1), out=da.view(-1, 2 * g.win))
            dt = work.get("dt", n, g.blocks, g.rows, table.shape[0], zero=True)
            dth, dtw = _skews(dt, g, n)
            dth.copy_(da[..., :g.win])
            dtw.copy_(da[..., g.win:])
            dt2 = dt.view(-1, table.shape[0])
            dqc.view(-1, g.dim).addmm_(dt2, table, alpha=LN2)  # the table is in base-2 units
            dtable.addmm_(dt2.transpose(0, 1), qc.view(-1, g.dim))
        dq_v[a:b] = dqc.view(n, g.nbx, g.nby, g.group, g.bq, g.bq, g.dim)
    drel_h = drel_w = None
    if dtable is not None:
        rr = 2 * g.win - 1
        if rel_h is not None:
            drel_h = dtable[:rr].to(rel_h.dtype, copy=True)  # copies: custom-op outputs must not alias
        if rel_w is not None:
            drel_w = dtable[rr:].to(rel_w.dtype, copy=True)
    return dq, dk, dv, drel_h, drel_w
