"""Up-front argument checks shared by the ops. Every message names the argument, its value and
the accepted range."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)} ({t.dim()} dims)")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported; expected one of {FLOAT_DTYPES}")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{name} has an empty dimension: shape {tuple(t.shape)}; every dim must be >= 1")
    return t


def check_same(attr: str, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """All tensors agree on ``attr`` (dtype or device)."""
    values = {name: getattr(t, attr) for name, t in named}
    if len(set(values.values())) > 1:
        listing = ", ".join(f"{n}.{attr}={v}" for n, v in values.items())
        raise ValueError(f"{', '.join(values)} must share one {attr}; got {listing}")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {tuple(choices)}")


def check_int(name: str, value: object, minimum: int) -> None:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} must be a finite float > 0 (or None for 1/sqrt(D)={head_dim**-0.5:.4g})")
    return float(scale)


def check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite float")
    return float(value)


def check_qkv(q, k, v, spatial: int, same_grid: bool) -> None:
    """Heads-first q (B, H, *grid, D), k (B, H_kv, *grid_kv, D), v (B, H_kv, *grid_kv, Dv) with ``spatial``
    grid axes; the value head dim Dv may differ from D."""
    axes = {1: "N", 2: "X, Y", 3: "X, Y, Z"}[spatial]
    kv_axes = axes if same_grid else {1: "M"}.get(spatial, axes)
    check_tensor("q", q, spatial + 3, f"(B, H, {axes}, D)")
    check_tensor("k", k, spatial + 3, f"(B, H_kv, {kv_axes}, D)")
    check_tensor("v", v, spatial + 3, f"(B, H_kv, {kv_axes}, Dv)")
    check_same("dtype", (("q", q), ("k", k), ("v", v)))
    check_same("device", (("q", q), ("k", k), ("v", v)))
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same shape except the head dim; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {q.shape[0]}; they must match")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim D={k.shape[-1]} must equal q's head dim D={q.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q has H={q.shape[1]} heads, k/v have H_kv={k.shape[1]}; H must be a multiple of H_kv (GQA/MQA)")
    if same_grid and k.shape[2:-1] != q.shape[2:-1]:
        raise ValueError(
            f"k/v token grid {tuple(k.shape[2:-1])} must equal q's token grid {tuple(q.shape[2:-1])}")


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256


def check_triton_inputs(q: torch.Tensor) -> None:
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports dtypes {TRITON_DTYPES}; got q.dtype={q.dtype}")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dim D in [1, {TRITON_MAX_HEAD_DIM}]; got D={q.shape[-1]}")


def per_axis(name: str, value: object, n: int, kind: type) -> tuple:
    """An int/bool or a length-n tuple/list of them, as a length-n tuple (a bool is not accepted as an int)."""
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * n
    if len(values) != n or not all(isinstance(x, kind) and (kind is bool or not isinstance(x, bool)) for x in values):
        raise TypeError(f"{name}={value!r} must be a {kind.__name__} or a tuple of {n} {kind.__name__}s")
    return values
