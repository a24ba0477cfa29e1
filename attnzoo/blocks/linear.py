"""Linear attention block (design §2.5) on the ``linear_attention`` op, with the fixes of recent vision papers.

``LinearAttention`` keeps ``MultiHeadSelfAttention``'s parameters (``qkv``, ``proj``: timm's ViT layout), so a
ViT checkpoint can switch its attention to linear, and adds:

* feature maps: the op's (``elu1``, ``relu``, ``softmax``, ``taylor2``, ``identity``) or ``hedgehog`` (Hedgehog,
  Zhang et al. 2024): a learnable per-head map ``softmax([W x + b, -(W x + b)])`` over its 2·D features, separate
  for q and k (``feature_map_q``, ``feature_map_k``), W initialised to the identity;
* ``local_conv``: a depthwise-conv term on v added to the output (InLine, Han et al. 2024; NaLaFormer), restoring
  the locality linear attention lacks. Over a sequence it is a 1-D conv (causal blocks pad on the left only, so
  the term stays causal and decodes from a cache of the last ``k - 1`` tokens); with ``grid_size=(X, Y)`` it is a
  2-D conv over the token grid, and the ``num_prefix_tokens`` tokens before the grid (class tokens) get none;
* ``out_norm``: the normalisation fix of TransNormer (Qin et al. 2022): no division by the normalizer (whose
  gradient is unbounded when it nears zero), a LayerNorm ``out_norm`` on the attention output instead.

Causal blocks decode incrementally: ``forward(x, state, return_state=True)`` continues a sequence chunk by chunk
and ``step(x_t, state)`` advances it by one token (on ``linear_attention_step``); both equal the full forward.

The grid/prefix-token checks and the depthwise-conv term are shared with ``AgentAttention`` (``agent.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from attnzoo.blocks.qkv import QKVProjection, check_block_options
from attnzoo.kernels import LinearState, linear_attention, linear_attention_step
from attnzoo.kernels.linear import FEATURE_MAPS
from attnzoo.kernels.linear.feature_maps import NON_CAUSAL_ONLY
from attnzoo.kernels.validate import check_choice

__all__ = ["HedgehogFeatureMap", "LinearAttention", "LinearAttentionState"]

BLOCK_FEATURE_MAPS = (*FEATURE_MAPS, "hedgehog")


class LinearAttentionState(NamedTuple):
    """Decoding state of a causal ``LinearAttention``: ``attn`` the op's ``LinearState``; ``conv`` the last
    ``local_conv - 1`` v tokens (B, local_conv - 1, C) the causal conv term still sees, or None without one."""

    attn: LinearState
    conv: Tensor | None = None


class HedgehogFeatureMap(nn.Module):
    """Hedgehog's learnable feature map, one linear map per head: x (B, H, *, D) -> (B, H, *, 2D),
    ``softmax([x Wₕᵀ + bₕ, -(x Wₕᵀ + bₕ)])`` over the last axis. ``weight`` (H, D, D) starts as the identity,
    ``bias`` (H, D) as zeros, so the map starts as a softmax over ±x."""

    def __init__(self, num_heads: int, head_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, device=device, dtype=dtype).repeat(num_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.view(self.bias.shape[0], *(1,) * (x.dim() - 3), -1)
        y = torch.einsum("bh...d,hed->bh...e", x, self.weight) + bias
        return torch.cat([y, -y], dim=-1).softmax(-1).to(x.dtype)  # autocast runs softmax in fp32


# ---- shared with AgentAttention: token layout checks and the depthwise-conv term ----


def check_layout(grid_size: tuple[int, int] | None, num_prefix_tokens: int) -> tuple[int, int] | None:
    """``grid_size`` as a tuple (or None); prefix tokens only exist in front of a grid."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens!r} must be an int >= 0")
    if grid_size is None:
        if num_prefix_tokens:
            raise ValueError(f"num_prefix_tokens={num_prefix_tokens} needs grid_size=(X, Y): prefix tokens are the "
                             "tokens before the grid")
        return None
    grid = tuple(grid_size) if isinstance(grid_size, list | tuple) else (grid_size,)
    if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid_size={grid_size!r} must be None or two positive ints (X, Y)")
    return grid


