"""The simplest exact formula for attention: the test oracle, never a production path."""

from __future__ import annotations

import math

import torch


def attention_reference(q, k, v, *, causal=False, scale=None, score="softmax", sigmoid_bias=None):
    """q: (B, H, N, D), k/v: (B, H_kv, M, D) -> (B, H, N, D); materializes the (N, M) score matrix.

    Causal masks are top-left aligned like ``F.scaled_dot_product_attention``: query i sees keys j <= i.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    n, m = s.shape[-2:]
    visible = torch.ones(n, m, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    if score == "softmax":
        p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    else:
        bias = -math.log(m) if sigmoid_bias is None else sigmoid_bias
        p = torch.sigmoid(s + bias) * visible
    return p @ v
