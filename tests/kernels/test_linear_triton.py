"""The chunked linear-attention Triton kernels (``linear.triton_launch``) vs the float64 quadratic reference:
output, final state and every gradient (q, k, v, g, initial state), with and without an upstream state gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels.linear import triton_launch
from attnzoo.kernels.linear.reference import linear_reference
from attnzoo.kernels.linear.triton_launch import check_chunk_size, linear_bwd_triton, linear_fwd_triton
from tests.kernels.helpers import TOL, leaf64, poison_allocations, randn, rel_err

# name: (B, H, T, K, V, decay, causal, chunk_size, initial_state, dstate); T is never a multiple of the chunk.
CASES = {
    "causal": (1, 2, 45, 24, 20, None, True, 16, True, True),
    "scalar": (2, 1, 70, 16, 32, "scalar", True, 32, True, True),
    "vector": (1, 2, 70, 24, 20, "vector", True, 32, True, True),
    "vector_stateless": (1, 1, 50, 32, 16, "vector", True, 16, False, False),
    "scalar_one_chunk": (1, 2, 40, 16, 24, "scalar", True, 64, False, True),
    "noncausal": (2, 1, 77, 20, 33, None, False, 32, False, True),
    "noncausal_no_dstate": (1, 2, 50, 32, 16, None, False, 16, False, False),
}
SCALE = 0.3


def _log_decay(decay: str | None, shape: tuple[int, ...], strength: float | None) -> torch.Tensor | None:
    """Realistic gates by default (the state still carries across chunks): logsigmoid(x + 3) per head, GLA's
    logsigmoid(x) / 16 per channel; ``strength`` s draws uniform log-decays in [-s, 0] instead."""
    if decay is None:
        return None
    b, h, t, k = shape
    size = (b, h, t, k) if decay == "vector" else (b, h, t)
    if strength is not None:
        return -strength * torch.rand(size, dtype=torch.float64)
    x = torch.randn(size, dtype=torch.float64)
    return F.logsigmoid(x) / 16 if decay == "vector" else F.logsigmoid(x + 3)


def _run(case: tuple, dtype: torch.dtype, device: str, monkeypatch, strength: float | None = None) -> dict[str, float]:
    """Relative errors of the kernels' (o, final state, dq, dk, dv[, dg][, dinitial]) vs the float64 reference."""
    B, H, T, K, V, decay, causal, chunk_size, with_init, with_dstate = case
    q, k = randn(B, H, T, K, dtype=dtype, device=device), randn(B, H, T, K, dtype=dtype, device=device)
    v, do = randn(B, H, T, V, dtype=dtype, device=device), randn(B, H, T, V, dtype=dtype, device=device)
    g = _log_decay(decay, (B, H, T, K), strength)
    g = None if g is None else g.to(device=device, dtype=torch.float32)  # the op passes fp32 log-decays
    s0 = randn(B, H, K, V, dtype=torch.float32, device=device) if with_init else None
    dstate = randn(B, H, K, V, dtype=torch.float32, device=device) if with_dstate else None

    inputs = {"q": q, "k": k, "v": v, "g": g, "initial_state": s0}
    leaves = {n: leaf64(t) for n, t in inputs.items() if t is not None}
    ref_o, ref_state = linear_reference(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), scale=SCALE,
                                        causal=causal, initial_state=leaves.get("initial_state"), return_state=True)
    upstream = (do.cpu().double(), torch.zeros_like(ref_state) if dstate is None else dstate.cpu().double())
    ref_grads = dict(zip(leaves, torch.autograd.grad((ref_o, ref_state), list(leaves.values()), upstream),
                         strict=True))

    poison_allocations(monkeypatch)
    kw = dict(scale=SCALE, causal=causal, chunk_size=chunk_size, initial_state=s0)
    o, state = linear_fwd_triton(q, k, v, g, **kw)
    grads = dict(zip(inputs, linear_bwd_triton(q, k, v, g, do, dstate, **kw), strict=True))
    assert o.dtype == dtype and o.shape == v.shape
    assert state.dtype == torch.float32 and state.shape == (B, H, K, V)
    for name, t in inputs.items():
        assert (grads[name] is None) == (t is None), name
        if t is not None:
            assert grads[name].dtype == t.dtype and grads[name].shape == t.shape, name
    errors = {"o": rel_err(o, ref_o), "state": rel_err(state, ref_state)}
    errors |= {f"d{n}": rel_err(grads[n], r) for n, r in ref_grads.items()}
    return errors


