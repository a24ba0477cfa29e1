"""Agent attention (Han et al. 2024, arXiv:2312.08874): n agent tokens relay between the N tokens, so the cost is
O(N·n) instead of O(N²), as two small softmax attentions on the shared kernel (``attnzoo.kernels.attention``):

1. agents ``A`` (B, H, n, D): q pooled to n tokens (adaptive average pooling over the X×Y grid to a √n×√n agent
   grid, or over the sequence);
2. agents attend the tokens: ``V_A = softmax(s·A Kᵀ + B₁) V``;
3. tokens attend the agents: ``O = softmax(s·Q Aᵀ + B₂) V_A``;
4. plus the paper's depthwise-conv term on v (``local_conv``, default 3; as ``LinearAttention``'s), then ``proj``.

The agent biases B₁ (agent a, token (i, j)) and B₂ (token (i, j), agent a) are the paper's row and column terms,
``t[h, a, i] + t[h, a, X + j]`` with learned tables ``agent_token_bias`` / ``token_agent_bias`` (H, n, X + Y); the
paper's interpolated 7×7 block term is left out. The kernel has no additive bias, so a bias is folded into the dot
product: the agent side gets its table row as X + Y extra features, the token side its one-hot row and column
(zeros for prefix tokens: no bias), and the logit scale moves into q. Hence D + X + Y <= 256 with the Triton backend.

Parameters ``qkv`` and ``proj`` share ``MultiHeadSelfAttention``'s (timm ViT) layout; ``dwc`` is a depthwise conv.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from attnzoo.blocks.linear import check_layout, check_tokens, local_term, make_depthwise_conv, merge_heads
from attnzoo.blocks.qkv import QKVProjection, check_block_options
from attnzoo.kernels import attention

__all__ = ["AgentAttention"]


@register_notrace_module  # an FX leaf (timm's feature extraction): checks token shapes eagerly
class AgentAttention(QKVProjection):
    """Agent attention over a token sequence or a token grid.

    Args:
        dim: token width C.
        num_heads: heads H; ``dim`` must be divisible by it (head dim D = C / H).
        num_agents: agent tokens n; with a grid a square (a √n×√n agent grid, √n <= X and Y), else <= N.
        grid_size: (X, Y): the tokens after the prefix are a row-major X×Y grid (2-D pooling and conv);
            None: a plain sequence (1-D pooling and conv).
        num_prefix_tokens: P class / register tokens before the grid: they attend and are attended like the
            others, but are not pooled into agents and get no conv term nor bias.
        qkv_bias: bias in the q/k/v projection.
        qk_norm: normalize q and k per head (``norm_layer(D)``, as ``MultiHeadSelfAttention``) before the attention.
        agent_bias: learned row/column agent biases (needs ``grid_size``; see the module docstring).
        local_conv: kernel size (odd) of the depthwise-conv term on v; 0 = none.
        proj_drop: dropout after the output projection.
        norm_layer: constructor of the qk-norm layer, called as ``norm_layer(D, device=, dtype=)``.
        backend: kernel backend of the attention op (None = automatic).

    Shapes: ``forward(x)``: (B, N, C) -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_agents: int = 49,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        agent_bias: bool = False,
        local_conv: int = 3,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.grid_size = check_layout(grid_size, num_prefix_tokens)
        _check_agents(num_agents, self.grid_size, agent_bias)
        check_block_options(proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.init_qkv(dim, num_heads, num_heads, qkv_bias, qk_norm, norm_layer, dd)
        self.scale = self.head_dim**-0.5
        self.num_agents, self.num_prefix_tokens, self.backend = num_agents, num_prefix_tokens, backend
        if agent_bias:
            width = sum(self.grid_size)
            self.agent_token_bias = nn.Parameter(torch.empty(num_heads, num_agents, width, **dd))
            self.token_agent_bias = nn.Parameter(torch.empty(num_heads, num_agents, width, **dd))
            for table in (self.agent_token_bias, self.token_agent_bias):
                nn.init.trunc_normal_(table, std=0.02)
        else:
            self.agent_token_bias = self.token_agent_bias = None
        self.dwc = make_depthwise_conv(dim, local_conv, self.grid_size, False, dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        check_tokens(x, self.dim, self.grid_size, self.num_prefix_tokens)
        if self.num_agents > x.shape[1]:
            raise ValueError(f"num_agents={self.num_agents} must be <= the number of tokens N={x.shape[1]}")
        q, k, v = self.project_qkv(x)  # (B, H, N, D)
        agents = self._agents(q)
        if self.agent_token_bias is None:
            agent_v = self._attend(agents, k, v)
            out = self._attend(q, agents, agent_v)
        else:
            positions = self._positions(q)
            agent_v = self._attend(agents, k, v, self.agent_token_bias, positions)
            out = self._attend(q, agents, agent_v, positions, self.token_agent_bias)
        out = merge_heads(out)
        if self.dwc is not None:
            out = out + local_term(self.dwc, merge_heads(v), self.grid_size, self.num_prefix_tokens)[0]
        return self.proj_drop(self.proj(out))

    def _agents(self, q: Tensor) -> Tensor:
        """q (B, H, N, D) averaged to the agents (B, H, n, D): over the grid (prefix tokens left out) or sequence."""
        B, H, _, D = q.shape
        q = q[:, :, self.num_prefix_tokens:].transpose(2, 3).reshape(B, H * D, -1)  # (B, H·D, tokens)
        if self.grid_size is None:
            pooled = F.adaptive_avg_pool1d(q, self.num_agents)
        else:
            pooled = F.adaptive_avg_pool2d(q.unflatten(-1, self.grid_size), math.isqrt(self.num_agents))
        # Contiguous: the attention op's CPU path misreads queries whose head dim is strided.
        return pooled.reshape(B, H, D, self.num_agents).transpose(2, 3).contiguous()

    def _positions(self, like: Tensor) -> Tensor:
        """(N, X + Y): each grid token's one-hot row and column; zeros for the prefix tokens."""
        X, Y = self.grid_size
        rows = torch.eye(X, dtype=like.dtype, device=like.device).repeat_interleave(Y, dim=0)
        cols = torch.eye(Y, dtype=like.dtype, device=like.device).repeat(X, 1)
        prefix = like.new_zeros(self.num_prefix_tokens, X + Y)
        return torch.cat([prefix, torch.cat([rows, cols], dim=1)])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, q_extra: Tensor | None = None,
                k_extra: Tensor | None = None) -> Tensor:
        """``softmax(s·q kᵀ + q_extra k_extraᵀ) v`` on the shared kernel; q (B, H, M, D), k/v (B, H, L, D), the
        extra features (H or 1, M or L, E) broadcast over the batch and fold the bias into the dot product."""
        if q_extra is None:
            return attention(q, k, v, scale=self.scale, backend=self.backend)
        # The tables stay in their dtype under autocast, where q and k are cast: follow q and k.
        q = torch.cat([q * self.scale, q_extra.to(q.dtype).expand(*q.shape[:-1], -1)], dim=-1)
        k = torch.cat([k, k_extra.to(k.dtype).expand(*k.shape[:-1], -1)], dim=-1)
        return attention(q, k, v, scale=1.0, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_agents={self.num_agents}, "
                f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"agent_bias={self.agent_token_bias is not None}, backend={self.backend!r}")


def _check_agents(num_agents: int, grid_size: tuple[int, int] | None, agent_bias: bool) -> None:
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"num_agents={num_agents!r} must be a positive int")
    if agent_bias and grid_size is None:
        raise ValueError("agent_bias=True needs grid_size=(X, Y): the bias tables are per grid row and column")
    if grid_size is None:
        return
    side = math.isqrt(num_agents)
    if side * side != num_agents:
        raise ValueError(f"num_agents={num_agents} must be a square (a sqrt(n) x sqrt(n) agent grid) with grid_size")
    if side > min(grid_size):
        raise ValueError(f"num_agents={num_agents} (a {side}x{side} agent grid) needs grid_size >= ({side}, {side}) "
                         f"per axis; got grid_size={grid_size}")
