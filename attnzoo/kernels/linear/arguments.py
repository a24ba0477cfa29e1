"""Argument checks and conversions shared by ``linear_attention`` and ``linear_attention_step``: q/k/v, decay
(to the core's log-decay tensor), and the recurrent ``LinearState`` (to and from the core's state tensor).

The step has no time axis: its tensors are the op's with T removed, which ``time=False`` selects below.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnzoo.kernels import validate
from attnzoo.kernels.linear.feature_maps import FEATURE_MAPS, NON_CAUSAL_ONLY
from attnzoo.kernels.precision import compute_dtype


class LinearState(NamedTuple):
    """Recurrent state of causal linear attention, in the accumulation dtype (fp32; fp64 for fp64 inputs).

    kv: (B, H, K, Dv), Σ_t decay·φ(k_t)ᵀ v_t; k_sum: (B, H, K), Σ_t decay·φ(k_t), the normalizer's state, present
    exactly when ``normalize=True``. K is the feature dim: Dk, or 1 + Dk + Dk² for ``taylor2``.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor | None = None


def check_qkv(q, k, v, *, time: bool) -> None:
    """q, k: (B, H, T, Dk), v: (B, H, T, Dv) (without T for ``time=False``)."""
    t = ", T" if time else ""
    validate.check_tensor("q", q, 3 + time, f"(B, H{t}, Dk)")
    validate.check_tensor("k", k, 3 + time, f"(B, H{t}, Dk)")
    validate.check_tensor("v", v, 3 + time, f"(B, H{t}, Dv)")
    validate.check_same("dtype", (("q", q), ("k", k), ("v", v)))
    validate.check_same("device", (("q", q), ("k", k), ("v", v)))
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}; (B, H{t}, Dk) must match")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v has shape {tuple(v.shape)}; its (B, H{t}) must equal q's {tuple(q.shape[:-1])}")


def check_feature_map(feature_map: str, causal: bool) -> None:
    validate.check_choice("feature_map", feature_map, FEATURE_MAPS)
    if causal and feature_map in NON_CAUSAL_ONLY:
        raise ValueError(
            f"feature_map={feature_map!r} normalizes k over all positions, so it is non-causal only; "
            "use causal=False or another feature map")


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool")
    return value


def check_eps(eps: object) -> float:
    eps = validate.check_finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps={eps!r} must be a finite float >= 0")
    return eps


def _check_log_decay(values: torch.Tensor) -> None:
    # A data-dependent check: skipped where values are unknown (compiling, tracing, meta tensors).
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or values.device.type == "meta":
        return
    if not bool(torch.isfinite(values).all()) or bool((values > 0).any()):
        raise ValueError(
            f"decay must hold finite log-decays <= 0 (decay factor exp(decay) in (0, 1]); got values in "
            f"[{values.min().item():.4g}, {values.max().item():.4g}]")


def log_decay(decay, q: torch.Tensor, width: int, *, time: bool) -> torch.Tensor | None:
    """``decay`` as the core's log-decay in the accumulation dtype: (B, H, T) per head or (B, H, T, K) per channel
    (without T for ``time=False``).

    Accepted: None; a float (every head); an (H,) tensor (per head, RetNet/Lightning); (B, H, T) or (B, H, T, K)
    tensors (data-dependent gates, GLA). An (H,) tensor is expanded here, so its gradient flows through autograd.
    Values are checked (finite, <= 0) on eager tensors only.
    """
    if decay is None:
        return None
    lead = q.shape[:2] + (q.shape[2:3] if time else ())
    cdt = compute_dtype(q.dtype)
    if not isinstance(decay, torch.Tensor):
        value = validate.check_finite("decay", decay)
        if value > 0:
            raise ValueError(f"decay={value!r} must be a log-decay <= 0 (decay factor exp(decay) in (0, 1])")
        return torch.full(lead, value, dtype=cdt, device=q.device)
    t = ", T" if time else ""
    shapes = {(q.shape[1],): f"(H,)={(q.shape[1],)}", lead: f"(B, H{t})={tuple(lead)}",
              (*lead, width): f"(B, H{t}, K)={(*lead, width)} with K the feature dim"}
    if tuple(decay.shape) not in shapes:
        raise ValueError(f"decay has shape {tuple(decay.shape)}; expected one of {', '.join(shapes.values())}")
    if not decay.is_floating_point():
        raise TypeError(f"decay.dtype={decay.dtype} must be a floating-point dtype")
    validate.check_same("device", (("q", q), ("decay", decay)))
    _check_log_decay(decay)
    decay = decay.to(cdt)
    if decay.dim() == 1:
        decay = decay.view(1, -1, *(1,) * time).expand(lead)
    return decay.contiguous()


def state_tensor(state, q: torch.Tensor, v: torch.Tensor, width: int, normalize: bool) -> torch.Tensor | None:
    """A ``LinearState`` as the core's state (B, H, K, Dv), with k_sum as an extra last column when normalizing."""
    if state is None:
        return None
    if not isinstance(state, LinearState):
        raise TypeError(f"initial_state must be a LinearState(kv, k_sum) or None, got {type(state).__name__}")
    b, h, dv = q.shape[0], q.shape[1], v.shape[-1]
    expect = {"kv": (b, h, width, dv), "k_sum": (b, h, width) if normalize else None}
    for name, shape in expect.items():
        t = getattr(state, name)
        if shape is None:
            if t is not None:
                raise ValueError("initial_state.k_sum must be None with normalize=False (no normalizer state)")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"initial_state.{name} must be a tensor of shape {shape} (normalize={normalize}), "
                            f"got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state.{name} has shape {tuple(t.shape)}; expected {shape} (B, H, K"
                             f"{', Dv' if name == 'kv' else ''}) with K the feature dim")
        if t.dtype != compute_dtype(q.dtype):
            raise TypeError(f"initial_state.{name}.dtype={t.dtype} must be the accumulation dtype "
                            f"{compute_dtype(q.dtype)} of q.dtype={q.dtype} (the dtype of returned states)")
        validate.check_same("device", (("q", q), (f"initial_state.{name}", t)))
    return torch.cat([state.kv, state.k_sum.unsqueeze(-1)], -1) if normalize else state.kv


def linear_state(state: torch.Tensor, normalize: bool) -> LinearState:
    """The core's state (B, H, K, Dv [+ 1]) as a ``LinearState``."""
    return LinearState(state[..., :-1], state[..., -1]) if normalize else LinearState(state)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """v (..., Dv) -> (..., Dv + 1): the ones column makes the core accumulate the normalizer q·Σk alongside q·Σkᵀv."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def normalized(o: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """(..., Dv + 1) core output of ``with_ones(v)`` -> numerator / (denominator + eps) (..., Dv) in ``dtype``."""
    cdt = compute_dtype(dtype)
    return (o[..., :-1].to(cdt) / (o[..., -1:].to(cdt) + eps)).to(dtype)
