"""HaloNet-style hybrids: timm's ByobNet (ResNet-style bottlenecks + self-attention blocks) with attnzoo's fused
``HaloAttention``: ``attnzoo_halonet26t``, the small ``attnzoo_halonet_tiny`` and ``attnzoo_halonet_mini``
(28 x 28 images).

Paper: `Scaling Local Self-Attention for Parameter Efficient Visual Backbones` (Vaswani et al., CVPR 2021,
arXiv:2103.12731); the architecture is timm's ``halonet26t`` (its ``byoanet`` config), built by timm's ByobNet
config machinery with ``self_attn_layer=HaloAttention``. ``HaloAttention`` names and shapes its parameters like
timm's ``HaloAttn`` and has its semantics (zero-padded keys), so a timm ``halonet26t`` state dict loads unchanged
and gives the same logits:
``timm.create_model("attnzoo_halonet26t", pretrained=True, pretrained_cfg_overlay=dict(file="halonet26t.pth"))``
(through ``attnzoo.zoo.convert.checkpoint_filter_fn``; the keys need no renaming).

Input sizes: every halo attention splits its input map into ``block_size`` x ``block_size`` blocks, so the image
height and width must be multiples of ``block_size`` times the stride at which each attention runs (256 for
``attnzoo_halonet26t``: block 8 at stride 32; 64 for ``attnzoo_halonet_tiny``; 14 for ``attnzoo_halonet_mini``);
other sizes fail with an error naming the accepted ones.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.byoanet import model_cfgs as timm_byoanet_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg, expand_blocks_cfg, interleave_blocks
from torch import Tensor

from attnzoo.blocks import HaloAttention
from attnzoo.blocks.factory import GridRule
from attnzoo.zoo._builder import FMNIST_CFG, zoo_cfg
from attnzoo.zoo.convert import checkpoint_filter_fn
from attnzoo.zoo.folded_conv import fold_batchnorm_in_eval
from attnzoo.zoo.pretrained import default_cfgs_with_shipped

__all__ = ["HaloNet", "model_cfgs"]

model_cfgs = dict(
    # timm's halonet26t (ResNet-26-T: tiered stem, 2-2-2-2 bottlenecks; halo attention in the last two stages),
    attnzoo_halonet26t=replace(timm_byoanet_cfgs["halonet26t"], self_attn_layer=HaloAttention),
    # ... and a narrow, shallow version of it for 64 px and up (block 4, halo 1: the attentions run at stride 16).
    attnzoo_halonet_tiny=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=64, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=1, c=128, s=2, gs=0, br=0.25),
            interleave_blocks(types=("bottle", "self_attn"), d=2, c=256, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=1, c=512, s=2, gs=0, br=0.25),
        ),
        stem_chs=32,
        stem_type="tiered",
        stem_pool="maxpool",
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=4),
    ),
    # ... and one for 28 x 28 grayscale images (Fashion-MNIST): a stride-2 stem, then every halo attention runs
    # on 14 x 14 maps (2 x 2 blocks of 7, halo 2; the last one strides its queries to 7 x 7); a last bottleneck
    # strides to 4 x 4, so that features_only has three levels (strides 2, 4, 8) as timm's contract asks.
    attnzoo_halonet_mini=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=64, s=1, gs=0, br=0.25),
            interleave_blocks(types=("bottle", "self_attn"), d=2, c=128, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=1, c=256, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=1, c=256, s=2, gs=0, br=0.25),  # a stride-8 level (4 x 4) for features
        ),
        stem_chs=32,
        stem_type="",
        stem_pool="",
        num_features=256,
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=7, halo_size=2, num_heads=4),
    ),
)


@torch.fx.wrap  # a leaf for every FX tracer (timm's feature extraction included): checks real shapes
def _checked_image(x: Tensor, multiple: int, needs: str) -> Tensor:
    """x: (B, C, H, W), returned unchanged; H or W not a positive multiple of ``multiple`` raises ValueError."""
    size, rule = (x.shape[-2], x.shape[-1]), GridRule(minimum=(multiple, multiple), multiple=(multiple, multiple))
    if not rule.accepts(size):
        raise ValueError(
            f"a {size[0]}x{size[1]} image does not fit this HaloNet's halo blocks ({needs}); accepted image sizes: "
            f"{rule.describe()}"
        )
    return x


class HaloNet(ByobNet):
    """timm's ``ByobNet`` whose self-attention blocks are attnzoo ``HaloAttention``s, with an up-front image-size
    check and ``no_weight_decay``. For speed, the images go through the network channels-last (memory layout only:
    shapes stay NCHW), and in eval mode every conv's BatchNorm is folded into it (``folded_conv``).

    Args:
        cfg: the architecture (a ``ByoModelCfg`` whose ``self_attn_layer`` is ``HaloAttention``).
        output_stride: 32, or 16 / 8 to dilate the last stages (the halo attentions then run at a finer stride,
            which lowers the accepted image-size multiple).
        attn_backend: kernel backend of every ``HaloAttention`` (None = automatic: Triton on CUDA, else torch).
        **kwargs: ``ByobNet``'s arguments (``num_classes``, ``in_chans``, ``global_pool``, ``drop_rate``,
            ``drop_path_rate``, ``device``, ``dtype``, ...) and overrides of ``cfg`` fields; anything else is a
            ``TypeError``.

    Shapes: ``forward(x)``: (B, in_chans, H, W) -> (B, num_classes); ``forward_features(x)`` ->
    (B, num_features, H / 32, W / 32) (NCHW, at ``output_stride=32``).
    """

    def __init__(self, cfg: ByoModelCfg, output_stride: int = 32, attn_backend: str | None = None, **kwargs) -> None:
        if attn_backend is not None:
            cfg = replace(cfg, self_attn_kwargs={**cfg.self_attn_kwargs, "backend": attn_backend})
        super().__init__(cfg, output_stride=output_stride, **kwargs)
        fold_batchnorm_in_eval(self)
        self.attn_name = "halo"
        self.image_multiple, self._needs = self._halo_image_multiple(cfg, output_stride)

    def _halo_image_multiple(self, cfg: ByoModelCfg, output_stride: int) -> tuple[int, str]:
        """The least common multiple of ``block_size * stride`` over the halo attentions, and why (for errors).

        Follows ByobNet's striding: the first block of a stage runs at the stage's input stride (it strides
        itself), the others at its output stride; stages past ``output_stride`` dilate instead of striding.
        """
        multiple, needs = 1, []
        reduction = getattr(self.stem, "stride", 2)  # timm's Stem records its stride; its other stems are stride 2
        for stage_cfg, stage in zip(cfg.blocks, self.stages, strict=True):
            stride = expand_blocks_cfg(stage_cfg)[0].s if reduction < output_stride else 1
            for j, block in enumerate(stage):
                at = reduction if j == 0 else reduction * stride
                for attn in (m for m in block.modules() if isinstance(m, HaloAttention)):
                    multiple = math.lcm(multiple, attn.block_size * at)
                    needs.append(f"block {attn.block_size} at stride {at}")
            reduction *= stride
        return multiple, "halo attention on " + ", ".join(dict.fromkeys(needs))

    def no_weight_decay(self) -> set[str]:
        """The halo attentions' relative-position tables are left out of weight decay (as NAT's ``rpb``)."""
        return {name for name, _ in self.named_parameters() if ".pos_embed." in name}

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        """``ByobNet.forward_intermediates`` after the image-size check."""
        return super().forward_intermediates(self._checked_input(x), *args, **kwargs)

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, num_features, H / 32, W / 32); H and W multiples of ``image_multiple``."""
        return super().forward_features(self._checked_input(x))

    def _checked_input(self, x: Tensor) -> Tensor:
        # channels-last: the convs' fast CPU layout, and the halo op's (B, H, W, C) token layout
        return _checked_image(x, self.image_multiple, self._needs).contiguous(memory_format=torch.channels_last)


