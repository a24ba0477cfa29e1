"""Launchers of the chunked linear-attention kernels (``triton_kernel``): the contract of ``core``'s Triton pair.

q, k: (B, H, T, K); v: (B, H, T, V); g: None, (B, H, T) or (B, H, T, K) log-decay (finite, <= 0; causal only);
initial_state, the returned final state and dstate: (B, H, K, V) fp32. Kernels see (B·H, T, D) contiguous rows;
outputs are allocated contiguous.

Per-chunk states are stored in fp32 (bf16 for bf16 inputs, which has fp32's range; fp16 could overflow on long
undecayed sequences). The backward recomputes them rather than keeping them from the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from attnzoo.kernels.backend import triton_interpreting
from attnzoo.kernels.linear.triton_kernel import (
    DECAY_NONE,
    DECAY_SCALAR,
    DECAY_VECTOR,
    DG_NONE,
    DG_STORE,
    DG_SUBTRACT,
    _chunk_keys,
    _chunk_states,
    _chunk_values,
)

__all__ = ["check_chunk_size", "linear_bwd_triton", "linear_fwd_triton"]

_SUB_CHUNK = 16  # row tile of the vector-decay kernels: the diagonal block is (16, 16, channels) element-wise


def check_chunk_size(chunk_size: object) -> int:
    valid = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 16
    if not valid or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a power of two >= 16 for backend='triton'")
    return chunk_size


def _check_mode(g, initial_state, causal: bool) -> None:
    if not causal and (g is not None or initial_state is not None):
        raise ValueError("g (decay) and initial_state need causal=True; non-causal linear attention has neither")


def _block(dim: int, cap: int) -> int:
    """Power-of-two block over a feature dim: at least 16 (``tl.dot``), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(dim)))