def _assert_within(errors: dict[str, float], tol: float, label: str) -> None:
    assert max(errors.values()) <= tol, f"{label}: {errors} > {tol}"


# The interpreter is slow: every case in fp32, the main ones in fp16 too.
@pytest.mark.parametrize(("name", "dtype"), [pytest.param(n, torch.float32, id=f"{n}-fp32") for n in CASES] + [
    pytest.param(n, torch.float16, id=f"{n}-fp16") for n in ("causal", "scalar", "vector", "noncausal")])
def test_triton_matches_reference(name, dtype, triton_device, monkeypatch):
    _assert_within(_run(CASES[name], dtype, triton_device, monkeypatch), TOL[dtype], f"{name} {dtype}")


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_size_invariance(chunk_size, triton_device, monkeypatch):
    """Per-channel decay over five, three and two chunks: every chunk size gives the reference result."""
    case = (1, 1, 70, 16, 16, "vector", True, chunk_size, True, True)
    _assert_within(_run(case, torch.float32, triton_device, monkeypatch), 1e-5, f"chunk {chunk_size}")


@pytest.mark.parametrize("decay", [None, "scalar", "vector"])
def test_small_tiles(decay, triton_device, monkeypatch):
    """The GPU's tiling under the interpreter: several row tiles per chunk, state-pass sub-tiles, and several
    blocks over K and V (with ragged last blocks)."""
    tiles = dict(rt=16, rs=16, bk=16, bv=16, bkd=16, num_warps=1, num_stages=1)
    monkeypatch.setattr(triton_launch, "_launch_config", lambda decay, chunk: tiles)
    case = (1, 1, 45, 20, 18, decay, True, 32, True, True)
    _assert_within(_run(case, torch.float32, triton_device, monkeypatch), 1e-5, f"{decay}")


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_strong_decay_does_not_overflow(decay, triton_device, monkeypatch):
    """Log-decays down to -5 per step: over a 64-token chunk the cumulative decay reaches about -160 (e^-160 and
    e^+160 are outside fp32), yet the kernels stay finite and exact since they only take exponents <= 0."""
    case = (1, 1, 70, 16, 16, decay, True, 64, True, True)
    _assert_within(_run(case, torch.float32, triton_device, monkeypatch, strength=5.0), 1e-5, f"{decay}")


@pytest.mark.parametrize("chunk_size", [8, 24, 0, -16, True, 16.0])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=rf"chunk_size={chunk_size!r} must be a power of two >= 16"):
        check_chunk_size(chunk_size)


def test_non_causal_rejects_decay_and_initial_state(triton_device):
    q = randn(1, 1, 20, 16, dtype=torch.float32, device=triton_device)
    g = torch.zeros(1, 1, 20, device=triton_device)
    with pytest.raises(ValueError, match="g \\(decay\\) and initial_state need causal=True"):
        linear_fwd_triton(q, q, q, g, scale=1.0, causal=False, chunk_size=16, initial_state=None)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_triton_bf16_cuda(name, monkeypatch):
    """bf16 ``tl.dot`` is only trustworthy on a real GPU (the interpreter's is broken)."""
    _assert_within(_run(CASES[name], torch.bfloat16, "cuda", monkeypatch), TOL[torch.bfloat16], name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("decay", [None, "scalar", "vector"])
def test_triton_gpu_tiles(decay, dtype, monkeypatch):
    """GPU launch configuration: several row tiles per chunk and several feature blocks (K, V = 160, 96)."""
    case = (2, 2, 300, 160, 96, decay, True, 128, True, True)
    _assert_within(_run(case, dtype, "cuda", monkeypatch), TOL[dtype], f"{decay} {dtype}")
