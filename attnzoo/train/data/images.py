"""Image classification data: Fashion-MNIST (the embedded default) or a user ImageFolder directory.

Images stay uint8 (N, C, H, W) in memory; each batch is scaled to [0, 1], augmented when training (if
asked) and normalized with the data's mean/std after it reaches the device. Training batches are
``(images, labels)``; prediction batches are ``(images, file names)`` from ``predict_files``.
"""

from __future__ import annotations

import functools
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from attnzoo.train.data.base import ZooDataModule
from attnzoo.train.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from attnzoo.train.data.image_files import check_image, normalize_images, read_image_file

__all__ = ["FashionMNISTDataModule", "ImageDataModule", "ImageFolderDataModule", "random_shift_flip"]

# Fashion-MNIST pixel mean/std over the training images, pixels scaled to [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
_MAX_SHIFT = 2  # pixels of random translation when augmenting


def random_shift_flip(x: Tensor, max_shift: int) -> Tensor:
    """Per image: mirror left-right with probability 1/2, translate by up to ``max_shift`` pixels on each axis
    (vacated pixels 0, i.e. black). x: (B, C, H, W), any dtype -> same; uses the global torch RNG."""
    B, C, H, W = x.shape
    flip = torch.rand(B, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B, 1), device=x.device)
    rows = (dy + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None, None]
    chans = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


class ImageDataModule(ZooDataModule):
    """Base of the image DataModules; a subclass implements ``load_split`` and ``data_info``.

    Args:
        batch_size: images per batch (per process).
        num_workers: DataLoader worker processes.
        augment: random left-right flips and shifts of up to 2 pixels for training batches.
        predict_files: image files for ``predict``; each must have the data's channels and size.
    """

    def __init__(self, batch_size: int = 128, num_workers: int = 0, augment: bool = False,
                 predict_files: list[str] | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers)
        self.augment = augment
        self.predict_files = predict_files

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        """``split`` in {"train", "val", "test"} -> images uint8 (N, C, H, W), labels int64 (N,)."""
        raise NotImplementedError

    def make_dataset(self, split: str) -> TensorDataset | list[tuple[Tensor, str]]:
        return self._predict_images() if split == "predict" else TensorDataset(*self.load_split(split))

    def _predict_images(self) -> list[tuple[Tensor, str]]:
        if not self.predict_files:
            raise ValueError("predict needs image files: set data.init_args.predict_files (a list of paths)")
        info = self.data_info
        items = []
        for path in self.predict_files:
            image = read_image_file(path)
            check_image(path, image, info["in_chans"], info["img_size"])
            items.append((image, Path(path).name))
        return items

    def on_after_batch_transfer(self, batch: tuple, dataloader_idx: int) -> tuple:
        images, other = batch
        training = self.trainer is not None and self.trainer.training
        return self.normalize(images, augment=self.augment and training), other

    def normalize(self, images: Tensor, augment: bool = False) -> Tensor:
        """uint8 (B, C, H, W) -> float (B, C, H, W): optionally augmented, then normalized with the data's
        mean/std (``normalize_images``)."""
        if augment:
            images = random_shift_flip(images, _MAX_SHIFT)
        return normalize_images(images, self.data_info["mean"], self.data_info["std"])


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (1 x 28 x 28, 10 classes) via ``load_fashion_mnist``: the Debian package
    ``dataset-fashion-mnist``, else torchvision's download; missing data is an error saying how to get it.

    Splits: ``train`` = the first 60000 - ``val_size`` training images, ``val`` = the last ``val_size``,
    ``test`` = the 10000 test images.

    Args:
        root: directory with the four idx files instead of the default lookup.
        val_size: training images held out for validation, in [1, 59999].
        **kwargs: ``ImageDataModule`` arguments (batch_size, num_workers, augment, predict_files).
    """

    def __init__(self, root: str | None = None, val_size: int = 5000, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 1 <= val_size < 60000:
            raise ValueError(f"val_size={val_size} must be in [1, 59999] (Fashion-MNIST has 60000 training images)")
        self.root = root
        self.val_size = val_size

    @property
    def data_info(self) -> dict:
        return {"class_names": list(FASHION_MNIST_CLASSES), "in_chans": 1, "img_size": [28, 28],
                "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD)}  # fmt: skip

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "test":
            images, labels = _load_fashion_mnist_once("test", self.root)
        else:
            images, labels = _load_fashion_mnist_once("train", self.root)
            cut = len(images) - self.val_size
            images, labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
        return images.unsqueeze(1), labels


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist_once(split: str, root: str | None) -> tuple[Tensor, Tensor]:
    # Several DataModules in one process (fit then test, the demo, the tests) parse the idx files once.
    return load_fashion_mnist(split, root)


class ImageFolderDataModule(ImageDataModule):
    """A user's images in torchvision's ImageFolder layout: ``root/{train,val,test}/<class name>/<image>``.

    Every image must be 8-bit grayscale or RGB and all of one size and mode (nothing is resized or
    converted); ``val`` and ``test`` must hold the same class folders as ``train``. The normalization
    mean/std are measured per channel on ``train``.

    Args:
        root: the directory holding ``train/``, ``val/`` and (for ``test``) ``test/``.
        **kwargs: ``ImageDataModule`` arguments.
    """

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(f"root={root!r} has no train/ folder (expected root/train/<class>/<image>)")

    @cached_property
    def _train(self) -> tuple[Tensor, Tensor, list[str]]:
        return self._read_folder("train")

    @cached_property
    def data_info(self) -> dict:
        images, _, classes = self._train
        x = images.double() / 255
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
        return {"class_names": classes, "in_chans": images.shape[1], "img_size": list(images.shape[2:]),
                "mean": mean.tolist(), "std": std.tolist()}  # fmt: skip

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "train":
            return self._train[:2]
        images, labels, classes = self._read_folder(split)
        info = self.data_info
        if classes != info["class_names"]:
            raise ValueError(f"{self.root / split} has classes {classes}, train/ has {info['class_names']}")
        if tuple(images.shape[1:]) != (info["in_chans"], *info["img_size"]):
            raise ValueError(f"{self.root / split} holds {tuple(images.shape[1:])} images, train/ holds "
                             f"{(info['in_chans'], *info['img_size'])}")  # fmt: skip
        return images, labels

    def _read_folder(self, split: str) -> tuple[Tensor, Tensor, list[str]]:
        from torchvision.datasets import ImageFolder

        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"no {split}/ folder in {self.root} (expected {folder}/<class>/<image>)")
        ds = ImageFolder(str(folder), loader=read_image_file)
        images, labels = [], []
        for (path, label), (image, _) in zip(ds.samples, ds, strict=True):
            if images and image.shape != images[0].shape:
                raise ValueError(f"image file {path} is {tuple(image.shape)}, the first image in {folder} is "
                                 f"{tuple(images[0].shape)} (channels, height, width); all must match")  # fmt: skip
            images.append(image)
            labels.append(label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(ds.classes)
