"""The simplest exact formula for (unnormalized) linear attention: the test oracle, never a production path."""

from __future__ import annotations

import torch


def linear_reference(q, k, v, g=None, *, scale=1.0, causal=False, initial_state=None, return_state=False):
    """Unnormalized linear attention on already feature-mapped inputs, explicit quadratic float math.

    q, k: (B, H, T, K); v: (B, H, T, V); g: log-decay (<= 0) of shape (B, H, T) or (B, H, T, K), causal only.
    non-causal: o = scale * q @ (k^T v).
    causal: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t  (decay applied before the current token is added),
            o_t = scale * q_t S_t, S_0 = initial_state (B, H, K, V) or zeros. Returns o, or (o, S_T).
    Written as masked products (o = scale * ((q k^T) ⊙ decay-mask) v + q decayed-S_0), not as the recurrence.
    The non-causal state is k^T v. Computes in the inputs' dtype (tests pass float64).
    """
    if not causal:
        if g is not None or initial_state is not None:
            raise ValueError("linear_reference: g and initial_state need causal=True")
        o = scale * ((q @ k.transpose(-1, -2)) @ v)
        return (o, k.transpose(-1, -2) @ v) if return_state else o
    t = q.shape[2]
    if g is None:
        g = q.new_zeros(q.shape[:3])
    if g.dim() == 3:
        g = g.unsqueeze(-1)
    cum = g.cumsum(2)  # G_t = sum_{s <= t} g_s: (B, H, T, 1 or K)
    visible = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    # exp(G_i - G_j) for j <= i; the masked pairs get -inf so no positive exponent is ever taken.
    log_decay = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(~visible[:, :, None], float("-inf"))
    scores = torch.einsum("bhic,bhjc,bhijc->bhij", q, k, log_decay.exp().expand(*q.shape[:3], t, q.shape[3]))
    o = scores @ v
    s0 = q.new_zeros(*q.shape[:2], q.shape[3], v.shape[3]) if initial_state is None else initial_state
    o = scale * (o + (q * cum.exp()) @ s0)
    if not return_state:
        return o
    to_end = (cum[:, :, -1:] - cum).exp()  # exp(G_T - G_j): (B, H, T, 1 or K)
    state = (k * to_end).transpose(-1, -2) @ v + cum[:, :, -1].exp().unsqueeze(-1) * s0
    return o, state
