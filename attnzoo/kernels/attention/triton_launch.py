"""Launchers of the shared fused attention kernel (``triton_kernel``): token geometry per mode, additive
bias terms, tile and warp configuration, and the forward / backward launches.

Tensors arrive heads-first (B, H, *grid, D); kernels see them as (B, H, N, D) rows with a unit stride on D,
and every output is allocated contiguous.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from attnzoo.kernels.attention.triton_kernel import (
    _LOG2E,
    BIAS_NONE,
    BIAS_QUERY,
    BIAS_TABLE,
    MODE_DENSE,
    MODE_HALO,
    MODE_NEIGHBORHOOD,
    SCORES,
    _attn_bwd_dkdv,
    _attn_bwd_dq,
    _attn_fwd,
)
from attnzoo.kernels.backend import triton_interpreting

__all__ = ["BIAS_QUERY", "BIAS_TABLE", "Bias", "Geometry", "attention_bwd", "attention_fwd", "dense_geometry",
           "halo_geometry", "neighborhood_geometry"]


def _tiles(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> int:
    return triton.cdiv(grid[0], tile[0]) * triton.cdiv(grid[1], tile[1]) * triton.cdiv(grid[2], tile[2])


def _tile_shape(grid: tuple[int, int, int], size: int) -> tuple[int, int, int]:
    """A power-of-two tile of ``size`` elements, as square as the grid allows (innermost axis first).

    Never smaller than 16 elements: ``tl.dot`` needs 16 rows.
    """
    tile, caps = [1, 1, 1], [triton.next_power_of_2(g) for g in grid]
    while size > 1 and any(t < c for t, c in zip(tile, caps, strict=True)):
        for axis in (2, 1, 0):
            if size > 1 and tile[axis] < caps[axis]:
                tile[axis] *= 2
                size //= 2
    while tile[0] * tile[1] * tile[2] < 16:
        tile[2] *= 2
    return tuple(tile)


def _launch_config(pass_: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes (query, key) and warps per pass.

    Under the interpreter every nested @jit call re-patches triton.language (~ms), so fewer, larger tiles
    keep tests fast; test grids still span several tiles.
    """
    if triton_interpreting():
        return dict(block_m=32, block_n=32, num_warps=1, num_stages=1)
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


class Geometry(NamedTuple):
    """Token grids and visibility of one launch, padded to 3 axes (leading 1s).

    Per mode, the per-axis triples mean: neighborhood — kernel size, dilation, stride; halo (axes 1, 2) —
    key block size, halo, query block size. ``causal`` is 0/1 for dense attention, a bit per causal axis
    for neighborhood attention, and 1 for halo zero padding (the key grid is then the map plus the halo).
    """

    q_grid: tuple[int, int, int]
    kv_grid: tuple[int, int, int]
    kernel: tuple[int, int, int]
    dilation: tuple[int, int, int]
    stride: tuple[int, int, int]
    mode: int
    causal: int

    def scalars(self) -> tuple[int, ...]:
        return (*self.q_grid, *self.kv_grid, *self.kernel, *self.dilation, *self.stride)


def _pad3(values, fill) -> tuple:
    return (fill,) * (3 - len(values)) + tuple(values)


def dense_geometry(q: torch.Tensor, k: torch.Tensor, causal: bool) -> Geometry:
    return Geometry(_pad3(q.shape[2:-1], 1), _pad3(k.shape[2:-1], 1), (1, 1, 1), (1, 1, 1), (1, 1, 1),
                    MODE_DENSE.value, int(causal))


def neighborhood_geometry(q: torch.Tensor, kernel_size, dilation, stride, causal) -> Geometry:
    grid = _pad3(q.shape[2:-1], 1)
    bits = sum(1 << a for a, c in enumerate(_pad3(causal, False)) if c)
    return Geometry(grid, grid, _pad3(kernel_size, 1), _pad3(dilation, 1), _pad3(stride, 1),
                    MODE_NEIGHBORHOOD.value, bits)


