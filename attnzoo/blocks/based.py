"""BASED-style causal sequence mixer (Arora et al. 2024, arXiv:2402.18668): exact softmax attention over a short
causal sliding window (local recall) plus causal linear attention with the 2nd-order Taylor feature map on a
low-dimensional projection of q/k (global, fixed-size state), summed before the output projection.

* window branch: ``qkv`` (timm ViT layout) and the 1-D causal neighborhood op ``na1d(..., is_causal=True)``: token
  t sees tokens ``[t - window + 1, t]``;
* linear branch: ``linear_qk`` (rows [q | k]) projects x to ``linear_heads`` heads of ``feature_dim`` q/k features (φ =
  ``taylor2``: 1 + F + F² features), normalized; the values are the window branch's v, regrouped into
  ``linear_heads`` heads of C / linear_heads channels.

Decoding: ``forward(x, state, return_state=True)`` continues a sequence chunk by chunk and ``step(x_t, state)``
advances it by one token; the state is the last ``window - 1`` keys/values plus the linear ``LinearState``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from attnzoo.blocks.linear import check_step_token, check_tokens, merge_heads
from attnzoo.blocks.qkv import QKVProjection, check_block_options, heads_first
from attnzoo.kernels import LinearState, attention, linear_attention, linear_attention_step
from attnzoo.kernels.neighborhood import na1d

__all__ = ["BasedMixer", "BasedState"]


class BasedState(NamedTuple):
    """Decoding state of a ``BasedMixer``: the window branch's last (up to ``window - 1``) keys and values
    (B, H, L, D), and the linear branch's ``LinearState``."""

    keys: Tensor
    values: Tensor
    linear: LinearState


class BasedMixer(QKVProjection):
    """Causal sliding-window softmax attention + causal Taylor linear attention, summed (BASED).

    Args:
        dim: token width C.
        num_heads: heads H of the window branch; ``dim`` must be divisible by it (head dim D = C / H).
        window: keys each token sees in the window branch (itself and the ``window - 1`` before it), >= 1.
        feature_dim: q/k features F per head of the linear branch (state size (1 + F + F²) x C / linear_heads).
        linear_heads: heads of the linear branch (None = ``num_heads``); must divide ``dim``.
        qkv_bias: bias in the q/k/v and linear q/k projections.
        proj_drop: dropout after the output projection.
        backend: kernel backend of the ops (None = automatic).

    Shapes: ``forward(x)``: (B, T, C) -> (B, T, C); ``step(x_t, state)``: (B, C) -> (B, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window: int = 64,
        feature_dim: int = 16,
        linear_heads: int | None = None,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        linear_heads = num_heads if linear_heads is None else linear_heads
        for name, value in (("window", window), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        check_block_options(proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.init_qkv(dim, num_heads, num_heads, qkv_bias, False, nn.LayerNorm, dd)
        if isinstance(linear_heads, bool) or not isinstance(linear_heads, int) or linear_heads < 1 or (
                dim % linear_heads):
            raise ValueError(f"linear_heads={linear_heads!r} must be a positive divisor of dim={dim}")
        self.scale = self.head_dim**-0.5
        self.window, self.feature_dim, self.linear_heads, self.backend = window, feature_dim, linear_heads, backend
        self.linear_qk = nn.Linear(dim, 2 * linear_heads * feature_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, T, C) -> window q, k, v (B, H, T, D) and linear q, k (B, H_lin, T, F)."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        lq, lk = heads_first(self.linear_qk(x).reshape(B, T, 2, self.linear_heads, self.feature_dim))
        return q, k, v, lq, lk

    def _linear_values(self, v: Tensor) -> Tensor:
        """The window branch's v (B, H, T, D) regrouped into the linear heads (B, H_lin, T, C / H_lin)."""
        B, _, T, _ = v.shape
        return merge_heads(v).reshape(B, T, self.linear_heads, -1).transpose(1, 2)

    def _window(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal sliding-window attention of q (B, H, T, D) over k/v (B, H, L + T, D), whose first L tokens come
        before q's (a decoding cache) -> (B, H, T, D)."""
        L = k.shape[2] - q.shape[2]
        # The cached tokens' rows are computed and dropped (at most window - 1 of them).
        q = torch.cat([q.new_zeros(*q.shape[:2], L, q.shape[-1]), q], dim=2) if L else q
        # A window covering the whole sequence equals the full causal set, which NA's kernel <= length allows.
        kernel = min(self.window, k.shape[2])
        out = v if kernel == 1 else na1d(q, k, v, kernel, is_causal=True, scale=self.scale, backend=self.backend)
        return out[:, :, L:]

    def _cache(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The last ``window - 1`` keys/values: all a later token's window can still see."""
        start = max(keys.shape[2] - (self.window - 1), 0)
        return keys[:, :, start:], values[:, :, start:]

    def _output(self, window_out: Tensor, linear_out: Tensor) -> Tensor:
        return self.proj_drop(self.proj(merge_heads(window_out) + merge_heads(linear_out)))

    def forward(self, x: Tensor, state: BasedState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, BasedState]:
        """x: (B, T, C) -> (B, T, C). ``state`` from a previous call continues that sequence (x are the next T
        tokens); ``return_state`` also returns the state after x."""
        check_tokens(x, self.dim, None, 0)
        _check_state(state)
        q, k, v, lq, lk = self._project(x)
        linear_v = self._linear_values(v)
        if state is not None:
            k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        window_out = self._window(q, k, v)
        linear_out = linear_attention(lq, lk, linear_v, feature_map="taylor2", causal=True, scale=1.0,
                                      initial_state=None if state is None else state.linear,
                                      return_state=return_state, backend=self.backend)
        if not return_state:
            return self._output(window_out, linear_out)
        linear_out, linear_state = linear_out
        return self._output(window_out, linear_out), BasedState(*self._cache(k, v), linear_state)

    def step(self, x_t: Tensor, state: BasedState | None = None) -> tuple[Tensor, BasedState]:
        """One decoding step: x_t (B, C) -> (output (B, C), the state after x_t), equal to ``forward`` at that
        token. ``state`` None starts a sequence."""
        check_step_token(x_t, self.dim)
        _check_state(state)
        q, k, v, lq, lk = self._project(x_t[:, None])  # T = 1
        linear_v = self._linear_values(v)[:, :, 0]
        if state is not None:
            k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        window_out = attention(q, k, v, scale=self.scale, backend=self.backend)  # the cache is all in the window
        linear_out, linear_state = linear_attention_step(lq[:, :, 0], lk[:, :, 0], linear_v,
                                                         None if state is None else state.linear,
                                                         feature_map="taylor2", scale=1.0)
        return self._output(window_out, linear_out[:, :, None])[:, 0], BasedState(*self._cache(k, v), linear_state)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"feature_dim={self.feature_dim}, linear_heads={self.linear_heads}, backend={self.backend!r}")


def _check_state(state: BasedState | None) -> None:
    if state is not None and not isinstance(state, BasedState):
        raise TypeError(f"state must be a BasedState or None, got {type(state).__name__}")
