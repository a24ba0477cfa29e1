"""Image classification with a timm backbone: cross-entropy (label smoothing, mixup/cutmix optional),
top-1/top-5 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from attnzoo.train.tasks.base import TaskModule

__all__ = ["ImageClassifier", "accuracy_metrics"]


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """``{prefix}acc`` (top-1) and, with more than 5 classes, ``{prefix}acc5`` (top-5); micro-averaged."""
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class ImageClassifier(TaskModule):
    """Classify images with ``timm.create_model(model_name, num_classes=K, in_chans=C, **model_kwargs)``.

    Batches: ``(images, labels)`` with images float (B, C, H, W), normalized by the DataModule, labels int64
    (B,). ``data_info`` needs ``class_names`` (K names) and ``in_chans``. Logs ``{stage}_loss``,
    ``{stage}_acc`` and ``{stage}_acc5``. ``predict_step`` takes ``(images, names)`` and returns the class
    probabilities (B, K) with the names.

    Args:
        label_smoothing: cross-entropy label smoothing in [0, 1).
        mixup_alpha, cutmix_alpha: timm ``Mixup`` strengths for training batches (0 = off; batches must
            have an even size, which the DataModules' training loaders guarantee by dropping the last one).
        **kwargs: ``TaskModule`` arguments (``model_name``, ``data_info``, ``model_kwargs``, ``optimizer``, ...).
    """

    DATA_KEYS = ("class_names", "in_chans")

    def __init__(
        self, model_name: str, label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
        **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(model_name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0")
        num_classes = len(self.data_info["class_names"])
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha, cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes)
        self.val_metrics = accuracy_metrics(num_classes, "val_")
        self.test_metrics = accuracy_metrics(num_classes, "test_")

    def backbone_kwargs(self, data_info: dict) -> dict:
        return {"num_classes": len(data_info["class_names"]), "in_chans": data_info["in_chans"]}

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        if stage == "train" and self.mixup is not None:
            images, soft = self.mixup(images, labels)  # soft targets (B, K), smoothing included
            loss = torch.sum(-soft * F.log_softmax(self(images), dim=-1), dim=-1).mean()
            self.log_stage(stage, loss)
            return loss
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        self.log_stage(stage, loss, logits, labels)
        return loss

    def predict_step(self, batch: tuple[Tensor, list[str]], batch_idx: int) -> dict:
        images, names = batch
        return {"names": list(names), "probs": self(images).softmax(dim=-1)}
