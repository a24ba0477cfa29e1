"""``create_attention``: the token mixer of a ViT-style block, chosen by name (the zoo's ``attn=`` argument).

Every registered attention maps tokens ``x: (B, P + X·Y, C) -> (B, P + X·Y, C)``: P prefix tokens (class /
register tokens) followed by a row-major X×Y patch grid. All of them name their parameters like timm's ViT
``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``), plus attention-specific extras (NA's ``rpb``), so
one checkpoint moves between attentions.

- ``softmax`` / ``sigmoid``: dense ``MultiHeadSelfAttention`` over all tokens; ``moh``: the same with
  mixture-of-heads routing (``moh=dict(shared_heads, top_k)``, default half the heads shared).
- ``linear`` / ``agent``: ``LinearAttention`` / ``AgentAttention`` (prefix tokens handled by the blocks).
- ``na``: neighborhood attention on the patch grid (``kernel_size=7``, ``dilation``, ``rel_pos_bias``). Every
  patch also sees the prefix tokens as extra keys in the same softmax (the NA op's extra tokens); the prefix
  tokens attend densely to all tokens.
- ``halo``: halo attention on the patch grid (``block_size=7``, ``halo_size=3``, ``pad_mode="mask"``). The
  halo op has no extra keys, so patches see only their window; the prefix tokens attend densely to all tokens.

Local attentions restrict the grids they run on (``GridRule``); ``create_attention`` checks the grid up front
and raises ``GridSizeError`` naming the accepted sizes. Other block families extend ``ATTENTIONS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from attnzoo.blocks.agent import AgentAttention
from attnzoo.blocks.linear import LinearAttention
from attnzoo.blocks.mhsa import MultiHeadSelfAttention
from attnzoo.blocks.neighborhood import NeighborhoodAttention2d
from attnzoo.blocks.qkv import QKVProjection, check_block_options
from attnzoo.kernels import attention
from attnzoo.kernels.halo import halo2d
from attnzoo.kernels.neighborhood import na2d
from attnzoo.kernels.validate import check_choice

__all__ = [
    "ATTENTIONS",
    "GridRule",
    "GridSizeError",
    "TokenHaloAttention",
    "TokenNeighborhoodAttention",
    "create_attention",
    "register_attention",
]


@dataclass(frozen=True)
class GridRule:
    """The token grids (X, Y) an attention runs on: per axis, ``extent >= minimum`` and ``extent % multiple == 0``."""

    minimum: tuple[int, int] = (1, 1)
    multiple: tuple[int, int] = (1, 1)

    def accepts(self, grid: tuple[int, int]) -> bool:
        return all(g >= m and g % k == 0 for g, m, k in zip(grid, self.minimum, self.multiple, strict=True))

    def describe(self, unit: int = 1) -> str:
        """The accepted sides in units of ``unit`` grid cells (e.g. pixels per patch), per axis."""
        parts = []
        for axis, m, k in zip(("height", "width"), self.minimum, self.multiple, strict=True):
            least = math.ceil(m / k) * k * unit  # the smallest accepted side
            if k == 1:
                parts.append(f"{axis} >= {least}")
            else:
                parts.append(f"{axis} a multiple of {k * unit}" + (f" and >= {least}" if least > k * unit else ""))
        return ", ".join(parts)


class GridSizeError(ValueError):
    """An attention cannot run on the requested token grid; ``rule`` says which grids it accepts."""

    def __init__(self, attn: str, grid: tuple[int, int], rule: GridRule) -> None:
        self.attn, self.grid, self.rule = attn, grid, rule
        super().__init__(f"attn={attn!r} cannot run on a {grid[0]}x{grid[1]} token grid; it accepts grids with "
                         f"{rule.describe()}")


class _PrefixGridTokens:
    """Mixin: attention over P prefix tokens + an X×Y patch grid, from one q/k/v projection.

    The host class provides ``project_qkv`` / ``proj`` / ``proj_drop`` (a ``QKVProjection``) and ``attend_grid``;
    the prefix tokens attend densely to every token.
    """

    def init_tokens(self, grid_size: tuple[int, int], num_prefix_tokens: int) -> None:
        grid_size = tuple(grid_size)
        if len(grid_size) != 2 or any(not isinstance(g, int) or g < 1 for g in grid_size):
            raise ValueError(f"grid_size={grid_size} must be two positive ints (X, Y)")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0")
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens

    def attend_grid(self, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None) -> Tensor:
        """q, k, v: (B, H, X, Y, D) patch grids; prefix_k/v: (B, H_kv, P, D) or None -> (B, H, X, Y, D)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, P + X·Y, C) -> (B, P + X·Y, C)."""
        B, N, C = x.shape
        P, (X, Y) = self.num_prefix_tokens, self.grid_size
        if N != P + X * Y:
            raise ValueError(f"x has {N} tokens; this attention expects num_prefix_tokens + X·Y = {P} + {X}x{Y}")
        q, k, v = self.project_qkv(x)  # (B, H, N, D)
        grid = [t[:, :, P:].reshape(*t.shape[:2], X, Y, t.shape[-1]) for t in (q, k, v)]
        prefix_k, prefix_v = (k[:, :, :P].contiguous(), v[:, :, :P].contiguous()) if P else (None, None)
        out = self.attend_grid(*grid, prefix_k, prefix_v).flatten(2, 3)
        if P:
            dense = attention(q[:, :, :P].contiguous(), k, v, scale=self.scale, backend=self.backend)
            out = torch.cat([dense, out], dim=2)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


@register_notrace_module  # an FX leaf: the ops validate shapes eagerly
class TokenNeighborhoodAttention(_PrefixGridTokens, NeighborhoodAttention2d):
    """2-D neighborhood attention on the patch grid of a token sequence; the prefix tokens are extra keys of every
    patch and attend densely themselves. Parameters as ``NeighborhoodAttention2d`` (``qkv``, ``proj``, ``rpb``).

    Args:
        dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer, backend: as ``NeighborhoodAttention2d``.
        grid_size: the patch grid (X, Y); each axis must be >= ``kernel_size * dilation``.
        num_prefix_tokens: P tokens before the grid.
        kernel_size, dilation: the neighborhood per axis (int or pair).
        rel_pos_bias: NAT's learnable relative-position bias ``rpb`` (H, 2k-1, 2k-1).

    Shapes: ``forward(x)``: (B, P + X·Y, C) -> same.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid_size: tuple[int, int],
        num_prefix_tokens: int = 0,
        kernel_size: int | tuple[int, int] = 7,
        dilation: int | tuple[int, int] = 1,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads, kernel_size, dilation=dilation, qkv_bias=qkv_bias, qk_norm=qk_norm,
                         rel_pos_bias=rel_pos_bias, proj_drop=proj_drop, norm_layer=norm_layer, backend=backend,
                         device=device, dtype=dtype)
        self.init_tokens(grid_size, num_prefix_tokens)
        self.grid_rule = GridRule(minimum=tuple(k * d for k, d in zip(self.kernel_size, self.dilation, strict=True)))

    def attend_grid(self, q, k, v, prefix_k, prefix_v):
        return na2d(q, k, v, self.kernel_size, self.dilation, self.stride, self.is_causal, self.rpb, prefix_k,
                    prefix_v, scale=self.scale, backend=self.backend)


