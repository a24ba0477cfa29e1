"""``na1d`` / ``na2d`` / ``na3d``: neighborhood attention (NATTEN semantics) on the shared fused kernel.

One custom op pair (``attnzoo::na_fwd`` / ``attnzoo::na_bwd``) serves all three ranks; the rank is the
number of grid axes of q. Optional inputs (``rpb``, extra tokens) are ``Tensor?`` in the schema; the
backward returns empty tensors for the gradients of absent inputs.
"""

from __future__ import annotations

import torch

from attnzoo.kernels import gating, validate
from attnzoo.kernels.backend import resolve_backend
from attnzoo.kernels.neighborhood import semantics
from attnzoo.kernels.neighborhood.reference import na_reference
from attnzoo.kernels.precision import lse_dtype

_NONE = torch.empty(0)


def _triton():
    from attnzoo.kernels.attention import triton_launch

    return triton_launch


def _torch_impl():
    from attnzoo.kernels.neighborhood import torch_impl

    return torch_impl


def _table(tk, rpb):
    return None if rpb is None else tk.Bias(tk.BIAS_TABLE.value, rpb, rpb)


@torch.library.custom_op("attnzoo::na_fwd", mutates_args=())
def na_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None, gates: torch.Tensor | None, kernel_size: list[int], dilation: list[int],
    stride: list[int], causal: list[bool], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, *grid, D), k: (B, H_kv, *grid, D), v: (..., Dv) -> (out (B, H, *grid, Dv), lse (B, H, *grid))."""
    if backend == "triton":
        tk = _triton()
        geo = tk.neighborhood_geometry(q, kernel_size, dilation, stride, causal)
        return tk.attention_fwd(q, k, v, geo, scale, "softmax", 0.0, _table(tk, rpb), extra_k, extra_v, gates=gates)
    return gating.torch_path_fwd(_torch_impl().na_fwd, gates, q, k, v, kernel_size, dilation, stride, causal, scale,
                                 rpb, extra_k, extra_v)


@na_fwd.register_fake
def _(q, k, v, rpb, extra_k, extra_v, gates, kernel_size, dilation, stride, causal, scale, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("attnzoo::na_bwd", mutates_args=())
def na_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rpb: torch.Tensor | None, extra_k: torch.Tensor | None, extra_v: torch.Tensor | None, gates: torch.Tensor | None,
    kernel_size: list[int], dilation: list[int], stride: list[int], causal: list[bool], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, drpb, dextra_k, dextra_v); an absent input's gradient is an empty tensor."""
    if backend == "triton":
        tk = _triton()
        geo = tk.neighborhood_geometry(q, kernel_size, dilation, stride, causal)
        dq, dk, dv, dbias, dek, dev = tk.attention_bwd(do, q, k, v, out, lse, geo, scale, "softmax", 0.0,
                                                       _table(tk, rpb), extra_k, extra_v, gates=gates)
        grads = (dq, dk, dv, None if dbias is None else dbias[0].to(rpb.dtype), dek, dev)
    else:
        grads = gating.torch_path_bwd(_torch_impl().na_bwd, gates, do, q, k, v, out, lse, kernel_size, dilation,
                                      stride, causal, scale, rpb, extra_k, extra_v)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@na_bwd.register_fake
def _(do, q, k, v, out, lse, rpb, extra_k, extra_v, gates, kernel_size, dilation, stride, causal, scale, backend):
    def like(t):
        return q.new_empty(0) if t is None else t.new_empty(t.shape)

    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(rpb), like(extra_k), like(extra_v)


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, extra_k, extra_v, gates, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rpb, extra_k, extra_v, gates)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, rpb, extra_k, extra_v, gates = ctx.saved_tensors
    do = do.contiguous()
    grads = na_bwd(do, q, k, v, out, lse, rpb, extra_k, extra_v, gates, *ctx.params)
    present = (q, k, v, rpb, extra_k, extra_v)
    grads = tuple(g if t is not None else None for g, t in zip(grads, present, strict=True))
    dgates = None if gates is None else gating.gates_grad(do, out, gates)
    return *grads, dgates, *(None,) * len(ctx.params)


na_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_geometry(grid, kernel_size, dilation, stride) -> None:
    for a, (L, k, d, s) in enumerate(zip(grid, kernel_size, dilation, stride, strict=True)):
        if not 2 <= k <= L:
            raise ValueError(f"kernel_size[{a}]={k} must be in [2, {L}] (the token grid's extent on axis {a})")
        if d < 1 or k * d > L:
            raise ValueError(
                f"dilation[{a}]={d} must be >= 1 with kernel_size*dilation={k}*{d}={k * d} <= {L} "
                f"(the token grid's extent on axis {a})")
        if not 1 <= s <= k:
            raise ValueError(f"stride[{a}]={s} must be in [1, kernel_size[{a}]={k}]")


