"""Chunked linear attention (design §2.5) in Triton: the unnormalized core on feature-mapped inputs.

Per (batch x head), with chunk-local cumulative log-decays ``b_t = sum of g over the chunk up to t`` (fp32,
precomputed by the launcher; ``B`` is b at the chunk's last valid token):

* ``_chunk_states`` — the recurrence over chunks, one program per (K block, V block, batch x head).
  Forward: ``H_{n+1} = e^B H_n + (k ⊙ e^(B - b))ᵀ v`` (the state before every chunk is stored, the last one
  returned). Reverse: ``dH_n = e^B dH_{n+1} + scale (q ⊙ e^b)ᵀ dO``, the same pass run backwards in time.
* ``_chunk_values`` — rows of ``X @ state + masked (X Zᵀ ⊙ decay) @ Y`` per (V block, row tile): the output
  (X=q, Z=k, Y=v, state H_n) and, mirrored in time (``REVERSE``), dv (X=k, Z=q, Y=dO, state dH_{n+1}).
* ``_chunk_keys`` — the same products with the decay on the output channels instead of the contraction:
  dq (rows dO, columns v, coefficients k, state H_n) and, mirrored, dk (rows v, columns dO, coefficients q,
  state dH_{n+1}); they also accumulate ``q ⊙ dq − k ⊙ dk``, from which the launcher gets dg by a reverse
  cumulative sum.

Non-causal attention is the same pieces without decay or intra-chunk term: one state ``kᵀv`` over all T that
every chunk reads, and ``o = scale q @ state``; no T x T matrix anywhere.

Decay (``DECAY``): none, a scalar per (head, step), or a vector over the key channels (GLA). Every exponent the
kernels take is ``<= 0`` (exp of the decay from an earlier to a later position), so there is no overflow for any
finite ``g <= 0``. A per-channel decay cannot be factored out of the q·k contraction for a whole chunk without
positive exponents, so ``DECAY_VECTOR`` works in 16-row sub-chunks: blocks below the diagonal factor through the
cumulative decay at the sub-chunk boundary (both factors <= 1), and the diagonal 16 x 16 block is computed
element-wise over the channels. Accuracy: decays between two positions are differences of fp32 cumulative sums,
so their relative error is about 1e-7 times the cumulative decay over the chunk (-5 per step over a 64-token
chunk: still within 1e-5 of float64).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kernels may only read constexpr globals.
DECAY_NONE = tl.constexpr(0)
DECAY_SCALAR = tl.constexpr(1)
DECAY_VECTOR = tl.constexpr(2)
# How ``_chunk_keys`` folds its output into the dg buffer: not at all, store +X ⊙ out, subtract X ⊙ out.
DG_NONE, DG_STORE, DG_SUBTRACT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _tile(P, t, T, D, c):
    """P[t, c] of a row-major (T, D) matrix, zero outside it: t (M,) rows, c (N,) columns -> (M, N)."""
    return tl.load(P + t[:, None] * D + c[None, :], mask=(t[:, None] < T) & (c[None, :] < D), other=0.0)


@triton.jit
def _cum(BC, t, T, KG, c, DECAY: tl.constexpr):
    """Chunk-local cumulative log-decay at rows t: (M, N) over channels c (vector decay), (M,) (scalar), or 0.

    Rows past the end read the last row, as if padded with g = 0, so exponents keep their sign there.
    """
    t = tl.minimum(t, T - 1)
    if DECAY == DECAY_VECTOR:
        b = tl.load(BC + t[:, None] * KG + c[None, :], mask=c[None, :] < KG, other=0.0)
    elif DECAY == DECAY_SCALAR:
        b = tl.load(BC + t)
    else:
        b = tl.zeros_like(t).to(tl.float32)
    return b


@triton.jit
def _cum_row(BC, t, KG, c, DECAY: tl.constexpr):
    """Cumulative log-decay at one (valid) row t: (N,) over channels c (vector decay), or a scalar."""
    if DECAY == DECAY_VECTOR:
        b = tl.load(BC + t * KG + c, mask=c < KG, other=0.0)
    else:
        b = tl.load(BC + t)
    return b


@triton.jit
def _gap(b_row, b_other, REVERSE: tl.constexpr):
    """Log-decay from the earlier to the later position (<= 0 when the other position is on the visible side):
    b_row - b_other, or b_other - b_row when time runs backwards."""
    if REVERSE:
        gap = b_other - b_row
    else:
        gap = b_row - b_other
    return gap


@triton.jit
def _rows_times(x, w, DECAY: tl.constexpr):
    """x (M, N) times per-row weights w: (M, N) for a vector decay, (M,) for a scalar one."""
    if DECAY == DECAY_VECTOR:
        x = x * w
    else:
        x = x * w[:, None]
    return x


@triton.jit
def _visible(rows, cols, REVERSE: tl.constexpr):
    """(M, N) causal mask: column token at or before the row token (at or after it when REVERSE)."""
    if REVERSE:
        vis = cols[None, :] >= rows[:, None]
    else:
        vis = cols[None, :] <= rows[:, None]
    return vis


@triton.jit
def _masked_scores(s, rows, cols, br, bc, DECAY: tl.constexpr, REVERSE: tl.constexpr):
    """Mask and scalar-decay an (M, N) score tile (br, bc: row and column cumulative decays). Vector decay is
    the caller's: its off-diagonal tiles are fully visible."""
    vis = _visible(rows, cols, REVERSE)
    if DECAY == DECAY_SCALAR:
        s = s * tl.exp(tl.where(vis, _gap(br[:, None], bc[None, :], REVERSE), float("-inf")))
    elif DECAY == DECAY_NONE:
        s = tl.where(vis, s, 0.0)
    return s


