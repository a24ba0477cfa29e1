"""Object detection on a zoo backbone: torchvision's FCOS / RetinaNet / Faster R-CNN or the zoo's DETR
(``attnzoo.zoo.detection``), COCO-style mean average precision (torchmetrics) on val/test."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from attnzoo.train.tasks.base import TaskModule
from attnzoo.zoo.detection import DETECTORS, build_detector, evaluation_losses
from attnzoo.zoo.detection.shipped import detector_weights_file
from attnzoo.zoo.weight_files import load_weights

__all__ = ["DetectionTask"]


def _mean_average_precision() -> MeanAveragePrecision:
    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")


class DetectionTask(TaskModule):
    """Detect objects with ``build_detector(detector, body, K, **detector_kwargs)`` on the backbone
    ``body = timm.create_model(model_name, features_only=True, in_chans=C, **model_kwargs)`` (``model_kwargs``'
    ``out_indices`` picks its levels).

    Batches: ``(images, targets)`` from the detection DataModules: images normalized float (B, C, H, W) (or a list
    of (C, H_i, W_i)), targets B dicts ``{"boxes": float (N, 4) (x1, y1, x2, y2) pixels, "labels": int64 (N,)}``.
    ``data_info`` needs ``class_names`` (K names) and ``in_chans``. Logs ``{stage}_loss`` (the sum of the
    detector's loss terms, for val/test computed with the layers in eval mode) and each term as
    ``{stage}_loss_<term>`` (torchvision's ``loss_`` prefix dropped); for val/test also the COCO metrics of
    torchmetrics' ``MeanAveragePrecision`` at the end of the epoch: ``{stage}_map``, ``_map_50``, ``_map_75``,
    ``_map_small`` / ``_medium`` / ``_large``, ``_mar_1`` / ``_10`` / ``_100`` and ``_mar_small`` / ``_medium`` /
    ``_large`` (-1 where the data has no such box).
    In eval mode ``self(images)`` returns per image ``{"boxes": (D, 4), "labels": (D,), "scores": (D,)}``;
    ``predict_step`` takes ``(images, names)`` and returns per image the detections scoring at least
    ``predict_score_thresh``.

    Args:
        detector: one of ``attnzoo.zoo.detection.DETECTORS`` ("fcos", "retinanet", "faster_rcnn", "detr").
        detector_kwargs: more ``build_detector`` arguments (``fpn_channels``, ``extra_blocks``, ``score_thresh``,
            ``num_queries``, ...).
        predict_score_thresh: least score of a predicted detection, in [0, 1].
        detector_weights: the whole detector's weights, loaded after it is built: a shipped detector's name
            (``attnzoo.zoo.detection.shipped``, e.g. ``attnzoo_fcos_nat_mini.fmnist``) or a file
            (``attnzoo.zoo.weight_files.read_state_dict``: a DetectionTask's Lightning checkpoint, safetensors, ...).
        **kwargs: ``TaskModule`` arguments (``model_name``, ``data_info``, ``model_kwargs``, ``optimizer``, ...).
    """

    DATA_KEYS = ("class_names", "in_chans")

    def __init__(self, model_name: str, detector: str = "fcos", detector_kwargs: dict | None = None,
                 predict_score_thresh: float = 0.3, detector_weights: str | None = None, **kwargs) -> None:  # fmt: skip
        if detector not in DETECTORS:
            raise ValueError(f"detector={detector!r}; accepted values: {list(DETECTORS)}")
        if not 0.0 <= predict_score_thresh <= 1.0:
            raise ValueError(f"predict_score_thresh={predict_score_thresh} must be in [0, 1]")
        super().__init__(model_name, **kwargs)
        num_classes = len(self.data_info["class_names"])
        self.model = build_detector(detector, self.model, num_classes, **(detector_kwargs or {}))
        if detector_weights is not None:
            load_weights(self.model, detector_weights_file(detector_weights))
        self.predict_score_thresh = predict_score_thresh
        self.val_map, self.test_map = _mean_average_precision(), _mean_average_precision()

    def backbone_kwargs(self, data_info: dict) -> dict:
        return {"features_only": True, "in_chans": data_info["in_chans"]}

    def shared_step(self, batch: tuple, stage: str) -> Tensor:
        images, targets = batch
        if stage == "train":
            losses = self.model(images, targets)
        else:
            losses = evaluation_losses(self.model, images, targets)
            getattr(self, f"{stage}_map").update(self(images), targets)
        loss = sum(losses.values())
        n = len(images)
        terms = {f"{stage}_loss_{name.removeprefix('loss_')}": value for name, value in losses.items()}
        self.log_dict(terms, batch_size=n, sync_dist=stage != "train")
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=n, sync_dist=stage != "train")
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_map("test")

    def _log_map(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_map")
        results = metric.compute()  # synchronized over processes by the metric itself
        metric.reset()
        # "classes" and the per-class entries are not scalars (and -1 placeholders without class_metrics)
        self.log_dict({f"{stage}_{k}": v for k, v in results.items() if k != "classes" and "per_class" not in k},
                      sync_dist=True)  # fmt: skip

    def predict_step(self, batch: tuple, batch_idx: int) -> dict:
        images, names = batch
        detections = [{k: v[d["scores"] >= self.predict_score_thresh] for k, v in d.items()} for d in self(images)]
        return {"names": list(names), "detections": detections}
