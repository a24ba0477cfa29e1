"""Detection data: the composed Fashion-MNIST default (``composed_detection``) or a user's COCO-json data set.

Batches are ``(images, targets)``: images float (B, C, H, W), scaled to [0, 1] and normalized with the data's
mean/std after they reach the device (a list of B (C, H_i, W_i) when the images of a batch differ in size, which
COCO data may); targets, B dicts ``{"boxes": float (N, 4) (x1, y1, x2, y2) pixels, "labels": int64 (N,)}``.
Prediction batches are ``(images, names)``: from ``predict_files``, else the first ``predict_limit`` test images.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from attnzoo.train.data.base import ZooDataModule
from attnzoo.train.data.coco_json import CocoImages, read_coco
from attnzoo.train.data.composed_detection import ComposedDetection
from attnzoo.train.data.fashion_mnist import FASHION_MNIST_CLASSES
from attnzoo.train.data.image_files import normalize_images, read_image_file
from attnzoo.train.data.images import _load_fashion_mnist_once

__all__ = ["CocoDetectionDataModule", "CocoSplit", "DetectionDataModule", "FashionDetectionDataModule",
           "collate_detection"]  # fmt: skip

_ITEM_SIDE = 28  # Fashion-MNIST images are 28 x 28
_VAL_ITEMS = 5000  # the last training images: the validation canvases' pool (FashionMNISTDataModule's default)
_STATS_CANVASES = 256  # training canvases the composed data's mean / std are measured on


def collate_detection(batch: list[tuple[Tensor, Any]]) -> tuple[Tensor | list[Tensor], list]:
    """[(image (C, H, W), x), ...] -> (images (B, C, H, W), or a list of them when their sizes differ; [x, ...])."""
    images, rest = zip(*batch, strict=True)
    same_size = len({image.shape for image in images}) == 1
    return (torch.stack(images) if same_size else list(images)), list(rest)


class DetectionDataModule(ZooDataModule):
    """Base of the detection DataModules; a subclass implements ``data_info`` and ``load_split``.

    Args:
        batch_size: images per batch (per process).
        num_workers: DataLoader worker processes.
        predict_files: image files for ``predict`` (8-bit grayscale or RGB with the data's channels; any size the
            detector takes).
        predict_limit: without ``predict_files``, ``predict`` runs on this many test images.
    """

    predict_collate = staticmethod(collate_detection)

    def __init__(self, batch_size: int = 32, num_workers: int = 0, predict_files: list[str] | None = None,
                 predict_limit: int = 8) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers)
        if predict_limit < 1:
            raise ValueError(f"predict_limit={predict_limit} must be >= 1")
        self.predict_files, self.predict_limit = predict_files, predict_limit

    def load_split(self, split: str) -> Dataset:
        """``split`` in {"train", "val", "test"} -> items (image uint8 (C, H, W), target dict)."""
        raise NotImplementedError

    def make_dataset(self, split: str) -> Dataset | list[tuple[Tensor, str]]:
        return self._predict_images() if split == "predict" else self.load_split(split)

    def _predict_images(self) -> list[tuple[Tensor, str]]:
        if not self.predict_files:
            test = self.load_split("test")
            return [(test[i][0], f"test_{i}") for i in range(min(self.predict_limit, len(test)))]
        chans = self.data_info["in_chans"]
        items = []
        for path in self.predict_files:
            image = read_image_file(path)
            if image.shape[0] != chans:
                raise ValueError(f"image file {path} has {image.shape[0]} channel(s), the data has {chans}")
            items.append((image, Path(path).name))
        return items

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        # ZooDataModule.train_loader builds the sampler and order; only the batching of targets differs here
        # (collate_fn may be set on a DataLoader after construction; Lightning keeps a DistributedSampler's loader).
        loader.collate_fn = collate_detection
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, collate_fn=collate_detection)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set, collate_fn=collate_detection)

    def on_after_batch_transfer(self, batch: tuple, dataloader_idx: int) -> tuple:
        images, other = batch
        mean, std = self.data_info["mean"], self.data_info["std"]
        if isinstance(images, Tensor):
            return normalize_images(images, mean, std), other
        return [normalize_images(image, mean, std) for image in images], other


class FashionDetectionDataModule(DetectionDataModule):
    """The composed Fashion-MNIST detection data (``composed_detection``; 1 channel, 10 classes): canvases of
    ``canvas_size`` pixels with 1 to ``max_objects`` items scaled by ``scale_range``.

    Pools: ``train`` canvases take the first 55000 Fashion-MNIST training images, ``val`` the last 5000, ``test``
    the 10000 test images. The normalization mean/std are measured on the first 256 training canvases.
    Missing Fashion-MNIST data is an error saying how to get it (``load_fashion_mnist``).

    Args:
        root: directory with the four Fashion-MNIST idx files instead of the default lookup.
        canvas_size: canvas side in pixels (e.g. 112: a multiple of 14 and 28, for halo and mini models).
        max_objects: most items per canvas (>= 1).
        scale_range: (low, high) item scale factors, 0 < low <= high, 28 * high <= canvas_size.
        train_size, val_size, test_size: canvases per split.
        seed: seed of the composition (independent of the run's seed).
        **kwargs: ``DetectionDataModule`` arguments.
    """

    def __init__(self, root: str | None = None, canvas_size: int = 112, max_objects: int = 4,
                 scale_range: tuple[float, float] = (0.75, 2.0), train_size: int = 20000, val_size: int = 1000,
                 test_size: int = 1000, seed: int = 0, **kwargs) -> None:  # fmt: skip
        super().__init__(**kwargs)
        low, high = scale_range
        if not (0 < low <= high and _ITEM_SIDE * high <= canvas_size):
            raise ValueError(f"scale_range={tuple(scale_range)} must satisfy 0 < low <= high and {_ITEM_SIDE} x high "
                             f"<= canvas_size={canvas_size} (items must fit the canvas)")  # fmt: skip
        if max_objects < 1:
            raise ValueError(f"max_objects={max_objects} must be >= 1")
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if size < 1:
                raise ValueError(f"{name}={size} must be >= 1")
        self.root, self.seed = root, seed
        self.canvas = {"canvas_size": canvas_size, "max_objects": max_objects, "scale_range": (low, high)}
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    @cached_property
    def data_info(self) -> dict:
        train = self.load_split("train")
        pixels = torch.stack([train[i][0] for i in range(min(_STATS_CANVASES, len(train)))]).double() / 255
        side = self.canvas["canvas_size"]
        return {"class_names": list(FASHION_MNIST_CLASSES), "in_chans": 1, "img_size": [side, side],
                "mean": [round(pixels.mean().item(), 4)], "std": [round(pixels.std().item(), 4)]}  # fmt: skip

    def load_split(self, split: str) -> ComposedDetection:
        images, labels = _load_fashion_mnist_once("test" if split == "test" else "train", self.root)
        if split != "test":
            cut = len(images) - _VAL_ITEMS
            images, labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
        stream = ("train", "val", "test").index(split)
        return ComposedDetection(images, labels, self.sizes[split], self.seed, stream, **self.canvas)


class CocoSplit(TypedDict):
    """One split of COCO-layout data: the images folder and its instances json file."""

    images: str
    annotations: str


class CocoDetectionDataModule(DetectionDataModule):
    """A user's detection data in COCO's layout (``coco_json``): a folder of 8-bit grayscale or RGB images and an
    instances json per split. Images keep their sizes (nothing is resized); all must have the channels of the
    first training image, and ``val`` / ``test`` the categories of ``train``.

    Args:
        train, val: ``{"images": folder, "annotations": json file}`` of the training and validation splits.
        test: the same for ``test`` (and ``predict`` without ``predict_files``); optional.
        mean, std: per-channel normalization; None = measured on the training images (all of them are read).
        **kwargs: ``DetectionDataModule`` arguments.
    """

    def __init__(self, train: CocoSplit, val: CocoSplit, test: CocoSplit | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if (mean is None) != (std is None):
            raise ValueError(f"mean={mean} and std={std}: give both or neither")
        self.splits = {"train": train, "val": val, "test": test}
        self.mean, self.std = mean, std

    @cached_property
    def _train(self) -> tuple[list, list[str]]:
        return read_coco(self.splits["train"]["images"], self.splits["train"]["annotations"])

    @cached_property
    def data_info(self) -> dict:
        records, classes = self._train
        if not records:
            raise ValueError(f"the training annotations {self.splits['train']['annotations']} list no images")
        in_chans = read_image_file(records[0].path).shape[0]
        mean, std = self.mean, self.std
        if mean is None:
            images = CocoImages(records, in_chans)
            pixels = torch.cat([images[i][0].flatten(1) for i in range(len(images))], dim=1).double() / 255
            mean, std = pixels.mean(1).tolist(), pixels.std(1).tolist()
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean={mean} and std={std} need one value per channel ({in_chans})")
        return {"class_names": classes, "in_chans": in_chans, "mean": list(mean), "std": list(std)}

    def load_split(self, split: str) -> CocoImages:
        split_files = self.splits[split]
        if split_files is None:
            raise ValueError(f"no {split} split: set data.init_args.{split} (images folder and annotations file)")
        if split == "train":
            records, classes = self._train
        else:
            records, classes = read_coco(split_files["images"], split_files["annotations"])
        if classes != self.data_info["class_names"]:
            raise ValueError(f"{split_files['annotations']} has categories {classes}, the training data "
                             f"{self.data_info['class_names']}")  # fmt: skip
        return CocoImages(records, self.data_info["in_chans"])
