"""A DETR-style detector on a zoo backbone, built from the zoo's own attention blocks.

DETR (Carion et al., "End-to-End Object Detection with Transformers", arXiv:2005.12872): learned object queries
read the image through cross attention and each predicts one box or "no object"; training matches predictions
to targets one-to-one (``matcher``) and needs no anchors and no NMS. Here the backbone (itself attention) replaces
DETR's transformer encoder: its last feature map, projected to ``dim`` channels plus a 2-D sin-cos position
embedding, is the memory the decoder attends to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import Tensor, nn
from torchvision.ops import box_convert, clip_boxes_to_image

from attnzoo.blocks import CrossAttention, MultiHeadSelfAttention
from attnzoo.blocks.mlp import Mlp
from attnzoo.kernels.validate import check_int
from attnzoo.zoo.detection.set_loss import SetCriterion
from attnzoo.zoo.detection.transform import DetectionTransform

__all__ = ["DETR", "DecoderLayer"]


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: the queries attend to each other (``MultiHeadSelfAttention``), then to the memory
    (``CrossAttention``), then an MLP; each with a residual connection.

    Shapes: ``forward(x, memory, key_padding_mask)``: x (B, Q, C), memory (B, M, C), key_padding_mask (B, M) bool
    (True = padding) or None -> (B, Q, C).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, memory: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), memory, key_padding_mask)
        return x + self.mlp(self.norm3(x))


class DETR(nn.Module):
    """DETR-style set prediction with torchvision's detector interface.

    Args:
        body: a timm model created with ``features_only=True``; its last level is the memory (create it with
            ``out_indices=(i,)`` to compute only the level used).
        num_classes: K object classes (labels 0..K-1).
        dim: decoder width C.
        num_queries: Q learned object queries, the most objects an image may hold.
        depth: decoder layers.
        num_heads: attention heads; ``dim`` must be divisible by it (and by 4, for the position embedding).
        mlp_ratio: decoder MLP hidden width relative to ``dim``.
        aux_loss: apply the set loss after every decoder layer (shared heads), as DETR does, not only the last.
        class_weight, l1_weight, giou_weight, no_object_weight: ``SetCriterion`` weights.

    ``forward(images, targets=None)``: images, B tensors (C, H_i, W_i) or one (B, C, H, W) tensor, normalized;
    targets, B dicts ``{"boxes": (N_b, 4) float (x1, y1, x2, y2) pixels, "labels": (N_b,) int64}``. In training mode
    it returns the losses ``{"loss_ce", "loss_bbox", "loss_giou"}``; in eval mode, per image ``{"boxes": (Q, 4),
    "labels": (Q,), "scores": (Q,)}``, one detection per query (the most probable class other than "no object"),
    boxes in the image's pixels, sorted by score.
    """

    def __init__(
        self,
        body: nn.Module,
        num_classes: int,
        dim: int = 128,
        num_queries: int = 16,
        depth: int = 3,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        aux_loss: bool = True,
        class_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        no_object_weight: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_queries", num_queries), ("depth", depth)):
            check_int(name, value, 1)
        if dim % 4:
            raise ValueError(f"dim={dim} must be a multiple of 4 (the 2-D sin-cos position embedding)")
        self.body = body
        self.stride = int(body.feature_info.reduction()[-1])
        self.transform = DetectionTransform.for_backbone(body, [self.stride], num_classes)
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.input_proj = nn.Conv2d(body.feature_info.channels()[-1], dim, kernel_size=1)
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes + 1)  # + "no object"
        self.box_head = Mlp(dim, dim, 4)
        self.criterion = SetCriterion(num_classes, class_weight, l1_weight, giou_weight, no_object_weight)

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("DETR in training mode needs targets (it returns the losses); call .eval() to detect")
        batch, targets = self.transform(images, targets)
        if targets is not None:
            most = max((len(t["labels"]) for t in targets), default=0)
            if most > self.num_queries:
                raise ValueError(f"an image has {most} boxes, more than num_queries={self.num_queries}; create the "
                                 "detector with more queries")  # fmt: skip
        predictions = self.predict_sets(batch.tensors, batch.image_sizes)
        if self.training:
            return self.criterion(predictions if self.aux_loss else predictions[-1:],
                                  _normalized_targets(targets, batch.image_sizes))  # fmt: skip
        return _detections(*predictions[-1], batch.image_sizes)

    def predict_sets(self, images: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        """images: (B, C, H, W) padded, the image (h_i, w_i) at the top left of each -> per decoder layer
        (logits (B, Q, K + 1), boxes (B, Q, 4) normalized (cx, cy, w, h) relative to each image's own size)."""
        feature = self.input_proj(self.body(images)[-1])  # (B, C, h, w)
        B, C, h, w = feature.shape
        pos = build_sincos2d_pos_embed([h, w], C, device=feature.device, dtype=feature.dtype)  # (h·w, C)
        memory = feature.flatten(2).transpose(1, 2) + pos
        mask = _padding_mask(image_sizes, (h, w), self.stride, feature.device)
        x = self.query.expand(B, -1, -1)
        predictions = []
        for layer in self.layers:
            x = layer(x, memory, mask)
            y = self.norm(x)
            predictions.append((self.class_head(y), self.box_head(y).sigmoid()))
        return predictions


def _padding_mask(image_sizes: Sequence[tuple[int, int]], grid: tuple[int, int], stride: int,
                  device: torch.device) -> Tensor | None:  # fmt: skip
    """(B, h·w) bool, True on the cells that lie wholly in the batch padding; None when no cell does."""
    valid = torch.tensor([[math.ceil(s / stride) for s in size] for size in image_sizes], device=device)  # (B, 2)
    rows = torch.arange(grid[0], device=device)[None, :, None] >= valid[:, 0, None, None]
    cols = torch.arange(grid[1], device=device)[None, None, :] >= valid[:, 1, None, None]
    mask = (rows | cols).flatten(1)
    return mask if mask.any() else None


def _scale(size: tuple[int, int], like: Tensor) -> Tensor:
    """(W, H, W, H) of an image size (H, W), for boxes in pixels <-> normalized."""
    return torch.tensor([size[1], size[0], size[1], size[0]], dtype=like.dtype, device=like.device)


def _normalized_targets(targets: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
    """Pixel (x1, y1, x2, y2) boxes -> (cx, cy, w, h) relative to the image size."""
    return [{"labels": t["labels"], "boxes": box_convert(t["boxes"] / _scale(size, t["boxes"]), "xyxy", "cxcywh")}
            for t, size in zip(targets, image_sizes, strict=True)]  # fmt: skip


def _detections(logits: Tensor, boxes: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Per image, each query's best object class, its probability and its box in pixels, sorted by score."""
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    out = []
    for s, lab, bx, size in zip(scores, labels, boxes, image_sizes, strict=True):
        pixels = clip_boxes_to_image(box_convert(bx, "cxcywh", "xyxy") * _scale(size, bx), size)
        order = s.argsort(descending=True)
        out.append({"boxes": pixels[order], "labels": lab[order], "scores": s[order]})
    return out
