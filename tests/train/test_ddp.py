"""Distributed: fit with strategy=ddp on 2 CPU processes (gloo) agrees with one process taking the same samples
per step (batch 8 per process vs 16), in weights and in the validation metrics synced over the processes."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON, QUIET, REPO, TINY_VIT, VIT_CONFIG, cli, rel_err

pytestmark = pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)

# Deterministic training (no augmentation or mixup: the per-batch reseed differs by process rank).
RUN = ["--config", str(VIT_CONFIG), *TINY_VIT, "--data.init_args.augment", "false", "--trainer.max_epochs", "1",
       "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "4"]  # fmt: skip


def _metrics(trainer_or_csv) -> dict[str, float]:
    return {k: float(v) for k, v in trainer_or_csv.items() if k.startswith("val_")}


def test_ddp_two_processes_match_one(tmp_path):
    single = cli("fit", tmp_path / "single", *RUN)
    # DDP re-launches this command line for rank 1, so it runs as its own program, not inside pytest.
    cmd = [sys.executable, "-m", "attnzoo", "fit", *RUN, *QUIET, "--data.init_args.batch_size", "8",
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.default_root_dir", str(tmp_path / "ddp")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (ckpt,) = (tmp_path / "ddp").rglob("last.ckpt")
    ddp = torch.load(ckpt, weights_only=True)
    assert ddp["global_step"] == single.trainer.global_step == 3

    ref = single.model.state_dict()
    for k, v in ddp["state_dict"].items():
        # The all-reduced gradient differs from the one-process one by rounding; Adam divides by its square
        # root, which keeps that relative difference in the update (1e-5 of near-zero biases seen).
        assert rel_err(v, ref[k]) <= 1e-4, k
    (metrics_csv,) = (tmp_path / "ddp").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val_loss")]
    ddp_metrics = {k: float(v) for k, v in rows[-1].items() if k.startswith("val_") and v}
    single_metrics = _metrics(single.trainer.callback_metrics)
    assert ddp_metrics.keys() == single_metrics.keys() >= {"val_loss", "val_acc", "val_acc5"}
    for k, v in single_metrics.items():
        assert abs(ddp_metrics[k] - v) <= 1e-5 * max(1.0, abs(v)), (k, ddp_metrics[k], v)