def check_tokens(x: Tensor, dim: int, grid_size: tuple[int, int] | None, num_prefix_tokens: int) -> None:
    """x: (B, N, C) with N = num_prefix_tokens + X·Y when there is a grid."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, N, C={dim}); got {got}")
    if grid_size is not None and x.shape[1] != num_prefix_tokens + grid_size[0] * grid_size[1]:
        X, Y = grid_size
        raise ValueError(f"x has N={x.shape[1]} tokens; grid_size={grid_size} with num_prefix_tokens="
                         f"{num_prefix_tokens} needs N = {num_prefix_tokens} + {X}x{Y} = {num_prefix_tokens + X * Y}")


def check_step_token(x_t: Tensor, dim: int) -> None:
    """x_t: (B, C), one token per sequence."""
    if not isinstance(x_t, Tensor) or x_t.dim() != 2 or x_t.shape[-1] != dim:
        got = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
        raise ValueError(f"x_t must have shape (B, C={dim}); got {got}")


def make_depthwise_conv(dim: int, kernel_size: int, grid_size: tuple[int, int] | None, causal: bool,
                        dd: dict) -> nn.Module | None:
    """The depthwise conv of the local term (None for ``kernel_size == 0``): 2-D over a grid, else 1-D. A causal
    conv is left-padded by ``local_term``; the others are centred, so their kernel size must be odd."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 0:
        raise ValueError(f"local_conv={kernel_size!r} must be an int >= 0 (the conv kernel size; 0 = no local term)")
    if kernel_size and not causal and kernel_size % 2 == 0:
        raise ValueError(f"local_conv={kernel_size} must be odd (a centred window) unless causal=True")
    if not kernel_size:
        return None
    conv = nn.Conv1d if grid_size is None else nn.Conv2d
    return conv(dim, dim, kernel_size, padding=0 if causal else kernel_size // 2, groups=dim, **dd)


def local_term(dwc: nn.Module, v: Tensor, grid_size: tuple[int, int] | None, num_prefix_tokens: int,
               cache: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The depthwise conv of v tokens (B, N, C) -> (term (B, N, C), new cache).

    A left-padded (causal) 1-D conv of kernel k sees the k - 1 tokens before v: ``cache`` (B, k - 1, C), zeros at
    the start of a sequence; the new cache holds the last k - 1 of them. Other convs return no cache.
    """
    B, _, C = v.shape
    if grid_size is not None:
        X, Y = grid_size
        P = num_prefix_tokens
        term = dwc(v[:, P:].reshape(B, X, Y, C).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return torch.cat([term.new_zeros(B, P, C), term], dim=1), None
    if dwc.padding[0]:  # centred: the conv pads itself (a 1-wide centred conv takes the causal path: the same)
        return dwc(v.transpose(1, 2)).transpose(1, 2), None
    history = dwc.kernel_size[0] - 1
    if cache is None:
        cache = v.new_zeros(B, history, C)
    elif cache.shape != (B, history, C):
        raise ValueError(f"state.conv has shape {tuple(cache.shape)}; expected (B, local_conv - 1, C)="
                         f"{(B, history, C)}")
    seen = torch.cat([cache, v], dim=1)
    return dwc(seen.transpose(1, 2)).transpose(1, 2), seen[:, seen.shape[1] - history:]


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H·D)."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


@register_notrace_module  # an FX leaf (timm's feature extraction): checks token shapes eagerly
class LinearAttention(QKVProjection):
    """Multi-head linear attention over a token sequence: ``φ(q) (φ(k)ᵀ v)``, normalized, on ``linear_attention``.

    Args:
        dim: token width C.
        num_heads: heads H; ``dim`` must be divisible by it (head dim D = C / H).
        feature_map: φ, one of ``BLOCK_FEATURE_MAPS``: the op's maps (``softmax`` is non-causal only) or
            ``hedgehog`` (learnable, see the module docstring).
        causal: token i sees tokens ``<= i`` only (sequences; no grid).
        qkv_bias: bias in the q/k/v projection.
        qk_norm: normalize q and k per head (``norm_layer(D)``, as ``MultiHeadSelfAttention``) before the attention.
        local_conv: kernel size of the depthwise-conv term on v (0 = none); odd unless causal.
        out_norm: replace the division by the normalizer with a LayerNorm ``out_norm`` (C) on the attention output.
        grid_size: (X, Y): the tokens after the prefix are a row-major X×Y grid, and the conv term is 2-D over it;
            None: a plain sequence (1-D conv term).
        num_prefix_tokens: P class / register tokens before the grid (attended like any token, no conv term).
        proj_drop: dropout after the output projection.
        norm_layer: constructor of the qk-norm layer, called as ``norm_layer(D, device=, dtype=)``.
        backend: kernel backend of the op (None = automatic).

    Shapes: ``forward(x)``: (B, N, C) -> (B, N, C); causal blocks also take ``state`` / ``return_state`` (chunked
    decoding) and ``step(x_t, state)``: (B, C) -> (B, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        feature_map: str = "elu1",
        causal: bool = False,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        local_conv: int = 0,
        out_norm: bool = False,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice("feature_map", feature_map, BLOCK_FEATURE_MAPS)
        if causal and feature_map in NON_CAUSAL_ONLY:
            raise ValueError(f"feature_map={feature_map!r} normalizes k over all positions, so it needs causal=False")
        self.grid_size = check_layout(grid_size, num_prefix_tokens)
        if causal and self.grid_size is not None:
            raise ValueError(f"causal=True is for sequences; got grid_size={grid_size} (use grid_size=None)")
        check_block_options(proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.init_qkv(dim, num_heads, num_heads, qkv_bias, qk_norm, norm_layer, dd)
        self.scale = self.head_dim**-0.5
        self.feature_map, self.causal, self.backend = feature_map, causal, backend
        self.num_prefix_tokens = num_prefix_tokens
        if feature_map == "hedgehog":
            self.feature_map_q = HedgehogFeatureMap(num_heads, self.head_dim, **dd)
            self.feature_map_k = HedgehogFeatureMap(num_heads, self.head_dim, **dd)
        self.dwc = make_depthwise_conv(dim, local_conv, self.grid_size, causal, dd)
        self.out_norm = nn.LayerNorm(dim, **dd) if out_norm else None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _op_options(self) -> dict:
        """Keyword arguments of the op and its step; ``hedgehog`` features are mapped here, so φ = identity."""
        op_map = "identity" if self.feature_map == "hedgehog" else self.feature_map
        return {"feature_map": op_map, "normalize": self.out_norm is None, "scale": self.scale}

    def _features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.feature_map == "hedgehog":
            return self.feature_map_q(q), self.feature_map_k(k)
        return q, k

    def _output(self, attn: Tensor, v: Tensor, conv_cache: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Attention output and v, both (B, H, N, D) -> (block output (B, N, C), new conv cache)."""
        out = merge_heads(attn)
        if self.out_norm is not None:
            out = self.out_norm(out)
        if self.dwc is not None:
            term, conv_cache = local_term(self.dwc, merge_heads(v), self.grid_size, self.num_prefix_tokens, conv_cache)
            out = out + term
        return self.proj_drop(self.proj(out)), conv_cache

    def _check_state(self, state: LinearAttentionState | None, return_state: bool) -> None:
        if (state is not None or return_state) and not self.causal:
            raise ValueError("state and return_state need causal=True (a non-causal block has no running state)")
        if state is not None and not isinstance(state, LinearAttentionState):
            raise TypeError(f"state must be a LinearAttentionState or None, got {type(state).__name__}")

    def forward(self, x: Tensor, state: LinearAttentionState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, LinearAttentionState]:
        """x: (B, N, C) -> (B, N, C). Causal only: ``state`` from a previous call continues that sequence (x are
        the next N tokens); ``return_state`` also returns the state after x."""
        check_tokens(x, self.dim, self.grid_size, self.num_prefix_tokens)
        self._check_state(state, return_state)
        q, k, v = self.project_qkv(x)
        q, k = self._features(q, k)
        attn = linear_attention(q, k, v, causal=self.causal, initial_state=None if state is None else state.attn,
                                return_state=return_state, backend=self.backend, **self._op_options())
        attn, attn_state = attn if return_state else (attn, None)
        out, conv = self._output(attn, v, None if state is None else state.conv)
        return (out, LinearAttentionState(attn_state, conv)) if return_state else out

    def step(self, x_t: Tensor, state: LinearAttentionState | None = None) -> tuple[Tensor, LinearAttentionState]:
        """One decoding step of a causal block: x_t (B, C) -> (output (B, C), the state after x_t), equal to
        ``forward`` at that token. ``state`` None starts a sequence."""
        check_step_token(x_t, self.dim)
        self._check_state(state, True)
        q, k, v = self.project_qkv(x_t[:, None])  # (B, H, 1, D)
        q, k = self._features(q, k)
        attn, attn_state = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                                 None if state is None else state.attn, **self._op_options())
        out, conv = self._output(attn[:, :, None], v, None if state is None else state.conv)
        return out[:, 0], LinearAttentionState(attn_state, conv)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_map={self.feature_map!r}, "
                f"causal={self.causal}, out_norm={self.out_norm is not None}, grid_size={self.grid_size}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, backend={self.backend!r}")
