"""What the DataModules share: batch settings, the data description tasks are built from, and loaders
whose training order depends only on (seed, epoch) and is the same for one process or many."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ZooDataModule"]

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class ZooDataModule(LightningDataModule):
    """Base of the DataModules.

    Subclasses provide ``data_info`` (a JSON-able dict: classes, channels, vocabulary, normalization), which
    the attnzoo CLI passes to the task and which is saved with its checkpoints, and ``make_dataset(split)``
    for the splits "train", "val", "test" and "predict".

    Training batches: each epoch is a permutation drawn from (seed, epoch), the seed being the run's global
    seed (``seed_everything``, 0 without one). With P processes, process r takes every P-th sample from
    position r, so at step t the P processes together see the samples that one process with a P times larger
    batch sees at step t. A last incomplete batch is dropped (mixup needs even batches).

    With a global seed, each training batch reseeds Python, NumPy and torch from (seed, batch index, rank)
    before it reaches the device: augmentation (on_after_batch_transfer), mixup and dropout of batch t are
    then the same whether or not the run was interrupted and resumed from a checkpoint in between.
    """

    def __init__(self, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.batch_size = batch_size
        self.num_workers = num_workers

    predict_collate = None  # collate_fn of the predict loader (None = torch's default)

    @property
    def data_info(self) -> dict:
        raise NotImplementedError

    def make_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        for split in _STAGE_SPLITS[stage]:
            setattr(self, f"{split}_set", self.make_dataset(split))

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader(self.predict_set, collate_fn=self.predict_collate)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None and self.trainer is not None and self.trainer.training:
            step = self.trainer.fit_loop.epoch_loop.total_batch_idx + 1  # this batch, counted over the whole run
            step_seed = (int(seed) + (step + 1) * self.trainer.world_size + self.trainer.global_rank) % 2**32
            random.seed(step_seed)
            np.random.seed(step_seed)
            torch.manual_seed(step_seed)
        return batch

    def train_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if len(dataset) < self.batch_size * world:
            raise ValueError(
                f"batch_size={self.batch_size} x {world} process(es) is more than the {len(dataset)} training samples"
            )
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        # A DistributedSampler even in one process: Lightning leaves it in place (no re-sharding) and calls
        # its set_epoch, so the order is a function of (seed, epoch) alone and survives a resume.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def eval_loader(self, dataset: Dataset, collate_fn=None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_fn)
