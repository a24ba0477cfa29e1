"""Halo attention through the shared Triton kernel (halo mode) vs the float64 reference: values and the
gradients of q, k, v and the relative-position tables."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels.halo import halo2d
from attnzoo.kernels.halo.reference import halo_reference
from tests.kernels.helpers import TOL, leaf64, poison_allocations, randn, rel_err

# name: (X, Y, query downsample r, block, halo, pad_mode, rel tables, (H, H_kv))
CASES = {
    "zeros_plain": (8, 8, 1, 4, 1, "zeros", False, (2, 2)),
    "zeros_rel_gqa_nonsquare": (8, 12, 1, 4, 2, "zeros", True, (2, 1)),
    "query_stride2_rel": (8, 8, 2, 4, 1, "zeros", True, (2, 2)),
    "mask_rel": (12, 8, 1, 4, 1, "mask", True, (2, 2)),
}


def run_case(name: str, dtype: torch.dtype, backend: str, device: str, monkeypatch) -> dict[str, float]:
    X, Y, r, block, halo, pad_mode, use_rel, (H, Hkv) = CASES[name]
    B, D, win = 1, 16, block + 2 * halo
    inputs = {
        "q": randn(B, H, X // r, Y // r, D, dtype=dtype, device=device),
        "k": randn(B, Hkv, X, Y, D, dtype=dtype, device=device),
        "v": randn(B, Hkv, X, Y, D, dtype=dtype, device=device),
    }
    if use_rel:
        inputs |= {n: randn(2 * win - 1, D, dtype=dtype, device=device, scale=0.5) for n in ("rel_h", "rel_w")}
    ref_in = {n: leaf64(t) for n, t in inputs.items()}
    ref = halo_reference(ref_in["q"], ref_in["k"], ref_in["v"], block, halo, pad_mode, ref_in.get("rel_h"),
                         ref_in.get("rel_w"))
    do = randn(*ref.shape, dtype=dtype, device=device)
    ref_grads = torch.autograd.grad(ref, list(ref_in.values()), do.cpu().double())

    poison_allocations(monkeypatch)
    ours_in = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    out = halo2d(ours_in["q"], ours_in["k"], ours_in["v"], block, halo, pad_mode, ours_in.get("rel_h"),
                 ours_in.get("rel_w"), backend=backend)
    grads = torch.autograd.grad(out, list(ours_in.values()), do)
    assert out.shape == inputs["q"].shape and out.dtype == dtype
    errors = {"out": rel_err(out, ref)}
    errors |= {f"d{n}": rel_err(g, rg) for n, g, rg in zip(ours_in, grads, ref_grads, strict=True)}
    return errors


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(n, torch.float32) for n in CASES] + [(n, torch.float16) for n in ("zeros_rel_gqa_nonsquare", "mask_rel")],
)
def test_triton_halo_matches_reference(name, dtype, triton_device, monkeypatch):
    errors = run_case(name, dtype, "triton", triton_device, monkeypatch)
    assert max(errors.values()) <= TOL[dtype], f"{name} {dtype}: {errors}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_torch_halo_through_the_op_matches_reference(name, dtype, monkeypatch):
    errors = run_case(name, dtype, "torch", "cpu", monkeypatch)
    assert max(errors.values()) <= TOL[dtype], f"{name} {dtype}: {errors}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_triton_halo_bf16_on_gpu(name, monkeypatch):
    errors = run_case(name, torch.bfloat16, "triton", "cuda", monkeypatch)
    assert max(errors.values()) <= TOL[torch.bfloat16], f"{name}: {errors}"
