"""``attention``'s contract: argument checks, backend choice, and graph capture (opcheck, compile,
export, meta, TorchScript tracing, autocast)."""

from __future__ import annotations

import re

import pytest
import torch

from attnzoo.kernels import attention
from attnzoo.kernels.attention.op import attention_fwd
from attnzoo.kernels.attention.reference import attention_reference
from attnzoo.kernels.backend import resolve_backend
from tests.kernels.helpers import randn, rel_err


def qkv(B=1, H=2, Hkv=2, N=9, M=9, D=16, dtype=torch.float32, device="cpu"):
    return (randn(B, H, N, D, dtype=dtype, device=device), randn(B, Hkv, M, D, dtype=dtype, device=device),
            randn(B, Hkv, M, D, dtype=dtype, device=device))


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "message"),
    [
        (lambda: (torch.randn(2, 9, 16), *qkv()[1:]), {}, ValueError,
         "q must have 4 dims (B, H, N, D), got shape (2, 9, 16)"),
        (lambda: (qkv()[0], torch.randn(1, 2, 9), qkv()[2]), {}, ValueError, "k must have 4 dims"),
        (lambda: (qkv()[0], *qkv(D=8)[1:]), {}, ValueError, "k head dim D=8 must equal q's head dim D=16"),
        (lambda: qkv(H=3, Hkv=2), {}, ValueError, "H=3 heads, k/v have H_kv=2; H must be a multiple of H_kv"),
        (lambda: (qkv()[0], qkv()[1], qkv(M=5)[2]), {}, ValueError, "k and v must have the same shape"),
        (lambda: (qkv()[0], *qkv(B=2)[1:]), {}, ValueError, "k has batch size 2 but q has 1"),
        (lambda: (qkv()[0].half(), *qkv()[1:]), {}, ValueError, "q.dtype=torch.float16, k.dtype=torch.float32"),
        (lambda: (qkv()[0].to("meta"), *qkv()[1:]), {}, ValueError, "q.device=meta, k.device=cpu"),
        (lambda: (qkv()[0].int(), *qkv()[1:]), {}, TypeError, "q.dtype=torch.int32 is not supported"),
        (lambda: qkv(N=0), {}, ValueError, "q has an empty dimension"),
        (qkv, {"backend": "cuda"}, ValueError, "backend='cuda' is not a known backend"),
        (qkv, {"score": "relu"}, ValueError,
         "score='relu' is not supported; expected one of ('softmax', 'sigmoid')"),
        (qkv, {"scale": -1.0}, ValueError, "scale=-1.0 must be a finite float > 0"),
        (qkv, {"scale": float("nan")}, ValueError, "scale=nan must be a finite float > 0"),
        (qkv, {"sigmoid_bias": 1.0}, ValueError, "sigmoid_bias=1.0 is only accepted with score='sigmoid'"),
        (qkv, {"score": "sigmoid", "sigmoid_bias": float("inf")}, ValueError, "sigmoid_bias=inf must be a finite"),
        (qkv, {"causal": 1}, TypeError, "causal=1 must be a bool"),
        (lambda: qkv(dtype=torch.float64), {"backend": "triton"}, TypeError, "backend='triton' supports dtypes"),
        (lambda: qkv(D=320), {"backend": "triton"}, ValueError, "supports head dim D in [1, 256]; got D=320"),
        (lambda: qkv(B=2, M=7), {"key_padding_mask": torch.zeros(2, 9, dtype=torch.bool)}, ValueError,
         "key_padding_mask must be a bool tensor of shape (B, M)=(2, 7); got torch.bool (2, 9)"),
        (lambda: qkv(B=2, M=7), {"key_padding_mask": torch.zeros(2, 7)}, ValueError,
         "key_padding_mask must be a bool tensor of shape (B, M)=(2, 7); got torch.float32 (2, 7)"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(make, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        attention(*make(), **kwargs)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    # Patch the check rather than TRITON_INTERPRET: Triton must keep the interpreter it started with.
    monkeypatch.setattr("attnzoo.kernels.backend.triton_interpreting", lambda: False)
    message = "backend='triton' needs CUDA tensors, got tensors on device 'cpu'"
    with pytest.raises(ValueError, match=re.escape(message)):
        attention(*qkv(), backend="triton")


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    from attnzoo.kernels.attention import op

    calls, real = [], op.torch_impl.attention_fwd

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(op.torch_impl, "attention_fwd", spy)
    attention(*qkv())
    assert len(calls) == 1
    assert resolve_backend(None, torch.device("cuda")) == "triton"
    assert resolve_backend("reference", torch.device("cuda")) == "reference"


def test_matches_sdpa_including_gqa_and_causal():
    q, k, v = qkv(H=4, Hkv=2, N=13, M=13)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(attention(q, k, v, causal=True), expect) < 1e-5


def test_key_padding_mask_matches_sdpa_with_the_same_mask():
    q, k, v = qkv(B=3, N=6, M=11)
    pad = torch.rand(3, 11) < 0.4
    pad[:, 0] = False  # SDPA gives NaN for queries that see no key
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None])
    assert rel_err(attention(q, k, v, key_padding_mask=pad), expect) < 1e-5


def test_sigmoid_default_bias_is_minus_log_m():
    q, k, v = qkv(N=6, M=11)
    expect = attention_reference(q, k, v, score="sigmoid", sigmoid_bias=-torch.log(torch.tensor(11.0)).item())
    assert rel_err(attention(q, k, v, score="sigmoid"), expect) < 1e-5


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, score, request):
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    q, k, v = (t.requires_grad_() for t in qkv(H=4, Hkv=2, N=10, M=7, device=device))
    keep = torch.rand(1, 7, device=device) < 0.7
    for key_mask in (None, keep):
        torch.library.opcheck(attention_fwd, (q, k, v, key_mask, None, True, 0.25, score, -1.0, backend))
    # q, k, v as the blocks make them: views of one packed (B, N, 3, H, D) projection
    packed = torch.randn(2, 10, 3, 4, 16, device=device).permute(2, 0, 3, 1, 4).requires_grad_()
    torch.library.opcheck(attention_fwd, (*packed.unbind(0), None, None, False, 0.25, score, -1.0, backend))