def _launch_config(decay: int, chunk: int) -> dict:
    """Row tile, feature blocks and warps.

    Under the interpreter every program and nested call costs Python time, so one feature block spans the whole
    (small, tested) dims and a row tile spans the whole chunk.
    """
    vector = decay == DECAY_VECTOR.value
    if triton_interpreting():
        return dict(rt=_SUB_CHUNK if vector else chunk, rs=chunk, bk=256, bv=256, bkd=256, num_warps=1,
                    num_stages=1)
    # vector decay: the (16, 16, channels) diagonal tensors bound the key-channel blocks
    return dict(rt=_SUB_CHUNK if vector else min(chunk, 64), rs=min(chunk, 64), bk=32 if vector else 64, bv=64,
                bkd=16, num_warps=4, num_stages=2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_cumsum(g: torch.Tensor | None, chunk: int) -> tuple[int, torch.Tensor | None]:
    """Decay mode and the chunk-local cumulative log-decay (B·H, T, K or 1) in fp32 (None without decay)."""
    if g is None:
        return DECAY_NONE.value, None
    vector = g.dim() == 4
    b, h, t = g.shape[:3]
    gf = g.float() if vector else g.float().unsqueeze(-1)
    gf = F.pad(gf, (0, 0, 0, -t % chunk))
    cum = gf.unflatten(2, (-1, chunk)).cumsum(3).flatten(2, 3)[:, :, :t]
    return (DECAY_VECTOR if vector else DECAY_SCALAR).value, cum.reshape(b * h, t, -1).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> contiguous (B·H, T, D)."""
    return t.reshape(-1, *t.shape[2:]).contiguous()


def _state_pass(x, y, cum, decay, init, *, chunk, causal, reverse, scale, state_dtype):
    """Per-chunk states (B·H, NT, DX, DY) (None when non-causal) and the final one (B·H, DX, DY) fp32.

    Forward (x=k, y=v, init=S_0): the state before each chunk. Reverse (x=q, y=dO, init=dstate): the gradient of
    the state after each chunk; its final value is the gradient of S_0.
    """
    bh, t, dx = x.shape
    dy = y.shape[-1]
    nt = triton.cdiv(t, chunk)
    cfg = _launch_config(decay, chunk)
    bk, bv = _block(dx, cfg["bk"]), _block(dy, cfg["bv"])
    final = x.new_empty((bh, dx, dy), dtype=torch.float32)
    states = x.new_empty((bh, nt, dx, dy), dtype=state_dtype) if causal else final
    init_arg = final if init is None else init.reshape(bh, dx, dy).float().contiguous()
    grid = (triton.cdiv(dx, bk), triton.cdiv(dy, bv), bh)
    _chunk_states[grid](
        x, y, x if cum is None else cum, init_arg, states, final, t, dx, dy, nt, scale,
        DECAY=decay, REVERSE=reverse, HAS_INIT=init is not None, STORE=causal, CHUNK=chunk, RS=cfg["rs"],
        BK=bk, BV=bv, PRECISION=_precision(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (states if causal else None), final


def _row_tiles(kernel, pointers, out, decay, state, dx, dy, *, over, chunk, causal, reverse, scale, inter_scale,
               **consts):
    """Launch a row-tile kernel writing ``out`` (B·H, T, ·): one program per (``over`` feature block, row tile,
    batch x head); ``pointers`` are the kernel's pointer arguments up to and including the output."""
    cfg = _launch_config(decay, chunk)
    blocks = dict(BK=_block(dx, cfg["bk"]), BV=_block(dy, cfg["bv"]))
    bh, t, width = out.shape
    grid = (triton.cdiv(width, blocks[over]), triton.cdiv(t, cfg["rt"]), bh)
    kernel[grid](
        *pointers, t, dx, dy, state.shape[1] if causal else 1, scale, inter_scale, DECAY=decay, CAUSAL=causal,
        REVERSE=reverse, CHUNK=chunk, RT=cfg["rt"], **blocks, PRECISION=_precision(out.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **consts,
    )
    return out


def _values(x, z, y, cum, decay, state, **kw):
    """o (forward: x=q, z=k, y=v, state H) or dv (reverse: x=k, z=q, y=dO, state dH): (B·H, T, DY)."""
    out = y.new_empty(y.shape)
    dx = x.shape[-1]
    cfg = _launch_config(decay, kw["chunk"])
    return _row_tiles(_chunk_values, (x, z, y, x if cum is None else cum, state, out), out, decay, state, dx,
                      y.shape[-1], over="BV", BKD=_block(dx, cfg["bkd"]), **kw)


def _keys(p, rc, z, xr, cum, decay, state, dg, *, dg_mode, **kw):
    """dq (forward: p=dO, rc=v, z=k, xr=q, state H) or dk (reverse: p=v, rc=dO, z=q, xr=k, state dH): (B·H, T, DX).
    With ``dg_mode`` DG_STORE / DG_SUBTRACT, ``dg`` (B·H, T, DX) fp32 gets +xr ⊙ out / −xr ⊙ out."""
    out = z.new_empty(z.shape)
    pointers = (p, rc, z, xr, z if cum is None else cum, state, out, out if dg is None else dg)
    return _row_tiles(_chunk_keys, pointers, out, decay, state, z.shape[-1], p.shape[-1], over="BK",
                      DG_MODE=dg_mode, **kw)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def linear_fwd_triton(q, k, v, g, *, scale, causal, chunk_size, initial_state):
    """-> o (B, H, T, V) in q's dtype and the final state (B, H, K, V) fp32 (always computed: it is the forward
    state pass's last value; non-causal: kᵀv)."""
    check_chunk_size(chunk_size)
    _check_mode(g, initial_state, causal)
    B, H, T, K = q.shape
    V = v.shape[-1]
    qr, kr, vr = _rows(q), _rows(k), _rows(v)
    decay, cum = _chunk_cumsum(g, chunk_size)
    states, final = _state_pass(kr, vr, cum, decay, initial_state, chunk=chunk_size, causal=causal, reverse=False,
                                scale=1.0, state_dtype=_state_dtype(q.dtype))
    o = _values(qr, kr, vr, cum, decay, states if causal else final, chunk=chunk_size, causal=causal,
                reverse=False, scale=scale, inter_scale=scale)
    return o.view(B, H, T, V), final.view(B, H, K, V)


def linear_bwd_triton(q, k, v, g, do, dstate, *, scale, causal, chunk_size, initial_state):
    """Gradients of ``linear_fwd_triton``'s (o, final state) for upstream (do, dstate): (dq, dk, dv, dg or None,
    dinitial_state or None), shaped and typed like their inputs.

    dg from the chunk-free identity: with G the cumulative sum of g, o and the final state depend on g only through
    q ⊙ e^G, k ⊙ e^-G and the final e^(G_T) factor, so ∂L/∂G_t = q_t ⊙ dq_t − k_t ⊙ dk_t (+ dstate ⊙ S_T summed over
    V at t = T), and dg is its reverse cumulative sum over t (summed over K for a per-head g).
    """
    check_chunk_size(chunk_size)
    _check_mode(g, initial_state, causal)
    B, H, T, K = q.shape
    V = v.shape[-1]
    qr, kr, vr, dor = _rows(q), _rows(k), _rows(v), _rows(do)
    decay, cum = _chunk_cumsum(g, chunk_size)
    common = dict(chunk=chunk_size, causal=causal)
    sdt = _state_dtype(q.dtype)
    states, final = _state_pass(kr, vr, cum, decay, initial_state, **common, reverse=False, scale=1.0,
                                state_dtype=sdt)
    dstates, dfirst = _state_pass(qr, dor, cum, decay, dstate, **common, reverse=True, scale=scale, state_dtype=sdt)
    fwd_state, bwd_state = (states, dstates) if causal else (final, dfirst)

    dv = _values(kr, qr, dor, cum, decay, bwd_state, **common, reverse=True, scale=scale, inter_scale=1.0)
    dgt = None if g is None else qr.new_empty(qr.shape, dtype=torch.float32)
    has_dg = g is not None
    dq = _keys(dor, vr, kr, qr, cum, decay, fwd_state, dgt, **common, reverse=False, scale=scale, inter_scale=scale,
               dg_mode=(DG_STORE if has_dg else DG_NONE).value)
    dk = _keys(vr, dor, qr, kr, cum, decay, bwd_state, dgt, **common, reverse=True, scale=scale, inter_scale=1.0,
               dg_mode=(DG_SUBTRACT if has_dg else DG_NONE).value)

    dg = None
    if has_dg:
        dg = dgt.view(B, H, T, K).flip(2).cumsum(2).flip(2)
        if dstate is not None:
            dg = dg + (dstate.float() * final.view(B, H, K, V)).sum(-1).unsqueeze(2)
        dg = (dg if g.dim() == 4 else dg.sum(-1)).to(g.dtype)
    dinit = None if initial_state is None else dfirst.view(B, H, K, V).to(initial_state.dtype)
    return dq.view(B, H, T, K), dk.view(B, H, T, K), dv.view(B, H, T, V), dg, dinit
