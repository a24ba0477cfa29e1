"""The ``torch`` implementation of the unnormalized linear-attention core (see ``reference.linear_reference``):
exact, any device, memory linear in T.

Non-causal: two matmuls, ``S = kᵀv``, ``o = scale·q S``. Causal: chunked in the Lightning-Attention style. A chunk
of L tokens adds its masked intra-chunk product ``((q kᵀ) ⊙ decay-mask) v`` to the contribution of the state at its
start, ``(q ⊙ exp(G)) S``; the states at chunk starts come from one sequential scan over chunks. Chunks are handled
in segments (a batch of whole chunks, then the tail chunk of T mod L tokens on its own, so there is no padding),
each segment's temporaries bounded by ``_SEGMENT_ELEMENTS``. The backward is explicit and reverse-chunked: it
re-runs the state scan forward, then scans the state gradient backward segment by segment.

Every decay factor is ``exp`` of a non-positive number: within a chunk ``exp(G_i − G_j)`` for i ≥ j only (G is
the in-chunk cumulative log-decay), from the chunk start ``exp(G_i)``, to the chunk end ``exp(G_last − G_j)``, so
strong per-channel gates cannot overflow. The decay gradient uses the identity
``dG_t = q_t ⊙ dq_t − k_t ⊙ dk_t`` (+ ``dS_T ⊙ S_T`` summed over V at t = T − 1) for the global cumulative
log-decay G, then ``dg`` is its reverse cumulative sum over t.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnzoo.kernels.precision import compute_dtype

# Largest temporary of one segment, in elements (B·H·chunks·L·L·K_decay, or the chunk states): ~64 MB in fp32.
_SEGMENT_ELEMENTS = 1 << 24
# Chunk length cap under per-channel decay: its (L, L, K) in-chunk decay tensor costs L·K element-wise operations
# per token, against K·V for the state matmuls, so short chunks are fastest (results do not depend on L).
_CHANNEL_CHUNK = 16


class _Decay(NamedTuple):
    """Decay factors of a segment of n chunks of length L; Kd = 1 (per head/step) or K (per channel).

    pair: (B, H, n, L, L, Kd) exp(G_i − G_j) for i ≥ j, 0 above the diagonal;
    from_start: (B, H, n, L, Kd) exp(G_i); to_end: (B, H, n, L, Kd) exp(G_last − G_i);
    chunk: (B, H, n, Kd, 1) exp(G_last). Without decay ``pair`` is the causal mask and the rest None.
    """

    pair: torch.Tensor
    from_start: torch.Tensor | None
    to_end: torch.Tensor | None
    chunk: torch.Tensor | None


def _decays(gc: torch.Tensor | None, length: int, device: torch.device, dtype: torch.dtype) -> _Decay:
    """Factors for in-chunk log-decays ``gc`` (B, H, n, L, Kd) or None."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if gc is None:
        return _Decay(causal.to(dtype)[..., None], None, None, None)
    cum = gc.cumsum(3)
    last = cum[:, :, :, -1:]
    # Masked pairs get -inf before exp: exp is only ever taken of G_i - G_j <= 0.
    diff = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(~causal[:, :, None], float("-inf"))
    return _Decay(diff.exp(), cum.exp(), (last - cum).exp(), last.exp().transpose(-1, -2))


