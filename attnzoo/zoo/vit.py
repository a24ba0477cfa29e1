"""Plain ViT whose attention is chosen by name (``attn=``): ``attnzoo_vit_*``.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
arXiv:2010.11929. ``attn`` is a key of ``attnzoo.blocks.factory.ATTENTIONS`` (softmax | sigmoid | na | halo, ...),
``attn_kwargs`` its options (``kernel_size`` for na, ``block_size`` / ``halo_size`` for halo, ...).

Weights: every attention uses timm's ViT layout (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``), so timm ``vit_*``
checkpoints load unchanged and a checkpoint can switch attention (``attnzoo.zoo.convert``).
Class token: it attends densely to every token under all attentions; under ``na`` every patch also sees it as an
extra key, under ``halo`` patches see only their window (see ``attnzoo.blocks.factory``).

Layout: ``forward_features`` returns the normed tokens as a 1 x N NHWC strip ``(B, 1, P + X·Y, C)``
(``output_fmt = "NHWC"``; ``.squeeze(1)`` gives timm's ``(B, N, C)``), which keeps timm's standard model contract
(spatial features of size ``pool_size = (1, N)``) that timm exempts its own ``vit_*`` models from.
``forward_intermediates`` and ``features_only=True`` give (B, C, X, Y) patch maps (or NLC tokens).
Input size: fixed at ``img_size`` (multiples of ``patch_size``; local attentions restrict the grid further).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers import DropPath, LayerNorm, PatchEmbed, get_device_dtype, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import Tensor, nn

from attnzoo.blocks.factory import GridSizeError, create_attention
from attnzoo.blocks.mlp import Mlp
from attnzoo.kernels.validate import check_choice
from attnzoo.zoo._builder import image_size_error, init_linears
from attnzoo.zoo.convert import checkpoint_filter_fn, register_converter, vit_rules
from attnzoo.zoo.vit_cfgs import default_cfgs  # noqa: F401  (register_model reads this module's default_cfgs)

__all__ = ["Block", "VisionTransformer"]

GLOBAL_POOLS = ("", "token", "avg")


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; x: (B, P + X·Y, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attn: str,
        attn_kwargs: dict[str, Any],
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = create_attention(attn, dim, num_heads, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens,
                                     qkv_bias=qkv_bias, qk_norm=qk_norm, proj_drop=proj_drop, norm_layer=norm_layer,
                                     **attn_kwargs, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with a pluggable attention (module docstring: layouts, class token, weights).

    Args:
        img_size: input height/width (int or pair), multiples of ``patch_size``.
        patch_size: patch side; the token grid is ``img_size / patch_size``.
        in_chans, num_classes: input channels and classes (0 = no classifier).
        global_pool: ``"token"`` (class token), ``"avg"`` (mean of the patch tokens) or ``""`` (none).
        embed_dim, depth, num_heads, mlp_ratio: width C, blocks, heads, MLP hidden / C.
        qkv_bias, qk_norm: q/k/v projection bias; per-head q/k LayerNorm.
        class_token: prepend a learnable class token.
        fc_norm: norm after pooling instead of before it; None = only with ``global_pool="avg"`` (timm's rule).
        attn: attention name (``attnzoo.blocks.factory.ATTENTIONS``); unknown names list the choices.
        attn_kwargs: attention-specific options passed to ``create_attention``.
        drop_rate, pos_drop_rate, proj_drop_rate, drop_path_rate: head / position / projection dropout,
            stochastic depth (linear in depth up to this rate).

    Shapes: ``forward(x)``: (B, in_chans, H, W) -> (B, num_classes).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        class_token: bool = True,
        fc_norm: bool | None = None,
        attn: str = "softmax",
        attn_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        img_size = to_2tuple(img_size)
        if patch_size < 1 or any(s < patch_size or s % patch_size for s in img_size):
            raise ValueError(f"img_size={img_size} must be positive multiples of patch_size={patch_size}")
        _check_pool(global_pool, class_token)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = int(class_token)
        self.attn_name = attn
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dd)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_prefix_tokens + grid[0] * grid[1], embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # no tensor: meta-device safe
        try:
            self.blocks = nn.Sequential(*[
                Block(embed_dim, num_heads, attn=attn, attn_kwargs=attn_kwargs or {}, grid_size=grid,
                      num_prefix_tokens=self.num_prefix_tokens, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      qk_norm=qk_norm, proj_drop=proj_drop_rate, drop_path=rate, **dd)
                for rate in rates
            ])
        except GridSizeError as err:
            raise image_size_error(err, img_size, patch_size) from err
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim, **dd)
        self.fc_norm = LayerNorm(embed_dim, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: trunc-normal(0.02) positions and linear weights, zero biases, a near-zero class token."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        init_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0 = none); ``global_pool`` None keeps the current pooling."""
        if global_pool is not None:
            _check_pool(global_pool, self.cls_token is not None)
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> tokens (B, P + X·Y, C) with positions."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normed tokens as a 1 x N strip (B, 1, P + X·Y, C)."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x).unsqueeze(1)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """(B, 1, N, C) -> (B, C) (``token`` / ``avg``), or unchanged (``""``)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0, 0]
        if pool_type == "avg":
            return x[:, 0, self.num_prefix_tokens:].mean(1)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features (B, 1, N, C) -> logits (B, num_classes), or the pooled (B, C) with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs ``indices`` (last n if int, all if None; negative allowed) as (B, C, X, Y) maps
        (``output_fmt="NCHW"``) or (B, X·Y, C) tokens (``"NLC"``), prefix tokens split off (returned as
        ``(map, prefix (B, P, C))`` pairs with ``return_prefix_tokens``); ``norm`` applies the final norm to them.
        Returns the list, or ``(forward_features(x), list)``.
        """
        check_choice("output_fmt", output_fmt, ("NCHW", "NLC"))
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        P = self.num_prefix_tokens
        prefix = [y[:, :P] for y in intermediates]
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == "NCHW":
            X, Y = self.patch_embed.grid_size
            intermediates = [y.reshape(B, X, Y, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x).unsqueeze(1), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices


def _check_pool(global_pool: str, class_token: bool) -> None:
    check_choice("global_pool", global_pool, GLOBAL_POOLS)
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")


register_converter(VisionTransformer, vit_rules)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
    )


