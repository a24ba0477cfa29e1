"""Plain multi-head self-attention (design §2.6): softmax or sigmoid scores, GQA/MQA, qk-norm, causal.

With ``num_kv_heads == num_heads`` the parameters are named and shaped like timm's
``vision_transformer.Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``), so a timm ViT's attention
state dict loads unchanged. With fewer kv heads the projection is split into ``q`` and ``kv``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnzoo.kernels import BACKENDS, SCORES, attention

__all__ = ["MultiHeadSelfAttention"]


class MultiHeadSelfAttention(nn.Module):
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _validate(dim, num_heads, num_kv_heads, score, proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.score = score
        self.causal = causal
        self.backend = backend

        kv_dim = num_kv_heads * self.head_dim
        if num_kv_heads == num_heads:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)  # timm's fused layout: [q | k | v]
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.kv = nn.Linear(dim, 2 * kv_dim, bias=qkv_bias, **dd)  # [k | v]
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Heads-first projections of x (B, N, C): q (B, H, N, D), k and v (B, H_kv, N, D), qk-normed."""
        B, N, _ = x.shape
        if self.num_kv_heads == self.num_heads:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            kv = self.kv(x).reshape(B, N, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        q, k, v = self.project_qkv(x)
        out = attention(q, k, v, causal=self.causal, scale=self.scale, score=self.score, backend=self.backend)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"score={self.score!r}, causal={self.causal}, backend={self.backend!r}"
        )


def _validate(dim: int, num_heads: int, num_kv_heads: int, score: str, proj_drop: float, backend: str | None) -> None:
    # Checked once at construction so a bad config fails with a readable message, not a reshape error.
    if dim < 1:
        raise ValueError(f"dim={dim} must be a positive integer")
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive divisor of dim={dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} must be a positive divisor of num_heads={num_heads} "
            "(1 = multi-query, num_heads = plain multi-head)"
        )
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not supported; accepted values: {list(SCORES)}")
    if not 0.0 <= proj_drop < 1.0:
        raise ValueError(f"proj_drop={proj_drop} must be in [0, 1)")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known backend; accepted values: None, {list(BACKENDS)}")
