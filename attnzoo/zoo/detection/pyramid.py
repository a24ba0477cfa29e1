"""A timm ``features_only`` backbone followed by torchvision's ``FeaturePyramidNetwork``: the backbone contract of
torchvision's detectors (an ``OrderedDict`` of maps and ``out_channels``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from attnzoo.kernels.validate import check_int

__all__ = ["EXTRA_BLOCKS", "FeaturePyramid"]

# Extra levels above the backbone's last one, each at twice the previous stride: "pool" (a max pool, torchvision's
# Faster R-CNN) and "p6p7" (two stride-2 convs, its RetinaNet and FCOS). name -> (block for C channels, level names)
EXTRA_BLOCKS: dict[str, tuple[Callable[[int], ExtraFPNBlock], tuple[str, ...]]] = {
    "pool": (lambda channels: LastLevelMaxPool(), ("pool",)),
    "p6p7": (lambda channels: LastLevelP6P7(channels, channels), ("p6", "p7")),
}


class FeaturePyramid(nn.Module):
    """Backbone maps -> FPN maps of ``out_channels`` channels, plus the ``extra_blocks`` levels.

    Args:
        body: a timm model created with ``features_only=True`` (its ``feature_info`` gives channels and strides).
        out_channels: channels of every pyramid level.
        extra_blocks: a key of ``EXTRA_BLOCKS``, or None for no extra level.

    Attributes:
        out_channels: as torchvision's detectors require.
        names: level names: "0", "1", ... for the backbone's levels, then the extra ones ("pool" or "p6", "p7").
        strides: pixels per cell of each level, in ``names`` order.

    Shapes: ``forward(x)``: (B, C, H, W), H and W multiples of the largest stride -> ``OrderedDict`` name ->
    (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, body: nn.Module, out_channels: int, extra_blocks: str | None) -> None:
        super().__init__()
        if extra_blocks is not None and extra_blocks not in EXTRA_BLOCKS:
            raise ValueError(f"extra_blocks={extra_blocks!r}; accepted values: {[*EXTRA_BLOCKS, None]}")
        check_int("fpn_channels", out_channels, 1)
        make_extra, extra_names = EXTRA_BLOCKS[extra_blocks] if extra_blocks else (None, ())
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=make_extra(out_channels) if make_extra else None
        )
        self.out_channels = out_channels
        strides = [int(r) for r in body.feature_info.reduction()]
        self.names = [str(i) for i in range(len(strides))] + list(extra_names)
        self.strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(len(extra_names))]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))
