"""Neighborhood attention blocks (design §2.3): NATTEN's ``NeighborhoodAttention{1,2,3}D`` on the ``na*d`` ops.

Channels-last like NATTEN / NAT: ``forward(x)`` takes (B, *spatial, C) and returns the same shape. On top of
NATTEN's module: GQA/MQA (``num_kv_heads``), qk-norm, NAT's learnable relative-position bias (``rpb``, removed
from NATTEN in 0.20), and extra key/value tokens that every query sees in the same softmax: learnable
registers (``num_extra_tokens``) and/or external global or cross tokens passed as ``forward(x, extra)``.

With ``num_kv_heads == num_heads`` the parameters are named and shaped like NATTEN's / timm's (``qkv``,
``proj``, NAT's ``rpb``); with fewer kv heads the projection is split into ``q`` and ``kv``.
One generic class serves all ranks; ``NeighborhoodAttention1d/2d/3d`` only fix the number of grid axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from attnzoo.blocks.moh import make_router
from attnzoo.blocks.qkv import QKVProjection, check_block_options
from attnzoo.kernels.neighborhood import na1d, na2d, na3d
from attnzoo.kernels.validate import check_int, per_axis

__all__ = ["NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d"]

_OPS = {1: na1d, 2: na2d, 3: na3d}
_AXES = {1: "L", 2: "X, Y", 3: "X, Y, Z"}

_ARGS_DOC = """\
Args:
    dim: token width C.
    num_heads: query heads H; ``dim`` must be divisible by it (head dim D = C / H).
    kernel_size: neighborhood size per axis (an int or a per-axis tuple), >= 2. Every query sees exactly
        ``kernel_size`` keys per axis; windows shift inward at the borders (NATTEN semantics). It must not
        exceed the grid (``kernel_size * dilation <= extent``), which the op checks at forward time.
    dilation: per-axis dilation, >= 1.
    stride: per-axis query stride (GNA), in ``[1, kernel_size]``: groups of ``stride`` queries share the
        window of the group's centre query; ``stride == kernel_size`` is blocked (Swin-style) attention.
    is_causal: per-axis causality; a causal axis sees only the current and earlier positions.
    num_kv_heads: key/value heads H_kv (GQA; 1 = MQA); None = ``num_heads``. Must divide ``num_heads``.
    qkv_bias: bias in the q/k/v projections.
    qk_norm: normalize q and k per head (``norm_layer(D)``) before the scores.
    rel_pos_bias: learnable NAT-style relative-position bias ``rpb`` of shape (H, 2k-1 per axis),
        trunc-normal(std=0.02) initialised; stride 1 only.
    num_extra_tokens: E learnable register tokens ``extra_kv`` (E, C); projected by the k/v projection,
        they are keys/values that every query sees (no positional bias). 0 = none.
    qk_scale: logit scale; None = 1/sqrt(D) (NATTEN's argument).
    proj_drop: dropout after the output projection.
    norm_layer: constructor of the qk-norm layer, called as ``norm_layer(D, device=, dtype=)``.
    backend: kernel backend passed to the ``na*d`` op (None = automatic: Triton on CUDA, torch elsewhere).
    moh: mixture-of-heads routing, ``dict(shared_heads=, top_k=[, load_balance_weight=])``: a ``router``
        (``attnzoo.blocks.moh``) gates each (token, head) output; None = every head at weight 1.

Shapes: ``forward(x, extra=None)``: x (B, *spatial, C) -> (B, *spatial, C); ``extra`` (B, E', C) are
optional external tokens (global / cross) projected like the registers and seen by every query.
"""

IntOrTuple = int | tuple[int, ...]
BoolOrTuple = bool | tuple[bool, ...]


class _NeighborhoodAttention(QKVProjection):
    __doc__ = "Neighborhood attention over a grid of ``spatial`` axes (fixed by the subclasses).\n\n" + _ARGS_DOC

    spatial: ClassVar[int]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: IntOrTuple,
        dilation: IntOrTuple = 1,
        stride: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        rel_pos_bias: bool = False,
        num_extra_tokens: int = 0,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        backend: str | None = None,
        moh: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self.spatial
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kernel_size = per_axis("kernel_size", kernel_size, n, int)
        self.dilation = per_axis("dilation", dilation, n, int)
        self.stride = per_axis("stride", stride, n, int)
        self.is_causal = per_axis("is_causal", is_causal, n, bool)
        _validate_window(self.kernel_size, self.dilation, self.stride, rel_pos_bias)
        _validate_rest(num_extra_tokens, qk_scale, proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.init_qkv(dim, num_heads, num_kv_heads, qkv_bias, qk_norm, norm_layer, dd)
        self.scale = self.head_dim**-0.5 if qk_scale is None else float(qk_scale)
        self.num_extra_tokens = num_extra_tokens
        self.backend = backend
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in self.kernel_size), **dd))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)
        if num_extra_tokens:
            self.extra_kv = nn.Parameter(torch.empty(num_extra_tokens, dim, **dd))
            nn.init.trunc_normal_(self.extra_kv, std=0.02)
        else:
            self.register_parameter("extra_kv", None)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.router = make_router(moh, dim, num_heads, dd)

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """x: (B, *spatial, C) -> (B, *spatial, C); ``extra``: optional (B, E, C) tokens every query sees."""
        self._check_inputs(x, extra)
        B = x.shape[0]
        gates = None if self.router is None else self.router(x)  # first: x is still cached (as in MHSA)
        # Contiguous heads-first operands: the kernels read them as flat (B*H, N, D) rows (the copy happens here
        # or inside the op anyway), and the op's fake (compile-time) output takes q's strides.
        q, k, v = (t.contiguous() for t in self.project_qkv(x))
        tokens = None if self.extra_kv is None else self.extra_kv.expand(B, -1, -1)
        if extra is not None:
            tokens = extra if tokens is None else torch.cat([tokens, extra], dim=1)
        extra_k, extra_v = (None, None) if tokens is None else (t.contiguous() for t in self.project_kv(tokens))
        op = _OPS[self.spatial]
        window = (self.kernel_size, self.dilation, self.stride, self.is_causal)
        out = op(q, k, v, *window, self.rpb, extra_k, extra_v, scale=self.scale, backend=self.backend, gates=gates)
        out = out.movedim(1, -2).reshape(x.shape)  # (B, H, *S, D) -> (B, *S, H*D)
        return self.proj_drop(self.proj(out))

    def _check_inputs(self, x: Tensor, extra: Tensor | None) -> None:
        n, C = self.spatial, self.dim
        if x.dim() != n + 2 or x.shape[-1] != C:
            raise ValueError(f"x must have shape (B, {_AXES[n]}, C={C}) (channels last); got {tuple(x.shape)}")
        if extra is not None and (extra.dim() != 3 or extra.shape[0] != x.shape[0] or extra.shape[-1] != C):
            raise ValueError(f"extra must have shape (B={x.shape[0]}, E, C={C}) to match x; got {tuple(extra.shape)}")

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"kernel_size={self.kernel_size}, dilation={self.dilation}, stride={self.stride}, "
            f"is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}, "
            f"num_extra_tokens={self.num_extra_tokens}, backend={self.backend!r}"
        )


@register_notrace_module  # an FX leaf (timm feature extraction): the op checks shapes eagerly
class NeighborhoodAttention1d(_NeighborhoodAttention):
    __doc__ = "1-D neighborhood attention block (NATTEN's ``NeighborhoodAttention1D``): x (B, L, C) -> (B, L, C).\n\n"
    __doc__ += _ARGS_DOC
    spatial = 1


@register_notrace_module  # an FX leaf (timm feature extraction): the op checks shapes eagerly
class NeighborhoodAttention2d(_NeighborhoodAttention):
    __doc__ = "2-D neighborhood attention block (NATTEN's ``NeighborhoodAttention2D``): x (B, X, Y, C) -> same.\n\n"
    __doc__ += _ARGS_DOC
    spatial = 2


@register_notrace_module  # an FX leaf (timm feature extraction): the op checks shapes eagerly
class NeighborhoodAttention3d(_NeighborhoodAttention):
    __doc__ = "3-D neighborhood attention block (NATTEN's ``NeighborhoodAttention3D``): x (B, X, Y, Z, C) -> same.\n\n"
    __doc__ += _ARGS_DOC
    spatial = 3


def _validate_window(kernel_size: tuple, dilation: tuple, stride: tuple, rel_pos_bias: bool) -> None:
    # The grid-dependent limits (kernel_size * dilation <= extent) are checked by the op at forward time.
    if any(k < 2 for k in kernel_size):
        raise ValueError(f"kernel_size={kernel_size} must be >= 2 on every axis")
    if any(d < 1 for d in dilation):
        raise ValueError(f"dilation={dilation} must be >= 1 on every axis")
    if any(not 1 <= s <= k for s, k in zip(stride, kernel_size, strict=True)):
        raise ValueError(f"stride={stride} must be in [1, kernel_size] on every axis (kernel_size={kernel_size})")
    if rel_pos_bias and any(s != 1 for s in stride):
        raise ValueError(
            f"rel_pos_bias=True needs stride 1 on every axis (the NAT bias table is defined for unstrided "
            f"windows only); got stride={stride}"
        )


def _validate_rest(num_extra_tokens: int, qk_scale: float | None, proj_drop: float, backend: str | None) -> None:
    check_int("num_extra_tokens", num_extra_tokens, 0)
    if qk_scale is not None and (
        isinstance(qk_scale, bool) or not isinstance(qk_scale, int | float) or not 0 < qk_scale < math.inf
    ):
        raise ValueError(f"qk_scale={qk_scale!r} must be a finite float > 0 (or None for 1/sqrt(head_dim))")
    check_block_options(proj_drop, backend)