@triton.jit
def _diagonal_decay(b, rows, REVERSE: tl.constexpr):
    """(M, M, N) decay between the rows of one sub-chunk per channel (b: (M, N)), 0 where not visible."""
    vis = _visible(rows, rows, REVERSE)[:, :, None]
    return tl.exp(tl.where(vis, _gap(b[:, None, :], b[None, :, :], REVERSE), float("-inf")))


@triton.jit
def _tile_span(T, CHUNK: tl.constexpr, RT: tl.constexpr, DECAY: tl.constexpr, REVERSE: tl.constexpr):
    """This program's batch x head and row tile: rows, chunk index and end, the column-tile range [lo, hi) its
    intra-chunk term visits (with vector decay: the off-diagonal sub-chunks only) and the sub-chunk reference row."""
    r0 = tl.program_id(1) * RT
    rows = r0 + tl.arange(0, RT)
    c0 = r0 // CHUNK * CHUNK
    c_end = tl.minimum(c0 + CHUNK, T)
    if REVERSE:
        lo = r0
        if DECAY == DECAY_VECTOR:
            lo = r0 + RT
        hi = c_end
        ref = tl.minimum(r0 + RT, T) - 1  # last row of the tile: every later column decays through it
    else:
        lo = c0
        hi = r0 + RT
        if DECAY == DECAY_VECTOR:
            hi = r0
        ref = tl.maximum(r0 - 1, c0)  # row before the tile: every earlier column decays through it
    return tl.program_id(2).to(tl.int64), rows, r0 // CHUNK, c_end, lo, hi, ref


@triton.jit
def _edge_weight(BC, rows, T, c_end, KG, c, DECAY: tl.constexpr, REVERSE: tl.constexpr):
    """exp of the decay between the chunk edge holding the state (start; end when REVERSE) and each row."""
    br = _cum(BC, rows, T, KG, c, DECAY)
    if REVERSE:
        be = _cum_row(BC, c_end - 1, KG, c, DECAY)
        if DECAY == DECAY_VECTOR:
            be = be[None, :]
        w = tl.exp(be - br)
    else:
        w = tl.exp(br)
    return w


