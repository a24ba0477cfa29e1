"""The simplest exact formula for attention: the test oracle, never a production path."""

from __future__ import annotations

import math

import torch


def attention_reference(q, k, v, *, causal=False, scale=None, score="softmax", sigmoid_bias=None, key_mask=None):
    """q: (B, H, N, D), k: (B, H_kv, M, D), v: (B, H_kv, M, Dv) -> (B, H, N, Dv); materializes the (N, M) scores.

    Causal masks are top-left aligned like ``F.scaled_dot_product_attention``: query i sees keys j <= i.
    key_mask: (B, M) bool, True = the key is seen; a query that sees no key outputs 0.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    n, m = s.shape[-2:]
    visible = torch.ones(n, m, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    if score == "softmax":
        p = s.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    else:
        bias = -math.log(m) if sigmoid_bias is None else sigmoid_bias
        p = torch.sigmoid(s + bias) * visible
    return p @ v
