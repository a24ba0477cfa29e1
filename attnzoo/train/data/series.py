"""Time-series data: a user's CSV file, or a composed default from a seeded formula (stated below).

Forecasting (``task="forecasting"``): one series with C channels, time along the rows. From a CSV: a header
row of column names, then one row per time step (``columns`` picks the channels; every value must be a
number). Windows of ``context_length`` steps predict the next ``horizon`` steps. The series is cut in time
into train / val / test (``fractions``), every window lies inside one part, and each channel is normalized
with the mean and std of the train part.

Classification (``task="classification"``): many single-channel series of one length. From a CSV in the UCR
archive's layout: no header, one series per row, its class label first. Series are split at random
(seeded) into train / val / test and normalized with the train mean and std.

Composed default (``source="composed"``; synthetic, deterministic from ``seed``; not a real data set):
- forecasting: 3 channels x 6000 steps; channel c is ``a_c sin(2πt/24 + φ_c) + b_c sin(2πt/168 + ψ_c)``
  plus a linear trend and AR(1) noise (ρ = 0.8, σ = 0.1), amplitudes and phases drawn from the seed;
- classification: 2000 series of 128 steps in 4 classes (sine, square, sawtooth, chirp wave) with random
  frequency (2-6 cycles), phase, amplitude (0.5-1.5) and Gaussian noise (σ = 0.3).
statsmodels' bundled series (co2, sunspots) are not read directly; write one to CSV
(``statsmodels.api.datasets.sunspots.load_pandas().data.to_csv(path, index=False)``) and pass the file.
"""

from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from attnzoo.train.data.base import ZooDataModule

__all__ = ["SeriesDataModule", "SeriesWindows", "composed_classes", "composed_series", "read_series_csv"]

_SPLITS = ("train", "val", "test")
COMPOSED_CLASSES = ("sine", "square", "sawtooth", "chirp")


def composed_series(seed: int, steps: int = 6000, channels: int = 3) -> np.ndarray:
    """The composed forecasting series (see the module docstring): float32 (steps, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None]
    a, b = rng.uniform(0.5, 1.5, (2, channels))
    phi, psi = rng.uniform(0, 2 * np.pi, (2, channels))
    slope = rng.uniform(-1, 1, channels)
    noise = np.zeros((steps, channels))
    eps = rng.normal(0, 0.1, (steps, channels))
    for i in range(1, steps):
        noise[i] = 0.8 * noise[i - 1] + eps[i]
    x = a * np.sin(2 * np.pi * t / 24 + phi) + b * np.sin(2 * np.pi * t / 168 + psi) + slope * t / steps + noise
    return x.astype(np.float32)


def composed_classes(seed: int, n: int = 2000, length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The composed classification set (see the module docstring): float32 (n, length), int64 labels (n,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(COMPOSED_CLASSES), n)
    u = np.arange(length) / length  # time in [0, 1)
    cycles = rng.uniform(2, 6, (n, 1))
    phase = rng.uniform(0, 1, (n, 1))
    ramp = (cycles * u + phase) % 1.0  # position within the current cycle
    waves = np.stack([
        np.sin(2 * np.pi * ramp),
        np.where(ramp < 0.5, 1.0, -1.0),
        2 * ramp - 1,
        np.sin(2 * np.pi * (cycles * u**2 + phase)),  # frequency rises over the series
    ])  # fmt: skip
    x = waves[labels, np.arange(n)] * rng.uniform(0.5, 1.5, (n, 1)) + rng.normal(0, 0.3, (n, length))
    return x.astype(np.float32), labels


def _number(path: Path, row: int, col: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path} row {row} column {col}: {text!r} is not a number") from None


def read_series_csv(path: str | Path, task: str, columns: list[str] | None = None) -> tuple[np.ndarray, list]:
    """Forecasting: (float32 (steps, C), the C column names). Classification: (float32 (n, length), the n labels
    as strings). See the module docstring for the layouts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"series file {path} does not exist")
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if task == "classification":
        lengths = {len(r) for r in rows}
        if len(lengths) != 1 or min(lengths) < 3:
            raise ValueError(f"{path}: every row must be 'label, x_0, ..., x_(T-1)', T >= 2; row lengths: {lengths}")
        values = [[_number(path, i + 1, str(j + 1), v) for j, v in enumerate(r[1:])] for i, r in enumerate(rows)]
        return np.asarray(values, dtype=np.float32), [r[0].strip() for r in rows]
    header, body = rows[0], rows[1:]
    columns = columns or header
    unknown = [c for c in columns if c not in header]
    if unknown:
        raise ValueError(f"columns={unknown} are not in {path}; its columns: {header}")
    idx = [header.index(c) for c in columns]
    values = [[_number(path, i + 2, header[j], r[j]) for j in idx] for i, r in enumerate(body)]
    return np.asarray(values, dtype=np.float32).reshape(len(body), len(idx)), columns