@register_model
def attnzoo_vit_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 at 224 px (timm ``vit_tiny_patch16_224`` weights)."""
    return _create("attnzoo_vit_tiny", pretrained, **{**dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
                                                         **kwargs})


@register_model
def attnzoo_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 at 224 px (timm ``vit_small_patch16_224`` weights)."""
    return _create("attnzoo_vit_small", pretrained, **{**dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
                                                          **kwargs})


@register_model
def attnzoo_vit_tiny_patch4_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/4 for 28 x 28 grayscale images (Fashion-MNIST): a 7 x 7 patch grid."""
    return _create("attnzoo_vit_tiny_patch4_28", pretrained,
                   **{**dict(patch_size=4, embed_dim=192, depth=12, num_heads=3), **kwargs})


# ViT-mini for 28 x 28 grayscale images (Fashion-MNIST): 4 x 4 patches -> a 7 x 7 grid, 64 channels, 4 blocks of
# 4 heads, average pooling. The variants differ only in their attention (and its extra parameters).
_MINI = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, global_pool="avg")


@register_model
def attnzoo_vit_mini(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-mini/4 for 28 x 28 images, softmax attention (the ``make demo`` model)."""
    return _create("attnzoo_vit_mini", pretrained, **{**_MINI, **kwargs})


@register_model
def attnzoo_vit_mini_moh(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-mini/4 with mixture-of-heads attention: 2 shared heads + the top 1 of 2 routed (75% of heads)."""
    attn = dict(attn="moh", attn_kwargs=dict(moh=dict(shared_heads=2, top_k=1)))
    return _create("attnzoo_vit_mini_moh", pretrained, **{**_MINI, **attn, **kwargs})


@register_model
def attnzoo_vit_mini_linear(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-mini/4 with linear attention (elu+1 feature map, depthwise-conv local term)."""
    attn = dict(attn="linear", attn_kwargs=dict(local_conv=3))
    return _create("attnzoo_vit_mini_linear", pretrained, **{**_MINI, **attn, **kwargs})

