"""Shared test utilities for the kernel tests: error measure, inputs, output poisoning."""

from __future__ import annotations

import torch

# Relative-error bounds vs the float64 reference (design §4).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double().to(out.device)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def randn(*shape: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of ``t`` (with the same rounded values) that requires grad."""
    return t.detach().cpu().double().requires_grad_()


def poison_allocations(monkeypatch) -> None:
    """Make torch.empty/empty_like/Tensor.new_empty return NaN-filled memory so unwritten outputs are caught."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan_fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_fill(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: nan_fill(new_empty(self, *a, **kw)))


def assert_path_matches(label, dtype, names, inputs, grads, outputs, refs, ref_grads) -> None:
    """A torch path's (out, lse) and gradients vs the oracle's: gradients exist exactly for the given inputs,
    with their dtype and shape, and every relative error is within tolerance (1e-12 in float64)."""
    for name, g, t in zip(names, grads, inputs, strict=True):
        assert (g is None) == (t is None), name
        if g is not None:
            assert g.dtype == t.dtype and g.shape == t.shape, name
    errors = {n: rel_err(o, r) for n, o, r in zip(("out", "lse"), outputs, refs, strict=True)}
    present = [(n, g) for n, g in zip(names, grads, strict=True) if g is not None]
    errors |= {n: rel_err(g, r) for (n, g), r in zip(present, ref_grads, strict=True)}
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype]
    assert max(errors.values()) <= tol, f"{label}: {errors} > {tol}"