@pytest.mark.parametrize("gated", [None, "every row", "few rows"])
def test_cpu_output_keeps_the_packed_layout_so_merging_heads_is_a_view(gated):
    """q/k/v from one packed (B, N, 3, H, D) projection: ATen's output comes back in q's token-major memory order
    (no copy), so the blocks' ``out.transpose(1, 2).reshape(B, N, H * D)`` copies nothing, as after SDPA; gated
    outputs too, whether every row was computed or only the active ones (MoH's routed heads)."""
    B, N, H, D = 2, 9, 3, 8
    packed = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = packed.unbind(0)
    gates = None if gated is None else torch.rand(B, H, N) + 0.5
    if gated == "few rows":
        gates[:, 1:, 2:] = 0  # heads 1.. computed on 2 of 9 rows
    out = attention(q, k, v, gates=gates, backend="torch")
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()
    assert rel_err(out, attention(q, k, v, gates=gates, backend="reference")) < 1e-6
    gates_arg = None if gates is None else gates.requires_grad_()
    torch.library.opcheck(attention_fwd, (*packed.requires_grad_().unbind(0), None, gates_arg, False, 0.25,
                                          "softmax", -1.0, "torch"))


def test_compile_fullgraph_torch_path():
    q, k, v = (t.requires_grad_() for t in qkv(H=4, Hkv=2, N=21, M=21, D=32))

    def f(q, k, v):
        return attention(q * 1.5, k, v, causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expect = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert all(rel_err(g, e) < 1e-6 for g, e in zip(got, expect, strict=True))


def test_compile_fullgraph_inductor_forward():
    q, k, v = qkv(N=17, M=17, D=32)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v).relu() + 1, fullgraph=True)
    assert rel_err(compiled(q, k, v), attention(q, k, v).relu() + 1) < 1e-6


def test_meta_device_forward_and_backward():
    q, k, v = (t.requires_grad_() for t in qkv(B=2, H=6, Hkv=3, N=40, M=30, D=24, device="meta"))
    out = attention(q, k, v, causal=True)
    assert out.shape == (2, 6, 40, 24) and out.device.type == "meta"
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


class _Attend(torch.nn.Module):
    def forward(self, q, k, v):
        return attention(q, k, v, causal=True, score="sigmoid")


def test_export_keeps_one_op_node():
    q, k, v = qkv(N=12, M=12)
    program = torch.export.export(_Attend(), (q, k, v))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("attnzoo.attention_fwd.default") == 1, targets
    assert rel_err(program.module()(q, k, v), _Attend()(q, k, v)) < 1e-6


def test_torchscript_trace():
    q, k, v = qkv(N=12, M=12)
    traced = torch.jit.trace(_Attend(), (q, k, v))
    q2, k2, v2 = qkv(N=12, M=12)
    assert rel_err(traced(q2, k2, v2), _Attend()(q2, k2, v2)) < 1e-6


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = qkv(N=12, M=12, D=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, attention_reference(q, k, v)) < 2e-2


def test_strided_head_dim_on_the_cpu_fast_path():
    """ATen's CPU flash kernel needs unit-stride head dims; strided q/k/v must give the same result."""
    q = torch.randn(2, 2, 8, 9).transpose(-1, -2)
    k, v = (torch.randn(2, 2, 8, 18).transpose(-1, -2) for _ in range(2))
    assert q.stride(-1) != 1
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    expect = attention_reference(*(t.detach().double() for t in (q, k, v))).float()
    assert rel_err(out, expect) < 1e-5
    grads = torch.autograd.grad(out.sum(), leaves)
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    expect_grads = torch.autograd.grad(attention(*dense).sum(), dense)
    assert all(rel_err(g, e) < 1e-5 for g, e in zip(grads, expect_grads, strict=True))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("layout", ["tokens-major", "heads-major", "broadcast", "strided head dim"])
def test_output_gradient_in_any_layout(layout, gated):
    """The CPU fast path hands ATen the output gradient as it comes (ATen reads it tokens-major): every layout
    autograd can deliver gives the gradients of the same gradient materialized contiguous."""
    B, N, H, D = 2, 9, 3, 8
    packed = torch.randn(B, N, 3, H, D)
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in packed.unbind(2))
    gates = torch.rand(B, H, N) + 0.5 if gated else None
    do = {
        "tokens-major": torch.randn(B, N, H, D).transpose(1, 2),
        "heads-major": torch.randn(B, H, N, D),
        "broadcast": torch.randn(D).expand(B, H, N, D),
        "strided head dim": torch.randn(B, H, N, 2 * D)[..., ::2],
    }[layout]
    out = attention(q, k, v, gates=gates, backend="torch")
    grads = torch.autograd.grad(out, (q, k, v), do)
    expect = torch.autograd.grad(attention(q, k, v, gates=gates, backend="torch"), (q, k, v), do.contiguous())
    assert all(rel_err(g, e) < 1e-6 for g, e in zip(grads, expect, strict=True))
