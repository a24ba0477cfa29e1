"""CrossViT-style dual-branch vision transformers (``attnzoo_crossvit_{mini,tiny,small}``, registered in
``crossvit_cfgs``).

Paper: `CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification` (Chen et al., ICCV 2021,
arXiv:2103.14899); the layout is timm's ``crossvit``.

Layout: n branches (two in every released CrossViT) embed the image with their own patch size (small patches: many
narrow tokens; large patches: few wide ones), each with a class token and learned position embeddings. A stack of
multi-scale blocks follows; each runs every branch's transformer blocks (the zoo ViT's ``Block``, attention chosen
with ``attn=`` as in ``attnzoo_vit_*``), then CrossViT's class-token fusion (``attnzoo.blocks.CrossViTFusion``:
branch i's class token attends to branch i+1's patch tokens). The head normalizes each branch's class token,
classifies it with the branch's own linear layer and averages the branches' logits.

Features: ``forward_features`` returns the normed class tokens of all branches, concatenated into a 1x1 channels-last
map ``(B, 1, 1, sum(embed_dim))`` (``output_fmt = "NHWC"``), the features the head classifies (the branches' patch
tokens have different counts and widths, so they share no tensor); ``forward_intermediates`` and
``features_only=True`` give each branch's patch map (B, C_b, H / p_b, W / p_b) after each multi-scale block, ordered
branch-major as in timm (index b * num_blocks + i).

Input size: fixed at ``img_size`` (the position embeddings are learned per patch); other sizes fail with an error
naming the accepted one. ``img_scale`` (default 1 for every branch) lets a branch see the image resized (bicubic) to
``img_size * img_scale``, as timm's 240-px CrossViTs do for their large-patch branch (224 / 240).

Weights: named like timm's ``CrossVit`` except ``pos_embed.{b}`` / ``cls_token.{b}`` (timm: ``pos_embed_{b}``, the
original release's names are ours) and the fusion attention's ``attn.q`` / ``attn.kv`` (timm: ``wq`` / ``wk`` /
``wv``); ``crossvit_rules`` converts timm checkpoints, so ``attnzoo_crossvit_tiny(img_scale=(1.0, 224 / 240))``
gives timm ``crossvit_tiny_240``'s logits with its weights.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, PatchEmbed, get_device_dtype, register_notrace_module, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from attnzoo.blocks import CrossViTFusion
from attnzoo.blocks.cross import timm_crossvit_fusion_state_dict
from attnzoo.blocks.factory import GridSizeError
from attnzoo.kernels.validate import check_choice
from attnzoo.zoo._builder import image_size_error
from attnzoo.zoo.convert import register_converter
from attnzoo.zoo.vit import Block

__all__ = ["CrossVit", "MultiScaleBlock", "crossvit_rules"]

GLOBAL_POOLS = ("token", "")


@register_notrace_module  # an FX leaf: the fusion checks its branches' shapes eagerly
class MultiScaleBlock(CrossViTFusion):
    """CrossViT's multi-scale block: each branch's transformer blocks, then the class-token fusion (the parent).

    Args:
        dims, num_heads: width and heads of each branch.
        depths: transformer blocks of each branch (>= 1).
        grid_sizes: each branch's patch grid (for local attentions).
        mlp_ratios: MLP hidden width / C of each branch.
        drop_path: stochastic-depth rate of the j-th block of every branch; the fusion takes the last one.
        attn, attn_kwargs: the branch attention (``attnzoo.blocks.factory.create_attention``).
        qkv_bias, proj_drop, norm_layer: as ``attnzoo.zoo.vit.Block`` and ``CrossViTFusion``.
        fusion_backend: kernel backend of the fusion's cross attention.

    Shapes: ``forward(xs)``: n tensors (B, 1 + P_b, dims[b]) -> n tensors of the same shapes.
    """

    def __init__(
        self,
        dims: Sequence[int],
        num_heads: Sequence[int],
        depths: Sequence[int],
        grid_sizes: Sequence[tuple[int, int]],
        mlp_ratios: Sequence[float],
        drop_path: Sequence[float],
        attn: str,
        attn_kwargs: dict[str, Any],
        qkv_bias: bool,
        proj_drop: float,
        norm_layer: type[nn.Module],
        fusion_backend: str | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dims, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, drop_path=drop_path[-1],
                         norm_layer=norm_layer, backend=fusion_backend, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(
            nn.Sequential(*(
                Block(dim, heads, attn=attn, attn_kwargs=attn_kwargs, grid_size=grid, num_prefix_tokens=1,
                      mlp_ratio=ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, drop_path=drop_path[j],
                      norm_layer=norm_layer, device=device, dtype=dtype)
                for j in range(depth)
            ))
            for dim, heads, depth, grid, ratio in zip(dims, num_heads, depths, grid_sizes, mlp_ratios, strict=True)
        )

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        return super().forward([blocks(x) for blocks, x in zip(self.blocks, xs, strict=True)])


@torch.fx.wrap  # a leaf for every FX tracer (timm's feature extraction included): checks real shapes
def _checked_image(x: Tensor, img_size: tuple[int, int]) -> Tensor:
    """x: (B, C, H, W), returned unchanged; another size than ``img_size`` raises ValueError naming it."""
    if tuple(x.shape[-2:]) != img_size:
        raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} image does not fit this CrossViT (its position embeddings "
                         f"are learned per patch); accepted image size: {img_size[0]}x{img_size[1]} only (another "
                         "size needs a model created with that img_size=)")
    return x


class CrossVit(nn.Module):
    """Multi-branch CrossViT (module docstring).

    Args:
        img_size: input height / width (int or pair); every branch's (scaled) image must be a multiple of its patch.
        patch_size: patch side of each branch (>= 2 branches).
        img_scale: factor per branch of the image size the branch sees (bicubic resize when not 1).
        in_chans, num_classes: input channels and classes (0 = no classifier).
        global_pool: ``"token"`` (the class tokens) or ``""`` (keep the (B, 1, 1, C) map).
        embed_dim, num_heads, mlp_ratio: width, heads and MLP hidden / C of each branch.
        depth: per multi-scale block, the transformer blocks of each branch (>= 1 each).
        qkv_bias: bias in every q/k/v projection.
        attn, attn_kwargs: the branches' self-attention by name (``attnzoo.blocks.factory.ATTENTIONS``: softmax |
            sigmoid | na | halo | ...) and its options; the fusion is always softmax cross attention.
        drop_rate, pos_drop_rate, proj_drop_rate, drop_path_rate: head / position / projection dropout, stochastic
            depth (linear over each multi-scale block's deepest branch, timm's schedule).
        attn_backend: kernel backend of every attention (None = automatic: Triton on CUDA, else torch);
            a ``backend`` in ``attn_kwargs`` overrides it for the branch attention.

    Shapes: ``forward(x)``: (B, in_chans, H, W) -> (B, num_classes); ``forward_features(x)`` -> (B, 1, 1, num_features)
    with ``num_features = sum(embed_dim)``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 240,
        patch_size: Sequence[int] = (12, 16),
        img_scale: Sequence[float] = (1.0, 1.0),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: Sequence[int] = (96, 192),
        depth: Sequence[Sequence[int]] = ((1, 4), (1, 4), (1, 4)),
        num_heads: Sequence[int] = (3, 3),
        mlp_ratio: Sequence[float] = (4.0, 4.0),
        qkv_bias: bool = True,
        attn: str = "softmax",
        attn_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        n = len(patch_size)
        if n < 2 or not len(img_scale) == len(embed_dim) == len(num_heads) == len(mlp_ratio) == n:
            raise ValueError(f"patch_size={tuple(patch_size)}, img_scale={tuple(img_scale)}, "
                             f"embed_dim={tuple(embed_dim)}, num_heads={tuple(num_heads)} and "
                             f"mlp_ratio={tuple(mlp_ratio)} must give one entry per branch (>= 2 branches)")
        if not depth or any(len(d) != n or min(d) < 1 for d in depth):
            raise ValueError(f"depth={tuple(map(tuple, depth))} must give, per multi-scale block, {n} branch depths "
                             ">= 1")
        check_choice("global_pool", global_pool, GLOBAL_POOLS)
        self.img_size = to_2tuple(img_size)
        self.branch_sizes = [tuple(int(s * scale) for s in self.img_size) for scale in img_scale]
        for b, (size, p) in enumerate(zip(self.branch_sizes, patch_size, strict=True)):
            if min(size) < p or any(s % p for s in size):
                raise ValueError(_bad_img_size(self.img_size, tuple(img_scale), b, size, tuple(patch_size)))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.embed_dim = tuple(embed_dim)
        self.num_features = self.head_hidden_size = sum(embed_dim)
        self.num_branches = n
        self.attn_name = f"{attn} + cross"
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.patch_embed = nn.ModuleList(
            PatchEmbed(size, p, in_chans, d, **dd)
            for size, p, d in zip(self.branch_sizes, patch_size, embed_dim, strict=True)
        )
        grids = [e.grid_size for e in self.patch_embed]
        self.cls_token = nn.ParameterList(nn.Parameter(torch.empty(1, 1, d, **dd)) for d in embed_dim)
        self.pos_embed = nn.ParameterList(
            nn.Parameter(torch.empty(1, 1 + g[0] * g[1], d, **dd)) for g, d in zip(grids, embed_dim, strict=True))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        block_depths = [max(d) for d in depth]  # the fusion shares its block's last rate
        rates = torch.linspace(0, drop_path_rate, sum(block_depths), device="cpu").split(block_depths)
        attn_kwargs = {"backend": attn_backend, **(attn_kwargs or {})}
        try:
            self.blocks = nn.ModuleList(
                MultiScaleBlock(embed_dim, num_heads, d, grids, mlp_ratio, r.tolist(), attn, attn_kwargs, qkv_bias,
                                proj_drop_rate, LayerNorm, attn_backend, **dd)
                for d, r in zip(depth, rates, strict=True)
            )
        except GridSizeError as err:  # a local attention that cannot run on a branch's patch grid
            b = next(i for i, g in enumerate(grids) if tuple(g) == err.grid)
            raise image_size_error(err, self.img_size, round(patch_size[b] / img_scale[b])) from err
        self.feature_info = [
            dict(num_chs=embed_dim[b], reduction=round(patch_size[b] / img_scale[b]), module=f"blocks.{i}")
            for b in range(n) for i in range(len(depth))
        ]
        self.norm = nn.ModuleList(LayerNorm(d, **dd) for d in embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._heads(num_classes, dd)
        # timm's CrossViT init: trunc-normal(0.02) tokens, positions and linear weights, zero biases
        for t in (*self.cls_token, *self.pos_embed):
            trunc_normal_(t, std=0.02)
        self.apply(init_weights_vit_timm)

    def _heads(self, num_classes: int, dd: dict) -> nn.ModuleList:
        return nn.ModuleList(nn.Linear(d, num_classes, **dd) if num_classes > 0 else nn.Identity()
                             for d in self.embed_dim)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"{name}.{b}" for name in ("cls_token", "pos_embed") for b in range(self.num_branches)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None),
                                                                        (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New per-branch heads for ``num_classes`` (0 = none); ``global_pool`` None keeps the current pooling."""
        if global_pool is not None:
            check_choice("global_pool", global_pool, GLOBAL_POOLS)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._heads(num_classes, get_device_dtype(self)).train(self.training)

    def _embed(self, x: Tensor) -> list[Tensor]:
        """Images (B, in_chans, H, W) -> per branch b, tokens (B, 1 + P_b, C_b): class token first, with positions."""
        x = _checked_image(x, self.img_size)
        xs = []
        for embed, size, cls, pos in zip(self.patch_embed, self.branch_sizes, self.cls_token, self.pos_embed,
                                         strict=True):
            image = x if size == self.img_size else F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            tokens = torch.cat([cls.expand(x.shape[0], -1, -1), embed(image)], dim=1)
            xs.append(self.pos_drop(tokens + pos))
        return xs

    def _run(self, blk: nn.Module, xs: list[Tensor]) -> list[Tensor]:
        return checkpoint(blk, xs) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(xs)

    def _features(self, xs: list[Tensor]) -> Tensor:
        """Final tokens per branch -> normed class tokens as a (B, 1, 1, sum C_b) map."""
        # indexed, not iterated: under FX the leaf blocks' output list is a single proxy
        return torch.cat([norm(xs[b][:, 0]) for b, norm in enumerate(self.norm)], dim=-1)[:, None, None]

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normed class tokens of all branches, (B, 1, 1, num_features)."""
        xs = self._embed(x)
        for blk in self.blocks:
            xs = self._run(blk, xs)
        return self._features(xs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, 1, 1, num_features) -> the mean of the branch heads' logits (B, num_classes), or the class tokens
        (B, num_features) with ``pre_logits`` or without heads; ``global_pool=""`` keeps the 1x1 map."""
        if self.global_pool == "token":
            x = x.flatten(1)
        x = self.head_drop(x)
        if pre_logits or self.num_classes == 0:
            return x
        ends = list(itertools.accumulate(self.embed_dim))  # slices, not split(): FX cannot iterate a split's proxy
        logits = [head(x[..., end - d:end]) for head, d, end in zip(self.head, self.embed_dim, ends, strict=True)]
        return torch.stack(logits).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Patch tokens of branch b after multi-scale block i, at index ``b * num_blocks + i`` (``indices``: None = all,
        int = last n, negative allowed), as (B, C_b, H_b, W_b) maps (``"NCHW"``) or (B, P_b, C_b) tokens (``"NLC"``);
        ``norm`` applies the branch's final norm to them. Returns the list, or ``(forward_features(x), list)``."""
        check_choice("output_fmt", output_fmt, ("NCHW", "NLC"))
        num_blocks = len(self.blocks)
        take_indices, _ = feature_take_indices(self.num_branches * num_blocks, indices)
        last = max(i % num_blocks for i in take_indices)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        xs = self._embed(x)
        taken: dict[int, Tensor] = {}
        for i, blk in enumerate(blocks):
            xs = self._run(blk, xs)
            for b in range(self.num_branches):
                if b * num_blocks + i in take_indices:
                    taken[b * num_blocks + i] = (self.norm[b](xs[b]) if norm else xs[b])[:, 1:]
        intermediates = []
        for index in sorted(taken):
            t = taken[index]
            if output_fmt == "NCHW":
                t = t.unflatten(1, self.patch_embed[index // num_blocks].grid_size).permute(0, 3, 1, 2).contiguous()
            intermediates.append(t)
        return intermediates if intermediates_only else (self._features(xs), intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the multi-scale blocks after the last one ``indices`` need (and the norms / heads as asked); returns the
        kept indices. A fusion whose result no kept feature uses stays (DDP then needs find_unused_parameters)."""
        num_blocks = len(self.blocks)
        take_indices, _ = feature_take_indices(self.num_branches * num_blocks, indices)
        self.blocks = self.blocks[: max(i % num_blocks for i in take_indices) + 1]
        if prune_norm:
            self.norm = nn.ModuleList(nn.Identity() for _ in range(self.num_branches))
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _bad_img_size(img_size: tuple, img_scale: tuple, branch: int, size: tuple, patch_size: tuple) -> str:
    if all(s == 1.0 for s in img_scale):
        step = math.lcm(*patch_size)
        accepted = f"accepted img_size: height and width multiples of {step} (every branch's patch size)"
    else:
        scale, patch = img_scale[branch], patch_size[branch]
        accepted = f"accepted img_size: sides whose int(side * {scale}) is a positive multiple of {patch}"
    return (f"img_size={img_size} with img_scale={img_scale} gives branch {branch} a {size[0]}x{size[1]} image, not a "
            f"positive multiple of its patch_size={patch_size[branch]}; {accepted}")


def crossvit_rules(state_dict: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """timm ``crossvit_*`` checkpoints -> ``CrossVit``: ``pos_embed_{b}`` / ``cls_token_{b}`` -> ``pos_embed.{b}`` /
    ``cls_token.{b}``; each fusion attention's ``wq`` -> ``q`` and ``wk`` / ``wv`` stacked into ``kv``
    (``timm_crossvit_fusion_state_dict``). Zoo (and original release) checkpoints pass unchanged."""
    out = {re.sub(r"^(pos_embed|cls_token)_(\d+)$", r"\1.\2", k): v for k, v in state_dict.items()}
    adapted = []
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        own = {k[len(p):]: v for k, v in out.items() if k.startswith(p)}
        if not any(".attn.wq." in k for k in own):
            continue
        fused = timm_crossvit_fusion_state_dict(own)  # the fusion's keys (its branch blocks are left out)
        out = {k: v for k, v in out.items() if not k.startswith(p) or k[len(p):].startswith("blocks.")}
        out.update({p + k: v for k, v in fused.items()})
        adapted += [p + k for k in fused if ".attn.kv." in k]
    return out, adapted


register_converter(CrossVit, crossvit_rules)

