"""Optimizer and learning-rate schedule from a task's ``optimizer`` settings, built with timm.

``create_optimizer_v2`` groups the parameters the timm way: no weight decay for 1-d parameters (biases,
norms) and for the model's ``no_weight_decay()`` names, and with ``layer_decay`` per-layer learning rates
from its ``group_matcher()``. The schedule (``create_scheduler_v2``) runs per optimizer step over the whole
run: linear warm-up from ``lr / 100`` for ``warmup`` of the steps, then the named decay down to ``min_lr``.
"""

from __future__ import annotations

from typing import TypedDict

from torch import nn

__all__ = ["DEFAULT_OPTIMIZER", "SCHEDULERS", "OptimizerSettings", "build_optimization", "check_optimizer_settings"]


class OptimizerSettings(TypedDict, total=False):
    """``model.init_args.optimizer`` in a config; a key left out takes its ``DEFAULT_OPTIMIZER`` value."""

    name: str  # a timm optimizer name (``timm.optim.list_optimizers()``): adamw, sgd, lamb, ...
    lr: float  # peak learning rate
    weight_decay: float
    layer_decay: float | None  # per-layer lr factor (needs the model's group_matcher); None = off
    scheduler: str  # one of SCHEDULERS
    warmup: float  # fraction of the optimizer steps spent in linear warm-up, in [0, 1)
    min_lr: float  # learning rate at the end of the decay


DEFAULT_OPTIMIZER: OptimizerSettings = {
    "name": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "layer_decay": None,
    "scheduler": "cosine",
    "warmup": 0.05,
    "min_lr": 0.0,
}
# timm's per-step schedules (``plateau`` steps per epoch on a metric, so it is left out).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant", "none")


def check_optimizer_settings(settings: OptimizerSettings | None) -> OptimizerSettings:
    """Merge ``settings`` over the defaults and check every value; returns the merged settings."""
    from timm.optim import list_optimizers

    merged: OptimizerSettings = {**DEFAULT_OPTIMIZER, **(settings or {})}
    names = list_optimizers()
    if merged["name"] not in names:
        raise ValueError(f"optimizer.name={merged['name']!r} is not a timm optimizer; accepted values: {names}")
    if merged["scheduler"] not in SCHEDULERS:
        raise ValueError(f"optimizer.scheduler={merged['scheduler']!r}; accepted values: {list(SCHEDULERS)}")
    if not merged["lr"] > 0:
        raise ValueError(f"optimizer.lr={merged['lr']} must be > 0")
    if not 0.0 <= merged["warmup"] < 1.0:
        raise ValueError(f"optimizer.warmup={merged['warmup']} must be a fraction of the steps in [0, 1)")
    if merged["weight_decay"] < 0 or merged["min_lr"] < 0:
        raise ValueError(
            f"optimizer.weight_decay={merged['weight_decay']} and optimizer.min_lr={merged['min_lr']} must be >= 0"
        )
    if merged["layer_decay"] is not None and not 0.0 < merged["layer_decay"] <= 1.0:
        raise ValueError(f"optimizer.layer_decay={merged['layer_decay']} must be in (0, 1] or None")
    return merged


def build_optimization(model: nn.Module, settings: OptimizerSettings, total_steps: int) -> dict:
    """Optimizer (+ per-step scheduler) for ``model`` in the form ``LightningModule.configure_optimizers`` returns.

    ``settings`` are merged ones (``check_optimizer_settings``); ``total_steps`` is the run's optimizer steps.
    The scheduler is timm's, so the module steps it with ``step_update`` (``TaskModule.lr_scheduler_step``).
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(
        model,
        opt=settings["name"],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        layer_decay=settings["layer_decay"],
    )
    # One "epoch" per step: the schedule's length and warm-up are counted in optimizer steps.
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=settings["scheduler"],
        num_epochs=total_steps,
        warmup_epochs=settings["warmup"] * total_steps,
        warmup_lr=settings["lr"] / 100,
        min_lr=settings["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    if scheduler is None:
        return {"optimizer": optimizer}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
