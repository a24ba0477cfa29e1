"""Time series: classify a whole series, or forecast the next ``horizon`` steps of every channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from attnzoo.train.tasks.base import TaskModule
from attnzoo.train.tasks.image import accuracy_metrics

__all__ = ["SERIES_TASKS", "SeriesClassifier"]

SERIES_TASKS = ("classification", "forecasting")


class SeriesClassifier(TaskModule):
    """A head over ``timm.create_model(model_name, in_chans=C, num_classes=N, **model_kwargs)``.

    The backbone maps series float (B, T, C) to (B, N). ``data_info["task"]`` picks the head:
    - ``"classification"``: N = number of ``class_names``; cross-entropy, logs ``{stage}_acc``
      (and ``{stage}_acc5`` with more than 5 classes). Batches ``(series, labels int64 (B,))``.
    - ``"forecasting"``: N = ``horizon`` x C, read as (B, horizon, C); mean squared error on the
      DataModule's normalized scale, logs ``{stage}_mse`` and ``{stage}_mae``. Batches
      ``(context (B, T, C), future (B, horizon, C))``.
    ``predict_step`` returns class probabilities (B, K), or forecasts (B, horizon, C) in the data's own
    units (``data_info`` ``mean``/``std`` undone).
    """

    DATA_KEYS = ("task", "in_chans")

    def __init__(self, model_name: str, **kwargs) -> None:
        super().__init__(model_name, **kwargs)
        self.task = self.data_info["task"]
        self.val_metrics, self.test_metrics = self._metrics("val_"), self._metrics("test_")

    def _metrics(self, prefix: str) -> MetricCollection:
        if self.task == "classification":
            return accuracy_metrics(len(self.data_info["class_names"]), prefix)
        return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}, prefix=prefix)

    def backbone_kwargs(self, data_info: dict) -> dict:
        task = data_info["task"]
        if task not in SERIES_TASKS:
            raise ValueError(f"data_info task={task!r}; accepted values: {list(SERIES_TASKS)}")
        needed = "class_names" if task == "classification" else "horizon"
        if needed not in data_info:
            raise ValueError(f"data_info for {task} needs {needed!r}; it has {sorted(data_info)}")
        n = len(data_info["class_names"]) if task == "classification" else data_info["horizon"] * data_info["in_chans"]
        return {"in_chans": data_info["in_chans"], "num_classes": n}

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if self.task == "forecasting":
            return out.view(x.shape[0], self.data_info["horizon"], self.data_info["in_chans"])
        return out

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, target = batch
        pred = self(x)
        if self.task == "classification":
            loss = F.cross_entropy(pred, target)
        else:
            loss = F.mse_loss(pred, target)
            pred, target = pred.flatten(), target.flatten()
        self.log_stage(stage, loss, pred, target)
        return loss

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict:
        x, _ = batch
        out = self(x)
        if self.task == "classification":
            return {"probs": out.softmax(dim=-1)}
        mean, std = (torch.tensor(self.data_info[k], dtype=out.dtype, device=out.device) for k in ("mean", "std"))
        return {"forecast": out * std + mean}
