"""The q/k/v projection shared by the token-attention blocks: timm's fused ``qkv`` layout when every
head has its own k/v, separate ``q`` and ``kv`` projections with fewer (GQA/MQA) kv heads, optional
per-head qk-norm."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.kernels import BACKENDS


def check_heads(dim: int, num_heads: int, num_kv_heads: int) -> None:
    """Checked at construction so a bad config fails with a readable message, not a reshape error."""
    if dim < 1:
        raise ValueError(f"dim={dim} must be a positive integer")
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive divisor of dim={dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} must be a positive divisor of num_heads={num_heads} "
            "(1 = multi-query, num_heads = plain multi-head)"
        )


def check_block_options(proj_drop: float, backend: str | None) -> None:
    if not 0.0 <= proj_drop < 1.0:
        raise ValueError(f"proj_drop={proj_drop} must be in [0, 1)")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known backend; accepted values: None, {list(BACKENDS)}")


class QKVProjection(nn.Module):
    """Base of blocks that project channels-last tokens to heads-first q, k, v.

    Parameters: ``qkv`` (C -> 3C, [q | k | v]) or ``q`` (C -> C) and ``kv`` (C -> 2·H_kv·D, [k | v]);
    ``q_norm`` / ``k_norm`` (per head, or Identity).
    """

    def init_qkv(self, dim: int, num_heads: int, num_kv_heads: int, qkv_bias: bool, qk_norm: bool,
                 norm_layer: Callable[..., nn.Module], dd: dict) -> None:
        check_heads(dim, num_heads, num_kv_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        if num_kv_heads == num_heads:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.kv = nn.Linear(dim, 2 * num_kv_heads * self.head_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, *S, C) -> q (B, H, *S, D), k and v (B, H_kv, *S, D); q and k normed."""
        lead = x.shape[:-1]
        if self.num_kv_heads == self.num_heads:
            q, k, v = heads_first(self.qkv(x).reshape(*lead, 3, self.num_heads, self.head_dim))
        else:
            q = self.q(x).reshape(*lead, self.num_heads, self.head_dim).movedim(-2, 1)
            k, v = heads_first(self.kv(x).reshape(*lead, 2, self.num_kv_heads, self.head_dim))
        return self.q_norm(q), self.k_norm(k), v

    def project_kv(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """k/v of tokens (B, E, C) through the k/v projection: (B, H_kv, E, D) each, k normed."""
        if self.num_kv_heads == self.num_heads:
            bias = None if self.qkv.bias is None else self.qkv.bias[self.dim :]
            kv = F.linear(tokens, self.qkv.weight[self.dim :], bias)  # the [k | v] rows only
        else:
            kv = self.kv(tokens)
        B, E, _ = tokens.shape
        k, v = heads_first(kv.reshape(B, E, 2, self.num_kv_heads, self.head_dim))
        return self.k_norm(k), v


def heads_first(packed: Tensor) -> tuple[Tensor, ...]:
    """Views (B, H, *S, D) of the parts of a packed projection (B, *S, P, H, D). Unbound along P (not first
    permuted to (P, B, H, *S, D)), so autograd stacks their gradients straight into the packed layout: one copy
    instead of a stack and a transposing copy."""
    return tuple(t.movedim(-2, 1) for t in packed.unbind(-3))
