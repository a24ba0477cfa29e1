"""``halo2d``: blocked local attention with a halo (timm ``HaloAttn`` semantics) on the shared fused kernel.

The Triton path runs the shared kernel in halo mode: with ``pad_mode="zeros"`` the key grid is the map
padded by the halo, padded positions being keys that load as zeros but stay in the softmax. The
decomposed relative logits ``q·rel_h``, ``q·rel_w`` are per-query tables computed by one matmul each,
gathered in the kernel; their gradients come back from the kernel and are folded into dq / drel here.
"""

from __future__ import annotations

import torch

from attnzoo.kernels import gating, validate
from attnzoo.kernels.backend import resolve_backend
from attnzoo.kernels.halo.reference import halo_reference
from attnzoo.kernels.precision import lse_dtype

PAD_MODES = ("zeros", "mask")


def _triton():
    from attnzoo.kernels.attention import triton_launch

    return triton_launch


def _torch_impl():
    from attnzoo.kernels.halo import torch_impl

    return torch_impl


def _rel_tables(tk, q, rel_h, rel_w):
    """Per-query relative logits (B, H, Nq, 2*win-1) for both axes, fp32."""
    if rel_h is None:
        return None
    qf = q.reshape(q.shape[0], q.shape[1], -1, q.shape[-1]).float()
    return tk.Bias(tk.BIAS_QUERY.value, qf @ rel_h.float().T, qf @ rel_w.float().T)


@torch.library.custom_op("attnzoo::halo_fwd", mutates_args=())
def halo_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor | None, rel_w: torch.Tensor | None,
    gates: torch.Tensor | None, block_size: int, halo_size: int, pad_mode: str, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, Xq, Yq, D), k: (B, H_kv, X, Y, D), v: (..., Dv) -> (out (B, H, Xq, Yq, Dv), lse (B, H, Xq, Yq))."""
    if backend == "triton":
        tk = _triton()
        geo = tk.halo_geometry(q, k, block_size, halo_size, pad_mode == "zeros")
        return tk.attention_fwd(q, k, v, geo, scale, "softmax", 0.0, _rel_tables(tk, q, rel_h, rel_w), gates=gates)
    return gating.torch_path_fwd(_torch_impl().halo_fwd, gates, q, k, v, block_size, halo_size, pad_mode, rel_h,
                                 rel_w, scale)


@halo_fwd.register_fake
def _(q, k, v, rel_h, rel_w, gates, block_size, halo_size, pad_mode, scale, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("attnzoo::halo_bwd", mutates_args=())
def halo_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rel_h: torch.Tensor | None, rel_w: torch.Tensor | None, gates: torch.Tensor | None, block_size: int,
    halo_size: int, pad_mode: str, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, drel_h, drel_w); the rel gradients are empty tensors when the tables are absent."""
    if backend == "triton":
        tk = _triton()
        geo = tk.halo_geometry(q, k, block_size, halo_size, pad_mode == "zeros")
        dq, dk, dv, dtables, _, _ = tk.attention_bwd(do, q, k, v, out, lse, geo, scale, "softmax", 0.0,
                                                     _rel_tables(tk, q, rel_h, rel_w), gates=gates)
        if dtables is None:
            return dq, dk, dv, q.new_empty(0), q.new_empty(0)
        dth, dtw = dtables
        qf = q.reshape(dth.shape[0], dth.shape[1], -1, q.shape[-1]).float()
        dq = (dq.float() + (dth @ rel_h.float() + dtw @ rel_w.float()).view(q.shape)).to(q.dtype)
        drel_h = torch.einsum("bhnr,bhnd->rd", dth, qf).to(rel_h.dtype)
        drel_w = torch.einsum("bhnr,bhnd->rd", dtw, qf).to(rel_w.dtype)
        return dq, dk, dv, drel_h, drel_w
    grads = gating.torch_path_bwd(_torch_impl().halo_bwd, gates, do, q, k, v, out, lse, block_size, halo_size,
                                  pad_mode, rel_h, rel_w, scale)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@halo_bwd.register_fake
