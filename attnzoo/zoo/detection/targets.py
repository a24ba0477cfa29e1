"""Checks of detection targets, shared by the detectors and the data readers: errors name the image, the box and
the accepted values."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_targets"]


def check_targets(targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[Sequence[int]], num_classes: int) -> None:
    """Every target is ``{"boxes": float (N, 4), "labels": int64 (N,)}`` (N = 0 is an image without objects) with
    boxes ``(x1, y1, x2, y2)`` in pixels, ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H`` for its image's
    ``(H, W)`` in ``image_sizes``, and labels in ``[0, num_classes)``. Raises ValueError naming the first offence."""
    if len(targets) != len(image_sizes):
        raise ValueError(f"got {len(targets)} targets for {len(image_sizes)} images; give one target dict per image")
    for i, (target, (height, width)) in enumerate(zip(targets, image_sizes, strict=True)):
        missing = {"boxes", "labels"} - set(target)
        if missing:
            raise ValueError(f"targets[{i}] lacks {sorted(missing)}; a target is {{'boxes': (N, 4), 'labels': (N,)}}")
        boxes, labels = target["boxes"], target["labels"]
        if not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be a float (N, 4) tensor; got {boxes.dtype} "
                             f"{tuple(boxes.shape)}")  # fmt: skip
        if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]['labels'] must be an int64 ({len(boxes)},) tensor, one label per box; "
                             f"got {labels.dtype} {tuple(labels.shape)}")  # fmt: skip
        x1, y1, x2, y2 = boxes.unbind(1)
        bad = ~(torch.isfinite(boxes).all(1) & (x1 >= 0) & (y1 >= 0) & (x1 < x2) & (y1 < y2) & (x2 <= width)
                & (y2 <= height))  # fmt: skip
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(
                f"targets[{i}] box {j} is {[round(v, 4) for v in boxes[j].tolist()]}; boxes are (x1, y1, x2, y2) "
                f"pixels with 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height} (the image is {height}x{width})"
            )
        out = (labels < 0) | (labels >= num_classes)
        if out.any():
            j = int(out.nonzero()[0])
            raise ValueError(f"targets[{i}] label {j} is {int(labels[j])}; accepted labels: 0 to {num_classes - 1} "
                             f"(num_classes={num_classes})")  # fmt: skip
