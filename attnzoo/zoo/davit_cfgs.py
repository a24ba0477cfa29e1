"""Pretrained cfgs and timm entrypoints of ``attnzoo_davit_{mini,tiny,small}`` (the models: ``attnzoo.zoo.davit``).

They are registered from this module: timm keys a model's family by its module's name, and ``davit`` is timm's own.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, register_model

from attnzoo.zoo._builder import FMNIST_CFG, zoo_cfg
from attnzoo.zoo.convert import checkpoint_filter_fn
from attnzoo.zoo.davit import DaVit
from attnzoo.zoo.pretrained import default_cfgs_with_shipped


def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaVit:
    # features_only through forward_intermediates (feature_cls='getter'), so the image-size check applies there too
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    return build_model_with_cfg(
        DaVit, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return zoo_cfg(**{
        "pool_size": (7, 7), "crop_pct": 0.95, "first_conv": "stem.conv", "classifier": "head.fc",
        "min_input_size": (3, 193, 193), "paper_name": "DaViT: Dual Attention Vision Transformers",
        "paper_ids": "arXiv:2204.03645", "origin_url": "https://github.com/dingmyu/davit", **kwargs,
    })


default_cfgs = default_cfgs_with_shipped({
    # mini at 28 px: maps 14, 7, 4; min_input_size is the data's 28 (the model takes >= 25 px)
    "attnzoo_davit_mini.untrained": _cfg(**FMNIST_CFG, pool_size=(4, 4), min_input_size=FMNIST_CFG["input_size"]),
    "attnzoo_davit_tiny.untrained": _cfg(),
    "attnzoo_davit_small.untrained": _cfg(),
})

_MINI = dict(embed_dims=(32, 64, 128), depths=(1, 2, 1), num_heads=(1, 2, 4), window_size=(7, 7, 4), stem_stride=2,
             down_kernel_size=3)


@register_model
def attnzoo_davit_mini(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT for 28x28 images (stem stride 2, three stages of 1-2-1 dual blocks, 32-128 channels, windows 7-7-4)."""
    return _create_davit("attnzoo_davit_mini", pretrained, **dict(_MINI, **kwargs))


@register_model
def attnzoo_davit_tiny(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-Tiny (depths 1-1-3-1, 96-768 channels, 3-24 heads, window 7); loads timm ``davit_tiny`` weights."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(1, 1, 3, 1), num_heads=(3, 6, 12, 24))
    return _create_davit("attnzoo_davit_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def attnzoo_davit_small(pretrained: bool = False, **kwargs) -> DaVit:
    """DaViT-Small (depths 1-1-9-1, 96-768 channels, 3-24 heads, window 7); loads timm ``davit_small`` weights."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(1, 1, 9, 1), num_heads=(3, 6, 12, 24))
    return _create_davit("attnzoo_davit_small", pretrained, **dict(model_args, **kwargs))
