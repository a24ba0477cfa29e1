"""Values and gradients of ``attention`` vs the float64 reference, for every mode and backend."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import attention
from attnzoo.kernels.attention.reference import attention_reference
from tests.kernels.helpers import TOL, leaf64, poison_allocations, randn, rel_err

# name: (B, H, H_kv, N, M, causal, score); lengths are deliberately not multiples of the tiles.
MODES = {
    "full": (2, 2, 2, 37, 37, False, "softmax"),
    "causal": (1, 3, 3, 45, 45, True, "softmax"),
    "cross": (2, 2, 2, 21, 50, False, "softmax"),
    "cross_causal_long_q": (1, 2, 2, 43, 19, True, "softmax"),
    "gqa": (1, 4, 2, 33, 29, False, "softmax"),
    "mqa_causal": (1, 4, 1, 35, 35, True, "softmax"),
    "sigmoid": (1, 2, 2, 26, 39, False, "sigmoid"),
    "sigmoid_gqa_causal": (1, 4, 2, 30, 30, True, "sigmoid"),
    "cross_padded": (2, 2, 2, 23, 41, False, "softmax"),
    "gqa_causal_padded": (2, 4, 2, 31, 31, True, "softmax"),
    "sigmoid_padded": (2, 2, 2, 19, 35, False, "sigmoid"),
    "value_dim": (1, 2, 2, 33, 27, False, "softmax"),
    "gqa_causal_value_dim": (1, 4, 2, 29, 29, True, "softmax"),
}
# Modes with a key padding mask (batch 0: random keys padded, batch 1: every key padded -> zero output) and
# modes whose value head dim differs from the q/k head dim by this much.
PADDED = {"cross_padded", "gqa_causal_padded", "sigmoid_padded"}
VALUE_DIM_EXTRA = {"value_dim": 8, "gqa_causal_value_dim": -8}
HEAD_DIMS = (16, 24, 32, 64)


def _padding(batch: int, keys: int, device: str) -> torch.Tensor:
    pad = torch.rand(batch, keys, device=device) < 0.3
    pad[-1] = True
    return pad


def _run(mode: str, head_dim: int, dtype: torch.dtype, backend: str, device: str, monkeypatch):
    B, H, Hkv, N, M, causal, score = MODES[mode]
    value_dim = head_dim + VALUE_DIM_EXTRA.get(mode, 0)
    q = randn(B, H, N, head_dim, dtype=dtype, device=device)
    k = randn(B, Hkv, M, head_dim, dtype=dtype, device=device)
    v = randn(B, Hkv, M, value_dim, dtype=dtype, device=device)
    do = randn(B, H, N, value_dim, dtype=dtype, device=device)
    kw = dict(causal=causal, score=score, sigmoid_bias=-1.5 if score == "sigmoid" else None)
    pad = _padding(B, M, device) if mode in PADDED else None

    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    ref = attention_reference(q64, k64, v64, key_mask=None if pad is None else ~pad.cpu(), **kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())

    poison_allocations(monkeypatch)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, key_padding_mask=pad, backend=backend, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert out.dtype == dtype and out.shape == (B, H, N, value_dim)
    if pad is not None:  # the last batch sees no key at all
        assert not out[-1].any() and not grads[0][-1].any()
    tol = TOL[dtype]
    errors = {"out": rel_err(out, ref)}
    errors |= {f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads, strict=True)}
    assert max(errors.values()) <= tol, f"{mode} D={head_dim} {dtype} {backend}: {errors} > {tol}"


FP32_FP16 = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


# The interpreter is slow: every mode at one head dim, and the head-dim sweep on two modes.
@FP32_FP16
@pytest.mark.parametrize("mode", MODES)
def test_triton_matches_reference(mode, dtype, triton_device, monkeypatch):
    _run(mode, 32, dtype, "triton", triton_device, monkeypatch)


@FP32_FP16
@pytest.mark.parametrize("head_dim", [d for d in HEAD_DIMS if d != 32])
@pytest.mark.parametrize("mode", ["cross", "mqa_causal"])
def test_triton_head_dims(mode, head_dim, dtype, triton_device, monkeypatch):
    _run(mode, head_dim, dtype, "triton", triton_device, monkeypatch)


@FP32_FP16
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_torch_path_matches_reference(mode, head_dim, dtype, monkeypatch):
    _run(mode, head_dim, dtype, "torch", "cpu", monkeypatch)


@pytest.mark.parametrize("mode", ["full", "causal", "gqa", "sigmoid_gqa_causal", "gqa_causal_padded"])
def test_torch_path_chunked_matches_reference(mode, monkeypatch):
    """Force several query chunks so the chunk boundaries (and causal offsets) are exercised."""
    from attnzoo.kernels.attention import torch_impl

    monkeypatch.setattr(torch_impl, "_CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(torch_impl, "uses_aten_flash", lambda q, v, score: False)
    _run(mode, 24, torch.float32, "torch", "cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("mode", MODES)
def test_triton_bf16_on_gpu(mode, head_dim, monkeypatch):
    _run(mode, head_dim, torch.bfloat16, "triton", "cuda", monkeypatch)


def test_float64_gradcheck_torch_path():
    kw = dict(dtype=torch.float64, device="cpu")
    q, k, v = (randn(1, 2, n, 8, **kw).requires_grad_() for n in (5, 7, 7))
    for causal in (False, True):
        for score in ("softmax", "sigmoid"):
            assert torch.autograd.gradcheck(
                lambda q, k, v, c=causal, s=score: attention(q, k, v, causal=c, score=s, backend="torch"),
                (q, k, v))
