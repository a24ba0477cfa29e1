"""The shared fused attention kernel (design §2.2), in Triton.

One tiled online-softmax kernel serves every softmax-type op. Tokens live on a 1-, 2- or 3-D grid
(``S0 x S1 x S2``, row-major, fewer dims padded with leading 1s); queries are processed in
``QT0 x QT1 x QT2`` tiles and keys in ``KT0 x KT1 x KT2`` tiles. Which keys a query sees is decided
by two hooks keyed on the ``MODE`` constexpr:

* ``_kv_box``  — the per-axis key range a whole query tile can see; the kernel visits only the key
  tiles inside it (and ``_q_box``, its inverse, drives the dK/dV pass);
* ``_visible`` — the per-(query, key) mask inside a visited tile pair.

MODE 0 is dense attention (optionally causal on the flattened index), MODE 1 neighborhood attention
(NATTEN semantics per axis), MODE 2 halo attention (blocked windows; zero padding as a padded key grid).
Additive logit terms (``BIAS``): a per-head relative-position table, or per-query per-axis tables (halo).
Extra tokens every query sees are folded into the same softmax after the key tiles.

Forward saves the log-sum-exp (natural log, fp32) per query; backward recomputes the scores from
it: one pass for dK/dV per key tile (looping over the GQA group's heads, so no atomics) and one for
dQ per query tile. ``SCORE`` 1 switches to sigmoid scoring (FlashSigmoid-style, no normalizer).
``GATED`` multiplies each (query, head) output by a gate in the epilogue (mixture-of-heads); a query tile
whose gates are all zero visits no key at all, in every pass.
Launch configuration and the host-side functions live in ``triton_launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# Kernels may only read constexpr globals.
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
MODE_DENSE = tl.constexpr(0)
MODE_NEIGHBORHOOD = tl.constexpr(1)
MODE_HALO = tl.constexpr(2)
# Additive logit terms: none, a per-head relative-position table (NAT rpb), per-query per-axis tables (halo).
BIAS_NONE, BIAS_TABLE, BIAS_QUERY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
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
def _axis_window(j, Lg, K, ST, CAUSAL: tl.constexpr):
    """NATTEN window [lo, hi) in group units for group index j in a group of length Lg (see semantics.py)."""
    if CAUSAL:
        leader = tl.minimum((j // ST) * ST + ST - 1, Lg - 1)
        lo = tl.maximum(leader - K + 1, 0)
        hi = j + 1
    else:
        leader = tl.minimum((j // ST) * ST + ST // 2, Lg - 1)
        lo = tl.minimum(tl.maximum(leader - K // 2, 0), Lg - K)
        hi = lo + K
    return lo, hi


@triton.jit
def _axis_visible(qc, kc, S, K, DL, ST, CAUSAL: tl.constexpr):
    """(M, N) mask: key coordinate kc lies in the window of query coordinate qc on one axis."""
    r = qc % DL
    lo, hi = _axis_window(qc // DL, (S - r + DL - 1) // DL, K, ST, CAUSAL)
    t = kc // DL
    return ((kc[None, :] % DL) == r[:, None]) & (t[None, :] >= lo[:, None]) & (t[None, :] < hi[:, None])


@triton.jit
def _axis_kv_range(o, T: tl.constexpr, S, K, DL, ST, CAUSAL: tl.constexpr):
    """[lo, hi) key coordinates seen by query coordinates [o, o + T) on one axis.

    Windows are non-decreasing in the group index and the group length, so the first query of the
    shortest group and the last query of the longest group bound them.
    """
    lo, _ = _axis_window(o // DL, S // DL, K, ST, CAUSAL)
    _, hi = _axis_window((tl.minimum(o + T, S) - 1) // DL, (S + DL - 1) // DL, K, ST, CAUSAL)
    return lo * DL, tl.minimum(hi * DL, S)


@triton.jit
def _axis_q_range(o, T: tl.constexpr, S, K, DL, ST, CAUSAL: tl.constexpr):
    """[lo, hi) query coordinates whose windows reach key coordinates [o, o + T): the inverse neighborhood.

    Inverts the monotone window ends: the first query whose window end passes t_min, the last whose
    window start is <= t_max (all queries when the border clamp lets every window reach t_max).
    """
    t_min = o // DL
    t_max = (tl.minimum(o + T, S) - 1) // DL
    lg_min = S // DL
    lg_max = (S + DL - 1) // DL
    if CAUSAL:
        j0 = t_min
        reach_all = lg_min - 1 <= t_max + K - 1
        j1 = (t_max + K - ST) // ST * ST + ST - 1
    else:
        kl = K // 2
        a = tl.maximum(t_min - K + 1 + kl - ST // 2, 0)
        j0 = tl.where(t_min - K + 1 <= 0, 0, (a + ST - 1) // ST * ST)
        reach_all = (t_max >= lg_min - K) | (lg_min - 1 <= t_max + kl)
        j1 = (t_max + kl - ST // 2) // ST * ST + ST - 1
    j1 = tl.where(reach_all, lg_max - 1, tl.minimum(j1, lg_max - 1))
    return j0 * DL, tl.minimum((j1 + 1) * DL, S)


@triton.jit
def _halo_window(qc, BK, HALO, BQ, PAD: tl.constexpr):
    """Halo window [lo, hi) in (padded) key coordinates of query coordinate(s) qc, and the window start."""
    lo = (qc // BQ) * BK - HALO + PAD * HALO
    return lo, lo + BK + 2 * HALO


@triton.jit
def _halo_q_range(o, T: tl.constexpr, QS, KS, BK, HALO, BQ, PAD: tl.constexpr):
    """[lo, hi) query coordinates whose halo windows reach padded key coordinates [o, o + T)."""
    r_min = o - PAD * HALO
    r_max = tl.minimum(o + T, KS) - 1 - PAD * HALO
    # first block whose window end passes r_min: floor((r_min - BK - HALO) / BK) + 1, kept non-negative
    shift = (BK + 2 * HALO) // BK + 2
    b_lo = tl.maximum((r_min - BK - HALO + shift * BK) // BK - shift + 1, 0)
    b_hi = (r_max + HALO) // BK
    return b_lo * BQ, tl.minimum((b_hi + 1) * BQ, QS)


@triton.jit
def _kv_box(o0, o1, o2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
            QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """Per-axis [lo, hi) key box visible to the query tile at origin (o0, o1, o2)."""
    if MODE == MODE_NEIGHBORHOOD:
        lo0, hi0 = _axis_kv_range(o0, QT0, KS0, NK0, DL0, ST0, (CAUSAL >> 0) & 1)
        lo1, hi1 = _axis_kv_range(o1, QT1, KS1, NK1, DL1, ST1, (CAUSAL >> 1) & 1)
        lo2, hi2 = _axis_kv_range(o2, QT2, KS2, NK2, DL2, ST2, (CAUSAL >> 2) & 1)
        return lo0, hi0, lo1, hi1, lo2, hi2
    if MODE == MODE_HALO:  # 2-D: axes 1 and 2; NK = key block, DL = halo, ST = query block
        lo1, _ = _halo_window(o1, NK1, DL1, ST1, CAUSAL)
        _, hi1 = _halo_window(o1 + QT1 - 1, NK1, DL1, ST1, CAUSAL)
        lo2, _ = _halo_window(o2, NK2, DL2, ST2, CAUSAL)
        _, hi2 = _halo_window(o2 + QT2 - 1, NK2, DL2, ST2, CAUSAL)
        return 0, KS0, tl.maximum(lo1, 0), tl.minimum(hi1, KS1), tl.maximum(lo2, 0), tl.minimum(hi2, KS2)
    hi2 = KS2
    if CAUSAL:  # dense causal is defined on 1-D token grids
        hi2 = tl.minimum(o2 + QT2, KS2)
    return 0, KS0, 0, KS1, 0, hi2


@triton.jit
def _q_box(o0, o1, o2, QS0, QS1, QS2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
           KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """Per-axis [lo, hi) range of queries that can see some key of the key tile at (o0, o1, o2)."""
    if MODE == MODE_NEIGHBORHOOD:
        lo0, hi0 = _axis_q_range(o0, KT0, QS0, NK0, DL0, ST0, (CAUSAL >> 0) & 1)
        lo1, hi1 = _axis_q_range(o1, KT1, QS1, NK1, DL1, ST1, (CAUSAL >> 1) & 1)
        lo2, hi2 = _axis_q_range(o2, KT2, QS2, NK2, DL2, ST2, (CAUSAL >> 2) & 1)
        return lo0, hi0, lo1, hi1, lo2, hi2
    if MODE == MODE_HALO:
        lo1, hi1 = _halo_q_range(o1, KT1, QS1, KS1, NK1, DL1, ST1, CAUSAL)
        lo2, hi2 = _halo_q_range(o2, KT2, QS2, KS2, NK2, DL2, ST2, CAUSAL)
        return 0, QS0, lo1, hi1, lo2, hi2
    lo2 = 0
    if CAUSAL:
        lo2 = o2
    return 0, QS0, 0, QS1, lo2, QS2


@triton.jit
def _visible(qc0, qc1, qc2, qflat, kc0, kc1, kc2, kflat, S0, S1, S2, NK0, NK1, NK2, DL0, DL1, DL2,
             ST0, ST1, ST2, MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of which keys each query sees (bounds are handled by the caller)."""
    if MODE == MODE_NEIGHBORHOOD:
        vis = _axis_visible(qc2, kc2, S2, NK2, DL2, ST2, (CAUSAL >> 2) & 1)
        vis &= _axis_visible(qc1, kc1, S1, NK1, DL1, ST1, (CAUSAL >> 1) & 1)
        vis &= _axis_visible(qc0, kc0, S0, NK0, DL0, ST0, (CAUSAL >> 0) & 1)
    elif MODE == MODE_HALO:
        lo1, hi1 = _halo_window(qc1, NK1, DL1, ST1, CAUSAL)
        lo2, hi2 = _halo_window(qc2, NK2, DL2, ST2, CAUSAL)
        vis = (kc1[None, :] >= lo1[:, None]) & (kc1[None, :] < hi1[:, None])
        vis &= (kc2[None, :] >= lo2[:, None]) & (kc2[None, :] < hi2[:, None])
    elif CAUSAL:
        vis = kflat[None, :] <= qflat[:, None]
    else:
        vis = (qflat[:, None] >= 0) & (kflat[None, :] >= 0)
    return vis


