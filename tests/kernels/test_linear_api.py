"""``linear_attention`` / ``linear_attention_step`` argument checks (messages name the argument, its value and the
accepted range) and backend choice."""

from __future__ import annotations

import re

import pytest
import torch

from attnzoo.kernels import LinearState, linear_attention, linear_attention_step
from attnzoo.kernels.linear import core

B, H, T, D, DV = 2, 3, 9, 8, 5


def qkv(t=T, d=D, h=H, b=B, dtype=torch.float32):
    return torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, h, t, DV)


def state(kv=(B, H, D, DV), k_sum=(B, H, D), dtype=torch.float32):
    return LinearState(torch.zeros(kv, dtype=dtype), None if k_sum is None else torch.zeros(k_sum, dtype=dtype))


CAUSAL = {"causal": True}
ACCEPTED_DECAYS = "expected one of (H,)=(3,), (B, H, T)=(2, 3, 9), (B, H, T, K)=(2, 3, 9, 8) with K the feature dim"


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (lambda: (torch.randn(B, T, D), *qkv()[1:]), {}, ValueError, "q must have 4 dims (B, H, T, Dk), got shape"),
        (lambda: (qkv()[0], qkv(d=4)[1], qkv()[2]), {}, ValueError,
         "k has shape (2, 3, 9, 4) but q has (2, 3, 9, 8); (B, H, T, Dk) must match"),
        (lambda: (qkv()[0], qkv(t=7)[1], qkv()[2]), {}, ValueError, "k has shape (2, 3, 7, 8) but q has (2, 3, 9, 8)"),
        (lambda: (qkv()[0], qkv(h=2)[1], qkv()[2]), {}, ValueError, "k has shape (2, 2, 9, 8) but q has (2, 3, 9, 8)"),
        (lambda: (*qkv()[:2], qkv(t=11)[2]), {}, ValueError,
         "v has shape (2, 3, 11, 5); its (B, H, T) must equal q's (2, 3, 9)"),
        (lambda: (*qkv()[:2], qkv(b=1)[2]), {}, ValueError, "v has shape (1, 3, 9, 5); its (B, H, T) must equal"),
        (lambda: (qkv()[0].half(), *qkv()[1:]), {}, ValueError, "q.dtype=torch.float16, k.dtype=torch.float32"),
        (qkv, {"feature_map": "cosine"}, ValueError,
         "feature_map='cosine' is not supported; expected one of ('elu1', 'relu', 'softmax', 'taylor2', 'identity')"),
        (qkv, {"feature_map": "softmax", **CAUSAL}, ValueError,
         "feature_map='softmax' normalizes k over all positions, so it is non-causal only"),
        (qkv, {"decay": torch.zeros(4), **CAUSAL}, ValueError, f"decay has shape (4,); {ACCEPTED_DECAYS}"),
        (qkv, {"decay": torch.zeros(B, H, T, D + 1), **CAUSAL}, ValueError, "decay has shape (2, 3, 9, 9); expected"),
        (qkv, {"decay": torch.zeros(B, H, T, D), "feature_map": "taylor2", **CAUSAL}, ValueError,
         "(B, H, T, K)=(2, 3, 9, 73) with K the feature dim"),
        (qkv, {"decay": 0.5, **CAUSAL}, ValueError, "decay=0.5 must be a log-decay <= 0"),
        (qkv, {"decay": float("-inf"), **CAUSAL}, ValueError, "decay=-inf must be a finite float"),
        (qkv, {"decay": torch.full((H,), 0.1), **CAUSAL}, ValueError,
         "decay must hold finite log-decays <= 0 (decay factor exp(decay) in (0, 1]); got values in [0.1, 0.1]"),
        (qkv, {"decay": torch.full((B, H, T), float("nan")), **CAUSAL}, ValueError,
         "decay must hold finite log-decays"),
        (qkv, {"decay": torch.zeros(H, dtype=torch.int64), **CAUSAL}, TypeError,
         "decay.dtype=torch.int64 must be a floating-point dtype"),
        (qkv, {"decay": -0.1}, ValueError, "decay and initial_state need causal=True"),
        (qkv, {"initial_state": state()}, ValueError, "got decay=None, initial_state=a LinearState with causal=False"),
        (qkv, {"chunk_size": 0, **CAUSAL}, ValueError, "chunk_size=0 must be a positive int"),
        (qkv, {"chunk_size": -16}, ValueError, "chunk_size=-16 must be a positive int"),
        (qkv, {"chunk_size": 16.0}, ValueError, "chunk_size=16.0 must be a positive int"),
        (qkv, {"initial_state": state(kv=(B, H, D, DV + 1)), **CAUSAL}, ValueError,
         "initial_state.kv has shape (2, 3, 8, 6); expected (2, 3, 8, 5) (B, H, K, Dv) with K the feature dim"),
        (qkv, {"initial_state": state(k_sum=(B, H, D + 1)), **CAUSAL}, ValueError,
         "initial_state.k_sum has shape (2, 3, 9); expected (2, 3, 8) (B, H, K)"),
        (qkv, {"initial_state": state(k_sum=None), **CAUSAL}, TypeError,
         "initial_state.k_sum must be a tensor of shape (2, 3, 8) (normalize=True), got NoneType"),
        (qkv, {"initial_state": state(), "normalize": False, **CAUSAL}, ValueError,
         "initial_state.k_sum must be None with normalize=False"),
        (qkv, {"initial_state": state(dtype=torch.float16), **CAUSAL}, TypeError,
         "initial_state.kv.dtype=torch.float16 must be the accumulation dtype torch.float32 of q.dtype=torch.float32"),
        (qkv, {"initial_state": torch.zeros(B, H, D, DV), **CAUSAL}, TypeError,
         "initial_state must be a LinearState(kv, k_sum) or None, got Tensor"),
        (qkv, {"scale": 0.0}, ValueError, "scale=0.0 must be a finite float > 0"),
        (qkv, {"eps": -1e-3}, ValueError, "eps=-0.001 must be a finite float >= 0"),
        (qkv, {"causal": 1}, TypeError, "causal=1 must be a bool"),
        (qkv, {"normalize": "yes"}, TypeError, "normalize='yes' must be a bool"),
        (qkv, {"return_state": None}, TypeError, "return_state=None must be a bool"),
        (qkv, {"backend": "cuda"}, ValueError, "backend='cuda' is not a known backend"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(make, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        linear_attention(*make(), **kwargs)


def _step_inputs(d=D):
    return [t[:, :, 0] for t in qkv(d=d)]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (qkv, {}, ValueError, "q must have 3 dims (B, H, Dk), got shape (2, 3, 9, 8)"),
        (lambda: (_step_inputs()[0], _step_inputs(d=4)[1], _step_inputs()[2]), {}, ValueError,
         "k has shape (2, 3, 4) but q has (2, 3, 8); (B, H, Dk) must match"),
        (_step_inputs, {"feature_map": "softmax"}, ValueError, "feature_map='softmax' normalizes k over all positions"),
        (_step_inputs, {"decay": torch.zeros(B, H, T)}, ValueError,
         "decay has shape (2, 3, 9); expected one of (H,)=(3,), (B, H)=(2, 3), (B, H, K)=(2, 3, 8)"),
        (_step_inputs, {"decay": torch.ones(B, H)}, ValueError, "decay must hold finite log-decays <= 0"),
        (lambda: (*_step_inputs(), state(kv=(B, H, D, 2))), {}, ValueError, "initial_state.kv has shape (2, 3, 8, 2)"),
    ],
)
def test_step_bad_input_is_rejected(make, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        linear_attention_step(*make(), **kwargs)


def test_triton_backend_without_its_kernels_is_a_clear_error(monkeypatch, triton_device):
    monkeypatch.setattr("attnzoo.kernels.linear.op.triton_launch_available", lambda: False)
    with pytest.raises(RuntimeError, match=re.escape("backend='triton': the linear-attention Triton kernels")):
        linear_attention(*(t.to(triton_device) for t in qkv()), backend="triton")


def test_triton_backend_checks_its_chunk_size(triton_device):
    with pytest.raises(ValueError, match=re.escape("chunk_size=24 must be a power of two >= 16 for backend='triton'")):
        linear_attention(*(t.to(triton_device) for t in qkv()), causal=True, chunk_size=24, backend="triton")


def test_auto_backend_on_cpu_is_the_torch_path(monkeypatch):
    calls, real = [], core.torch_impl.linear_fwd_torch

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(core.torch_impl, "linear_fwd_torch", spy)
    linear_attention(*qkv(), causal=True, chunk_size=4)
    assert [c["chunk_size"] for c in calls] == [4]
