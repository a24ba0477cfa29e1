"""Pretrained cfgs of the ``attnzoo_vit_*`` models (timm's ``default_cfgs`` table for ``attnzoo.zoo.vit``)."""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

from attnzoo.zoo._builder import FMNIST_CFG, zoo_cfg
from attnzoo.zoo.pretrained import default_cfgs_with_shipped


def _cfg(img_size: int, patch_size: int, **kwargs: Any) -> dict[str, Any]:
    # pool_size: forward_features is a 1 x (1 + grid²) token strip (class token + patches).
    return zoo_cfg(**{
        "input_size": (3, img_size, img_size),
        "pool_size": (1, 1 + (img_size // patch_size) ** 2),
        "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN,  # what timm's ViT checkpoints were trained with
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_name": "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
        "paper_ids": "arXiv:2010.11929",
        "origin_url": "https://github.com/huggingface/pytorch-image-models",
        "notes": ("attnzoo ViT in timm's vision_transformer weight layout; the attention is chosen with attn=",),
        **kwargs,
    })


default_cfgs = default_cfgs_with_shipped({
    "attnzoo_vit_tiny.untrained": _cfg(224, 16),
    "attnzoo_vit_small.untrained": _cfg(224, 16),
    "attnzoo_vit_tiny_patch4_28.untrained": _cfg(28, 4, **FMNIST_CFG),
    **{f"attnzoo_vit_mini{v}.untrained": _cfg(28, 4, **FMNIST_CFG) for v in ("", "_moh", "_linear")},
})
