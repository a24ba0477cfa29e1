"""What every training task shares: the timm backbone, the data description it was built for, the optimizer
and schedule, the backbone's auxiliary losses, logging of losses and metrics."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from lightning.pytorch import LightningModule
from torch import Tensor

from attnzoo.blocks.moh import auxiliary_loss as moh_auxiliary_loss
from attnzoo.train.backbone import create_backbone
from attnzoo.train.optim import OptimizerSettings, build_optimization, check_optimizer_settings
from attnzoo.zoo.weight_files import load_weights

__all__ = ["TaskModule"]


class TaskModule(LightningModule):
    """Base of the tasks. A subclass sets ``DATA_KEYS``, implements ``backbone_kwargs`` and ``shared_step``.

    Args:
        model_name: timm model name (``attnzoo_*`` after the zoo registers), optionally with a pretrained
            tag, or ``local-dir:<export folder>``.
        data_info: the DataModule's ``data_info`` (classes, vocabulary, normalization, ...); the attnzoo CLI
            links it in. It is saved with the checkpoint, and a checkpoint only resumes on matching data.
        model_kwargs: more ``timm.create_model`` keyword arguments (``img_size``, ``drop_path_rate``, ...).
        pretrained: load the model's pretrained weights (its tag's, or the export folder's).
        weights: initialise the backbone from this file instead (see ``attnzoo.zoo.weight_files.read_state_dict``).
        optimizer: ``OptimizerSettings`` (timm optimizer name, lr, weight decay, schedule, warm-up).

    Randomness (dropout, mixup) is reseeded per training batch by the zoo's DataModules (``ZooDataModule``),
    so that a resumed run repeats an uninterrupted one exactly.
    """

    DATA_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model_name: str,
        data_info: dict | None = None,
        model_kwargs: dict | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        optimizer: OptimizerSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_info = self._check_data_info(data_info)
        self.optimizer_settings = check_optimizer_settings(optimizer)
        model_kwargs = dict(model_kwargs or {})
        derived = self.backbone_kwargs(self.data_info)
        clash = sorted(set(derived) & set(model_kwargs))
        if clash:
            raise ValueError(f"model_kwargs sets {clash}, which the task derives from the data ({derived})")
        self.model = create_backbone(model_name, pretrained=pretrained, **derived, **model_kwargs)
        if weights is not None:
            load_weights(self.model, weights)

    # --- to implement -------------------------------------------------------------------------------------
    def backbone_kwargs(self, data_info: dict) -> dict:
        """``timm.create_model`` arguments that follow from the data (classes, channels, vocabulary)."""
        raise NotImplementedError

    def shared_step(self, batch: Any, stage: str) -> Tensor:
        """Loss of ``batch`` for ``stage`` in {"train", "val", "test"}; logs ``{stage}_loss`` and metrics."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.shared_step(batch, "train")
        aux = self.auxiliary_loss()
        if aux is not None:  # e.g. mixture-of-heads load balance, already weighted by the model
            self.log("train_aux_loss", aux)
            loss = loss + aux
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def log_stage(self, stage: str, loss: Tensor, preds: Tensor | None = None, target: Tensor | None = None) -> None:
        """Log ``{stage}_loss``; for val/test also update and log ``{stage}_metrics`` with (preds, target)."""
        if stage != "train" and preds is not None:
            metrics = getattr(self, f"{stage}_metrics")
            metrics.update(preds, target)
            self.log_dict(metrics, prog_bar=stage == "val")
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=stage != "train")

    def auxiliary_loss(self) -> Tensor | None:
        """The backbone's auxiliary losses of its last forward: its own ``auxiliary_loss()`` where it defines one,
        else the sum of what its mixture-of-heads routers recorded (any timm model with MoH blocks)."""
        fn = getattr(self.model, "auxiliary_loss", None)
        return fn() if callable(fn) else moh_auxiliary_loss(self.model)

    def configure_optimizers(self) -> dict:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the run has no length: set trainer.max_epochs or trainer.max_steps for the schedule")
        return build_optimization(self.model, self.optimizer_settings, int(total))

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm scheduler, counted in optimizer steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("data_info")
        if saved is not None and saved != self.data_info:
            diff = sorted(k for k in set(saved) | set(self.data_info) if saved.get(k) != self.data_info.get(k))
            was, now = [saved.get(k) for k in diff], [self.data_info.get(k) for k in diff]
            raise ValueError(
                f"the checkpoint was trained on other data: data_info differs in {diff} "
                f"(checkpoint: {was!r:.300}, now: {now!r:.300})"
            )

    def _check_data_info(self, data_info: dict | None) -> dict:
        if data_info is None:
            raise ValueError(
                f"{type(self).__name__} needs data_info, the DataModule's `data_info` (the attnzoo CLI links it in)"
            )
        missing = [k for k in self.DATA_KEYS if k not in data_info]
        if missing:
            raise ValueError(f"data_info lacks {missing} for {type(self).__name__}; it has {sorted(data_info)}")
        return dict(data_info)
