"""DETR's set loss: match predictions to targets (``matcher``), then cross-entropy with a down-weighted
"no object" class, L1 and GIoU losses on the matched boxes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from attnzoo.zoo.detection.matcher import hungarian_match, matching_cost

__all__ = ["SetCriterion"]


class SetCriterion(nn.Module):
    """DETR's loss (Carion et al., arXiv:2005.12872), the same weights for the matching cost and the loss.

    Args:
        num_classes: K object classes; class K of the logits is "no object".
        class_weight: weight of the classification cost (the loss's cross-entropy has weight 1, as DETR).
        l1_weight, giou_weight: weights of the box L1 and GIoU terms (cost and loss).
        no_object_weight: cross-entropy weight of the "no object" class (DETR: 0.1).

    Shapes: ``forward(predictions, targets)``: predictions, one ``(logits (B, Q, K + 1), boxes (B, Q, 4))`` per
    decoder layer, boxes normalized (cx, cy, w, h); targets, B dicts ``{"labels": (N_b,), "boxes": (N_b, 4)}``
    normalized (cx, cy, w, h) -> ``{"loss_ce", "loss_bbox", "loss_giou"}``, weighted and summed over the layers;
    the box terms are averaged over the batch's target boxes.
    """

    def __init__(self, num_classes: int, class_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
                 no_object_weight: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        for name, value in (("class_weight", class_weight), ("l1_weight", l1_weight), ("giou_weight", giou_weight),
                            ("no_object_weight", no_object_weight)):  # fmt: skip
            if not value >= 0:
                raise ValueError(f"{name}={value} must be >= 0")
        self.num_classes = num_classes
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        weights = torch.ones(num_classes + 1)
        weights[-1] = no_object_weight
        self.register_buffer("ce_weights", weights, persistent=False)

    def forward(self, predictions: Sequence[tuple[Tensor, Tensor]], targets: Sequence[dict[str, Tensor]]) -> dict:
        losses = [self.layer_loss(logits, boxes, targets) for logits, boxes in predictions]
        return {k: sum(loss[k] for loss in losses) for k in losses[0]}

    def layer_loss(self, logits: Tensor, boxes: Tensor, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """One decoder layer's loss: logits (B, Q, K + 1), boxes (B, Q, 4) -> the three weighted terms."""
        batch_idx, pred_idx, labels, matched = [], [], [], []
        for b, (lg, bx, target) in enumerate(zip(logits, boxes, targets, strict=True)):
            cost = matching_cost(lg, bx, target["labels"], target["boxes"], self.class_weight, self.l1_weight,
                                 self.giou_weight)  # fmt: skip
            pred, tgt = (i.to(logits.device) for i in hungarian_match(cost))
            batch_idx.append(torch.full_like(pred, b))
            pred_idx.append(pred)
            labels.append(target["labels"][tgt])
            matched.append(target["boxes"][tgt].float())
        batch_idx, pred_idx, labels, matched = (torch.cat(x) for x in (batch_idx, pred_idx, labels, matched))
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, pred_idx] = labels  # unmatched queries: "no object"
        num_boxes = max(len(matched), 1)
        predicted = boxes[batch_idx, pred_idx].float()
        corners = [box_convert(b, "cxcywh", "xyxy") for b in (predicted, matched)]
        giou = generalized_box_iou_loss(*corners, reduction="sum")
        return {
            "loss_ce": F.cross_entropy(logits.float().transpose(1, 2), classes, weight=self.ce_weights),
            "loss_bbox": self.l1_weight * F.l1_loss(predicted, matched, reduction="sum") / num_boxes,
            "loss_giou": self.giou_weight * giou / num_boxes,
        }
