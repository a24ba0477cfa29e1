"""The composed detection data (design §3): Fashion-MNIST items pasted on a black canvas, the boxes being the tight
boxes of the pasted pixels. Synthetic and deterministic: canvas i of a split depends only on (seed, split, i).

Canvas i: draw 1 to ``max_objects`` items from the split's pool of (image, label); scale each item by a factor
drawn from ``scale_range`` (bilinear, antialiased), crop it to the box of its non-zero pixels and paste it at a
random place where it overlaps no earlier item's box (an item that finds none in 20 tries is left out; the first
always fits). Items never overlap, so every box is exactly the tight box of that item's non-zero pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ComposedDetection", "compose_canvas"]

_PLACEMENT_TRIES = 20


def _scaled_crop(item: Tensor, scale: float) -> Tensor | None:
    """uint8 (h, w) -> the item resized by ``scale`` and cropped to its non-zero pixels, uint8; None if blank."""
    size = [max(1, round(s * scale)) for s in item.shape]
    x = F.interpolate(item[None, None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    x = x[0, 0].round().clamp(0, 255).to(torch.uint8)
    rows, cols = x.any(1).nonzero()[:, 0], x.any(0).nonzero()[:, 0]
    if len(rows) == 0:
        return None
    return x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def compose_canvas(
    items: Tensor, labels: Tensor, rng: np.random.Generator, canvas_size: int, max_objects: int,
    scale_range: tuple[float, float],
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """One canvas (module docstring) from the pool ``items`` uint8 (P, h, w) with ``labels`` int64 (P,).

    Returns: canvas uint8 (1, canvas_size, canvas_size); target ``{"boxes": float (N, 4) (x1, y1, x2, y2) pixel
    edges, "labels": int64 (N,)}``, 1 <= N <= max_objects.
    """
    canvas = torch.zeros(canvas_size, canvas_size, dtype=torch.uint8)
    boxes, chosen = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        index = int(rng.integers(len(items)))
        crop = _scaled_crop(items[index], float(rng.uniform(*scale_range)))
        if crop is None:
            continue
        h, w = crop.shape
        for _ in range(_PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, [canvas_size - w + 1, canvas_size - h + 1]))
            if all(x >= b[2] or x + w <= b[0] or y >= b[3] or y + h <= b[1] for b in boxes):
                canvas[y : y + h, x : x + w] = crop
                boxes.append((x, y, x + w, y + h))
                chosen.append(int(labels[index]))
                break
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(chosen, dtype=torch.int64)}  # fmt: skip
    return canvas[None], target


class ComposedDetection(Dataset):
    """``count`` canvases from one pool: item i is ``compose_canvas`` with the generator seeded by (seed, stream, i).

    Args:
        items, labels: the pool, uint8 (P, h, w) and int64 (P,); the scaled items must fit the canvas.
        count: canvases in the split.
        seed, stream: the split's seed; ``stream`` tells the splits of one seed apart.
        canvas_size, max_objects, scale_range: as ``compose_canvas``.
    """

    def __init__(self, items: Tensor, labels: Tensor, count: int, seed: int, stream: int, canvas_size: int,
                 max_objects: int, scale_range: tuple[float, float]) -> None:  # fmt: skip
        self.items, self.labels, self.count = items, labels, count
        self.seed, self.stream = seed, stream
        self.canvas_size, self.max_objects, self.scale_range = canvas_size, max_objects, tuple(scale_range)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= i < self.count:
            raise IndexError(f"canvas {i} is out of range [0, {self.count})")
        rng = np.random.default_rng([self.seed, self.stream, i])
        return compose_canvas(self.items, self.labels, rng, self.canvas_size, self.max_objects, self.scale_range)