def _mul(x: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return x if factor is None else x * factor


def _scores(q: torch.Tensor, k: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """A_ij = Σ_c q_ic k_jc pair_ijc: (..., L, K) x2 -> (..., L, L)."""
    if pair.shape[-1] == 1:
        return (q @ k.transpose(-1, -2)) * pair[..., 0]
    return (q.unsqueeze(-2) * k.unsqueeze(-3) * pair).sum(-1)


def _mix(w: torch.Tensor, x: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """Σ_j w_ij x_j ⊙ pair_ij: w (..., L, L), x (..., L, K) -> (..., L, K)."""
    if pair.shape[-1] == 1:
        return (w * pair[..., 0]) @ x
    return (w.unsqueeze(-1) * pair * x.unsqueeze(-3)).sum(-2)


def _scan(state: torch.Tensor, chunk: torch.Tensor | None, add: torch.Tensor, reverse: bool = False):
    """S_c = chunk_c ⊙ S_{c-1} + add_c over the chunk axis 2 (backwards if ``reverse``).

    state: (B, H, K, V) before the first chunk; add: (B, H, n, K, V). Returns (the state before each chunk's
    update (B, H, n, K, V), the state after the last).
    """
    if chunk is None and not reverse:
        total = add.cumsum(2)
        return torch.cat([state.unsqueeze(2), state.unsqueeze(2) + total[:, :, :-1]], 2), state + total[:, :, -1]
    before = torch.empty_like(add)
    order = range(add.shape[2] - 1, -1, -1) if reverse else range(add.shape[2])
    for c in order:
        before[:, :, c] = state
        state = add[:, :, c] + _mul(state, None if chunk is None else chunk[:, :, c])
    return before, state


class _Segment(NamedTuple):
    """Positions [start, stop) as n chunks of ``length`` tokens."""

    start: int
    stop: int
    n: int
    length: int


def _segments(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, chunk_size: int) -> list[_Segment]:
    """Whole chunks in batches within the memory budget, then the tail chunk (T mod L tokens) on its own."""
    b, h, t, d = q.shape
    decay_width = 0 if g is None else (1 if g.dim() == 3 else d)
    length = min(chunk_size, t, _CHANNEL_CHUNK if decay_width > 1 else t)
    per_chunk = b * h * max(length * length * max(decay_width, 1), d * v.shape[-1], length * max(d, v.shape[-1]))
    batch = max(1, _SEGMENT_ELEMENTS // per_chunk)
    whole = t // length
    segs = [_Segment(c * length, min(c + batch, whole) * length, min(batch, whole - c), length)
            for c in range(0, whole, batch)]
    if t % length:
        segs.append(_Segment(whole * length, t, 1, t % length))
    return segs


def _chunked(x: torch.Tensor | None, seg: _Segment, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, H, T, X) or (B, H, T) -> the segment as (B, H, n, L, X) (X = 1 for the latter) in ``dtype``."""
    if x is None:
        return None
    x = x[:, :, seg.start:seg.stop]
    x = x.unsqueeze(-1) if x.dim() == 3 else x
    return x.to(dtype).reshape(*x.shape[:2], seg.n, seg.length, x.shape[-1])


def _unchunked(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:2], -1, x.shape[-1])


def _to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Sum the channel axis of a per-channel decay gradient (..., K) down to a per-head one (..., 1) if width 1."""
    return x.sum(-1, keepdim=True) if width == 1 else x


def _zero_state(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    if initial_state is not None:
        return initial_state.to(compute_dtype(q.dtype))
    return q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=compute_dtype(q.dtype))


def _segment_fwd(q, k, v, d: _Decay, state, scale):
    """One segment's output (B, H, n, L, V), the states at its chunk starts and the state after it."""
    u = _mul(k, d.to_end).transpose(-1, -2) @ v
    starts, state = _scan(state, d.chunk, u)
    o = _scores(q, k, d.pair) @ v + _mul(q, d.from_start) @ starts
    return o * scale, starts, state


def linear_fwd_torch(q, k, v, g, *, scale, causal, chunk_size, initial_state, out_dtype=None):
    """q, k: (B, H, T, K), v: (B, H, T, V), g: None, (B, H, T) or (B, H, T, K) log-decay (causal only),
    initial_state: None or (B, H, K, V) -> (o (B, H, T, V) in ``out_dtype`` (default q's dtype), final state
    (B, H, K, V) in the accumulation dtype: fp32, or fp64 for fp64 inputs)."""
    cdt = compute_dtype(q.dtype)
    out_dtype = out_dtype or q.dtype
    if not causal:
        state = k.to(cdt).transpose(-1, -2) @ v.to(cdt)
        return (q.to(cdt) @ (state * scale)).to(out_dtype), state
    state = _zero_state(q, v, initial_state)
    o = q.new_empty(*q.shape[:3], v.shape[-1], dtype=out_dtype)
    for seg in _segments(q, v, g, chunk_size):
        qc, kc, vc = (_chunked(x, seg, cdt) for x in (q, k, v))
        oc, _, state = _segment_fwd(qc, kc, vc, _decays(_chunked(g, seg, cdt), seg.length, q.device, cdt), state,
                                    scale)
        o[:, :, seg.start:seg.stop] = _unchunked(oc)
    return o, state


def _noncausal_bwd(q, k, v, do, dstate, scale):
    cdt = compute_dtype(q.dtype)
    qf, kf, vf, dof = (x.to(cdt) for x in (q, k, v, do))
    state = kf.transpose(-1, -2) @ vf
    dsv = qf.transpose(-1, -2) @ dof * scale
    if dstate is not None:
        dsv = dsv + dstate.to(cdt)
    dq = dof @ (state.transpose(-1, -2) * scale)
    return dq.to(q.dtype), (vf @ dsv.transpose(-1, -2)).to(k.dtype), (kf @ dsv).to(v.dtype)


def linear_bwd_torch(q, k, v, g, do, dstate, *, scale, causal, chunk_size, initial_state):
    """Gradients of ``linear_fwd_torch`` for the output gradient ``do`` (B, H, T, V) and the final-state gradient
    ``dstate`` (B, H, K, V) or None -> (dq, dk, dv, dg or None, dinitial_state or None), each in its input's dtype.
    """
    if not causal:
        return (*_noncausal_bwd(q, k, v, do, dstate, scale), None, None)
    cdt = compute_dtype(q.dtype)
    segs = _segments(q, v, g, chunk_size)
    # Forward again for the states at every chunk start (n_chunks·K·V: linear in T) and the final state.
    state, starts = _zero_state(q, v, initial_state), []
    for seg in segs:
        kc, vc = _chunked(k, seg, cdt), _chunked(v, seg, cdt)
        d = _decays(_chunked(g, seg, cdt), seg.length, q.device, cdt)
        seg_starts, state = _scan(state, d.chunk, _mul(kc, d.to_end).transpose(-1, -2) @ vc)
        starts.append(seg_starts)
    final = state
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dgc = None if g is None else torch.empty(*q.shape[:3], 1 if g.dim() == 3 else q.shape[-1], dtype=cdt,
                                             device=q.device)
    ds = torch.zeros_like(final) if dstate is None else dstate.to(cdt)
    for seg, seg_starts in zip(reversed(segs), reversed(starts), strict=True):
        qc, kc, vc, doc = (_chunked(x, seg, cdt) for x in (q, k, v, do))
        d = _decays(_chunked(g, seg, cdt), seg.length, q.device, cdt)
        qd = _mul(qc, d.from_start)
        ends, ds = _scan(ds, d.chunk, qd.transpose(-1, -2) @ doc * scale, reverse=True)
        da = doc @ vc.transpose(-1, -2)
        kd = _mul(kc, d.to_end)
        pair_t = d.pair.transpose(-2, -3)
        dqc = (_mix(da, kc, d.pair) + _mul(doc @ seg_starts.transpose(-1, -2), d.from_start)) * scale
        dkc = _mix(da.transpose(-1, -2), qc, pair_t) * scale + _mul(vc @ ends.transpose(-1, -2), d.to_end)
        dvc = _scores(qc, kc, d.pair).transpose(-1, -2) @ doc * scale + kd @ ends
        span = slice(seg.start, seg.stop)
        dq[:, :, span], dk[:, :, span], dv[:, :, span] = _unchunked(dqc), _unchunked(dkc), _unchunked(dvc)
        if dgc is not None:
            dgc[:, :, span] = _to_width(_unchunked(qc * dqc - kc * dkc), dgc.shape[-1])
    dinit = None if initial_state is None else ds.to(initial_state.dtype)
    if dgc is None:
        return dq, dk, dv, None, dinit
    if dstate is not None:
        dgc[:, :, -1] += _to_width((dstate.to(cdt) * final).sum(-1), dgc.shape[-1])
    dg = dgc.flip(2).cumsum(2).flip(2)
    return dq, dk, dv, dg.reshape(g.shape).to(g.dtype), dinit
