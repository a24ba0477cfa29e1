"""The ``predict`` output: a callback that prints each task's predictions and, for images, can save the last
attention block's map over each input, or the detected boxes, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["PredictionPrinter"]


class PredictionPrinter(Callback):
    """Prints what ``predict_step`` returns, one line per input (rank 0 only).

    - class probabilities (``probs`` (B, K)): the ``top_k`` classes with their probabilities;
    - generated text (``texts``): the prompt and its continuation;
    - forecasts (``forecast`` (B, horizon, C)): the forecast values per channel;
    - detections (``detections``: per input ``{"boxes", "labels", "scores"}``): the ``top_k`` best-scoring ones,
      each as its class, score and box (x1, y1, x2, y2) in pixels.

    Args:
        top_k: classes (at most the number of classes), or detections, listed per input.
        attention_dir: if set, image predictions also write ``<attention_dir>/<input name>.attention.png``:
            the input with the attention its last attention block gives each position overlaid.
        boxes_dir: if set, detections also write ``<boxes_dir>/<input name>.boxes.png``: the input with the listed
            boxes and their labels drawn.
    """

    def __init__(self, top_k: int = 5, attention_dir: str | None = None, boxes_dir: str | None = None) -> None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        self.top_k = top_k
        self.attention_dir = Path(attention_dir) if attention_dir else None
        self.boxes_dir = Path(boxes_dir) if boxes_dir else None
        self.lines: list[str] = []  # everything printed, for callers that run predict in-process

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.lines = []
        self._count = 0  # inputs seen so far, to number unnamed ones

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        lines = []
        if "probs" in outputs:
            lines = self._classes(pl_module, outputs)
            if self.attention_dir is not None and "names" in outputs:
                self._save_attention(pl_module, batch[0], outputs["names"])
        elif "texts" in outputs:
            lines = [f"{p!r} -> {t!r}" for p, t in zip(outputs["prompts"], outputs["texts"], strict=True)]
        elif "detections" in outputs:
            lines = self._detections(pl_module, batch[0], outputs)
        elif "forecast" in outputs:
            for forecast in outputs["forecast"]:
                lines.append(" | ".join(" ".join(f"{v:.4g}" for v in ch) for ch in forecast.T.tolist()))
        if trainer.is_global_zero:
            for line in lines:
                print(line)
        self.lines.extend(lines)

    def _classes(self, pl_module: LightningModule, outputs: dict) -> list[str]:
        probs = outputs["probs"]
        names = outputs.get("names") or [f"#{self._count + i}" for i in range(len(probs))]
        self._count += len(probs)
        classes = pl_module.data_info["class_names"]
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        return [
            f"{name}: " + ", ".join(f"{classes[j]} {p:.3f}" for p, j in zip(ps.tolist(), js.tolist(), strict=True))
            for name, ps, js in zip(names, top.values, top.indices, strict=True)
        ]

    def _detections(self, pl_module: LightningModule, images: Any, outputs: dict) -> list[str]:
        classes = pl_module.data_info["class_names"]
        lines = []
        for image, name, found in zip(images, outputs["names"], outputs["detections"], strict=True):
            best = {k: v[found["scores"].argsort(descending=True)[: self.top_k]] for k, v in found.items()}
            listed = [f"{classes[j]} {s:.3f} [{', '.join(f'{v:.1f}' for v in box)}]" for j, s, box in
                      zip(best["labels"].tolist(), best["scores"].tolist(), best["boxes"].tolist(), strict=True)]
            lines.append(f"{name}: " + ("; ".join(listed) or "no detections"))
            if self.boxes_dir is not None:
                from attnzoo.train.detection_overlay import save_detections

                self.boxes_dir.mkdir(parents=True, exist_ok=True)
                info = pl_module.data_info
                save_detections(self.boxes_dir / f"{name}.boxes.png", image, best, classes, info["mean"], info["std"])
        return lines

    def _save_attention(self, pl_module: LightningModule, images: Any, names: list[str]) -> None:
        from attnzoo.train.attention_maps import last_attention_map, save_overlay

        self.attention_dir.mkdir(parents=True, exist_ok=True)
        maps = last_attention_map(pl_module.model, images)
        info = pl_module.data_info
        for image, amap, name in zip(images, maps, names, strict=True):
            save_overlay(self.attention_dir / f"{name}.attention.png", image, amap, info["mean"], info["std"])
