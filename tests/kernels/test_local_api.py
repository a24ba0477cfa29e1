"""The contract of the local ops (``na1d/na2d/na3d``, ``halo2d``): argument checks with clear messages,
non-contiguous inputs, and graph capture (opcheck, compile, meta)."""

from __future__ import annotations

import re

import pytest
import torch

from attnzoo.kernels import attention
from attnzoo.kernels.halo import halo2d
from attnzoo.kernels.halo.op import halo_fwd
from attnzoo.kernels.neighborhood import na1d, na2d, na3d
from attnzoo.kernels.neighborhood.op import na_fwd
from tests.kernels.helpers import randn, rel_err


def grid_qkv(*grid, B=1, H=2, Hkv=2, D=16, dtype=torch.float32, device="cpu"):
    return tuple(randn(B, h, *grid, D, dtype=dtype, device=device) for h in (H, Hkv, Hkv))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: na2d(*grid_qkv(6, 8), kernel_size=7), ValueError, "kernel_size[0]=7 must be in [2, 6]"),
        (lambda: na1d(*grid_qkv(9), kernel_size=1), ValueError, "kernel_size[0]=1 must be in [2, 9]"),
        (lambda: na2d(*grid_qkv(9, 9), kernel_size=3, dilation=(1, 4)), ValueError,
         "dilation[1]=4 must be >= 1 with kernel_size*dilation=3*4=12 <= 9"),
        (lambda: na1d(*grid_qkv(9), kernel_size=3, stride=4), ValueError,
         "stride[0]=4 must be in [1, kernel_size[0]=3]"),
        (lambda: na2d(*grid_qkv(6, 6), kernel_size=(3, 3, 3)), TypeError,
         "kernel_size=(3, 3, 3) must be a int or a tuple of 2 ints"),
        (lambda: na2d(*grid_qkv(6, 6), kernel_size=3, is_causal=1), TypeError, "is_causal=1 must be a bool"),
        (lambda: na2d(*grid_qkv(6, 6), kernel_size=3, rpb=torch.zeros(2, 4, 5)), ValueError,
         "rpb must have shape (H, 2k-1 per axis) = (2, 5, 5); got (2, 4, 5)"),
        (lambda: na1d(*grid_qkv(9), kernel_size=3, stride=2, rpb=torch.zeros(2, 5)), ValueError,
         "rpb is defined for stride 1 only"),
        (lambda: na1d(*grid_qkv(9), kernel_size=3, extra_k=torch.zeros(1, 2, 4, 8),
                      extra_v=torch.zeros(1, 2, 4, 8)), ValueError,
         "extra_k must have shape (B, H_kv, E, D) = (1, 2, 4, 16) to match k; got (1, 2, 4, 8)"),
        (lambda: na1d(*grid_qkv(9), kernel_size=3, extra_k=torch.zeros(1, 2, 4, 16)), ValueError,
         "extra_k and extra_v must be given together"),
        (lambda: na2d(*grid_qkv(6, 6)[:1], *grid_qkv(6, 5)[1:], kernel_size=3), ValueError,
         "k/v token grid (6, 5) must equal q's token grid (6, 6)"),
        (lambda: na3d(*grid_qkv(6, 6), kernel_size=3), ValueError, "q must have 6 dims (B, H, X, Y, Z, D)"),
        (lambda: halo2d(*grid_qkv(10, 8), block_size=4, halo_size=1), ValueError,
         "the key map 10x8 must be divisible by block_size=4 on both axes"),
        (lambda: halo2d(*grid_qkv(8, 8), block_size=4, halo_size=-1), ValueError, "halo_size=-1 must be an int >= 0"),
        (lambda: halo2d(*grid_qkv(8, 8), block_size=4, halo_size=1, pad_mode="reflect"), ValueError,
         "pad_mode='reflect' is not supported; expected one of ('zeros', 'mask')"),
        (lambda: halo2d(*grid_qkv(8, 8), block_size=4, halo_size=1, rel_h=torch.zeros(9, 16),
                        rel_w=torch.zeros(11, 16)),
         ValueError, "rel_h must have shape (2*(block_size+2*halo_size)-1, D) = (11, 16); got (9, 16)"),
        (lambda: halo2d(*grid_qkv(8, 8), block_size=4, halo_size=1, rel_h=torch.zeros(11, 16)), ValueError,
         "rel_h and rel_w must be given together"),
        (lambda: halo2d(grid_qkv(3, 3)[0], *grid_qkv(8, 8)[1:], block_size=4, halo_size=1), ValueError,
         "q's grid 3x3 must be the key map 8x8 downsampled by one factor r dividing block_size=4"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def _heads_second(t: torch.Tensor) -> torch.Tensor:
    """The same values as t, stored (B, *grid, H, D): a non-contiguous heads-first view."""
    return t.movedim(1, -2).contiguous().movedim(-2, 1)


OPS = {
    "attention": lambda q, k, v, backend: attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), causal=True,
                                                    backend=backend),
    "na2d": lambda q, k, v, backend: na2d(q, k, v, (3, 4), dilation=(2, 1), backend=backend),
    "halo2d": lambda q, k, v, backend: halo2d(q, k, v, 4, 1, backend=backend),
}


