"""``attention``: the public dense attention op on the shared fused kernel.

The forward and backward are ``torch.library`` custom ops (``attnzoo::attention_fwd`` /
``attnzoo::attention_bwd``) with fake (meta) implementations and an autograd rule, so the op is a
single graph node under ``torch.compile(fullgraph=True)``, ``torch.export``, FX and TorchScript
tracing. The ``backend`` string picks the implementation inside the op.
"""

from __future__ import annotations

import math

import torch

from attnzoo.kernels import gating, validate
from attnzoo.kernels.attention import torch_impl
from attnzoo.kernels.attention.reference import attention_reference
from attnzoo.kernels.backend import resolve_backend
from attnzoo.kernels.precision import lse_dtype

SCORES = ("softmax", "sigmoid")


def _triton():
    # Imported on first use: keeps `import attnzoo` free of Triton and lets tests set TRITON_INTERPRET.
    from attnzoo.kernels.attention import triton_launch

    return triton_launch


@torch.library.custom_op("attnzoo::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, gates: torch.Tensor | None,
    causal: bool, scale: float, score: str, sigmoid_bias: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, N, D), k: (B, H_kv, M, D), v: (B, H_kv, M, Dv), key_mask: (B, M) bool keep-mask or None,
    gates: (B, H, N) output gates or None -> (out (B, H, N, Dv), lse (B, H, N))."""
    if backend == "triton":
        tk = _triton()
        return tk.attention_fwd(q, k, v, tk.dense_geometry(q, k, causal), scale, score, sigmoid_bias,
                                key_mask=key_mask, gates=gates)
    if gates is not None:
        return torch_impl.gated_attention_fwd(q, k, v, causal, scale, score, sigmoid_bias, key_mask, gates)
    return torch_impl.attention_fwd(q, k, v, causal, scale, score, sigmoid_bias, key_mask)


@attention_fwd.register_fake
def _(q, k, v, key_mask, gates, causal, scale, score, sigmoid_bias, backend):
    # The implementations' layouts: contiguous, except ATen's CPU flash output (in q's memory order).
    lse = q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))
    if backend == "torch" and torch_impl.uses_aten_flash(q, v, score):
        return torch_impl.aten_flash_out_like(q), lse
    return q.new_empty((*q.shape[:-1], v.shape[-1])), lse


@torch.library.custom_op("attnzoo::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_mask: torch.Tensor | None, gates: torch.Tensor | None, causal: bool, scale: float, score: str,
    sigmoid_bias: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``attention_fwd``'s (gated) output given its upstream gradient ``do``."""
    if backend == "triton":
        tk = _triton()
        return tk.attention_bwd(do, q, k, v, out, lse, tk.dense_geometry(q, k, causal), scale, score,
                                sigmoid_bias, key_mask=key_mask, gates=gates)[:3]
    if gates is not None:
        return torch_impl.gated_attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias, key_mask,
                                              gates)
    return torch_impl.attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias, key_mask)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, key_mask, gates, causal, scale, score, sigmoid_bias, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, gates, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, gates)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, key_mask, gates = ctx.saved_tensors
    do = do.contiguous()
    dq, dk, dv = attention_bwd(do, q, k, v, out, lse, key_mask, gates, *ctx.params)
    dgates = None if gates is None else gating.gates_grad(do, out, gates)
    return dq, dk, dv, None, dgates, *(None,) * len(ctx.params)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_key_padding_mask(mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    """The (B, M) padding mask (True = padded) as the kernels' keep-mask (True = seen)."""
    if mask is None:
        return None
    expect = (k.shape[0], k.shape[2])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != expect:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor of shape (B, M)={expect}; got {got}")
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but k is on {k.device}")
    return ~mask


def _check_inputs(q, k, v, backend: str | None) -> str:
    validate.check_qkv(q, k, v, spatial=1, same_grid=False)
    resolved = resolve_backend(backend, q.device)
    if resolved == "triton":
        validate.check_triton_inputs(q)
    return resolved


def _autocast(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, run in the autocast dtype like SDPA does (the caller asked for it)."""
    device = ts[0].device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) for t in ts)
    return ts


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    score: str = "softmax",
    sigmoid_bias: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Dense multi-head attention on the shared fused kernel.

    Args:
        q: (B, H, N, D) queries.
        k: (B, H_kv, M, D) keys, v: (B, H_kv, M, Dv) values; H must be a multiple of H_kv (GQA/MQA). N != M
            is cross attention.
        causal: query i sees keys j <= i (top-left aligned, as in ``F.scaled_dot_product_attention``).
        scale: logit scale, default 1/sqrt(D).
        score: ``"softmax"`` or ``"sigmoid"`` (FlashSigmoid-style: ``sigmoid(q·k*scale + sigmoid_bias) @ v``,
            no normalization).
        sigmoid_bias: additive logit bias for sigmoid scoring, default ``-log(M)``.
        key_padding_mask: (B, M) bool, True marks a padded key that no query sees (``nn.MultiheadAttention``'s
            convention). A query that sees no key at all outputs 0 (SDPA would give NaN).
        gates: (B, H, N) per-(query, head) output gates (mixture-of-heads): the output is
            ``gates[..., None] * attention``; a zero gate means "not computed" — its output is 0 and it gets no
            gradient (see ``attnzoo.kernels.gating``); all-zero query tiles cost nothing on Triton.
        backend: ``None`` (Triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        (B, H, N, Dv) output in q's dtype.
    """
    resolved = _check_inputs(q, k, v, backend)
    key_mask = _check_key_padding_mask(key_padding_mask, k)
    gating.check_gates(gates, q)
    validate.check_choice("score", score, SCORES)
    if not isinstance(causal, bool):
        raise TypeError(f"causal={causal!r} must be a bool")
    scale = validate.check_scale(scale, q.shape[-1])
    if score == "softmax":
        if sigmoid_bias is not None:
            raise ValueError(
                f"sigmoid_bias={sigmoid_bias!r} is only accepted with score='sigmoid' (got score='softmax')")
        bias = 0.0
    else:
        bias = -math.log(k.shape[2]) if sigmoid_bias is None else validate.check_finite("sigmoid_bias", sigmoid_bias)
    q, k, v = _autocast(q, k, v)
    if resolved == "reference":
        out = attention_reference(q, k, v, causal=causal, scale=scale, score=score, sigmoid_bias=bias,
                                  key_mask=key_mask)
        return out if gates is None else gating.reference_gating(out, gates)
    out, _ = attention_fwd(q, k, v, key_mask, gates, causal, scale, score, bias, resolved)
    return out
