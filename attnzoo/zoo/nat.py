"""NAT / DiNAT-style hierarchical neighborhood-attention backbones: ``attnzoo_nat_*`` and ``attnzoo_dinat_*``.

Papers: `Neighborhood Attention Transformer` (Hassani et al., CVPR 2023, arXiv:2204.07143) and `Dilated Neighborhood
Attention Transformer` (Hassani & Shi, arXiv:2209.15001).

Layout (tokens are channels-last, (B, H, W, C), between the stem and the head):
- stem: two overlapping 3x3 convs (stride 2 each, no activation between, as NAT), then LayerNorm; ``stem_stride=2``
  makes the second conv stride 1 (the ``mini`` size, for 28x28 images);
- stages: stage i > 0 starts with a 3x3 stride-2 conv that doubles the width, then LayerNorm (NAT puts this
  downsampler at the end of the previous stage; here it opens the stage, so stage i outputs stride
  ``stem_stride * 2**i``, as timm's hierarchical models do), followed by NAT blocks
  ``x + ls1(NA-2D(norm1(x)))``, ``x + ls2(MLP(norm2(x)))`` with NAT's learnable relative-position bias ``rpb``;
- final LayerNorm, global average pool, linear classifier.

DiNAT alternates local (dilation 1) and dilated blocks inside every stage. As in DiNAT, the dilation of the dilated
blocks is chosen from the stage's feature-map size at the model's ``img_size``: ``extent // kernel_size`` per axis,
so ``kernel_size * dilation`` never exceeds the map at that size (DiNAT-Tiny at 224 px: 8, 4, 2, 1). Smaller
images must be announced with ``img_size=`` when the model is created; the schedule is fixed afterwards.

Input sizes: the 3x3 stride-2 convs give a ``ceil(H / stride)`` map at every stage, and neighborhood attention needs
every map to cover ``kernel_size * dilation`` (nothing is padded), so a model accepts images whose height and width
are at least a model-specific minimum (193 px for NAT-Tiny, 221 px for DiNAT-Tiny at 224, 25 px for NAT-Mini);
other sizes fail with an error that names it. Attention dropout is not supported by the fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerScale,
    calculate_drop_path_rates,
    get_device_dtype,
)
from timm.models import build_model_with_cfg, checkpoint_seq, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from attnzoo.blocks import NeighborhoodAttention2d
from attnzoo.blocks.factory import GridRule
from attnzoo.blocks.mlp import Mlp
from attnzoo.zoo._builder import FMNIST_CFG, zoo_cfg
from attnzoo.zoo.pretrained import default_cfgs_with_shipped

__all__ = ["Nat", "NatBlock", "dinat_dilations"]

Pair = tuple[int, int]


def _pair(v: int | Sequence[int]) -> Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _per_stage(name: str, value: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
    values = (value,) * num_stages if isinstance(value, int) else tuple(value)
    if len(values) != num_stages:
        raise ValueError(f"{name}={value!r} must be an int or have one entry per stage ({num_stages})")
    return values


def _min_side(needs: Sequence[int], reductions: Sequence[int]) -> int:
    """The smallest image side whose ``ceil(side / r)`` map covers ``need`` at every (need, r) stage."""
    return max((n - 1) * r + 1 for n, r in zip(needs, reductions, strict=True))


def dinat_dilations(
    depths: Sequence[int], kernel_size: int | Sequence[int], img_size: int | Sequence[int], stem_stride: int = 4
) -> tuple[tuple[Pair, ...], ...]:
    """DiNAT's schedule: per stage, per block, the (height, width) dilation of the neighborhood.

    Even blocks are local (1, 1); odd blocks take ``extent // kernel_size`` per axis, the largest dilation whose
    ``kernel_size * dilation`` fits the stage's ``ceil(img_size / stride)`` map (at least 1).

    Raises:
        ValueError: if a stage's map at ``img_size`` is smaller than its kernel (naming the smallest img_size).
    """
    kernels = _per_stage("kernel_size", kernel_size, len(depths))
    reductions = [stem_stride * 2**i for i in range(len(depths))]
    img_size = _pair(img_size)
    schedule = []
    for depth, k, r in zip(depths, kernels, reductions, strict=True):
        extent = tuple(math.ceil(s / r) for s in img_size)
        if min(extent) < k:
            least = _min_side(kernels, reductions)
            raise ValueError(
                f"img_size={img_size} gives a {extent[0]}x{extent[1]} map at stride {r}, smaller than kernel_size={k}; "
                f"accepted img_size: height and width >= {least}"
            )
        dilated = tuple(e // k for e in extent)
        schedule.append(tuple(dilated if j % 2 else (1, 1) for j in range(depth)))
    return tuple(schedule)


@torch.fx.wrap  # a leaf for every FX tracer (timm's feature extraction included): checks real shapes
def _checked_image(x: Tensor, minimum: Pair, needs: str, hint: str) -> Tensor:
    """x: (B, C, H, W), returned unchanged; a size below ``minimum`` raises ValueError naming the accepted sizes."""
    size, rule = (x.shape[-2], x.shape[-1]), GridRule(minimum=minimum)
    if not rule.accepts(size):
        raise ValueError(
            f"a {size[0]}x{size[1]} image is too small for this NAT model ({needs}); accepted image sizes: "
            f"{rule.describe()}{hint}"
        )
    return x


class ConvStem(nn.Module):
    """NAT's overlapping tokenizer: x (B, C_in, H, W) -> (B, ceil(H / stride), ceil(W / stride), dim), normed."""

    def __init__(self, in_chans: int, dim: int, stride: int, norm_layer: Callable[..., nn.Module], dd: dict) -> None:
        super().__init__()
        if stride not in (2, 4):
            raise ValueError(f"stem_stride={stride} is not supported; accepted values: 2, 4")
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1, **dd)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=stride // 2, padding=1, **dd)
        self.norm = norm_layer(dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv2(self.conv1(x)).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """NAT's downsampler: x (B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), out_dim), 3x3 stride-2 conv then norm."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable[..., nn.Module], dd: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NatBlock(nn.Module):
    """A NAT transformer block on channels-last tokens: x (B, H, W, C) -> same.

    ``x = x + drop_path(ls1(attn(norm1(x))))``, ``x = x + drop_path(ls2(mlp(norm2(x))))``, with ``attn`` a 2-D
    neighborhood attention (``kernel_size``, per-axis ``dilation``, relative-position bias) and ``ls*`` identity
    unless ``layer_scale_init_value`` is given.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: Pair = (1, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_scale_init_value: float | None = None,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        attn_backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = NeighborhoodAttention2d(
            dim, num_heads, kernel_size, dilation=dilation, qkv_bias=qkv_bias, rel_pos_bias=True,
            proj_drop=proj_drop, backend=attn_backend, **dd,
        )
        self.ls1 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class NatStage(nn.Module):
    """An optional stride-2 downsampler, then NAT blocks: (B, H, W, C_in) -> (B, H', W', dim) at ``reduction``.

    ``needs`` is the (height, width) map the stage's neighborhoods must fit: the largest ``kernel_size * dilation``.
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        reduction: int,
        num_heads: int,
        kernel_size: int,
        dilations: Sequence[Pair],
        drop_path: Sequence[float],
        downsample: bool,
        norm_layer: Callable[..., nn.Module],
        dd: dict,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.needs = tuple(kernel_size * max(d[a] for d in dilations) for a in (0, 1))
        self.grad_checkpointing = False
        self.downsample = ConvDownsample(dim_in, dim, norm_layer, dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(
            NatBlock(dim, num_heads, kernel_size, dilation=d, drop_path=p, norm_layer=norm_layer, **block_kwargs, **dd)
            for d, p in zip(dilations, drop_path, strict=True)
        ))

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing:
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Nat(nn.Module):
    """Hierarchical neighborhood-attention transformer (NAT; DiNAT with a dilation schedule), see the module docstring.

    Args:
        num_classes: classifier outputs (0 = no classifier).
        in_chans: image channels.
        global_pool: head pooling ('avg', 'max', ..., '' for none).
        embed_dim: width of the first stage; stage i has ``embed_dim * 2**i`` channels.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        kernel_size: neighborhood size (>= 2), one for all stages or one per stage.
        dilations: per stage, per block, the dilation (an int or a (height, width) pair); None = all 1 (NAT).
            ``dinat_dilations`` gives DiNAT's schedule.
        stem_stride: 4 (NAT) or 2 (both stem convs are stride 2 / only the first one is).
        mlp_ratio: MLP hidden width relative to the block width.
        qkv_bias: bias in the q/k/v projection.
        layer_scale_init_value: LayerScale init (NAT-Small uses 1e-5); None = no layer scale.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        drop_path_rate: stochastic depth, increasing linearly over the blocks up to this value.
        norm_layer: channels-last norm, called as ``norm_layer(dim, device=, dtype=)``.
        act_layer: MLP activation.
        attn_backend: kernel backend of the neighborhood attention (None = automatic: Triton on CUDA, else torch).

    Shapes: ``forward(x)``: (B, in_chans, H, W) -> (B, num_classes); ``forward_features(x)`` ->
    (B, ceil(H / r), ceil(W / r), num_features) with r = ``stem_stride * 2**(num_stages - 1)`` (channels-last).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 18, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        kernel_size: int | Sequence[int] = 7,
        dilations: Sequence[Sequence[int | Pair]] | None = None,
        stem_stride: int = 4,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        layer_scale_init_value: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        attn_backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = len(depths)
        num_heads = _per_stage("num_heads", num_heads, num_stages)
        kernels = _per_stage("kernel_size", kernel_size, num_stages)
        dilations = [[(1, 1)] * d for d in depths] if dilations is None else dilations
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f"dilations must give one entry per block of every stage (depths={tuple(depths)})")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        self.attn_name = "na" if all(_pair(d) == (1, 1) for stage in dilations for d in stage) else "dilated na"
        self.grad_checkpointing = False
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ConvStem(in_chans, embed_dim, stem_stride, norm_layer, dd)
        drop_paths = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        for i in range(num_stages):
            reduction = stem_stride * 2**i
            stages.append(NatStage(
                dims[max(i - 1, 0)], dims[i], reduction, num_heads[i], kernels[i], [_pair(d) for d in dilations[i]],
                drop_paths[i], downsample=i > 0, norm_layer=norm_layer, dd=dd, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, layer_scale_init_value=layer_scale_init_value, proj_drop=proj_drop_rate,
                act_layer=act_layer, attn_backend=attn_backend,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NHWC", **dd)
        self.apply(_init_weights)

    def _checked_input(self, x: Tensor) -> Tensor:
        stages = list(self.stages)
        reductions = [s.reduction for s in stages]
        minimum = tuple(_min_side([s.needs[a] for s in stages], reductions) for a in (0, 1))
        needs = "every stage's map must cover kernel_size * dilation: " + ", ".join(
            f"{s.needs[0]}x{s.needs[1]} at stride {s.reduction}" for s in stages
        )
        dilated = any(b.attn.dilation != (1, 1) for s in stages for b in s.blocks)
        hint = "; the dilations were derived from img_size, create the model with a smaller img_size" if dilated else ""
        return _checked_image(x, minimum, needs, hint)

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def no_weight_decay(self) -> set[str]:
        """NAT's relative-position biases are left out of weight decay (1-D parameters are excluded anyway)."""
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier (``global_pool`` None keeps the pooling), on the model's device and dtype."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs ``indices`` (None = all, int = last n) as (B, C, H, W) (or NHWC); ``norm`` applies the final
        norm to the last stage's output. Returns (forward_features output, intermediates) or just the intermediates."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; accepted values: 'NCHW', 'NHWC'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x = self.stem(self._checked_input(x))
        intermediates = []
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last index kept (and the norm / head as asked); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for, and applied to, the last stage only
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> normed last-stage tokens (B, H', W', num_features)."""
        return self.norm(self.stages(self.stem(self._checked_input(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    # NAT's init: truncated-normal linear weights, zero biases; convs and norms keep PyTorch's defaults.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> Nat:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    return build_model_with_cfg(
        Nat, variant, pretrained, feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs
    )


def _create_dinat(variant: str, pretrained: bool = False, img_size: int | Pair = 224, **kwargs) -> Nat:
    """NAT with DiNAT's dilation schedule for ``img_size`` (explicit ``dilations=`` take precedence)."""
    kwargs.setdefault(
        "dilations",
        dinat_dilations(kwargs["depths"], kwargs.get("kernel_size", 7), img_size, kwargs.get("stem_stride", 4)),
    )
    return _create_nat(variant, pretrained, **kwargs)


def _cfg(paper: str, **kwargs) -> dict:
    papers = {
        "nat": ("Neighborhood Attention Transformer", "arXiv:2204.07143"),
        "dinat": ("Dilated Neighborhood Attention Transformer", "arXiv:2209.15001"),
    }
    return zoo_cfg(**{
        "pool_size": (7, 7), "first_conv": "stem.conv1", "classifier": "head.fc", "paper_name": papers[paper][0],
        "paper_ids": papers[paper][1], "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        **kwargs,
    })


# mini: 28x28 Fashion-MNIST maps of 14, 7 and 4 px; the last stage's kernel 4 covers its whole 4x4 map.
# min_input_size: the smallest accepted image (mini: 25 px, 27 for DiNAT at img_size=28; kept at the data's 28).
_MINI_CFG = dict(FMNIST_CFG, pool_size=(4, 4), min_input_size=FMNIST_CFG["input_size"])

default_cfgs = default_cfgs_with_shipped({
    "attnzoo_nat_mini.untrained": _cfg("nat", **_MINI_CFG),
    "attnzoo_nat_tiny.untrained": _cfg("nat", min_input_size=(3, 193, 193)),
    "attnzoo_nat_small.untrained": _cfg("nat", min_input_size=(3, 193, 193)),
    "attnzoo_dinat_mini.untrained": _cfg("dinat", **_MINI_CFG),
    "attnzoo_dinat_tiny.untrained": _cfg("dinat", min_input_size=(3, 221, 221)),  # at the default img_size=224
    "attnzoo_dinat_small.untrained": _cfg("dinat", min_input_size=(3, 221, 221)),
})

_MINI = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), kernel_size=(7, 7, 4), stem_stride=2, mlp_ratio=3.0)
_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0)  # NAT-Tiny / DiNAT-Tiny
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0, layer_scale_init_value=1e-5)


