"""Helpers every zoo family shares: pretrained-cfg defaults, the Fashion-MNIST input cfg, the image-size error
that names the sizes a model's attention accepts, and timm's transformer init of linear layers."""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import nn

from attnzoo.blocks.factory import GridSizeError

# Fashion-MNIST (design §3): 1 x 28 x 28 grayscale, 10 classes; mean / std of the 60k training images.
FMNIST_CFG: dict[str, Any] = {
    "input_size": (1, 28, 28),
    "num_classes": 10,
    "mean": (0.2860,),
    "std": (0.3530,),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


def zoo_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg with the zoo's defaults (ImageNet-1k input, Apache-2.0); ``kwargs`` override or add fields.

    Families pass at least ``first_conv``, ``classifier``, ``paper_name``, ``paper_ids`` and ``origin_url``.
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
        **kwargs,
    }


def image_size_error(err: GridSizeError, img_size: tuple[int, int], reduction: int) -> ValueError:
    """``err`` (raised for a token grid at ``reduction`` pixels per cell) restated for the image: the requested
    ``img_size`` and the image sizes the attention accepts."""
    grid = f"{err.grid[0]}x{err.grid[1]}"
    return ValueError(
        f"img_size={tuple(img_size)} gives a {grid} token grid at stride {reduction}, on which attn={err.attn!r} "
        f"cannot run; accepted img_size: {err.rule.describe(unit=reduction)} (pixels)"
    )


def init_linears(module: nn.Module, std: float = 0.02) -> None:
    """timm's ViT init of every ``nn.Linear`` inside ``module``: trunc-normal(``std``) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
