"""Per-(query, head) output gates shared by the softmax-family ops (mixture-of-heads, design §2.6).

An op called with ``gates`` (B, H, *grid) returns ``gates[..., None] * attention(q, k, v)``. A zero gate marks
a (query, head) pair that is not computed: its output is 0 and its gate gets no gradient (MoH's top-k leaves
exact zeros for the heads a token did not choose, and their gates carry no gradient there either). The Triton
kernel multiplies in its epilogue and skips query tiles whose gates are all zero; the helpers below give the
torch paths the same contract.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnzoo.kernels.precision import compute_dtype


def reference_gating(out: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The oracle: ``gates * out`` with no gradient through zero gates (the contract above)."""
    g = torch.where(gates != 0, gates, gates.detach())
    return out * g[..., None]


def check_gates(gates: torch.Tensor | None, q: torch.Tensor) -> None:
    """gates: (B, H, *grid) like q without its head dim, floating point, on q's device."""
    if gates is None:
        return
    expect = tuple(q.shape[:-1])
    if not isinstance(gates, torch.Tensor) or not gates.is_floating_point() or tuple(gates.shape) != expect:
        got = f"{gates.dtype} {tuple(gates.shape)}" if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be a floating-point tensor of shape (B, H, *grid)={expect}; got {got}")
    if gates.device != q.device:
        raise ValueError(f"gates is on {gates.device} but q is on {q.device}")


def gate_output(out: torch.Tensor, gates: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """out (B, H, *grid, Dv) scaled by its gates, in out's dtype; written into ``into`` (out's shape and dtype,
    any memory layout; ``out`` itself gates in place) when given."""
    cdt = compute_dtype(out.dtype)
    g = gates[..., None].to(cdt)
    if out.dtype == cdt:
        return out * g if into is None else torch.mul(out, g, out=into)
    gated = (out.to(cdt) * g).to(out.dtype)
    return gated if into is None else into.copy_(gated)


def _inverse(gates: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    g = gates.to(dtype)
    return torch.where(g != 0, 1.0 / torch.where(g != 0, g, 1.0), 0.0)


def ungated(do: torch.Tensor, out: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, output) of the ungated attention from those of the gated one; zero where the gate is zero.
    The gradient is written in out's memory order, which the backward kernels read without a copy (ATen's CPU
    flash kernel transposes a heads-major gradient to its tokens-major order; the other paths' out is
    contiguous)."""
    cdt = compute_dtype(out.dtype)
    do_inner = gate_output(do, gates, torch.empty_like(out, dtype=do.dtype))
    out_inner = (out.to(cdt) * _inverse(gates, cdt)[..., None]).to(out.dtype)
    return do_inner, out_inner


def gates_grad(do: torch.Tensor, out: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """d loss / d gates = rowsum(do * ungated out) = rowsum(do * out) / gate, and 0 where the gate is 0."""
    cdt = compute_dtype(out.dtype)
    rows = torch.linalg.vecdot(do.to(cdt), out.to(cdt))
    return (rows * _inverse(gates, cdt)).to(gates.dtype)


class RowPlan(NamedTuple):
    """Which rows of which (batch x head) sequences to compute: ``whole`` sequences (B·H indices) computed in
    full, ``sparse`` sequences of which only ``rows`` (len(sparse), n) are — their active rows first, then
    inactive ones up to a common length n."""

    whole: torch.Tensor
    sparse: torch.Tensor
    rows: torch.Tensor


def row_plan(gates: torch.Tensor, max_fraction: float = 0.5) -> RowPlan | None:
    """Plan for gates (B, H, N): sequences with more than ``max_fraction`` of their rows active (e.g. MoH's
    shared heads) are computed whole, the others only on their active rows; None when no sequence is sparse
    (gathering would then cost more than it saves). On CPU, gathering the rows of routed heads with 2/3 of the
    rows active was slower than ATen's flash kernel over every row (``benchmarks/moh.py``), hence one half."""
    if bool(gates.abs().amin() > 0):  # no zero gate (e.g. every routed head chosen): one reduction, no counts
        return None
    counts = (gates != 0).sum(-1, dtype=torch.int32).reshape(-1)
    dense = counts > max_fraction * gates.shape[-1]
    if bool(dense.all()):
        return None
    sparse = (~dense).nonzero().squeeze(1)
    active = gates.reshape(-1, gates.shape[-1]).index_select(0, sparse) != 0
    n = max(int(counts.index_select(0, sparse).max()), 1)
    rows = torch.argsort((~active).to(torch.uint8), dim=-1, stable=True)[:, :n]
    return RowPlan(dense.nonzero().squeeze(1), sparse, rows)


def torch_path_fwd(fwd, gates: torch.Tensor | None, *args):
    """Run a torch-path forward ``fwd(*args) -> (out, lse)`` and gate its output (every row is computed)."""
    out, lse = fwd(*args)
    return (out, lse) if gates is None else (gate_output(out, gates, out), lse)  # out is fresh: gate in place


def torch_path_bwd(bwd, gates: torch.Tensor | None, do, q, k, v, out, *args):
    """Run a torch-path backward ``bwd(do, q, k, v, out, *args)`` of a gated forward."""
    if gates is not None:
        do, out = ungated(do, out, gates)
    return bwd(do, q, k, v, out, *args)
