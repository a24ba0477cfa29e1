"""Functional attention ops (heads-first tensors), each with ``triton``/``torch``/``reference`` backends.

Public ops:
    attention(q, k, v, *, causal=False, scale=None, score="softmax", sigmoid_bias=None, key_padding_mask=None,
              gates=None, backend=None)
        q: (B, H, N, D), k: (B, H_kv, M, D), v: (B, H_kv, M, Dv) -> (B, H, N, Dv)
    na1d / na2d / na3d (``attnzoo.kernels.neighborhood``), halo2d (``attnzoo.kernels.halo``): local attention
    linear_attention(q, k, v, *, feature_map="elu1", causal=False, decay=None, normalize=True, ...)
        q/k: (B, H, T, Dk), v: (B, H, T, Dv) -> (B, H, T, Dv); linear_attention_step for decoding
"""

from attnzoo.kernels.attention import attention
from attnzoo.kernels.attention.op import SCORES
from attnzoo.kernels.backend import BACKENDS
from attnzoo.kernels.linear import LinearState, linear_attention, linear_attention_step

__all__ = ["BACKENDS", "SCORES", "LinearState", "attention", "linear_attention", "linear_attention_step"]