def halo_geometry(q: torch.Tensor, k: torch.Tensor, block_size: int, halo_size: int, pad_zeros: bool) -> Geometry:
    """q: (B, H, Xq, Yq, D) query blocks of block_size * Xq / X; k: (B, H_kv, X, Y, D)."""
    pad = 2 * halo_size if pad_zeros else 0
    q_block = block_size * q.shape[2] // k.shape[2]
    return Geometry((1, *q.shape[2:4]), (1, k.shape[2] + pad, k.shape[3] + pad), (1, block_size, block_size),
                    (0, halo_size, halo_size), (1, q_block, q_block), MODE_HALO.value, int(pad_zeros))


def _block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _constexprs(q: torch.Tensor, geo: Geometry, score: str, bias_kind: int, pass_: str, v_dim: int | None = None,
                key_mask: bool = False, gated: bool = False) -> dict:
    """Kernel constexprs and launch options; ``v_dim``: value head dim (default q's)."""
    v_dim = q.shape[-1] if v_dim is None else v_dim
    cfg = _launch_config(pass_, max(q.shape[-1], v_dim), q.dtype)
    qt, kt = _tile_shape(geo.q_grid, cfg["block_m"]), _tile_shape(geo.kv_grid, cfg["block_n"])
    return dict(
        MODE=geo.mode, CAUSAL=geo.causal, SCORE=SCORES[score], BIAS=bias_kind,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        QT0=qt[0], QT1=qt[1], QT2=qt[2], KT0=kt[0], KT1=kt[1], KT2=kt[2],
        BLOCK_D=_block(q.shape[-1]), BLOCK_DV=_block(v_dim), KMASK=key_mask, GATED=gated,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, *grid, D) -> (B, H, N, D) with a unit stride on D."""
    t = t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(*ts: torch.Tensor) -> tuple[int, ...]:
    return tuple(s for t in ts for s in t.stride()[:3])


def _extra(q: torch.Tensor, extra_k, extra_v):
    """Flattened extra tokens (or q as an unread placeholder) and their count."""
    if extra_k is None:
        return q, q, 0
    return _flat(extra_k), _flat(extra_v), extra_k.shape[2]


class Bias(NamedTuple):
    """Additive logit term: ``kind`` BIAS_TABLE with ``a`` the (H, 2k-1, ...) table, or BIAS_QUERY with
    ``a``/``b`` the per-query (B, H, Nq, 2*win-1) tables of axes 1/2 (halo relative logits)."""

    kind: int
    a: torch.Tensor
    b: torch.Tensor


def _key_mask_arg(q: torch.Tensor, key_mask: torch.Tensor | None):
    """(pointer, flag): the (B, M) keep-mask as bytes, or q as an unread placeholder."""
    if key_mask is None:
        return q, False
    return key_mask.contiguous().view(torch.uint8), True


def _gates_arg(q: torch.Tensor, gates: torch.Tensor | None):
    """(pointer, flag): the (B, H, *grid) gates as contiguous fp32, or q as an unread placeholder."""
    if gates is None:
        return q, False
    return gates.to(torch.float32).contiguous(), True


def _bias_args(q: torch.Tensor, bias: Bias | None):
    if bias is None:
        return BIAS_NONE.value, q, q
    return bias.kind, bias.a.contiguous(), bias.b.contiguous()


def attention_fwd(q, k, v, geo: Geometry, scale, score, sigmoid_bias, bias: Bias | None = None, extra_k=None,
                  extra_v=None, key_mask=None, gates=None):
    """q: (B, H, *grid, D), k: (B, H_kv, *grid_kv, D), v: (B, H_kv, *grid_kv, Dv) -> out (B, H, *grid, Dv),
    lse (B, H, *grid) fp32 (natural log).

    extra_k/v: (B, H_kv, E, D / Dv) tokens all queries see, in the same softmax. key_mask: (B, M) bool,
    True = the key is seen (dense mode). gates: (B, H, *grid) per-(query, head) output gates; query tiles
    whose gates are all zero are skipped (out 0, lse +inf).
    """
    B, H = q.shape[:2]
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    ek, ev, n_extra = _extra(q, extra_k, extra_v)
    dv = v.shape[-1]
    out = qf.new_empty((*qf.shape[:3], dv))  # contiguous, whatever q's strides
    lse = torch.empty(qf.shape[:3], device=q.device, dtype=torch.float32)
    kind, ba, bb = _bias_args(q, bias)
    km, has_km = _key_mask_arg(q, key_mask)
    gf, gated = _gates_arg(q, gates)
    consts = _constexprs(q, geo, score, kind, "fwd", dv, has_km, gated)
    grid = (_tiles(geo.q_grid, (consts["QT0"], consts["QT1"], consts["QT2"])), B * H)
    _attn_fwd[grid](
        qf, kf, vf, out, lse, ba, bb, ek, ev, km, gf, *_strides(qf, kf, vf, out, ek, ev),
        H, H // k.shape[1], q.shape[-1], dv, n_extra, *geo.scalars(), scale * _LOG2E, sigmoid_bias * _LOG2E,
        **consts,
    )
    return out.view(*q.shape[:-1], dv), lse.view(q.shape[:-1])


def attention_bwd(do, q, k, v, out, lse, geo: Geometry, scale, score, sigmoid_bias, bias: Bias | None = None,
                  extra_k=None, extra_v=None, key_mask=None, gates=None):
    """Gradients (dq, dk, dv, (dbias_a, dbias_b) | None, dextra_k, dextra_v) from the saved ``lse``.

    Bias gradients are fp32 and shaped like the bias tensors; None marks absent inputs. With ``gates``, ``out``
    and ``do`` are the gated output and its gradient (the gates' own gradient is the caller's).
    """
    B, H = q.shape[:2]
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(do)
    ek, ev, n_extra = _extra(q, extra_k, extra_v)
    lse = lse.reshape(B, H, -1).contiguous()
    # softmax: delta = rowsum(dO * O); sigmoid scoring does not read it.
    delta = (dof.float() * _flat(out).float()).sum(-1) if score == "softmax" else lse
    # The backward kernels store contiguous (B, H, N, D) layouts.
    dq, dk, dv = qf.new_empty(qf.shape), kf.new_empty(kf.shape), vf.new_empty(vf.shape)
    kind, ba, bb = _bias_args(q, bias)
    dba = dbb = q
    if bias is not None:
        dba = torch.zeros(ba.shape, device=q.device, dtype=torch.float32)
        dbb = dba if bias.kind == BIAS_TABLE.value else torch.zeros(bb.shape, device=q.device, dtype=torch.float32)
    common = (H, H // k.shape[1], q.shape[-1], v.shape[-1])
    scalars = (scale, scale * _LOG2E, sigmoid_bias * _LOG2E)
    km, has_km = _key_mask_arg(q, key_mask)
    gf, gated = _gates_arg(q, gates)

    def dkdv(kf_, vf_, dk_, dv_, geo_, kind_, masked):
        consts = _constexprs(q, geo_, score, kind_, "dkdv", v.shape[-1], masked, gated)
        grid = (_tiles(geo_.kv_grid, (consts["KT0"], consts["KT1"], consts["KT2"])), B * k.shape[1])
        _attn_bwd_dkdv[grid](qf, kf_, vf_, dof, lse, delta, dk_, dv_, ba, bb, km, gf, *_strides(qf, kf_, vf_, dof),
                             *common, *geo_.scalars(), *scalars, **consts)

    dkdv(kf, vf, dk, dv, geo, kind, has_km)
    dek = dev = None
    if n_extra:
        # Extra tokens are seen by every query: the dense dK/dV pass, normalized by the full softmax's lse.
        dek, dev = ek.new_empty(ek.shape), ev.new_empty(ev.shape)
        dense = geo._replace(kv_grid=(1, 1, n_extra), mode=MODE_DENSE.value, causal=0)
        dkdv(ek, ev, dek, dev, dense, BIAS_NONE.value, False)
        dek, dev = dek.view(extra_k.shape), dev.view(extra_v.shape)
    consts = _constexprs(q, geo, score, kind, "dq", v.shape[-1], has_km, gated)
    grid = (_tiles(geo.q_grid, (consts["QT0"], consts["QT1"], consts["QT2"])), B * H)
    _attn_bwd_dq[grid](qf, kf, vf, dof, lse, delta, dq, ba, bb, dba, dbb, ek, ev, km, gf,
                       *_strides(qf, kf, vf, dof, ek, ev), *common, n_extra, *geo.scalars(), *scalars, **consts)
    dbias = None if bias is None else (dba, dbb)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dbias, dek, dev