# Default features_only levels: the stem and every stage that changes the stride (the mini model: strides 2, 4, 8).
_FEATURE_LEVELS = {"attnzoo_halonet26t": (0, 1, 2, 3, 4), "attnzoo_halonet_tiny": (0, 1, 2, 3, 4),
                   "attnzoo_halonet_mini": (0, 1, 2)}  # fmt: skip


def _create_halonet(variant: str, pretrained: bool = False, **kwargs) -> HaloNet:
    # features_only through forward_intermediates (feature_cls='getter'), so the image-size check applies there too
    return build_model_with_cfg(
        HaloNet, variant, pretrained, model_cfg=model_cfgs[variant], pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=kwargs.pop("out_indices", _FEATURE_LEVELS[variant])),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return zoo_cfg(**{
        "crop_pct": 0.95, "first_conv": "stem.conv1.conv", "classifier": "head.fc",
        "paper_name": "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
        "paper_ids": "arXiv:2103.12731", "origin_url": "https://github.com/huggingface/pytorch-image-models",
        **kwargs,
    })


default_cfgs = default_cfgs_with_shipped({
    "attnzoo_halonet26t.untrained": _cfg(input_size=(3, 256, 256), pool_size=(8, 8), min_input_size=(3, 256, 256)),
    "attnzoo_halonet_tiny.untrained": _cfg(input_size=(3, 128, 128), pool_size=(4, 4), min_input_size=(3, 64, 64)),
    "attnzoo_halonet_mini.untrained": _cfg(**FMNIST_CFG, pool_size=(4, 4), min_input_size=FMNIST_CFG["input_size"],
                                           first_conv="stem.conv"),  # its plain stem: one conv
})


@register_model
def attnzoo_halonet26t(pretrained: bool = False, **kwargs) -> HaloNet:
    """timm's HaloNet-26-T (block 8, halo 2, 8 heads in stages 3-4) on the fused halo kernel; loads timm
    ``halonet26t`` weights unchanged. 12.5M params; images: multiples of 256 px."""
    return _create_halonet("attnzoo_halonet26t", pretrained, **kwargs)


@register_model
def attnzoo_halonet_tiny(pretrained: bool = False, **kwargs) -> HaloNet:
    """A narrow HaloNet (32-512 channels, block 4, halo 1, 4 heads in stages 3-4); images: multiples of 64 px."""
    return _create_halonet("attnzoo_halonet_tiny", pretrained, **kwargs)


@register_model
def attnzoo_halonet_mini(pretrained: bool = False, **kwargs) -> HaloNet:
    """A HaloNet for 28 x 28 images (32-256 channels, block 7, halo 2, 4 heads; 0.32M params); images: multiples
    of 14 px."""
    return _create_halonet("attnzoo_halonet_mini", pretrained, **kwargs)