class SeriesWindows(Dataset):
    """Every window of a series x (steps, C): item i = (x[i : i + T], x[i + T : i + T + h])."""

    def __init__(self, x: Tensor, context_length: int, horizon: int) -> None:
        self.x, self.T, self.h = x, context_length, horizon

    def __len__(self) -> int:
        return max(0, len(self.x) - self.T - self.h + 1)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i : i + self.T], self.x[i + self.T : i + self.T + self.h]


class SeriesDataModule(ZooDataModule):
    """Time-series forecasting or classification (module docstring). Batches: ``(series float (B, T, C),
    target)`` with target float (B, horizon, C) or int64 labels (B,). ``predict`` runs on the first
    ``predict_limit`` test windows / series.

    Args:
        task: ``"forecasting"`` or ``"classification"``.
        source: ``"composed"`` or the path of a CSV file.
        columns: forecasting CSV columns to use (None = all).
        context_length: forecasting window length T.
        horizon: forecasting steps to predict.
        fractions: (train, val, test) shares, each > 0, summing to 1.
        seed: seed of the composed data and of the classification split.
        predict_limit: test windows / series ``predict`` uses.
        batch_size, num_workers: loader settings.
    """

    def __init__(
        self, task: str = "forecasting", source: str = "composed", columns: list[str] | None = None,
        context_length: int = 96, horizon: int = 24, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0, predict_limit: int = 8, batch_size: int = 64, num_workers: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers)
        if task not in ("forecasting", "classification"):
            raise ValueError(f"task={task!r}; accepted values: ['forecasting', 'classification']")
        if context_length < 1 or horizon < 1 or predict_limit < 1:
            raise ValueError(f"context_length={context_length}, horizon={horizon} and predict_limit={predict_limit} "
                             "must be >= 1")  # fmt: skip
        if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"fractions={fractions} must be three shares > 0 summing to 1 (train, val, test)")
        if source != "composed" and not Path(source).is_file():
            raise FileNotFoundError(f"source={source!r} is neither 'composed' nor an existing CSV file")
        self.task, self.source, self.columns, self.seed = task, source, columns, seed
        self.context_length, self.horizon, self.fractions = context_length, horizon, tuple(fractions)
        self.predict_limit = predict_limit

    @cached_property
    def _splits(self) -> tuple[dict[str, tuple[Tensor, ...]], dict]:
        """Normalized split tensors and the data_info."""
        if self.task == "forecasting":
            return self._forecasting_splits()
        return self._classification_splits()

    @property
    def data_info(self) -> dict:
        return self._splits[1]

    def _cuts(self, n: int) -> list[int]:
        train, val, _ = self.fractions
        return [0, int(n * train), int(n * (train + val)), n]

    def _forecasting_splits(self) -> tuple[dict, dict]:
        if self.source == "composed":
            x, names = composed_series(self.seed), [f"channel_{c}" for c in range(3)]
        else:
            x, names = read_series_csv(self.source, "forecasting", self.columns)
        cuts = self._cuts(len(x))
        mean, std = x[: cuts[1]].mean(0), x[: cuts[1]].std(0)
        x = torch.from_numpy((x - mean) / np.maximum(std, 1e-8))
        splits = {s: (x[cuts[i] : cuts[i + 1]],) for i, s in enumerate(_SPLITS)}
        info = {"task": "forecasting", "in_chans": x.shape[1], "length": self.context_length, "horizon": self.horizon,
                "channel_names": list(names), "mean": mean.tolist(), "std": std.tolist()}  # fmt: skip
        return splits, info

    def _classification_splits(self) -> tuple[dict, dict]:
        if self.source == "composed":
            x, labels = composed_classes(self.seed)
            classes = list(COMPOSED_CLASSES)
        else:
            x, names = read_series_csv(self.source, "classification")
            classes = sorted(set(names))
            labels = np.array([classes.index(n) for n in names])
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(x)))
        cuts = self._cuts(len(x))
        train = x[order[: cuts[1]].numpy()]
        mean, std = float(train.mean()), float(train.std())
        x = torch.from_numpy((x - mean) / max(std, 1e-8)).unsqueeze(-1)  # (n, length, 1)
        labels = torch.from_numpy(labels).long()
        splits = {s: (x[order[cuts[i] : cuts[i + 1]]], labels[order[cuts[i] : cuts[i + 1]]])
                  for i, s in enumerate(_SPLITS)}  # fmt: skip
        info = {"task": "classification", "in_chans": 1, "length": x.shape[1], "class_names": classes,
                "mean": [mean], "std": [std]}  # fmt: skip
        return splits, info

    def make_dataset(self, split: str) -> Dataset:
        part = self._splits[0]["test" if split == "predict" else split]
        if self.task == "forecasting":
            ds = SeriesWindows(part[0], self.context_length, self.horizon)
        else:
            ds = TensorDataset(*part)
        if len(ds) == 0:
            what = (f"one window of context_length + horizon = {self.context_length + self.horizon} steps"
                    if self.task == "forecasting" else "one series")  # fmt: skip
            raise ValueError(f"the {split} split is too small for {what}; use more data or other fractions")
        if split == "predict":
            ds = torch.utils.data.Subset(ds, range(min(self.predict_limit, len(ds))))
        return ds