def _(do, q, k, v, out, lse, rel_h, rel_w, gates, block_size, halo_size, pad_mode, scale, backend):
    def like(t):
        return q.new_empty(0) if t is None else t.new_empty(t.shape)

    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(rel_h), like(rel_w)


def _setup_context(ctx, inputs, output):
    q, k, v, rel_h, rel_w, gates, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_h, rel_w, gates)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, rel_h, rel_w, gates = ctx.saved_tensors
    do = do.contiguous()
    grads = halo_bwd(do, q, k, v, out, lse, rel_h, rel_w, gates, *ctx.params)
    present = (q, k, v, rel_h, rel_w)
    grads = tuple(g if t is not None else None for g, t in zip(grads, present, strict=True))
    dgates = None if gates is None else gating.gates_grad(do, out, gates)
    return *grads, dgates, *(None,) * len(ctx.params)


halo_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_geometry(q, k, block_size, halo_size) -> None:
    for name, value, low in (("block_size", block_size, 1), ("halo_size", halo_size, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    X, Y = k.shape[2:4]
    if X % block_size or Y % block_size:
        raise ValueError(f"the key map {X}x{Y} must be divisible by block_size={block_size} on both axes")
    Xq, Yq = q.shape[2:4]
    r = X // Xq
    if Xq * r != X or Yq * r != Y or block_size % r:
        raise ValueError(
            f"q's grid {Xq}x{Yq} must be the key map {X}x{Y} downsampled by one factor r dividing "
            f"block_size={block_size} (r = X // Xq = {r})")


def _check_rel(q, rel_h, rel_w, win: int) -> None:
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h and rel_w must be given together (both or neither)")
    if rel_h is None:
        return
    expect = (2 * win - 1, q.shape[-1])
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expect:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (2*(block_size+2*halo_size)-1, D) = {expect}; got {got}")
    validate.check_same("dtype", (("q", q), ("rel_h", rel_h), ("rel_w", rel_w)))
    validate.check_same("device", (("q", q), ("rel_h", rel_h), ("rel_w", rel_w)))


def halo2d(q, k, v, block_size, halo_size, pad_mode="zeros", rel_h=None, rel_w=None, scale=None, backend=None, *,
           gates=None):
    """Halo attention (timm ``HaloAttn`` semantics, design §2.4).

    Args:
        q: (B, H, Xq, Yq, D) queries, on the key map or downsampled by r (timm's block stride, r | block_size).
        k, v: (B, H_kv, X, Y, D); X and Y divisible by ``block_size``; H a multiple of H_kv.
        block_size, halo_size: each query block attends the (block_size + 2*halo_size)² window around it.
        pad_mode: ``"zeros"`` (timm: window positions outside the map are zero keys/values that stay in the
            softmax) or ``"mask"`` (they are excluded).
        rel_h, rel_w: optional (2*win-1, D) decomposed relative-position embeddings; the logit gains
            ``q·rel_h[jx - ix + win - 1] + q·rel_w[jy - iy + win - 1]`` (window position j, in-block position i).
        scale: q·k scale (default 1/sqrt(D)); the relative logits are not scaled, as in timm.
        backend: None (Triton on CUDA, torch elsewhere), "triton", "torch" or "reference".
        gates: optional (B, H, Xq, Yq) per-(query, head) output gates (mixture-of-heads, ``attnzoo.kernels.gating``).

    Returns:
        (B, H, Xq, Yq, Dv).
    """
    validate.check_qkv(q, k, v, spatial=2, same_grid=False)
    _check_geometry(q, k, block_size, halo_size)
    validate.check_choice("pad_mode", pad_mode, PAD_MODES)
    _check_rel(q, rel_h, rel_w, block_size + 2 * halo_size)
    gating.check_gates(gates, q)
    scale = validate.check_scale(scale, q.shape[-1])
    resolved = resolve_backend(backend, q.device)
    if resolved == "triton":
        validate.check_triton_inputs(q)
    if resolved == "reference":
        out = halo_reference(q, k, v, block_size, halo_size, pad_mode, rel_h, rel_w, scale)
        return out if gates is None else gating.reference_gating(out, gates)
    out, _ = halo_fwd(q, k, v, rel_h, rel_w, gates, block_size, halo_size, pad_mode, scale, resolved)
    return out
