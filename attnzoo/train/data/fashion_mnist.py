"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (gz idx files), torchvision as the fallback.

    images, labels = load_fashion_mnist("train")   # uint8 (60000, 28, 28), int64 (60000,)
    images, labels = load_fashion_mnist("test")    # uint8 (10000, 28, 28), int64 (10000,)

Lookup order when ``root`` is None: the Debian directory, then torchvision's copy in
``~/.cache/attnzoo`` (downloaded there if the network allows). With an explicit ``root`` only the idx
files in that directory are read. Missing data is an error, never replaced by fake data.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["CACHE_ROOT", "DEBIAN_ROOT", "FASHION_MNIST_CLASSES", "IdxFormatError", "load_fashion_mnist"]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CACHE_ROOT = Path("~/.cache/attnzoo").expanduser()

# split -> (images file, labels file, number of examples); names as in the Debian package and upstream.
_SPLITS: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IMAGE_SHAPE = (28, 28)
_UBYTE = 0x08  # idx type code for unsigned bytes, the only type Fashion-MNIST uses


class IdxFormatError(ValueError):
    """An idx file that is truncated, corrupt or not the expected kind of array."""


def _read_bytes(path: Path) -> bytes:
    # Accept both the gzipped files (Debian, upstream) and unpacked ones (torchvision's raw/ folder).
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; EOFError = truncated stream
        if isinstance(exc, FileNotFoundError):
            raise
        raise IdxFormatError(f"cannot read idx file {path}: {exc}") from exc


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte idx file (optionally gzipped) into a writable uint8 array.

    The header is ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian uint32 sizes, then the data.
    ``ndim`` is the expected rank (3 for images, 1 for labels); any mismatch raises ``IdxFormatError``.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IdxFormatError(f"idx file {path} is {len(raw)} bytes long, too short for the 4-byte magic")
    zero0, zero1, dtype_code, file_ndim = struct.unpack(">BBBB", raw[:4])
    expected_magic = (_UBYTE << 8) | ndim
    magic = struct.unpack(">I", raw[:4])[0]
    if zero0 or zero1 or dtype_code != _UBYTE or file_ndim != ndim:
        raise IdxFormatError(
            f"idx file {path} has magic number {magic:#010x}, expected {expected_magic:#010x} "
            f"(unsigned bytes, {ndim} dimension(s)); the file is corrupt or not this kind of idx file"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxFormatError(f"idx file {path} is truncated inside its header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected_len = header_len + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_len:
        raise IdxFormatError(
            f"idx file {path} has {len(raw)} bytes, expected {expected_len} for shape {shape}; "
            "the file is truncated or has trailing data"
        )
    # bytearray -> writable buffer, so torch.from_numpy does not warn about read-only memory.
    return np.frombuffer(bytearray(raw[header_len:]), dtype=np.uint8).reshape(shape)


def _find(root: Path, name: str) -> Path:
    # Prefer the gzipped file; fall back to an unpacked copy of the same name without ".gz".
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {name} (or its unpacked form) not found in {root}")


def _load_idx_pair(root: Path, split: str) -> tuple[Tensor, Tensor]:
    images_name, labels_name, count = _SPLITS[split]
    images = read_idx(_find(root, images_name), ndim=3)
    labels = read_idx(_find(root, labels_name), ndim=1)
    for what, arr, shape in (("images", images, (count, *_IMAGE_SHAPE)), ("labels", labels, (count,))):
        if arr.shape != shape:
            raise IdxFormatError(f"Fashion-MNIST {split} {what} in {root} have shape {arr.shape}, expected {shape}")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise IdxFormatError(f"Fashion-MNIST {split} labels in {root} contain {labels.max()}, expected 0..9")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _load_torchvision(split: str) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import FashionMNIST  # lazy: torchvision is only needed for this fallback

    ds = FashionMNIST(str(CACHE_ROOT), train=split == "train", download=True)
    return ds.data.to(torch.uint8), ds.targets.to(torch.int64)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Load one Fashion-MNIST split.

    Args:
        split: ``"train"`` (60000 examples) or ``"test"`` (10000 examples).
        root: directory holding the four idx files (gzipped or not); None = Debian's directory, then
            torchvision's download cache.

    Returns:
        images: uint8 tensor (N, 28, 28), pixel values 0..255;
        labels: int64 tensor (N,), class indices 0..9 into ``FASHION_MNIST_CLASSES``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; accepted values: {sorted(_SPLITS)}")
    if root is not None:
        return _load_idx_pair(Path(root), split)
    if all((DEBIAN_ROOT / name).is_file() for name in _SPLITS[split][:2]):
        return _load_idx_pair(DEBIAN_ROOT, split)
    try:
        return _load_torchvision(split)
    except Exception as exc:  # no network, no torchvision, bad download: report both ways to get the data
        raise FileNotFoundError(
            f"Fashion-MNIST ({split}) is not available: the Debian files are missing from {DEBIAN_ROOT} "
            f"and torchvision could not download it into {CACHE_ROOT} ({type(exc).__name__}: {exc}). "
            "Either install the Debian package as root (`apt-get install -y dataset-fashion-mnist`) "
            "or allow network access so torchvision can download it."
        ) from exc