@triton.jit
def _rpb_index(qc0, qc1, qc2, kc0, kc1, kc2, NK0, NK1, NK2, DL0, DL1, DL2):
    """Flat index into an (H, 2k0-1, 2k1-1, 2k2-1) bias table: per-axis (t_key - j_query) + k - 1."""
    i0 = kc0[None, :] // DL0 - qc0[:, None] // DL0 + NK0 - 1
    i1 = kc1[None, :] // DL1 - qc1[:, None] // DL1 + NK1 - 1
    i2 = kc2[None, :] // DL2 - qc2[:, None] // DL2 + NK2 - 1
    return (i0 * (2 * NK1 - 1) + i1) * (2 * NK2 - 1) + i2


@triton.jit
def _box_tiles(lo0, hi0, lo1, hi1, lo2, hi2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """First tile index per axis and tile counts covering a box (a count <= 0 means empty)."""
    f0 = lo0 // T0
    f1 = lo1 // T1
    f2 = lo2 // T2
    n0 = tl.cdiv(hi0, T0) - f0
    n1 = tl.cdiv(hi1, T1) - f1
    n2 = tl.cdiv(hi2, T2) - f2
    return f0, f1, f2, tl.maximum(n0, 0), tl.maximum(n1, 0), tl.maximum(n2, 0)


@triton.jit
def _scores(q, k, vis, bias, scale_log2, sig_bias_log2, SCORE: tl.constexpr, PRECISION: tl.constexpr):
    """Masked scores in log2 units: softmax logits (-inf where hidden) or sigmoid probabilities (0 where hidden).

    ``bias`` (log2 units) is the relative-position bias, or 0.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias
    if SCORE == 0:
        s = tl.where(vis, s, float("-inf"))
    else:
        s = tl.where(vis, 1.0 / (1.0 + tl.exp2(-(s + sig_bias_log2))), 0.0)
    return s


@triton.jit
def _softmax_step(m, l, acc, s, v, SCORE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one key tile's scores ``s`` and values ``v`` into the running (max, sum, accumulator)."""
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
    return m, l, acc


@triton.jit
def _key_address(kc0, kc1, kc2, kflat, kvalid, KS1, KS2, DL1, DL2, MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """Memory index and in-map mask of key coordinates. With halo zero padding the key grid is the map
    padded by the halo: padded positions are visible keys that load as zeros."""
    if MODE == MODE_HALO:
        if CAUSAL:
            r1 = kc1 - DL1
            r2 = kc2 - DL2
            rs1 = KS1 - 2 * DL1
            rs2 = KS2 - 2 * DL2
            inside = kvalid & (r1 >= 0) & (r1 < rs1) & (r2 >= 0) & (r2 < rs2)
            return (kc0 * rs1 + r1) * rs2 + r2, inside
    return kflat, kvalid


@triton.jit
def _pair_terms(qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, BA, BB, h, row0,
                KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
                MODE: tl.constexpr, CAUSAL: tl.constexpr, BIAS: tl.constexpr):
    """Visibility mask, additive bias (log2 units) and the bias-table offsets of a (query tile, key tile) pair.

    BIAS_TABLE: ``BA`` is an (H, 2k0-1, 2k1-1, 2k2-1) table indexed by the relative position.
    BIAS_QUERY (halo): ``BA``/``BB`` are per-query (rows, 2*win-1) tables for axes 1/2, indexed by the
    key's window position minus the query's in-block position.
    """
    vis = qvalid[:, None] & kvalid[None, :] & _visible(
        qc0, qc1, qc2, qflat, kc0, kc1, kc2, kflat, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2,
        ST0, ST1, ST2, MODE, CAUSAL)
    if BIAS == BIAS_TABLE:
        ia = h * (2 * NK0 - 1) * (2 * NK1 - 1) * (2 * NK2 - 1) + _rpb_index(
            qc0, qc1, qc2, kc0, kc1, kc2, NK0, NK1, NK2, DL0, DL1, DL2)
        ib = ia
        bias = tl.load(BA + ia, mask=vis, other=0.0).to(tl.float32) * LOG2E
    elif BIAS == BIAS_QUERY:
        win1 = NK1 + 2 * DL1
        win2 = NK2 + 2 * DL2
        lo1, _ = _halo_window(qc1, NK1, DL1, ST1, CAUSAL)
        lo2, _ = _halo_window(qc2, NK2, DL2, ST2, CAUSAL)
        rows = row0 + qflat[:, None]
        ia = rows * (2 * win1 - 1) + (kc1[None, :] - lo1[:, None]) - (qc1 % ST1)[:, None] + win1 - 1
        ib = rows * (2 * win2 - 1) + (kc2[None, :] - lo2[:, None]) - (qc2 % ST2)[:, None] + win2 - 1
        bias = tl.load(BA + ia, mask=vis, other=0.0).to(tl.float32) + tl.load(BB + ib, mask=vis, other=0.0).to(
            tl.float32)
        bias = bias * LOG2E
    else:
        ia = 0
        ib = 0
        bias = 0.0
    return vis, bias, ia, ib


@triton.jit
def _kv_tiles(o0, o1, o2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
              QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
              KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """The key tiles the query tile at (o0, o1, o2) must visit: first tile and count per axis."""
    lo0, hi0, lo1, hi1, lo2, hi2 = _kv_box(o0, o1, o2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2,
                                           ST0, ST1, ST2, QT0, QT1, QT2, MODE, CAUSAL)
    return _box_tiles(lo0, hi0, lo1, hi1, lo2, hi2, KT0, KT1, KT2)


@triton.jit
def _query_tile(Q, sqb, sqh, sqn, H, G, D, QS0, QS1, QS2,
                QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch x head, query tile): indices, coordinates, masks and the Q tile."""
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
    return bh, b, h, hk, o0, o1, o2, qc0, qc1, qc2, qflat, qvalid, d, dmask, qmask, q


@triton.jit
def _key_keep(KM, kflat, kvalid, KMASK: tl.constexpr):
    """In-grid keys that the key padding mask keeps (``KM``: this batch's row of 0/1 bytes, dense mode)."""
    if KMASK:
        kvalid &= tl.load(KM + kflat, mask=kvalid, other=0) != 0
    return kvalid


@triton.jit
def _key_tile(t, f0, f1, f2, n1, n2, K, V, KM, skn, svn, d, dmask, c, cmask, KS0, KS1, KS2, DL1, DL2,
              KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
              KMASK: tl.constexpr):
    """The t-th key tile of a box (first tiles f*, counts n*): coordinates, visible-key mask, K and V
    (``d``: q/k head-dim lanes, ``c``: value head-dim lanes)."""
    kc0, kc1, kc2, kflat, kvalid = _tile(
        (f0 + t // (n1 * n2)) * KT0, (f1 + (t // n2) % n1) * KT1, (f2 + t % n2) * KT2,
        KS0, KS1, KS2, KT0, KT1, KT2)
    kaddr, kin = _key_address(kc0, kc1, kc2, kflat, kvalid, KS1, KS2, DL1, DL2, MODE, CAUSAL)
    k = tl.load(K + kaddr[:, None] * skn + d[None, :], mask=kin[:, None] & dmask[None, :], other=0.0)
    v = tl.load(V + kaddr[:, None] * svn + c[None, :], mask=kin[:, None] & cmask[None, :], other=0.0)
    return kc0, kc1, kc2, kflat, _key_keep(KM, kflat, kvalid, KMASK), k, v


@triton.jit
def _extra_tile(e0, EK, EV, sekn, sevn, d, dmask, c, cmask, NE, T: tl.constexpr):
    """Extra tokens [e0, e0 + T): valid mask, K and V."""
    e = e0 + tl.arange(0, T)
    evalid = e < NE
    k = tl.load(EK + e[:, None] * sekn + d[None, :], mask=evalid[:, None] & dmask[None, :], other=0.0)
    v = tl.load(EV + e[:, None] * sevn + c[None, :], mask=evalid[:, None] & cmask[None, :], other=0.0)
    return evalid, k, v


@triton.jit
def _tile_gates(GATES, row, qflat, qvalid):
    """Gates of a query tile's rows (fp32, 0 outside the grid) and whether any is non-zero."""
    gate = tl.load(GATES + row + qflat, mask=qvalid, other=0.0)
    return gate, tl.max(tl.abs(gate), 0) > 0


@triton.jit
def _gated_walk(GATES, row, qflat, qvalid, n_tiles, n_extra):
    """A query tile's gates and its key-tile / extra-token counts: none when all its gates are zero (its rows
    then come out empty: 0 with lse = +inf)."""
    gate, active = _tile_gates(GATES, row, qflat, qvalid)
    return gate, tl.where(active, n_tiles, 0), tl.where(active, n_extra, 0)


@triton.jit
def _value_lanes(DVH, BLOCK_DV: tl.constexpr):
    """Lanes of the value head dim ``DVH`` (padded to BLOCK_DV) and their mask."""
    c = tl.arange(0, BLOCK_DV)
    return c, c < DVH


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, BA, BB, EK, EV, KM, GATES,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sekb, sekh, sekn, sevb, sevh, sevn,
    H, G, D, DVH, NE, QS0, QS1, QS2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
    scale_log2, sig_bias_log2,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr, BIAS: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    KMASK: tl.constexpr, GATED: tl.constexpr,
):
    """One program per (query tile, batch x head): online softmax over the visible key tiles, then the
    ``NE`` extra tokens every query sees."""
    bh, b, h, hk, o0, o1, o2, qc0, qc1, qc2, qflat, qvalid, d, dmask, _qmask, q = _query_tile(
        Q, sqb, sqh, sqn, H, G, D, QS0, QS1, QS2, QT0, QT1, QT2, BLOCK_D)
    c, cmask = _value_lanes(DVH, BLOCK_DV)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    KM += b * (KS0 * KS1 * KS2)
    row0 = bh.to(tl.int64) * (QS0 * QS1 * QS2)

    m = tl.full([QT0 * QT1 * QT2], float("-inf"), tl.float32)
    l = tl.zeros([QT0 * QT1 * QT2], tl.float32)
    acc = tl.zeros([QT0 * QT1 * QT2, BLOCK_DV], tl.float32)
    f0, f1, f2, n0, n1, n2 = _kv_tiles(o0, o1, o2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2,
                                       ST0, ST1, ST2, QT0, QT1, QT2, KT0, KT1, KT2, MODE, CAUSAL)
    n_tiles = n0 * n1 * n2
    n_extra = NE
    if GATED:
        gate, n_tiles, n_extra = _gated_walk(GATES, row0, qflat, qvalid, n_tiles, n_extra)
    for t in range(0, n_tiles):
        kc0, kc1, kc2, kflat, kvalid, k, v = _key_tile(t, f0, f1, f2, n1, n2, K, V, KM, skn, svn, d, dmask, c,
                                                       cmask, KS0, KS1, KS2, DL1, DL2, KT0, KT1, KT2, MODE, CAUSAL,
                                                       KMASK)
        vis, bias, _, _ = _pair_terms(qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, BA, BB, h, row0,
                                      KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
                                      MODE, CAUSAL, BIAS)
        s = _scores(q, k, vis, bias, scale_log2, sig_bias_log2, SCORE, PRECISION)
        m, l, acc = _softmax_step(m, l, acc, s, v, SCORE, PRECISION)

    EK += b * sekb + hk * sekh
    EV += b * sevb + hk * sevh
    for e0 in range(0, n_extra, KT0 * KT1 * KT2):
        evalid, k, v = _extra_tile(e0, EK, EV, sekn, sevn, d, dmask, c, cmask, NE, KT0 * KT1 * KT2)
        s = _scores(q, k, qvalid[:, None] & evalid[None, :], 0.0, scale_log2, sig_bias_log2, SCORE, PRECISION)
        m, l, acc = _softmax_step(m, l, acc, s, v, SCORE, PRECISION)

    if SCORE == 0:
        empty = l == 0.0
        l_safe = tl.where(empty, 1.0, l)
        acc = acc / l_safe[:, None]
        # A query with no visible key outputs 0; lse=+inf makes its backward probabilities 0.
        lse = tl.where(empty, float("inf"), (m + tl.log2(l_safe)) * LN2)
    else:
        lse = tl.zeros([QT0 * QT1 * QT2], tl.float32)  # sigmoid scoring has no normalizer
    if GATED:
        acc = acc * gate[:, None]
    tl.store(LSE + bh.to(tl.int64) * (QS0 * QS1 * QS2) + qflat, lse, mask=qvalid)
    tl.store(O + b * sob + h * soh + qflat[:, None] * son + c[None, :], acc.to(O.dtype.element_ty),
             mask=qvalid[:, None] & cmask[None, :])


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, vis, bias, scale_log2, sig_bias_log2,
                       SCORE: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed probabilities P and logit gradients dS = dL/d(logit)."""
    s = _scores(q, k, vis, bias, scale_log2, sig_bias_log2, SCORE, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if SCORE == 0:
        p = tl.exp2(s - lse2[:, None])
        ds = p * (dp - delta[:, None])
    else:
        p = s
        ds = p * (1.0 - p) * dp
    return p, ds


@triton.jit
def _dkdv_step(dk, dv, k, v, Qh, DOh, LSE, DELTA, BA, BB, h, row, gate, sqn, sdon,
               qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, d, dmask, c, cmask,
               KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2, scale_log2, sig_bias_log2,
               MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr,
               BIAS: tl.constexpr, GATED: tl.constexpr):
    """Fold one query tile into a key tile's (dK, dV) accumulators."""
    q = tl.load(Qh + qflat[:, None] * sqn + d[None, :], mask=qvalid[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DOh + qflat[:, None] * sdon + c[None, :], mask=qvalid[:, None] & cmask[None, :], other=0.0)
    if GATED:  # gradient of the ungated output
        do = (do * gate[:, None]).to(q.dtype)
    lse2 = tl.load(LSE + row + qflat, mask=qvalid, other=0.0) * LOG2E
    delta = tl.load(DELTA + row + qflat, mask=qvalid, other=0.0)
    vis, bias, _, _ = _pair_terms(qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, BA, BB, h,
                                  row, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
                                  MODE, CAUSAL, BIAS)
    p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, vis, bias, scale_log2, sig_bias_log2, SCORE, PRECISION)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, BA, BB, KM, GATES,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    H, G, D, DVH, QS0, QS1, QS2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
    scale, scale_log2, sig_bias_log2,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr, BIAS: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    KMASK: tl.constexpr, GATED: tl.constexpr,
):
    """One program per (key tile, batch x kv head): accumulates dK, dV over the queries that see the tile
    (the inverse neighborhood), for every query head of the GQA group — no atomics. ``DVH``: value head dim.
    With ``GATED``, ``DO`` is the gradient of the gated output and query tiles whose gates are all zero are skipped."""
    bhk = tl.program_id(1)
    HK = H // G
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    o0, o1, o2 = _tile_origin(tl.program_id(0), KS1, KS2, KT0, KT1, KT2)
    kc0, kc1, kc2, kflat, kvalid = _tile(o0, o1, o2, KS0, KS1, KS2, KT0, KT1, KT2)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    c, cmask = _value_lanes(DVH, BLOCK_DV)
    kaddr, kin = _key_address(kc0, kc1, kc2, kflat, kvalid, KS1, KS2, DL1, DL2, MODE, CAUSAL)
    kvalid = _key_keep(KM + b * (KS0 * KS1 * KS2), kflat, kvalid, KMASK)
    kmask = kin[:, None] & dmask[None, :]
    vmask = kin[:, None] & cmask[None, :]
    k = tl.load(K + b * skb + hk * skh + kaddr[:, None] * skn + d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + kaddr[:, None] * svn + c[None, :], mask=vmask, other=0.0)
    dk = tl.zeros([KT0 * KT1 * KT2, BLOCK_D], tl.float32)
    dv = tl.zeros([KT0 * KT1 * KT2, BLOCK_DV], tl.float32)
    NQ = QS0 * QS1 * QS2

    lo0, hi0, lo1, hi1, lo2, hi2 = _q_box(o0, o1, o2, QS0, QS1, QS2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2,
                                          ST0, ST1, ST2, KT0, KT1, KT2, MODE, CAUSAL)
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
            if GATED:
                gate, active = _tile_gates(GATES, row, qflat, qvalid)
                if active:
                    dk, dv = _dkdv_step(dk, dv, k, v, Qh, DOh, LSE, DELTA, BA, BB, h, row, gate, sqn, sdon,
                                        qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, d, dmask, c, cmask,
                                        KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
                                        scale_log2, sig_bias_log2, MODE, CAUSAL, SCORE, PRECISION, BIAS, GATED)
            else:
                dk, dv = _dkdv_step(dk, dv, k, v, Qh, DOh, LSE, DELTA, BA, BB, h, row, 1.0, sqn, sdon,
                                    qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, d, dmask, c, cmask,
                                    KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
                                    scale_log2, sig_bias_log2, MODE, CAUSAL, SCORE, PRECISION, BIAS, GATED)

    # dK/dV are laid out like k/v (the unpadded map); padded halo keys have no gradient to store.
    n_keys = KS0 * KS1 * KS2
    if MODE == MODE_HALO:
        if CAUSAL:
            n_keys = KS0 * (KS1 - 2 * DL1) * (KS2 - 2 * DL2)
    rows = (b * HK + hk) * n_keys + kaddr
    tl.store(DK + rows[:, None] * D + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + rows[:, None] * DVH + c[None, :], dv.to(DV.dtype.element_ty), mask=vmask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, BA, BB, DBA, DBB, EK, EV, KM, GATES,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sekb, sekh, sekn, sevb, sevh, sevn,
    H, G, D, DVH, NE, QS0, QS1, QS2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
    scale, scale_log2, sig_bias_log2,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, SCORE: tl.constexpr, PRECISION: tl.constexpr, BIAS: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    KMASK: tl.constexpr, GATED: tl.constexpr,
):
    """One program per (query tile, batch x head): the forward's key walk (neighborhood then extra tokens),
    accumulating dQ; the bias gradient is scattered into the fp32 table with atomics."""
    bh, b, h, hk, o0, o1, o2, qc0, qc1, qc2, qflat, qvalid, d, dmask, qmask, q = _query_tile(
        Q, sqb, sqh, sqn, H, G, D, QS0, QS1, QS2, QT0, QT1, QT2, BLOCK_D)
    c, cmask = _value_lanes(DVH, BLOCK_DV)
    do = tl.load(DO + b * sdob + h * sdoh + qflat[:, None] * sdon + c[None, :], mask=qvalid[:, None] & cmask[None, :],
                 other=0.0)
    KM += b * (KS0 * KS1 * KS2)
    row = bh.to(tl.int64) * (QS0 * QS1 * QS2)
    n_extra = NE
    lse2 = tl.load(LSE + row + qflat, mask=qvalid, other=0.0) * LOG2E
    delta = tl.load(DELTA + row + qflat, mask=qvalid, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    dq = tl.zeros([QT0 * QT1 * QT2, BLOCK_D], tl.float32)

    f0, f1, f2, n0, n1, n2 = _kv_tiles(o0, o1, o2, KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2,
                                       ST0, ST1, ST2, QT0, QT1, QT2, KT0, KT1, KT2, MODE, CAUSAL)
    n_tiles = n0 * n1 * n2
    if GATED:  # DO is the gradient of the gated output
        gate, n_tiles, n_extra = _gated_walk(GATES, row, qflat, qvalid, n_tiles, n_extra)
        do = (do * gate[:, None]).to(q.dtype)
    for t in range(0, n_tiles):
        kc0, kc1, kc2, kflat, kvalid, k, v = _key_tile(t, f0, f1, f2, n1, n2, K, V, KM, skn, svn, d, dmask, c,
                                                       cmask, KS0, KS1, KS2, DL1, DL2, KT0, KT1, KT2, MODE, CAUSAL,
                                                       KMASK)
        vis, bias, ia, ib = _pair_terms(qc0, qc1, qc2, qflat, qvalid, kc0, kc1, kc2, kflat, kvalid, BA, BB, h, row,
                                        KS0, KS1, KS2, NK0, NK1, NK2, DL0, DL1, DL2, ST0, ST1, ST2,
                                        MODE, CAUSAL, BIAS)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, vis, bias, scale_log2, sig_bias_log2,
                                   SCORE, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if BIAS == BIAS_TABLE:
            tl.atomic_add(DBA + ia, ds, mask=vis)
        elif BIAS == BIAS_QUERY:
            tl.atomic_add(DBA + ia, ds, mask=vis)
            tl.atomic_add(DBB + ib, ds, mask=vis)

    EK += b * sekb + hk * sekh
    EV += b * sevb + hk * sevh
    for e0 in range(0, n_extra, KT0 * KT1 * KT2):
        evalid, k, v = _extra_tile(e0, EK, EV, sekn, sevn, d, dmask, c, cmask, NE, KT0 * KT1 * KT2)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, qvalid[:, None] & evalid[None, :], 0.0,
                                   scale_log2, sig_bias_log2, SCORE, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    out = bh.to(tl.int64) * (QS0 * QS1 * QS2) * D + qflat[:, None] * D + d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)