@triton.jit
def _state_tile(ST, bh, chunk, DX, DY, NS, ck, cv, CAUSAL: tl.constexpr):
    """(BK, BV) block of the state a chunk reads: its own (causal, NS per batch x head) or the single
    non-causal one. ST: (BH, NS, DX, DY)."""
    if CAUSAL:
        ST += (bh * NS + chunk) * DX * DY
    else:
        ST += bh * DX * DY
    return tl.load(ST + ck[:, None] * DY + cv[None, :], mask=(ck[:, None] < DX) & (cv[None, :] < DY), other=0.0)


@triton.jit
def _chunk_states(
    X, Y, BC, INIT, STATES, FINAL, T, DX, DY, NT, scale,
    DECAY: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE: tl.constexpr,
    CHUNK: tl.constexpr, RS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """h (DX, DY) = INIT or 0, then per chunk (in reverse order when REVERSE): store h as the chunk's state,
    h = e^B h + scale (X ⊙ w)ᵀ Y with w = e^(B - b) (forward) or e^b (reverse); FINAL = h (fp32).

    X: (BH, T, DX), Y: (BH, T, DY), BC: (BH, T, DX or 1), INIT/FINAL: (BH, DX, DY) fp32, STATES: (BH, NT, DX, DY).
    Non-causal: DECAY_NONE and no STORE, so FINAL = INIT + scale Xᵀ Y.
    """
    bh = tl.program_id(2).to(tl.int64)
    ck = tl.program_id(0) * BK + tl.arange(0, BK)
    cv = tl.program_id(1) * BV + tl.arange(0, BV)
    smask = (ck[:, None] < DX) & (cv[None, :] < DY)
    soff = ck[:, None] * DY + cv[None, :]
    KG = DX if DECAY == DECAY_VECTOR else 1
    X += bh * T * DX
    Y += bh * T * DY
    BC += bh * T * KG
    if HAS_INIT:
        h = tl.load(INIT + bh * DX * DY + soff, mask=smask, other=0.0)
    else:
        h = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, NT):
        n = i
        if REVERSE:
            n = NT - 1 - i
        c0 = n * CHUNK
        if STORE:
            tl.store(STATES + (bh * NT + n) * DX * DY + soff, h.to(STATES.dtype.element_ty), mask=smask)
        if DECAY != DECAY_NONE:
            be = _cum_row(BC, tl.minimum(c0 + CHUNK, T) - 1, KG, ck, DECAY)
            if DECAY == DECAY_VECTOR:  # the state's rows are key channels
                h *= tl.exp(be)[:, None]
                be = be[None, :]
            else:
                h *= tl.exp(be)
        for t0 in range(c0, c0 + CHUNK, RS):
            rows = t0 + tl.arange(0, RS)
            x = _tile(X, rows, T, DX, ck)
            if DECAY != DECAY_NONE:
                br = _cum(BC, rows, T, KG, ck, DECAY)
                if REVERSE:
                    w = tl.exp(br)
                else:
                    w = tl.exp(be - br)
                x = _rows_times(x.to(tl.float32), w, DECAY).to(X.dtype.element_ty)
            y = _tile(Y, rows, T, DY, cv)
            h += scale * tl.dot(tl.trans(x), y, input_precision=PRECISION)
    tl.store(FINAL + bh * DX * DY + soff, h, mask=smask)


