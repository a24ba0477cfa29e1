"""Pretrained cfgs and timm entrypoints of ``attnzoo_crossvit_{mini,tiny,small}`` (the models:
``attnzoo.zoo.crossvit``).

They are registered from this module: timm keys a model's family by its module's name, and ``crossvit`` is timm's
own.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, register_model

from attnzoo.zoo._builder import FMNIST_CFG, zoo_cfg
from attnzoo.zoo.convert import checkpoint_filter_fn
from attnzoo.zoo.crossvit import CrossVit
from attnzoo.zoo.pretrained import default_cfgs_with_shipped


def _create_crossvit(variant: str, pretrained: bool = False, **kwargs) -> CrossVit:
    # default features: every branch after every multi-scale block (timm's battery wants >= 3 levels)
    out_indices = kwargs.pop("out_indices", tuple(range(2 * len(kwargs["depth"]))))
    return build_model_with_cfg(
        CrossVit, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs,
    )


def _cfg(**kwargs) -> dict:
    # pool_size: forward_features is a 1x1 map of the branches' class tokens
    return zoo_cfg(**{
        "input_size": (3, 240, 240), "pool_size": (1, 1), "fixed_input_size": True, "crop_pct": 0.875,
        "first_conv": ("patch_embed.0.proj", "patch_embed.1.proj"), "classifier": ("head.0", "head.1"),
        "paper_name": "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification",
        "paper_ids": "arXiv:2103.14899", "origin_url": "https://github.com/IBM/CrossViT", **kwargs,
    })


default_cfgs = default_cfgs_with_shipped({
    "attnzoo_crossvit_mini.untrained": _cfg(**FMNIST_CFG),
    "attnzoo_crossvit_tiny.untrained": _cfg(),
    "attnzoo_crossvit_small.untrained": _cfg(),
})


@register_model
def attnzoo_crossvit_mini(pretrained: bool = False, **kwargs) -> CrossVit:
    """CrossViT for 28x28 images: patches 4 and 7 (7x7 and 4x4 grids), 32 / 64 channels, two multi-scale blocks."""
    model_args = dict(img_size=28, patch_size=(4, 7), embed_dim=(32, 64), depth=((1, 2), (1, 2)), num_heads=(2, 2),
                      mlp_ratio=(3.0, 3.0))
    return _create_crossvit("attnzoo_crossvit_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def attnzoo_crossvit_tiny(pretrained: bool = False, **kwargs) -> CrossVit:
    """CrossViT-Ti at 240 px (patches 12 and 16, 96 / 192 channels, 3 heads, 3 multi-scale blocks of 1 + 4 blocks).
    timm ``crossvit_tiny_240`` weights: create with ``img_scale=(1.0, 224 / 240)``, its large-patch branch's input."""
    model_args = dict(patch_size=(12, 16), embed_dim=(96, 192), depth=((1, 4),) * 3, num_heads=(3, 3),
                      mlp_ratio=(4.0, 4.0))
    return _create_crossvit("attnzoo_crossvit_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def attnzoo_crossvit_small(pretrained: bool = False, **kwargs) -> CrossVit:
    """CrossViT-S at 240 px (patches 12 and 16, 192 / 384 channels, 6 heads, 3 multi-scale blocks of 1 + 4 blocks).
    timm ``crossvit_small_240`` weights: create with ``img_scale=(1.0, 224 / 240)``."""
    model_args = dict(patch_size=(12, 16), embed_dim=(192, 384), depth=((1, 4),) * 3, num_heads=(6, 6),
                      mlp_ratio=(4.0, 4.0))
    return _create_crossvit("attnzoo_crossvit_small", pretrained, **dict(model_args, **kwargs))