@register_notrace_module  # an FX leaf: the ops validate shapes eagerly
class TokenHaloAttention(_PrefixGridTokens, QKVProjection):
    """Halo attention (timm ``HaloAttn`` windows) on the patch grid of a token sequence, with ViT parameters
    (``qkv``, ``q_norm``, ``k_norm``, ``proj``) and no relative-position tables; the prefix tokens attend densely.

    Args:
        dim, num_heads, qkv_bias, qk_norm, proj_drop, norm_layer, backend: as ``MultiHeadSelfAttention``.
        grid_size: the patch grid (X, Y); both sides must be multiples of ``block_size``.
        num_prefix_tokens: P tokens before the grid.
        block_size, halo_size: each block_size² block of patches attends its (block_size + 2·halo_size)² window.
        pad_mode: ``"mask"`` (window positions outside the grid are left out) or ``"zeros"`` (timm's zero keys).

    Shapes: ``forward(x)``: (B, P + X·Y, C) -> same.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid_size: tuple[int, int],
        num_prefix_tokens: int = 0,
        block_size: int = 7,
        halo_size: int = 3,
        pad_mode: str = "mask",
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"block_size={block_size} must be >= 1 and halo_size={halo_size} >= 0")
        check_choice("pad_mode", pad_mode, ("mask", "zeros"))
        check_block_options(proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.init_qkv(dim, num_heads, num_heads, qkv_bias, qk_norm, norm_layer, dd)
        self.init_tokens(grid_size, num_prefix_tokens)
        self.scale = self.head_dim**-0.5
        self.block_size, self.halo_size, self.pad_mode, self.backend = block_size, halo_size, pad_mode, backend
        self.grid_rule = GridRule(minimum=(block_size, block_size), multiple=(block_size, block_size))
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend_grid(self, q, k, v, prefix_k, prefix_v):
        return halo2d(q, k, v, self.block_size, self.halo_size, self.pad_mode, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, grid_size={self.grid_size}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, block_size={self.block_size}, "
                f"halo_size={self.halo_size}, pad_mode={self.pad_mode!r}, backend={self.backend!r}")


def _dense(score: str) -> Callable[..., nn.Module]:
    def build(dim: int, num_heads: int, *, grid_size: tuple[int, int], num_prefix_tokens: int = 0,
              **options) -> nn.Module:
        del grid_size, num_prefix_tokens  # dense attention sees every token, wherever it sits
        return MultiHeadSelfAttention(dim, num_heads, score=score, **options)

    return build


# name -> builder(dim, num_heads, *, grid_size, num_prefix_tokens, qkv_bias, qk_norm, proj_drop, norm_layer,
#                 device, dtype, **attention-specific options) returning a token module as described above.
def _moh(dim: int, num_heads: int, *, moh: dict | None = None, **options) -> nn.Module:
    """Softmax attention with mixture-of-heads routing; default: half the heads shared, top-half of the rest."""
    shared = num_heads // 2
    moh = dict(shared_heads=shared, top_k=max(1, (num_heads - shared + 1) // 2)) if moh is None else moh
    return _dense("softmax")(dim, num_heads, moh=moh, **options)


def _grid_tokens(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    """Blocks that take the token layout (``grid_size``, ``num_prefix_tokens``) themselves."""
    def build(dim: int, num_heads: int, *, grid_size: tuple[int, int], num_prefix_tokens: int = 0,
              **options) -> nn.Module:
        return cls(dim, num_heads, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **options)

    return build


ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "softmax": _dense("softmax"),
    "sigmoid": _dense("sigmoid"),
    "moh": _moh,
    "linear": _grid_tokens(LinearAttention),
    "agent": _grid_tokens(AgentAttention),
    "na": TokenNeighborhoodAttention,
    "halo": TokenHaloAttention,
}


def register_attention(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add an attention to ``ATTENTIONS`` (see the builder contract there); an existing name is an error."""
    if name in ATTENTIONS:
        raise ValueError(f"attn={name!r} is already registered; registered: {sorted(ATTENTIONS)}")
    ATTENTIONS[name] = builder


