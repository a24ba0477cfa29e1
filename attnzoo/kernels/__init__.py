"""Functional attention ops (heads-first tensors), each with ``triton``/``torch``/``reference`` backends.

Public ops:
    attention(q, k, v, *, causal=False, scale=None, score="softmax", sigmoid_bias=None, backend=None)
        q: (B, H, N, D), k/v: (B, H_kv, M, D) -> (B, H, N, D)
"""

from attnzoo.kernels.attention import attention
from attnzoo.kernels.attention.op import SCORES
from attnzoo.kernels.backend import BACKENDS

__all__ = ["BACKENDS", "SCORES", "attention"]
