"""The shared fused attention kernel (design §2.2), in Triton.

One tiled online-softmax kernel serves every softmax-type op. Tokens live on a 1-, 2- or 3-D grid
(``S0 x S1 x S2``, row-major, fewer dims padded with leading 1s); queries are processed in
``QT0 x QT1 x QT2`` tiles and keys in ``KT0 x KT1 x KT2`` tiles. Which keys a query sees is decided
by two hooks keyed on the ``MODE`` constexpr:

* ``_kv_box``  — the per-axis key range a whole query tile can see; the kernel visits only the key
  tiles inside it (and ``_q_box``, its inverse, drives the dK/dV pass);
* ``_visible`` — the per-(query, key) mask inside a visited tile pair.

MODE 0 is dense attention (optionally causal on the flattened index). Local modes (neighborhood,
halo) add their boxes and masks here without touching the loops.

Forward saves the log-sum-exp (natural log, fp32) per query; backward recomputes the scores from
it: one pass for dK/dV per key tile (looping over the GQA group's heads, so no atomics) and one for
dQ per query tile. ``SCORE`` 1 switches to sigmoid scoring (FlashSigmoid-style, no normalizer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnzoo.kernels.backend import triton_interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MODE_DENSE = 0
SCORES = {"softmax": 0, "sigmoid": 1}


@triton.jit
def _tile(o0, o1, o2, S0, S1, S2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Coordinates of the tile whose origin is (o0, o1, o2): per-axis coords, flat index, in-bounds."""
    r = tl.arange(0, T0 * T1 * T2)
    if T0 == 1 and T1 == 1:
        # 1-D tiles: keep the index visibly contiguous so loads vectorize.
        c0 = tl.zeros_like(r) + o0
        c1 = tl.zeros_like(r) + o1
    else:
        c0 = o0 + r // (T1 * T2)
        c1 = o1 + (r // T2) % T1
    c2 = o2 + r % T2
    flat = (c0 * S1 + c1) * S2 + c2
    valid = (c0 < S0) & (c1 < S1) & (c2 < S2)
    return c0, c1, c2, flat, valid


@triton.jit
def _tile_origin(tile, S1, S2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Origin of the ``tile``-th tile in row-major tile order."""
    n1 = tl.cdiv(S1, T1)
    n2 = tl.cdiv(S2, T2)
    return (tile // (n1 * n2)) * T0, ((tile // n2) % n1) * T1, (tile % n2) * T2


@triton.jit
def _kv_box(o0, o1, o2, QS0, QS1, QS2, KS0, KS1, KS2,
            QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
            MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """Per-axis [lo, hi) key range visible to the query tile at origin (o0, o1, o2)."""
    hi2 = KS2
    if MODE == 0:
        if CAUSAL:  # dense causal is defined on 1-D token grids
            hi2 = tl.minimum(o2 + QT2, KS2)
    return 0, KS0, 0, KS1, 0, hi2


@triton.jit
def _q_box(o0, o1, o2, QS0, QS1, QS2, KS0, KS1, KS2,
           KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr,
           MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """Per-axis [lo, hi) range of queries that can see some key of the key tile at (o0, o1, o2)."""
    lo2 = 0
    if MODE == 0:
        if CAUSAL:
            lo2 = o2
    return 0, QS0, 0, QS1, lo2, QS2


@triton.jit
def _visible(qc0, qc1, qc2, qflat, kc0, kc1, kc2, kflat, MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of which keys each query sees (bounds are handled by the caller)."""
    vis = (qflat[:, None] >= 0) & (kflat[None, :] >= 0)
    if MODE == 0:
        if CAUSAL:
            vis = kflat[None, :] <= qflat[:, None]
    return vis


@triton.jit
def _box_tiles(lo0, hi0, lo1, hi1, lo2, hi2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """First tile index per axis and tile counts covering a box."""
    f0 = lo0 // T0
    f1 = lo1 // T1
    f2 = lo2 // T2
    n0 = tl.cdiv(hi0, T0) - f0
    n1 = tl.cdiv(hi1, T1) - f1
    n2 = tl.cdiv(hi2, T2) - f2
    return f0, f1, f2, n0, n1, n2


@triton.jit
def _scores(q, k, qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, scale_log2, bias_log2,
            MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr):
    """Masked scores in log2 units: softmax logits (-inf where hidden) or sigmoid probabilities."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    vis = qvalid[:, None] & kvalid[None, :] & _visible(qc0, qc1, qc2, qflat, kc0, kc1, kc2, kflat, MODE, CAUSAL)
    if SCORE == 0:
        s = tl.where(vis, s, float("-inf"))
    else:
        s = tl.where(vis, 1.0 / (1.0 + tl.exp2(-(s + bias_log2))), 0.0)
    return s


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, G, D, QS0, QS1, QS2, KS0, KS1, KS2, scale_log2, bias_log2,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    o0, o1, o2 = _tile_origin(tl.program_id(0), QS1, QS2, QT0, QT1, QT2)
    qc0, qc1, qc2, qflat, qvalid = _tile(o0, o1, o2, QS0, QS1, QS2, QT0, QT1, QT2)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qmask = qvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + qflat[:, None] * sqn + d[None, :], mask=qmask, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh

    m = tl.full([QT0 * QT1 * QT2], float("-inf"), tl.float32)
    l = tl.zeros([QT0 * QT1 * QT2], tl.float32)
    acc = tl.zeros([QT0 * QT1 * QT2, BLOCK_D], tl.float32)
    lo0, hi0, lo1, hi1, lo2, hi2 = _kv_box(o0, o1, o2, QS0, QS1, QS2, KS0, KS1, KS2, QT0, QT1, QT2, MODE, CAUSAL)
    f0, f1, f2, n0, n1, n2 = _box_tiles(lo0, hi0, lo1, hi1, lo2, hi2, KT0, KT1, KT2)
    for t in range(0, n0 * n1 * n2):
        kc0, kc1, kc2, kflat, kvalid = _tile(
            (f0 + t // (n1 * n2)) * KT0, (f1 + (t // n2) % n1) * KT1, (f2 + t % n2) * KT2,
            KS0, KS1, KS2, KT0, KT1, KT2)
        kmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(K + kflat[:, None] * skn + d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + kflat[:, None] * svn + d[None, :], mask=kmask, other=0.0)
        s = _scores(q, k, qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, scale_log2, bias_log2,
                    MODE, CAUSAL, SCORE, PRECISION)
        if SCORE == 0:
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m = m_new
        else:
            p = s
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    if SCORE == 0:
        empty = l == 0.0
        l_safe = tl.where(empty, 1.0, l)
        acc = acc / l_safe[:, None]
        # A query with no visible key outputs 0; lse=+inf makes its backward probabilities 0.
        lse = tl.where(empty, float("inf"), (m + tl.log2(l_safe)) * LN2)
    else:
        lse = tl.zeros([QT0 * QT1 * QT2], tl.float32)  # sigmoid scoring has no normalizer
    tl.store(LSE + bh.to(tl.int64) * (QS0 * QS1 * QS2) + qflat, lse, mask=qvalid)
    tl.store(O + b * sob + h * soh + qflat[:, None] * son + d[None, :], acc.to(O.dtype.element_ty), mask=qmask)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid,
                       scale_log2, bias_log2, MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Recomputed probabilities P and score gradients dS (w.r.t. the unscaled logits' pre-image)."""
    s = _scores(q, k, qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, scale_log2, bias_log2,
                MODE, CAUSAL, SCORE, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if SCORE == 0:
        p = tl.exp2(s - lse2[:, None])
        ds = p * (dp - delta[:, None])
    else:
        p = s
        ds = p * (1.0 - p) * dp
    return p, ds


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    H, G, D, QS0, QS1, QS2, KS0, KS1, KS2, scale, scale_log2, bias_log2,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (key tile, batch, kv head): accumulates dK, dV over the group's query heads."""
    bhk = tl.program_id(1)
    HK = H // G
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    o0, o1, o2 = _tile_origin(tl.program_id(0), KS1, KS2, KT0, KT1, KT2)
    kc0, kc1, kc2, kflat, kvalid = _tile(o0, o1, o2, KS0, KS1, KS2, KT0, KT1, KT2)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    kmask = kvalid[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + kflat[:, None] * skn + d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + kflat[:, None] * svn + d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([KT0 * KT1 * KT2, BLOCK_D], tl.float32)
    dv = tl.zeros([KT0 * KT1 * KT2, BLOCK_D], tl.float32)
    NQ = QS0 * QS1 * QS2

    lo0, hi0, lo1, hi1, lo2, hi2 = _q_box(o0, o1, o2, QS0, QS1, QS2, KS0, KS1, KS2, KT0, KT1, KT2, MODE, CAUSAL)
    f0, f1, f2, n0, n1, n2 = _box_tiles(lo0, hi0, lo1, hi1, lo2, hi2, QT0, QT1, QT2)
    for g in range(0, G):
        h = hk * G + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdob + h * sdoh
        row = (b * H + h) * NQ
        for t in range(0, n0 * n1 * n2):
            qc0, qc1, qc2, qflat, qvalid = _tile(
                (f0 + t // (n1 * n2)) * QT0, (f1 + (t // n2) % n1) * QT1, (f2 + t % n2) * QT2,
                QS0, QS1, QS2, QT0, QT1, QT2)
            qmask = qvalid[:, None] & dmask[None, :]
            q = tl.load(Qh + qflat[:, None] * sqn + d[None, :], mask=qmask, other=0.0)
            do = tl.load(DOh + qflat[:, None] * sdon + d[None, :], mask=qmask, other=0.0)
            lse2 = tl.load(LSE + row + qflat, mask=qvalid, other=0.0) * LOG2E
            delta = tl.load(DELTA + row + qflat, mask=qvalid, other=0.0)
            p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, qc0, qc1, qc2, qflat, qvalid,
                                       kc0, kc1, kc2, kflat, kvalid, scale_log2, bias_log2,
                                       MODE, CAUSAL, SCORE, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    out = (b * HK + hk) * (KS0 * KS1 * KS2) * D + kflat[:, None] * D + d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    H, G, D, QS0, QS1, QS2, KS0, KS1, KS2, scale, scale_log2, bias_log2,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query tile, batch, head): the forward's key-tile walk, accumulating dQ."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    o0, o1, o2 = _tile_origin(tl.program_id(0), QS1, QS2, QT0, QT1, QT2)
    qc0, qc1, qc2, qflat, qvalid = _tile(o0, o1, o2, QS0, QS1, QS2, QT0, QT1, QT2)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qmask = qvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + qflat[:, None] * sqn + d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + qflat[:, None] * sdon + d[None, :], mask=qmask, other=0.0)
    row = bh.to(tl.int64) * (QS0 * QS1 * QS2)
    lse2 = tl.load(LSE + row + qflat, mask=qvalid, other=0.0) * LOG2E
    delta = tl.load(DELTA + row + qflat, mask=qvalid, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    dq = tl.zeros([QT0 * QT1 * QT2, BLOCK_D], tl.float32)

    lo0, hi0, lo1, hi1, lo2, hi2 = _kv_box(o0, o1, o2, QS0, QS1, QS2, KS0, KS1, KS2, QT0, QT1, QT2, MODE, CAUSAL)
    f0, f1, f2, n0, n1, n2 = _box_tiles(lo0, hi0, lo1, hi1, lo2, hi2, KT0, KT1, KT2)
    for t in range(0, n0 * n1 * n2):
        kc0, kc1, kc2, kflat, kvalid = _tile(
            (f0 + t // (n1 * n2)) * KT0, (f1 + (t // n2) % n1) * KT1, (f2 + t % n2) * KT2,
            KS0, KS1, KS2, KT0, KT1, KT2)
        kmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(K + kflat[:, None] * skn + d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + kflat[:, None] * svn + d[None, :], mask=kmask, other=0.0)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, qc0, qc1, qc2, qflat, qvalid,
                                   kc0, kc1, kc2, kflat, kvalid, scale_log2, bias_log2,
                                   MODE, CAUSAL, SCORE, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    out = bh.to(tl.int64) * (QS0 * QS1 * QS2) * D + qflat[:, None] * D + d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _grid3(shape: list[int]) -> tuple[int, int, int]:
    return (1,) * (3 - len(shape)) + tuple(shape)


def _tiles(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> int:
    return triton.cdiv(grid[0], tile[0]) * triton.cdiv(grid[1], tile[1]) * triton.cdiv(grid[2], tile[2])


def _tile_shape(grid: tuple[int, int, int], size: int) -> tuple[int, int, int]:
    """A power-of-two tile of ``size`` elements laid along the grid's innermost axes."""
    tile = [1, 1, 1]
    for axis in (2, 1, 0):
        take = min(size, triton.next_power_of_2(grid[axis]))
        tile[axis] = take
        size //= take
        if size == 1:
            break
    return tuple(tile)


def _launch_config(pass_: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes (query, key) and warps per pass. Small fixed tiles under the interpreter."""
    if triton_interpreting():
        return dict(block_m=16, block_n=16, num_warps=1, num_stages=1)
    big_d = head_dim > 64
    wide = dtype == torch.float32  # fp32 tiles need twice the registers/shared memory
    if pass_ == "fwd":
        cfg = dict(block_m=128, block_n=32 if (big_d or wide) else 64, num_warps=8 if big_d else 4, num_stages=3)
    elif pass_ == "dkdv":
        cfg = dict(block_m=32, block_n=64 if (big_d or wide) else 128, num_warps=4 if not big_d else 8,
                   num_stages=2)
    else:  # dq
        cfg = dict(block_m=64 if (big_d or wide) else 128, block_n=32, num_warps=4 if not big_d else 8,
                   num_stages=2)
    return cfg


def _common(q: torch.Tensor, k: torch.Tensor, causal: bool, score: str, scale: float, sigmoid_bias: float):
    """Grids, constexprs and scalar arguments shared by the three kernels; grids are q/k's spatial dims."""
    qs, ks = _grid3(list(q.shape[2:-1])), _grid3(list(k.shape[2:-1]))
    head_dim = q.shape[-1]
    consts = dict(
        MODE=MODE_DENSE, CAUSAL=causal, SCORE=SCORES[score],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    scalars = (q.shape[1], q.shape[1] // k.shape[1], head_dim, *qs, *ks)
    return qs, ks, consts, scalars, scale * LOG2E, sigmoid_bias * LOG2E


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, *grid, D) -> (B, H, N, D) with a unit stride on D."""
    t = t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(*ts: torch.Tensor) -> tuple[int, ...]:
    return tuple(s for t in ts for s in t.stride()[:3])


def attention_fwd(q, k, v, causal, scale, score, sigmoid_bias):
    """q: (B, H, *q_grid, D), k/v: (B, H_kv, *kv_grid, D) -> out like q, lse (B, H, *q_grid) fp32."""
    B, H = q.shape[:2]
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    out = torch.empty_like(qf)
    lse = torch.empty(qf.shape[:3], device=q.device, dtype=torch.float32)
    qs, ks, consts, scalars, scale_log2, bias_log2 = _common(q, k, causal, score, scale, sigmoid_bias)
    cfg = _launch_config("fwd", q.shape[-1], q.dtype)
    qt, kt = _tile_shape(qs, cfg["block_m"]), _tile_shape(ks, cfg["block_n"])
    _attn_fwd[(_tiles(qs, qt), B * H)](
        qf, kf, vf, out, lse, *_strides(qf, kf, vf, out), *scalars, scale_log2, bias_log2, **consts,
        QT0=qt[0], QT1=qt[1], QT2=qt[2], KT0=kt[0], KT1=kt[1], KT2=kt[2],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out.view(q.shape), lse.view(q.shape[:-1])


def attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias):
    """Gradients (dq, dk, dv) shaped like (q, k, v), from the saved fp32 ``lse``."""
    B, H = q.shape[:2]
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(do)
    lse = lse.reshape(B, H, -1).contiguous()
    if score == "softmax":
        delta = (dof.float() * _flat(out).float()).sum(-1)
    else:
        delta = lse  # unused by sigmoid scoring
    dq = torch.empty(qf.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(kf.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(vf.shape, device=q.device, dtype=v.dtype)
    qs, ks, consts, scalars, scale_log2, bias_log2 = _common(q, k, causal, score, scale, sigmoid_bias)
    strides = _strides(qf, kf, vf, dof)
    for kernel, pass_, outs in ((_attn_bwd_dkdv, "dkdv", (dk, dv)), (_attn_bwd_dq, "dq", (dq,))):
        cfg = _launch_config(pass_, q.shape[-1], q.dtype)
        qt, kt = _tile_shape(qs, cfg["block_m"]), _tile_shape(ks, cfg["block_n"])
        grid = (_tiles(ks, kt), B * k.shape[1]) if pass_ == "dkdv" else (_tiles(qs, qt), B * H)
        kernel[grid](
            qf, kf, vf, dof, lse, delta, *outs, *strides, *scalars, scale, scale_log2, bias_log2, **consts,
            QT0=qt[0], QT1=qt[1], QT2=qt[2], KT0=kt[0], KT1=kt[1], KT2=kt[2],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
