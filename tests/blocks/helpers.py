"""Shared checks for the block tests."""

from __future__ import annotations

import torch
from torch import nn

from tests.kernels.helpers import leaf64, rel_err


def assert_causal(blk: torch.nn.Module, x: torch.Tensor, i: int) -> None:
    """Outputs up to token i of x (B, N, C) ignore the tokens after it, and the later outputs do change."""
    y = x.clone()
    y[:, i + 1 :] = torch.randn_like(y[:, i + 1 :])  # change only the tokens after position i
    with torch.no_grad():
        a, b = blk(x), blk(y)
    torch.testing.assert_close(a[:, : i + 1], b[:, : i + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, i + 1 :], b[:, i + 1 :])


def assert_matches_formula(module, inputs: list[torch.Tensor], formula, params: dict | None = None) -> None:
    """``module(*inputs)`` (fp32) vs ``formula(params, *inputs)`` evaluated in float64 on copies of the parameters
    (default: the module's named parameters): the output and the gradient of every input and parameter, each as a
    relative error <= 1e-5."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = module(*inputs)
    grad = torch.randn_like(out)
    out.backward(grad)
    params = dict(module.named_parameters()) if params is None else params
    params64 = {name: leaf64(p) for name, p in params.items()}
    inputs64 = [leaf64(t) for t in inputs]
    ref = formula(params64, *inputs64)
    ref.backward(grad.double())
    pairs = {f"input {i}": (t.grad, r.grad) for i, (t, r) in enumerate(zip(inputs, inputs64, strict=True))}
    pairs |= {name: (p.grad, params64[name].grad) for name, p in params.items()}
    scale = max(r.norm() for _, r in pairs.values())
    errors = {"out": rel_err(out, ref)}
    for name, (g, r) in pairs.items():
        # A gradient that is zero in float64 (a bias shifting all logits of a softmax alike) is fp32 round-off
        # only: measure it against the largest gradient instead of itself.
        errors[f"grad {name}"] = rel_err(g, r) if r.norm() > 1e-12 * scale else (g.norm() / scale).item()
    assert max(errors.values()) <= 1e-5, errors


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial parameters and norm statistics (so a formula mix-up cannot hide behind ones and zeros)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return module.eval()
