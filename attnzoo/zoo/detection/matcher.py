"""DETR's Hungarian matching: the one-to-one assignment of predictions to target boxes with the least total cost."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["hungarian_match", "matching_cost"]


@torch.no_grad()
def matching_cost(
    logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, class_weight: float, l1_weight: float,
    giou_weight: float,
) -> Tensor:  # fmt: skip
    """The cost of assigning each prediction of one image to each target (DETR's matcher):
    ``class_weight * -p(target class) + l1_weight * L1(boxes) + giou_weight * -GIoU(boxes)``.

    logits: (Q, K + 1) class logits (the last class is "no object"); boxes: (Q, 4) normalized (cx, cy, w, h);
    labels: (N,) int64; target_boxes: (N, 4) normalized (cx, cy, w, h) -> cost (Q, N).
    """
    prob = logits.float().softmax(-1)[:, labels]
    l1 = torch.cdist(boxes.float(), target_boxes.float(), p=1)
    giou = generalized_box_iou(*(box_convert(b.float(), "cxcywh", "xyxy") for b in (boxes, target_boxes)))
    return -class_weight * prob + l1_weight * l1 - giou_weight * giou


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """cost: (Q, N) with Q >= N -> (prediction indices (N,), target indices (N,)), int64, sorted by prediction: the
    assignment of every target to its own prediction with the least total cost (``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment  # lazy: only DETR needs scipy

    if cost.shape[0] < cost.shape[1]:
        raise ValueError(f"cost is {tuple(cost.shape)}: {cost.shape[1]} targets need at least as many predictions")
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
