"""``linear_attention``: the public linear-attention op (feature maps, decay, normalizer) on the shared core.

Feature maps, the decay's expansion and the normalizer run in PyTorch around one call of the core custom op
(``core.linear_fwd``), so autograd carries their gradients and the core stays one graph node.
"""

from __future__ import annotations

import torch

from attnzoo.kernels import validate
from attnzoo.kernels.backend import resolve_backend
from attnzoo.kernels.linear import arguments
from attnzoo.kernels.linear.arguments import LinearState
from attnzoo.kernels.linear.core import linear_fwd, triton_launch, triton_launch_available
from attnzoo.kernels.linear.feature_maps import apply_feature_map, feature_dim
from attnzoo.kernels.linear.reference import linear_reference
from attnzoo.kernels.precision import compute_dtype


def _check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    return chunk_size


def _resolve(backend: str | None, q: torch.Tensor, chunk_size: int) -> str:
    resolved = resolve_backend(backend, q.device)
    if resolved == "triton":
        if not triton_launch_available():
            raise RuntimeError(
                "backend='triton': the linear-attention Triton kernels (attnzoo/kernels/linear/triton_launch.py) "
                "are not part of this build; use backend='torch'")
        validate.check_triton_inputs(q)
        triton_launch().check_chunk_size(chunk_size)
    return resolved


def _core(q, k, v, g, state, scale, causal, chunk_size, return_state, normalize, backend):
    """The core on feature-mapped inputs: (o, final state or None). With ``normalize`` o stays in the accumulation
    dtype: numerator and normalizer are divided before rounding, and the gradients of the two (which cancel in
    part) are not rounded to fp16/bf16 either."""
    if backend == "reference":
        cdt = compute_dtype(q.dtype)
        o, final = linear_reference(q.to(cdt), k.to(cdt), v.to(cdt), g, scale=scale, causal=causal,
                                    initial_state=state, return_state=True)
        return o if normalize else o.to(q.dtype), final if return_state else None
    o, final = linear_fwd(q, k, v, g, state, scale, causal, chunk_size, return_state, normalize, backend)
    return o, final if return_state else None


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    causal: bool = False,
    decay: float | torch.Tensor | None = None,
    normalize: bool = True,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, LinearState]:
    """Linear attention ``φ(q) (φ(k)ᵀ v)``, bidirectional or causal with optional decay, optionally normalized.

    Args:
        q, k: (B, H, T, Dk); v: (B, H, T, Dv).
        feature_map: φ: ``"elu1"`` (elu + 1), ``"relu"``, ``"softmax"`` (Efficient Attention: over q's features
            and k's positions; non-causal only), ``"taylor2"`` (BASED: [1, x, x⊗x/√2] of x·Dk^(-1/4), feature
            dim K = 1 + Dk + Dk²) or ``"identity"``. Otherwise K = Dk.
        causal: token t sees tokens <= t: ``S_t = diag(exp(g_t)) S_{t-1} + φ(k_t)ᵀ v_t``, ``o_t = scale·φ(q_t) S_t``
            (computed chunk-wise, never as this loop). Non-causal: ``o = scale·φ(q) (φ(k)ᵀ v)``.
        decay: log-decay g <= 0 (causal only): a float or an (H,) tensor (per head, RetNet/Lightning), or a
            (B, H, T) or (B, H, T, K) tensor (data-dependent gates, GLA). Checked on eager tensors only.
        normalize: divide by ``scale·φ(q_t)·z_t + eps`` with the normalizer ``z_t = Σ φ(k)`` accumulated with the
            same decay (then ``scale`` cancels up to ``eps``).
        scale: multiplies φ(q)·φ(k); default 1/sqrt(Dk).
        eps: added to the normalizer (>= 0).
        chunk_size: causal chunk length (> 0).
        initial_state: causal only: the ``LinearState`` a previous call returned (its ``k_sum`` present exactly
            when ``normalize``), in the accumulation dtype (fp32; fp64 for fp64 inputs).
        return_state: also return the final ``LinearState`` (non-causal: kv = φ(k)ᵀv over all tokens).
        backend: ``None`` (Triton on CUDA, torch elsewhere), ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        (B, H, T, Dv) output in q's dtype, or (output, final ``LinearState``) if ``return_state``.
    """
    arguments.check_qkv(q, k, v, time=True)
    causal = arguments.check_bool("causal", causal)
    normalize = arguments.check_bool("normalize", normalize)
    return_state = arguments.check_bool("return_state", return_state)
    arguments.check_feature_map(feature_map, causal)
    scale = validate.check_scale(scale, q.shape[-1])
    eps = arguments.check_eps(eps)
    chunk_size = _check_chunk_size(chunk_size)
    if not causal and (decay is not None or initial_state is not None):
        raise ValueError("decay and initial_state need causal=True (they act on the recurrent state); "
                         f"got decay={'a tensor' if isinstance(decay, torch.Tensor) else decay!r}, "
                         f"initial_state={'a LinearState' if initial_state is not None else None} with causal=False")
    width = feature_dim(feature_map, q.shape[-1])
    g = arguments.log_decay(decay, q, width, time=True)
    state = arguments.state_tensor(initial_state, q, v, width, normalize)
    resolved = _resolve(backend, q, chunk_size)

    phi_q, phi_k = apply_feature_map(feature_map, q, k)
    t = q.shape[2]
    if normalize:
        # Core scores scaled by 1/sqrt(T): a row's numerator and denominator sum up to T terms, so this keeps both
        # within fp16's range (where a backend returns them in fp16) from the first token to the last; the ratio is
        # unchanged with eps scaled alike.
        shrink = t**-0.5
        o, final = _core(phi_q, phi_k, arguments.with_ones(v), g, state, scale * shrink, causal, chunk_size,
                         return_state, True, resolved)
        out = arguments.normalized(o, eps * shrink, q.dtype)
    else:
        out, final = _core(phi_q, phi_k, v, g, state, scale, causal, chunk_size, return_state, False, resolved)
    return (out, arguments.linear_state(final, normalize)) if return_state else out