def _dim_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with a strided head dim (stride(-1) != 1)."""
    return t.movedim(-1, 2).contiguous().movedim(2, -1)


@pytest.mark.parametrize("layout", [_heads_second, _dim_strided], ids=["heads_second", "dim_strided"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs_give_the_same_result(op, backend, layout, request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    base = grid_qkv(8, 8, H=2, Hkv=1, device=device)
    views = [layout(t).requires_grad_() for t in base]
    dense = [t.clone().requires_grad_() for t in base]
    assert not views[0].is_contiguous()
    out_v, out_d = OPS[op](*views, backend), OPS[op](*dense, backend)
    do = torch.randn_like(out_d)
    grads_v = torch.autograd.grad(out_v, views, do)
    grads_d = torch.autograd.grad(out_d, dense, do)
    assert rel_err(out_v, out_d) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads_v, grads_d, strict=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_na_and_halo(backend, request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    q, k, v = (t.requires_grad_() for t in grid_qkv(5, 6, H=2, Hkv=1, device=device))
    rpb = randn(2, 5, 3, dtype=torch.float32, device=device).requires_grad_()
    ek, ev = (randn(1, 1, 3, 16, dtype=torch.float32, device=device).requires_grad_() for _ in range(2))
    for gates in (None, _gates(q)):
        torch.library.opcheck(
            na_fwd, (q, k, v, rpb, ek, ev, gates, [3, 2], [1, 2], [1, 1], [False, True], 0.25, backend))
    q, k, v = (t.requires_grad_() for t in grid_qkv(8, 8, device=device))
    rel_h, rel_w = (randn(11, 16, dtype=torch.float32, device=device).requires_grad_() for _ in range(2))
    for gates in (None, _gates(q)):
        torch.library.opcheck(halo_fwd, (q, k, v, rel_h, rel_w, gates, 4, 1, "zeros", 0.25, backend))


def _gates(q: torch.Tensor) -> torch.Tensor:
    """Random non-negative (B, H, *grid) gates, about half of them zero."""
    gates = torch.rand(q.shape[:-1], device=q.device)
    return (gates * (gates > 0.5)).requires_grad_()


def test_compile_fullgraph_and_meta():
    q, k, v = (t.requires_grad_() for t in grid_qkv(7, 9))
    rel_h, rel_w = (randn(11, 16, dtype=torch.float32, device="cpu").requires_grad_() for _ in range(2))

    def f(q, k, v):
        na = na2d(q, k, v, 3, is_causal=(True, False))
        halo = halo2d(q[:, :, :4, :8], k[:, :, :4, :8], v[:, :, :4, :8], 4, 1, rel_h=rel_h, rel_w=rel_w)
        return na.sum() + halo.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expect = torch.autograd.grad(f(q, k, v), (q, k, v, rel_h))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v, rel_h))
    assert all(rel_err(g, e) < 1e-6 for g, e in zip(got, expect, strict=True))

    qm, km, vm = (t.requires_grad_() for t in grid_qkv(4, 5, 6, H=4, Hkv=2, device="meta"))
    out = na3d(qm, km, vm, (3, 3, 4), dilation=(1, 1, 1), is_causal=(False, True, False))
    assert out.shape == qm.shape and out.device.type == "meta"
    assert torch.autograd.grad(out.sum(), qm)[0].shape == qm.shape
