"""Fashion-MNIST loader: real Debian data (sizes, dtypes, labels) and the idx parser's error paths."""

import gzip
import struct

import numpy as np
import pytest
import torch

from attnzoo.train.data import FASHION_MNIST_CLASSES, IdxFormatError, load_fashion_mnist
from attnzoo.train.data import fashion_mnist as fm

_DEBIAN_FILES = [fm.DEBIAN_ROOT / name for split in ("train", "test") for name in fm._SPLITS[split][:2]]
needs_debian = pytest.mark.skipif(
    not all(p.is_file() for p in _DEBIAN_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed (no idx files in {fm.DEBIAN_ROOT}); "
    "install it as root with `apt-get install -y dataset-fashion-mnist`",
)


def _write_idx(path, arr: np.ndarray, magic: int | None = None, trailing: bytes = b"") -> None:
    magic = (0x08 << 8) | arr.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes() + trailing)


@needs_debian
@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_real_split(split, count):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() <= 9
    assert torch.bincount(labels, minlength=10).gt(0).all(), "every class must be present"
    assert images.float().std() > 10  # real pictures, not a blank or constant array


def test_class_names():
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[0] == "T-shirt/top"


def test_bad_split():
    with pytest.raises(ValueError, match=r"split='val'.*\['test', 'train'\]"):
        load_fashion_mnist("val")


def _fake_split(root, n=3, image_magic=None, label_trailing=b""):
    rng = np.random.default_rng(0)
    _write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), magic=image_magic)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), trailing=label_trailing)


def test_parser_reads_wellformed_file(tmp_path):
    arr = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    _write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "x.gz", ndim=3), arr)


def test_bad_magic(tmp_path):
    _fake_split(tmp_path, image_magic=0x00000D03)  # type code 0x0D (float) instead of 0x08 (ubyte)
    with pytest.raises(IdxFormatError, match=r"magic number 0x00000d03, expected 0x00000803"):
        load_fashion_mnist("test", root=tmp_path)


def test_trailing_bytes(tmp_path):
    _fake_split(tmp_path, label_trailing=b"\x00\x01")
    with pytest.raises(IdxFormatError, match=r"has 13 bytes, expected 11"):
        load_fashion_mnist("test", root=tmp_path)


def test_wrong_count(tmp_path):
    _fake_split(tmp_path, n=3)  # well-formed idx files, but the test split must hold 10000 examples
    with pytest.raises(IdxFormatError, match=r"shape \(3, 28, 28\), expected \(10000, 28, 28\)"):
        load_fashion_mnist("test", root=tmp_path)


def test_not_gzip(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a gzip stream")
    with pytest.raises(IdxFormatError, match="cannot read idx file"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_in_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_everywhere_names_both_ways(tmp_path, monkeypatch):
    def no_network(split):
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz")

    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "absent")
    monkeypatch.setattr(fm, "_load_torchvision", no_network)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_fashion_mnist("test")
    assert "network" in str(info.value) and "torchvision" in str(info.value)
