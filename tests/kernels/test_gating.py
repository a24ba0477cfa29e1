"""Per-(query, head) output gates (mixture-of-heads) on every softmax-family op: values and the gradients of
q, k, v and the gates vs the float64 reference (``gates * attention``, no gradient through zero gates), on the
torch path and the Triton kernel; all-zero query tiles; the torch path computing only the gated rows."""

from __future__ import annotations

import re

import pytest
import torch

from attnzoo.kernels import attention
from attnzoo.kernels.attention import torch_impl
from attnzoo.kernels.halo import halo2d
from attnzoo.kernels.neighborhood import na2d
from tests.kernels.helpers import TOL, leaf64, poison_allocations, randn, rel_err

# name: (op, q grid, kv grid, H, H_kv, D, Dv, kwargs); grids span several 32-query interpreter tiles.
CASES = {
    "dense_gqa": (attention, (70,), (53,), 4, 2, 16, 16, {}),
    "dense_causal_sigmoid": (attention, (45,), (45,), 2, 2, 16, 24, dict(causal=True, score="sigmoid")),
    "na2d_rpb_extra": (na2d, (9, 11), (9, 11), 2, 1, 16, 16, dict(kernel_size=5, dilation=(1, 2))),
    "halo_rel": (halo2d, (8, 16), (8, 16), 2, 2, 16, 8, dict(block_size=4, halo_size=1)),
}


def _gates(B: int, H: int, grid: tuple[int, ...], device: str, active: float) -> torch.Tensor:
    """Gates in (0.2, 1.2) on about ``active`` of the (query, head) pairs, 0 elsewhere; head 0 of batch 0 is
    all zero (every query tile of it is skipped)."""
    gates = (torch.rand(B, H, *grid, device=device) + 0.2) * (torch.rand(B, H, *grid, device=device) < active)
    gates[0, 0] = 0
    return gates


def _run(name: str, dtype: torch.dtype, backend: str, device: str, monkeypatch, active: float = 0.5) -> None:
    op, grid, kv_grid, H, Hkv, D, Dv, kw = CASES[name]
    B = 2
    q = randn(B, H, *grid, D, dtype=dtype, device=device)
    k = randn(B, Hkv, *kv_grid, D, dtype=dtype, device=device)
    v = randn(B, Hkv, *kv_grid, Dv, dtype=dtype, device=device)
    gates = _gates(B, H, grid, device, active).to(dtype)
    extras = {}
    if op is na2d:
        extras = dict(rpb=randn(H, 9, 9, dtype=dtype, device=device),
                      extra_k=randn(B, Hkv, 3, D, dtype=dtype, device=device),
                      extra_v=randn(B, Hkv, 3, Dv, dtype=dtype, device=device))
    elif op is halo2d:
        extras = dict(rel_h=randn(11, D, dtype=dtype, device=device), rel_w=randn(11, D, dtype=dtype, device=device))
    names = ["q", "k", "v", "gates", *extras]
    inputs = [q, k, v, gates, *extras.values()]

    ref_in = [leaf64(t) for t in inputs]
    ref = op(*ref_in[:3], gates=ref_in[3], backend="reference", **kw, **dict(zip(extras, ref_in[4:], strict=True)))
    do = randn(*ref.shape, dtype=dtype, device=device)
    ref_grads = torch.autograd.grad(ref, ref_in, do.cpu().double())

    poison_allocations(monkeypatch)
    ours_in = [t.clone().requires_grad_() for t in inputs]
    out = op(*ours_in[:3], gates=ours_in[3], backend=backend, **kw, **dict(zip(extras, ours_in[4:], strict=True)))
    grads = torch.autograd.grad(out, ours_in, do)
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out[0, 0].any(), "a head whose gates are all zero outputs zeros"
    assert not grads[3][gates == 0].any(), "zero gates get no gradient"
    errors = {"out": rel_err(out, ref)} | {f"d{n}": rel_err(g, r) for n, g, r in zip(names, grads, ref_grads,
                                                                                        strict=True)}
    assert max(errors.values()) <= TOL[dtype], f"{name} {dtype} {backend}: {errors}"


FP32_FP16 = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


@FP32_FP16
@pytest.mark.parametrize("name", CASES)
def test_triton_gated_matches_reference(name, dtype, triton_device, monkeypatch):
    _run(name, dtype, "triton", triton_device, monkeypatch)


@FP32_FP16
@pytest.mark.parametrize("active", [0.3, 1.0], ids=["sparse", "dense"])
@pytest.mark.parametrize("name", CASES)
def test_torch_path_gated_matches_reference(name, active, dtype, monkeypatch):
    _run(name, dtype, "torch", "cpu", monkeypatch, active)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_triton_gated_bf16_on_gpu(name, monkeypatch):
    _run(name, torch.bfloat16, "triton", "cuda", monkeypatch)


def test_torch_path_computes_only_gated_rows(monkeypatch):
    """With few active heads per query (MoH top-k) the dense torch path attends only the gated rows."""
    rows, real = [], torch_impl.attention_fwd

    def spy(q, *args):
        rows.append(q.shape[2])
        return real(q, *args)

    monkeypatch.setattr(torch_impl, "attention_fwd", spy)
    q, k, v = (randn(1, 4, 64, 16, dtype=torch.float32, device="cpu") for _ in range(3))
    gates = torch.zeros(1, 4, 64)
    gates[:, :2] = 1.0  # two shared heads: every query
    gates[:, 2:, ::4] = 0.5  # two routed heads: a quarter of the queries each
    out = attention(q, k, v, gates=gates, backend="torch")
    assert rows == [64, 16]  # the shared heads whole, the routed ones on their 16 active rows
    expect = attention(q, k, v, backend="reference") * gates[..., None]
    assert rel_err(out, expect) < 1e-6
    rows.clear()
    attention(q, k, v, gates=torch.ones(1, 4, 64), backend="torch")
    assert rows == [64]  # every row active: no gather


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        (torch.ones(1, 2, 9, dtype=torch.int64), "shape (B, H, *grid)=(1, 2, 9); got torch.int64 (1, 2, 9)"),
        (torch.ones(1, 2, 9, 1), "shape (B, H, *grid)=(1, 2, 9); got torch.float32 (1, 2, 9, 1)"),
    ],
)
def test_bad_gates(gates, message):
    q, k, v = (randn(1, 2, 9, 16, dtype=torch.float32, device="cpu") for _ in range(3))
    with pytest.raises(ValueError, match=re.escape(f"gates must be a floating-point tensor of {message}")):
        attention(q, k, v, gates=gates)
