"""``linear_attention_step``: one decoding step of causal linear attention on a ``LinearState`` cache, equal to
``linear_attention(..., causal=True)`` at that token. Plain PyTorch (one token: no kernel to fuse)."""

from __future__ import annotations

import torch

from attnzoo.kernels import validate
from attnzoo.kernels.linear import arguments
from attnzoo.kernels.linear.arguments import LinearState
from attnzoo.kernels.linear.feature_maps import apply_feature_map, feature_dim
from attnzoo.kernels.precision import compute_dtype


def linear_attention_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: LinearState | None = None,
    *,
    feature_map: str = "elu1",
    decay: float | torch.Tensor | None = None,
    normalize: bool = True,
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearState]:
    """Advance the causal recurrence by one token: ``S = diag(exp(g)) S + φ(k_t)ᵀ v_t``, ``o = scale·φ(q_t) S``.

    Args:
        q_t, k_t: (B, H, Dk); v_t: (B, H, Dv).
        state: the ``LinearState`` before this token (from ``linear_attention(..., return_state=True)`` or a
            previous step), or None for an empty history.
        feature_map, normalize, scale, eps: as in ``linear_attention`` (``softmax`` is non-causal, so refused).
        decay: this token's log-decay <= 0: a float, an (H,) tensor, or (B, H) / (B, H, K) gates.

    Returns:
        (output (B, H, Dv) in q_t's dtype, the state after this token).
    """
    arguments.check_qkv(q_t, k_t, v_t, time=False)
    normalize = arguments.check_bool("normalize", normalize)
    arguments.check_feature_map(feature_map, causal=True)
    scale = validate.check_scale(scale, q_t.shape[-1])
    eps = arguments.check_eps(eps)
    width = feature_dim(feature_map, q_t.shape[-1])
    g = arguments.log_decay(decay, q_t, width, time=False)
    s = arguments.state_tensor(state, q_t, v_t, width, normalize)

    cdt = compute_dtype(q_t.dtype)
    phi_q, phi_k = (x.squeeze(2).to(cdt) for x in apply_feature_map(feature_map, q_t.unsqueeze(2), k_t.unsqueeze(2)))
    v = arguments.with_ones(v_t) if normalize else v_t
    s_new = phi_k.unsqueeze(-1) * v.to(cdt).unsqueeze(-2)
    if s is not None:
        s_new = s_new + (s if g is None else g.exp().view(*g.shape[:2], -1, 1) * s)
    o = scale * (phi_q.unsqueeze(-2) @ s_new).squeeze(-2)
    out = arguments.normalized(o, eps, q_t.dtype) if normalize else o.to(q_t.dtype)
    return out, arguments.linear_state(s_new, normalize)