def create_attention(
    name: str,
    dim: int,
    num_heads: int,
    *,
    grid_size: tuple[int, int],
    num_prefix_tokens: int = 0,
    qkv_bias: bool = True,
    qk_norm: bool = False,
    proj_drop: float = 0.0,
    norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options,
) -> nn.Module:
    """The attention ``name`` over P prefix tokens + an X×Y patch grid: forward (B, P + X·Y, C) -> same.

    Args:
        name: a key of ``ATTENTIONS`` (softmax | sigmoid | na | halo | ...); unknown names list the choices.
        dim, num_heads: token width C and heads H (C divisible by H).
        grid_size: the patch grid (X, Y); a local attention raises ``GridSizeError`` if it cannot run on it.
        num_prefix_tokens: P class / register tokens before the grid.
        qkv_bias, qk_norm, proj_drop, norm_layer: projection options shared by every attention.
        **options: attention-specific arguments (``kernel_size`` for na, ``block_size`` for halo, ``backend``, ...);
            one the attention does not take raises ``TypeError``.
    """
    if name not in ATTENTIONS:
        raise ValueError(f"attn={name!r} is not a registered attention; accepted values: {sorted(ATTENTIONS)}")
    module = ATTENTIONS[name](dim, num_heads, grid_size=tuple(grid_size), num_prefix_tokens=num_prefix_tokens,
                              qkv_bias=qkv_bias, qk_norm=qk_norm, proj_drop=proj_drop, norm_layer=norm_layer,
                              device=device, dtype=dtype, **options)
    rule = getattr(module, "grid_rule", GridRule())  # dense attentions run on any grid
    if not rule.accepts(tuple(grid_size)):
        raise GridSizeError(name, tuple(grid_size), rule)
    return module