def _check_extras(q, k, v, rpb, extra_k, extra_v, kernel_size, stride) -> None:
    if rpb is not None:
        expect = (q.shape[1], *(2 * x - 1 for x in kernel_size))
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expect:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb must have shape (H, 2k-1 per axis) = {expect}; got {got}")
        if any(s != 1 for s in stride):
            raise ValueError(f"rpb is defined for stride 1 only; got stride={tuple(stride)}")
        validate.check_same("dtype", (("q", q), ("rpb", rpb)))
        validate.check_same("device", (("q", q), ("rpb", rpb)))
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra_k and extra_v must be given together (both or neither)")
    if extra_k is not None:
        validate.check_tensor("extra_k", extra_k, 4, "(B, H_kv, E, D)")
        n_extra = extra_k.shape[2]
        for name, t, like, ref, dim in (("extra_k", extra_k, "k", k, "D"), ("extra_v", extra_v, "v", v, "Dv")):
            expect = (ref.shape[0], ref.shape[1], n_extra, ref.shape[-1])
            if tuple(t.shape) != expect:
                raise ValueError(
                    f"{name} must have shape (B, H_kv, E, {dim}) = {expect} to match {like}; got {tuple(t.shape)}")
        validate.check_same("dtype", (("q", q), ("extra_k", extra_k), ("extra_v", extra_v)))
        validate.check_same("device", (("q", q), ("extra_k", extra_k), ("extra_v", extra_v)))


def neighborhood_attention(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, extra_k=None,
                           extra_v=None, scale=None, backend=None, *, spatial: int, gates=None):
    """Shared body of ``na1d/na2d/na3d`` for ``spatial`` grid axes (see ``na2d``)."""
    validate.check_qkv(q, k, v, spatial=spatial, same_grid=True)
    grid = tuple(q.shape[2:-1])
    kernel_size = validate.per_axis("kernel_size", kernel_size, spatial, int)
    dilation = validate.per_axis("dilation", dilation, spatial, int)
    stride = validate.per_axis("stride", stride, spatial, int)
    causal = validate.per_axis("is_causal", is_causal, spatial, bool)
    _check_geometry(grid, kernel_size, dilation, stride)
    _check_extras(q, k, v, rpb, extra_k, extra_v, kernel_size, stride)
    gating.check_gates(gates, q)
    scale = validate.check_scale(scale, q.shape[-1])
    resolved = resolve_backend(backend, q.device)
    if resolved == "triton":
        validate.check_triton_inputs(q)
    if resolved == "reference":
        out = na_reference(q, k, v, kernel_size, dilation, stride, causal, rpb, extra_k, extra_v, scale)
        return out if gates is None else gating.reference_gating(out, gates)
    out, _ = na_fwd(q, k, v, rpb, extra_k, extra_v, gates, list(kernel_size), list(dilation), list(stride),
                    list(causal), scale, resolved)
    return out


def na1d(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, extra_k=None, extra_v=None,
         scale=None, backend=None, *, gates=None):
    """1-D neighborhood attention; q: (B, H, L, D), k/v: (B, H_kv, L, D). See ``na2d``."""
    return neighborhood_attention(q, k, v, kernel_size, dilation, stride, is_causal, rpb, extra_k, extra_v, scale,
                                  backend, spatial=1, gates=gates)


def na2d(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, extra_k=None, extra_v=None,
         scale=None, backend=None, *, gates=None):
    """2-D neighborhood attention with NATTEN's semantics (design §2.3).

    Args:
        q: (B, H, X, Y, D); k, v: (B, H_kv, X, Y, D) with H a multiple of H_kv.
        kernel_size, dilation, stride, is_causal: an int/bool or a per-axis tuple. Each query sees
            kernel_size keys per axis (windows shift inward at borders), within its dilation group;
            stride groups queries that share their leader's window; causal axes see only the past.
        rpb: optional relative-position bias (H, 2kx-1, 2ky-1), learnable (stride 1 only).
        extra_k, extra_v: optional (B, H_kv, E, D) tokens that every query also sees, in the same softmax.
        scale: logit scale, default 1/sqrt(D).
        backend: None (Triton on CUDA, torch elsewhere), "triton", "torch" or "reference".
        gates: optional (B, H, X, Y) per-(query, head) output gates (mixture-of-heads, ``attnzoo.kernels.gating``).

    Returns:
        (B, H, X, Y, Dv).
    """
    return neighborhood_attention(q, k, v, kernel_size, dilation, stride, is_causal, rpb, extra_k, extra_v, scale,
                                  backend, spatial=2, gates=gates)


def na3d(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, extra_k=None, extra_v=None,
         scale=None, backend=None, *, gates=None):
    """3-D neighborhood attention; q: (B, H, X, Y, Z, D), k/v: (B, H_kv, X, Y, Z, D). See ``na2d``."""
    return neighborhood_attention(q, k, v, kernel_size, dilation, stride, is_causal, rpb, extra_k, extra_v, scale,
                                  backend, spatial=3, gates=gates)


__all__ = ["na1d", "na2d", "na3d", "semantics"]
