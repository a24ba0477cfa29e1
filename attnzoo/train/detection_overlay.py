"""A picture of detections: the input image with each box and its "<class> <score>" label, as a PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from attnzoo.train.data.image_files import write_image_file

__all__ = ["save_detections"]

# One colour per class (matplotlib's tab10), repeating past ten classes.
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def save_detections(path: str | Path, image: Tensor, detections: dict[str, Tensor], class_names: Sequence[str],
                    mean: Sequence[float], std: Sequence[float], min_side: int = 448) -> None:  # fmt: skip
    """Write ``path`` (a PNG): ``image`` with the boxes of ``detections`` drawn and labelled.

    image: normalized float (C, H, W), C in (1, 3), un-normalized with ``mean``/``std``; detections: ``{"boxes":
    (D, 4) (x1, y1, x2, y2) pixels, "labels": (D,), "scores": (D,)}``. The picture is enlarged (nearest
    neighbour) by a whole factor until its longer side is at least ``min_side`` pixels, so the labels stay legible.
    """
    from torchvision.utils import draw_bounding_boxes

    mean_, std_ = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (mean, std))
    pixels = ((image.detach().float().cpu() * std_ + mean_).clamp(0, 1) * 255).round().to(torch.uint8)
    factor = max(1, math.ceil(min_side / max(pixels.shape[-2:])))
    pixels = pixels.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    labels = detections["labels"].tolist()
    if labels:  # (torchvision warns on an empty set of boxes)
        texts = [f"{class_names[j]} {s:.2f}" for j, s in zip(labels, detections["scores"].tolist(), strict=True)]
        pixels = draw_bounding_boxes(pixels, detections["boxes"].detach().cpu() * factor, texts,
                                     colors=[_COLORS[j % len(_COLORS)] for j in labels], width=2)  # fmt: skip
    write_image_file(path, pixels.expand(3, -1, -1))