@triton.jit
def _chunk_values(
    X, Z, Y, BC, ST, OUT, T, DX, DY, NS, scale, inter_scale,
    DECAY: tl.constexpr, CAUSAL: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr, RT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BKD: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT rows (RT, BV) = inter_scale (X ⊙ w) @ state + scale Σ_{s visible} A_rs Y_s, A_rs = Σ_c X_rc Z_sc decay_rsc.

    Forward: o (X=q, Z=k, Y=v, state H_n, w = e^b, visible s <= r, decay e^(b_r - b_s)).
    REVERSE: dv (X=k, Z=q, Y=dO, state dH_{n+1}, w = e^(B - b), visible s >= r, decay e^(b_s - b_r)).
    X, Z: (BH, T, DX); Y, OUT: (BH, T, DY); ST: (BH, NS, DX, DY).
    """
    VECTOR: tl.constexpr = DECAY == DECAY_VECTOR
    KG = DX if VECTOR else 1
    bh, rows, chunk, c_end, lo, hi, ref = _tile_span(T, CHUNK, RT, DECAY, REVERSE)
    cv = tl.program_id(0) * BV + tl.arange(0, BV)
    X += bh * T * DX
    Z += bh * T * DX
    Y += bh * T * DY
    BC += bh * T * KG

    acc = tl.zeros([RT, BV], dtype=tl.float32)
    for k0 in range(0, DX, BK):
        ck = k0 + tl.arange(0, BK)
        x = _tile(X, rows, T, DX, ck)
        s = _state_tile(ST, bh, chunk, DX, DY, NS, ck, cv, CAUSAL)
        if CAUSAL and DECAY != DECAY_NONE:
            x = _rows_times(x.to(tl.float32), _edge_weight(BC, rows, T, c_end, KG, ck, DECAY, REVERSE), DECAY)
        acc += tl.dot(x.to(s.dtype), s, input_precision=PRECISION)
    acc *= inter_scale

    if CAUSAL:
        intra = tl.zeros([RT, BV], dtype=tl.float32)
        for j0 in range(lo, hi, RT):
            cols = j0 + tl.arange(0, RT)
            s = tl.zeros([RT, RT], dtype=tl.float32)
            for k0 in range(0, DX, BK):
                ck = k0 + tl.arange(0, BK)
                x = _tile(X, rows, T, DX, ck)
                z = _tile(Z, cols, T, DX, ck)
                if VECTOR:  # off-diagonal sub-chunks: both factors decay through the reference row
                    bref = _cum_row(BC, ref, KG, ck, DECAY)[None, :]
                    x = (x * tl.exp(_gap(_cum(BC, rows, T, KG, ck, DECAY), bref, REVERSE))).to(X.dtype.element_ty)
                    z = (z * tl.exp(_gap(bref, _cum(BC, cols, T, KG, ck, DECAY), REVERSE))).to(X.dtype.element_ty)
                s += tl.dot(x, tl.trans(z), input_precision=PRECISION)
            if not VECTOR:
                s = _masked_scores(s, rows, cols, _cum(BC, rows, T, KG, 0, DECAY), _cum(BC, cols, T, KG, 0, DECAY),
                                   DECAY, REVERSE)
            y = _tile(Y, cols, T, DY, cv)
            intra += tl.dot(s.to(y.dtype), y, input_precision=PRECISION)
        if VECTOR:  # the diagonal sub-chunk, element-wise over the channels
            s = tl.zeros([RT, RT], dtype=tl.float32)
            for k0 in range(0, DX, BKD):
                ck = k0 + tl.arange(0, BKD)
                x = _tile(X, rows, T, DX, ck).to(tl.float32)
                z = _tile(Z, rows, T, DX, ck).to(tl.float32)
                decay = _diagonal_decay(_cum(BC, rows, T, KG, ck, DECAY), rows, REVERSE)
                s += tl.sum(x[:, None, :] * z[None, :, :] * decay, axis=2)
            y = _tile(Y, rows, T, DY, cv)
            intra += tl.dot(s.to(y.dtype), y, input_precision=PRECISION)
        acc += scale * intra
    tl.store(OUT + bh * T * DY + rows[:, None] * DY + cv[None, :], acc.to(OUT.dtype.element_ty),
             mask=(rows[:, None] < T) & (cv[None, :] < DY))


@triton.jit
def _chunk_keys(
    P, RC, Z, XR, BC, ST, OUT, DG, T, DX, DP, NS, scale, inter_scale,
    DECAY: tl.constexpr, CAUSAL: tl.constexpr, REVERSE: tl.constexpr, DG_MODE: tl.constexpr,
    CHUNK: tl.constexpr, RT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT rows (RT, BK) = inter_scale w ⊙ (P @ stateᵀ) + scale Σ_{s visible} (P_r · RC_s) decay_rsc Z_sc.

    Forward: dq (P=dO, RC=v, Z=k, XR=q, state H_n, w = e^b); REVERSE: dk (P=v, RC=dO, Z=q, XR=k, state dH_{n+1},
    w = e^(B - b)); decay and visibility as in ``_chunk_values``. DG (BH, T, DX) fp32 gets +XR ⊙ OUT (DG_STORE)
    or −XR ⊙ OUT (DG_SUBTRACT), from the fp32 accumulator.
    P, RC: (BH, T, DP); Z, XR, OUT: (BH, T, DX); ST: (BH, NS, DX, DP).
    """
    VECTOR: tl.constexpr = DECAY == DECAY_VECTOR
    KG = DX if VECTOR else 1
    bh, rows, chunk, c_end, lo, hi, ref = _tile_span(T, CHUNK, RT, DECAY, REVERSE)
    ck = tl.program_id(0) * BK + tl.arange(0, BK)
    P += bh * T * DP
    RC += bh * T * DP
    Z += bh * T * DX
    BC += bh * T * KG

    acc = tl.zeros([RT, BK], dtype=tl.float32)
    for v0 in range(0, DP, BV):
        cv = v0 + tl.arange(0, BV)
        p = _tile(P, rows, T, DP, cv)
        s = _state_tile(ST, bh, chunk, DX, DP, NS, ck, cv, CAUSAL)
        acc += tl.dot(p.to(s.dtype), tl.trans(s), input_precision=PRECISION)
    if CAUSAL and DECAY != DECAY_NONE:
        acc = _rows_times(acc, _edge_weight(BC, rows, T, c_end, KG, ck, DECAY, REVERSE), DECAY)
    acc *= inter_scale

    if CAUSAL:
        intra = tl.zeros([RT, BK], dtype=tl.float32)
        br = _cum(BC, rows, T, KG, ck, DECAY)
        if VECTOR:
            bref = _cum_row(BC, ref, KG, ck, DECAY)[None, :]
        for j0 in range(lo, hi, RT):
            cols = j0 + tl.arange(0, RT)
            s = tl.zeros([RT, RT], dtype=tl.float32)
            for v0 in range(0, DP, BV):
                cv = v0 + tl.arange(0, BV)
                s += tl.dot(_tile(P, rows, T, DP, cv), tl.trans(_tile(RC, cols, T, DP, cv)), input_precision=PRECISION)
            bc = _cum(BC, cols, T, KG, ck, DECAY)
            s = _masked_scores(s, rows, cols, br, bc, DECAY, REVERSE)
            z = _tile(Z, cols, T, DX, ck)
            if VECTOR:  # off-diagonal sub-chunks: the column factor here, the row factor after the loop
                z = (z * tl.exp(_gap(bref, bc, REVERSE))).to(Z.dtype.element_ty)
            intra += tl.dot(s.to(z.dtype), z, input_precision=PRECISION)
        if VECTOR:  # then the diagonal sub-chunk, element-wise over the channels
            intra *= tl.exp(_gap(br, bref, REVERSE))
            s = tl.zeros([RT, RT], dtype=tl.float32)
            for v0 in range(0, DP, BV):
                cv = v0 + tl.arange(0, BV)
                s += tl.dot(_tile(P, rows, T, DP, cv), tl.trans(_tile(RC, rows, T, DP, cv)), input_precision=PRECISION)
            z = _tile(Z, rows, T, DX, ck).to(tl.float32)
            intra += tl.sum(s[:, :, None] * _diagonal_decay(br, rows, REVERSE) * z[None, :, :], axis=1)
        acc += scale * intra

    out = bh * T * DX + rows[:, None] * DX + ck[None, :]
    omask = (rows[:, None] < T) & (ck[None, :] < DX)
    tl.store(OUT + out, acc.to(OUT.dtype.element_ty), mask=omask)
    if DG_MODE != DG_NONE:
        term = _tile(XR + bh * T * DX, rows, T, DX, ck).to(tl.float32) * acc
        if DG_MODE == DG_SUBTRACT:
            term = tl.load(DG + out, mask=omask, other=0.0) - term
        tl.store(DG + out, term, mask=omask)
