"""The ``predict`` output: a callback that prints each task's predictions and, for images, can save the last
attention block's map over each input as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["PredictionPrinter"]


class PredictionPrinter(Callback):
    """Prints what ``predict_step`` returns, one line per input (rank 0 only).

    - class probabilities (``probs`` (B, K)): the ``top_k`` classes with their probabilities;
    - generated text (``texts``): the prompt and its continuation;
    - forecasts (``forecast`` (B, horizon, C)): the forecast values per channel.

    Args:
        top_k: classes listed per input (at most the number of classes).
        attention_dir: if set, image predictions also write ``<attention_dir>/<input name>.attention.png``:
            the input with the attention its last attention block gives each position overlaid.
    """

    def __init__(self, top_k: int = 5, attention_dir: str | None = None) -> None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        self.top_k = top_k
        self.attention_dir = Path(attention_dir) if attention_dir else None
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

    def _save_attention(self, pl_module: LightningModule, images: Any, names: list[str]) -> None:
        from attnzoo.train.attention_maps import last_attention_map, save_overlay

        self.attention_dir.mkdir(parents=True, exist_ok=True)
        maps = last_attention_map(pl_module.model, images)
        info = pl_module.data_info
        for image, amap, name in zip(images, maps, names, strict=True):
            save_overlay(self.attention_dir / f"{name}.attention.png", image, amap, info["mean"], info["std"])
