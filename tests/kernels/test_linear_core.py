"""The unnormalized linear-attention core (custom op ``attnzoo::linear_fwd`` and its autograd rule) vs the float64
quadratic reference: output, final state and every gradient (q, k, v, log-decay, initial state), per backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnzoo.kernels.linear import torch_impl
from attnzoo.kernels.linear.core import linear_fwd
from attnzoo.kernels.linear.reference import linear_reference
from tests.kernels.helpers import TOL, leaf64, poison_allocations, randn, rel_err

# The Triton pair joins once it is part of the build, on a few cases: the interpreter is slow, and
# test_linear_triton.py covers its kernels in depth.
TRITON = ["triton"] if (Path(torch_impl.__file__).parent / "triton_launch.py").exists() else []
BACKENDS = ["torch", *TRITON]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # parameter ids -> dtypes


def on_backends(torch_cases, triton_cases):
    """Parameter tuples (backend, *case): every torch case, and the Triton ones when Triton is built."""
    return [("torch", *c) for c in torch_cases] + [("triton", *c) for c in triton_cases if TRITON]


# name: (causal, gate: None | "head" (B, H, T) | "channel" (B, H, T, K), initial state)
CASES = {
    "noncausal": (False, None, False),
    "causal": (True, None, False),
    "causal_init": (True, None, True),
    "head_gate": (True, "head", False),
    "head_gate_init": (True, "head", True),
    "channel_gate": (True, "channel", False),
    "channel_gate_init": (True, "channel", True),
}


def device_for(backend: str, request) -> str:
    return request.getfixturevalue("triton_device") if backend == "triton" else "cpu"


def core_inputs(case, dtype, device, *, T=37, B=2, H=2, K=16, V=12, gate_scale=0.3):
    """(q, k, v, g, initial_state) for a ``CASES`` entry; g is a log-decay in fp32 (fp64 for fp64 inputs)."""
    _, gate, init = CASES[case]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    q, k = randn(B, H, T, K, dtype=dtype, device=device), randn(B, H, T, K, dtype=dtype, device=device)
    v = randn(B, H, T, V, dtype=dtype, device=device)
    g_shape = {None: None, "head": (B, H, T), "channel": (B, H, T, K)}[gate]
    g = None if g_shape is None else (-torch.rand(g_shape, dtype=torch.float64) * gate_scale).to(device, sdt)
    s0 = randn(B, H, K, V, dtype=sdt, device=device) if init else None
    return q, k, v, g, s0


def run_core(case, dtype, backend, device, *, chunk_size=16, return_state=True, scale=0.5, **shape):
    """Core output, final state and gradients vs the reference; returns the core's (outputs, grads)."""
    causal = CASES[case][0]
    inputs = core_inputs(case, dtype, device, **shape)
    present = [t for t in inputs if t is not None]
    do = randn(*inputs[2].shape, dtype=dtype, device=device)
    dstate = randn(*inputs[0].shape[:2], inputs[0].shape[-1], inputs[2].shape[-1], dtype=torch.float32,
                   device=device) if return_state else None

    leaves = [None if t is None else leaf64(t) for t in inputs]
    ref, ref_state = linear_reference(*leaves[:4], scale=scale, causal=causal, initial_state=leaves[4],
                                      return_state=True)
    ref_outs = (ref, ref_state) if return_state else (ref,)
    ref_upstream = (do.cpu().double(), dstate.cpu().double()) if return_state else (do.cpu().double(),)
    ref_grads = torch.autograd.grad(ref_outs, [t for t in leaves if t is not None], ref_upstream)

    xs = [t.requires_grad_() for t in present]
    out, state = linear_fwd(*inputs, scale, causal, chunk_size, return_state, False, backend)
    outs = (out, state) if return_state else (out,)
    grads = torch.autograd.grad(outs, xs, (do, dstate) if return_state else (do,))

    assert out.dtype == dtype and out.shape == do.shape
    for g, t in zip(grads, present, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape
    errors = {f"out{i}": rel_err(o, r) for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True))}
    errors |= {f"grad{i}": rel_err(g, r) for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))}
    tol = TOL[dtype]
    assert max(errors.values()) <= tol, f"{case} {dtype} {backend}: {errors} > {tol}"
    return outs, grads


@pytest.mark.parametrize(("backend", "case", "dtype"),
                         on_backends([(c, d) for c in CASES for d in DTYPES],
                                     [("causal_init", "fp32"), ("channel_gate_init", "fp16")]))
def test_core_matches_reference(backend, case, dtype, request, monkeypatch):
    device = device_for(backend, request)
    poison_allocations(monkeypatch)
    run_core(case, DTYPES[dtype], backend, device)


@pytest.mark.parametrize("case", ["causal_init", "channel_gate_init"])
def test_torch_path_segments_and_tail(case, monkeypatch):
    """Tiny segment budget: every chunk is its own segment; T = 37 leaves a tail chunk of 5 tokens after 4 x 8."""
    monkeypatch.setattr(torch_impl, "_SEGMENT_ELEMENTS", 1)
    poison_allocations(monkeypatch)
    run_core(case, torch.float32, "torch", "cpu", chunk_size=8)


@pytest.mark.parametrize("case", ["noncausal", "channel_gate_init"])
def test_core_without_state_output(case):
    run_core(case, torch.float32, "torch", "cpu", return_state=False)


@pytest.mark.parametrize("case", ["head_gate_init", "channel_gate_init"])
def test_chunk_size_invariance(case):
    seed = int(torch.randint(2**31, ()))  # fresh inputs, the same for every chunk size
    results = []
    for chunk in (1, 7, 16, 64):  # 64 > T: one partial chunk (per-channel decay: the torch path caps chunks at 16)
        torch.manual_seed(seed)
        results.append(run_core(case, torch.float32, "torch", "cpu", chunk_size=chunk, T=45))
    (outs0, grads0), *rest = results
    for outs, grads in rest:
        assert all(rel_err(a, b) < 2e-6 for a, b in zip((*outs, *grads), (*outs0, *grads0), strict=True))


@pytest.mark.parametrize(("case", "gate_scale", "chunk_size"),
                         [("head_gate_init", 4.0, 64), ("channel_gate_init", 12.0, 16)])
def test_strong_gates_stay_finite_and_exact(case, gate_scale, chunk_size):
    """Log-decays down to -gate_scale per step, so that a chunk's cumulative decay reaches ~-100 (the torch path cuts
    per-channel chunks to 16 tokens): factoring it as exp(G_i)·exp(-G_j) would overflow fp32 (e^88); exp(G_i - G_j)
    with i >= j never does."""
    run_core(case, torch.float32, "torch", "cpu", gate_scale=gate_scale, T=70, chunk_size=chunk_size)


# The fake functions do not depend on the backend (and the interpreter makes opcheck's many calls slow): torch only.
@pytest.mark.parametrize(("case", "dtype", "full_precision"),
                         [("noncausal", "fp32", False), ("channel_gate_init", "fp16", True)])
def test_opcheck(case, dtype, full_precision):
    inputs = core_inputs(case, DTYPES[dtype], "cpu", T=21, K=8, V=8)
    args = [None if t is None else t.requires_grad_() for t in inputs]
    torch.library.opcheck(linear_fwd, (*args, 0.5, CASES[case][0], 16, True, full_precision, "torch"))