@register_model
def attnzoo_nat_mini(pretrained: bool = False, **kwargs) -> Nat:
    """NAT for 28x28 images (stem stride 2, three stages of 2 blocks, 32-128 channels); 0.5M params."""
    return _create_nat("attnzoo_nat_mini", pretrained, **dict(_MINI, **kwargs))


@register_model
def attnzoo_nat_tiny(pretrained: bool = False, **kwargs) -> Nat:
    """NAT-Tiny (depths 3-4-18-5, 64 channels, 2-16 heads, kernel 7); 28M params."""
    return _create_nat("attnzoo_nat_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def attnzoo_nat_small(pretrained: bool = False, **kwargs) -> Nat:
    """NAT-Small (depths 3-4-18-5, 96 channels, 3-24 heads, layer scale); 51M params."""
    return _create_nat("attnzoo_nat_small", pretrained, **dict(_SMALL, **kwargs))


@register_model
def attnzoo_dinat_mini(pretrained: bool = False, **kwargs) -> Nat:
    """NAT-Mini with DiNAT's dilation schedule for ``img_size`` (default 28)."""
    return _create_dinat("attnzoo_dinat_mini", pretrained, **{**_MINI, "img_size": 28, **kwargs})


@register_model
def attnzoo_dinat_tiny(pretrained: bool = False, **kwargs) -> Nat:
    """DiNAT-Tiny: NAT-Tiny with DiNAT's dilation schedule for ``img_size`` (default 224: 8, 4, 2, 1)."""
    return _create_dinat("attnzoo_dinat_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def attnzoo_dinat_small(pretrained: bool = False, **kwargs) -> Nat:
    """DiNAT-Small: NAT-Small with DiNAT's dilation schedule for ``img_size`` (default 224)."""
    return _create_dinat("attnzoo_dinat_small", pretrained, **dict(_SMALL, **kwargs))
