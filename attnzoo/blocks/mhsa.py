"""Plain multi-head self-attention (design §2.6): softmax or sigmoid scores, GQA/MQA, qk-norm, causal.

With ``num_kv_heads == num_heads`` the parameters are named and shaped like timm's
``vision_transformer.Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``), so a timm ViT's attention
state dict loads unchanged. With fewer kv heads the projection is split into ``q`` and ``kv``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from attnzoo.blocks.moh import make_router
from attnzoo.blocks.qkv import QKVProjection, check_block_options
from attnzoo.kernels import SCORES, attention

__all__ = ["MultiHeadSelfAttention"]


@register_notrace_module  # an FX leaf (timm feature extraction): the op checks shapes eagerly
class MultiHeadSelfAttention(QKVProjection):
    """Multi-head self-attention over a token sequence.

    Args:
        dim: token width C.
        num_heads: query heads H; ``dim`` must be divisible by it (head dim D = C / H).
        num_kv_heads: key/value heads H_kv (GQA; 1 = MQA); None = ``num_heads``. Must divide ``num_heads``.
        qkv_bias: bias in the q/k/v projections.
        qk_norm: normalize q and k per head (``norm_layer(D)``) before the scores.
        score: ``"softmax"`` or ``"sigmoid"`` (``sigmoid(q·k·scale - log N)``, no normalization).
        causal: token i sees tokens ``<= i`` only.
        proj_bias: bias in the output projection.
        proj_drop: dropout after the output projection.
        norm_layer: constructor of the qk-norm layer, called as ``norm_layer(D, device=, dtype=)``.
        backend: kernel backend passed to ``attnzoo.kernels.attention`` (None = automatic).
        moh: mixture-of-heads routing, ``dict(shared_heads=, top_k=[, load_balance_weight=])``: a ``router``
            (``attnzoo.blocks.moh``) gates each (token, head) output; None = every head at weight 1.

    Shapes: ``forward(x)``: (B, N, C) -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        score: str = "softmax",
        causal: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        backend: str | None = None,
        moh: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _validate(score, proj_drop, backend)
        self.init_qkv(dim, num_heads, num_kv_heads, qkv_bias, qk_norm, norm_layer, {"device": device, "dtype": dtype})
        self.scale = self.head_dim**-0.5
        self.score = score
        self.causal = causal
        self.backend = backend
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        self.router = make_router(moh, dim, num_heads, {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        # The router reads x before the qkv projection writes 3x its size, which would evict x from the cache.
        gates = None if self.router is None else self.router(x)
        q, k, v = self.project_qkv(x)
        out = attention(q, k, v, causal=self.causal, scale=self.scale, score=self.score, gates=gates,
                        backend=self.backend)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"score={self.score!r}, causal={self.causal}, backend={self.backend!r}"
        )


def _validate(score: str, proj_drop: float, backend: str | None) -> None:
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not supported; accepted values: {list(SCORES)}")
    check_block_options(proj_drop, backend)
