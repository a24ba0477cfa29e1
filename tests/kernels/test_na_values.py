"""Neighborhood attention through the shared Triton kernel vs the float64 reference: values and the
gradients of q, k, v, the relative-position bias and the extra tokens."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels.neighborhood import na1d, na2d, na3d
from attnzoo.kernels.neighborhood.reference import na_reference
from tests.kernels.helpers import TOL, leaf64, poison_allocations, randn, rel_err

NA = {1: na1d, 2: na2d, 3: na3d}

# name: (grid, kernel, dilation, stride, causal, rpb, n_extra, (H, H_kv)). Small grids: the interpreter is slow.
CASES = {
    "1d": ((37,), (5,), (1,), (1,), (False,), False, 0, (2, 2)),
    "1d_even_dilated_causal_extra": ((20,), (4,), (2,), (1,), (True,), False, 3, (2, 1)),
    "1d_stride_rpb": ((23,), (6,), (1,), (1,), (False,), True, 0, (2, 2)),
    "2d_dilated_rpb": ((7, 9), (3, 4), (2, 1), (1, 1), (False, False), True, 0, (2, 1)),
    "2d_strided_half_causal_extra": ((8, 6), (5, 3), (1, 2), (2, 3), (False, True), False, 2, (2, 2)),
    "2d_full_window_gqa": ((5, 6), (5, 6), (1, 1), (1, 1), (False, False), False, 0, (4, 2)),
    "3d_mixed": ((3, 4, 6), (2, 2, 3), (1, 2, 1), (1, 1, 2), (False, False, True), False, 0, (2, 1)),
    "3d_rpb_extra_causal": ((3, 3, 4), (2, 3, 4), (1, 1, 1), (1, 1, 1), (True, False, False), True, 4, (1, 1)),
}
# Cases whose value head dim Dv differs from the q/k head dim D = 16.
VALUE_DIM = {"1d_even_dilated_causal_extra": 24, "2d_dilated_rpb": 8, "3d_mixed": 8}
# fp16 on the 1-D/2-D cases; the 3-D ones cost most under the interpreter and add no fp16-specific path.
FP16_CASES = [name for name in CASES if not name.startswith("3d")]


def run_case(name: str, dtype: torch.dtype, backend: str, device: str, monkeypatch) -> dict[str, float]:
    grid, ks, dil, st, causal, use_rpb, n_extra, (H, Hkv) = CASES[name]
    B, D = 1, 16
    Dv = VALUE_DIM.get(name, D)
    q = randn(B, H, *grid, D, dtype=dtype, device=device)
    k = randn(B, Hkv, *grid, D, dtype=dtype, device=device)
    v = randn(B, Hkv, *grid, Dv, dtype=dtype, device=device)
    rpb = randn(H, *(2 * x - 1 for x in ks), dtype=dtype, device=device) if use_rpb else None
    ek = randn(B, Hkv, n_extra, D, dtype=dtype, device=device) if n_extra else None
    ev = randn(B, Hkv, n_extra, Dv, dtype=dtype, device=device) if n_extra else None
    names = ["q", "k", "v", "rpb", "extra_k", "extra_v"]
    inputs = dict(zip(names, (q, k, v, rpb, ek, ev), strict=True))
    present = [n for n in names if inputs[n] is not None]

    ref_in = {n: leaf64(t) if t is not None else None for n, t in inputs.items()}
    ref = na_reference(ref_in["q"], ref_in["k"], ref_in["v"], ks, dil, st, causal, ref_in["rpb"],
                       ref_in["extra_k"], ref_in["extra_v"])
    do = randn(*ref.shape, dtype=dtype, device=device)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in present], do.cpu().double())

    poison_allocations(monkeypatch)
    ours_in = {n: t.clone().requires_grad_() if t is not None else None for n, t in inputs.items()}
    kw = dict(dilation=dil, stride=st, is_causal=causal, backend=backend)
    out = NA[len(grid)](ours_in["q"], ours_in["k"], ours_in["v"], ks, rpb=ours_in["rpb"], extra_k=ours_in["extra_k"],
                        extra_v=ours_in["extra_v"], **kw)
    grads = torch.autograd.grad(out, [ours_in[n] for n in present], do)
    assert out.shape == (*q.shape[:-1], Dv) and out.dtype == dtype
    errors = {"out": rel_err(out, ref)}
    errors |= {f"d{n}": rel_err(g, r) for n, g, r in zip(present, grads, ref_grads, strict=True)}
    return errors


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(n, torch.float32) for n in CASES] + [(n, torch.float16) for n in FP16_CASES],
    ids=[f"{n}-fp32" for n in CASES] + [f"{n}-fp16" for n in FP16_CASES],
)
def test_triton_na_matches_reference(name, dtype, triton_device, monkeypatch):
    errors = run_case(name, dtype, "triton", triton_device, monkeypatch)
    assert max(errors.values()) <= TOL[dtype], f"{name} {dtype}: {errors}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_triton_na_bf16_on_gpu(name, monkeypatch):
    errors = run_case(name, torch.bfloat16, "triton", "cuda", monkeypatch)
    assert max(errors.values()) <= TOL[torch.bfloat16], f"{name}: {errors}"
