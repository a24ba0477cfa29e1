"""The detectors' input transform: torchvision's ``GeneralizedRCNNTransform`` without its resize and normalization.

torchvision's transform normalizes with ImageNet statistics and resizes every image so its shorter side is 800 px,
which moves the boxes and hands the backbone sizes it may not take. Here images arrive normalized (the
DataModules use their data's mean/std) and keep their size, so boxes stay in input-image pixels; the batch is only
zero-padded at the bottom and right, which moves no coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from attnzoo.blocks.factory import GridRule
from attnzoo.zoo.detection.targets import check_targets

__all__ = ["DetectionTransform"]


class DetectionTransform(GeneralizedRCNNTransform):
    """Checks images and targets, then pads the batch to a common size that is a multiple of ``size_divisible``.

    Args:
        min_size: (height, width): the smallest image the backbone takes.
        size_divisible: padded batch sides are multiples of it (``for_backbone``: the backbone's image multiple and
            every pyramid stride, so that each level's map is exactly the padded size over its stride, which
            torchvision's anchors assume).
        num_classes: target labels must lie in [0, num_classes).
        backbone: the backbone's name, for error messages.
        label_offset: added to the target labels after the check and taken off the detections' labels again
            (torchvision's Faster R-CNN keeps label 0 for the background; every zoo detector takes labels 0..K-1).

    Shapes: ``forward(images, targets=None)``: B images (C, H_i, W_i) (a list, or a (B, C, H, W) tensor) ->
    (``ImageList``: tensors (B, C, H', W'), image_sizes [(H_i, W_i)]; the targets, labels + ``label_offset``).
    """

    def __init__(
        self, min_size: Sequence[int], size_divisible: int, num_classes: int, backbone: str, label_offset: int = 0
    ) -> None:
        # The resize and normalization settings of the parent are never used (both steps are overridden).
        super().__init__(min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0], size_divisible=size_divisible)
        self.rule = GridRule(minimum=(int(min_size[0]), int(min_size[1])))
        self.num_classes = num_classes
        self.backbone = backbone
        self.label_offset = label_offset

    @classmethod
    def for_backbone(
        cls, body: nn.Module, strides: Sequence[int], num_classes: int, label_offset: int = 0
    ) -> DetectionTransform:
        """The transform for a timm ``features_only`` backbone whose output levels have ``strides`` (pixels per cell).

        The least image is the pretrained cfg's ``min_input_size`` (1 x 1 without one); the padding multiple is the
        least common multiple of the strides and the model's ``image_multiple`` (HaloNet: its halo block size times
        the stride at which the block runs)."""
        cfg = getattr(body, "pretrained_cfg", None) or {}
        model = getattr(body, "model", body)  # timm's FeatureGetterNet keeps the whole model as ``model``
        multiple = math.lcm(int(getattr(model, "image_multiple", 1)), *(int(s) for s in strides))
        min_size = tuple(cfg.get("min_input_size") or (1, 1))[-2:]
        return cls(min_size, multiple, num_classes, cfg.get("architecture", type(model).__name__), label_offset)

    def normalize(self, image: Tensor) -> Tensor:
        return image  # normalized by the DataModule

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict | None]:
        return image, target  # never resized: boxes stay in input-image pixels

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        sizes = [tuple(image.shape[-2:]) for image in images]
        for i, size in enumerate(sizes):
            if not self.rule.accepts(size):
                raise ValueError(
                    f"images[{i}] is {size[0]}x{size[1]} (height x width); {self.backbone} takes images with "
                    f"{self.rule.describe()} (batches are zero-padded to multiples of {self.size_divisible}, "
                    "never resized)"
                )
        if targets is not None:
            check_targets(targets, sizes, self.num_classes)
            targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        return super().forward(list(images), targets)

    def postprocess(
        self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:  # fmt: skip
        # image_shapes == original_image_sizes (nothing was resized): only the label offset is undone
        return [{**r, "labels": r["labels"] - self.label_offset} for r in result]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(min_size={self.rule.minimum}, size_divisible={self.size_divisible}, "
                f"label_offset={self.label_offset}, no resize, no normalization)")  # fmt: skip
