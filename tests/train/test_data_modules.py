"""The DataModules: splits, normalization, augmentation, the (seed, epoch) sample order across processes, the
text corpora and the series sources, and their errors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnzoo.train.data import FashionMNISTDataModule, ImageFolderDataModule, SeriesDataModule, TextDataModule
from attnzoo.train.data import text as text_data
from attnzoo.train.data.image_files import read_image_file, write_image_file
from attnzoo.train.data.images import random_shift_flip
from attnzoo.train.data.series import composed_classes, composed_series
from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON

needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)


@needs_fmnist
def test_fashion_mnist_splits_and_normalization():
    dm = FashionMNISTDataModule(val_size=5000, batch_size=1000)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    images, labels = dm.train_set.tensors
    assert images.shape == (55000, 1, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    x = dm.normalize(images[:20000])
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # the published mean/std fit the data
    with pytest.raises(ValueError, match=r"val_size=60000 must be in \[1, 59999\]"):
        FashionMNISTDataModule(val_size=60000)


def _shift_flip_reference(x: torch.Tensor, flip, dy, dx, s: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    H, W = x.shape[-2:]
    for b in range(len(x)):
        img = x[b].flip(-1) if flip[b] else x[b]
        padded = torch.nn.functional.pad(img, (s, s, s, s))
        out[b] = padded[:, dy[b] : dy[b] + H, dx[b] : dx[b] + W]
    return out


def test_random_shift_flip_matches_per_image_reference():
    x = torch.rand(6, 3, 9, 7)
    torch.manual_seed(4)
    out = random_shift_flip(x, 2)
    torch.manual_seed(4)  # replay the draws: flips, then (dy, dx)
    flip = torch.rand(6) < 0.5
    dy, dx = torch.randint(0, 5, (2, 6, 1))
    torch.testing.assert_close(out, _shift_flip_reference(x, flip, dy[:, 0], dx[:, 0], 2), rtol=0, atol=0)
    assert flip.any() and not flip.all()  # both branches were exercised with this seed


def test_training_order_depends_on_seed_and_epoch_and_shards_across_processes(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    data = torch.utils.data.TensorDataset(torch.arange(40))
    dm = TextDataModule(batch_size=4)  # any ZooDataModule; only its loader logic is used here

    def batches(world, rank, batch_size, epoch):
        dm.batch_size, dm.trainer = batch_size, SimpleNamespace(world_size=world, global_rank=rank)
        loader = dm.train_loader(data)
        loader.sampler.set_epoch(epoch)
        return [b[0].tolist() for b in loader]

    one = batches(1, 0, 8, epoch=0)
    two = [batches(2, r, 4, epoch=0) for r in (0, 1)]
    assert len(one) == len(two[0]) == 5
    for step in range(5):  # the two processes together take the one-process batch
        assert sorted(two[0][step] + two[1][step]) == sorted(one[step])
    assert batches(1, 0, 8, epoch=0) == one and batches(1, 0, 8, epoch=1) != one
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")
    assert batches(1, 0, 8, epoch=0) != one
    with pytest.raises(ValueError, match=r"batch_size=64 x 1 process\(es\) is more than the 40 training samples"):
        batches(1, 0, 64, epoch=0)


def _image_folder(root, size=(6, 5), mode="RGB", classes=("cat", "dog"), n=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shape = (3, *size) if mode == "RGB" else (1, *size)
                write_image_file(root / split / c / f"{i}.png", torch.from_numpy(rng.integers(0, 256, shape, np.uint8)))


def test_image_folder(tmp_path):
    _image_folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), batch_size=2)
    info = dm.data_info
    images, labels = dm.load_split("train")
    assert info["class_names"] == ["cat", "dog"] and info["in_chans"] == 3 and info["img_size"] == [6, 5]
    assert images.shape == (6, 3, 6, 5) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    ref = images.double().div(255)
    np.testing.assert_allclose(info["mean"], ref.mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(info["std"], ref.std(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    assert torch.equal(read_image_file(tmp_path / "train" / "cat" / "0.png"), images[0])
    with pytest.raises(FileNotFoundError, match=r"no test/ folder in"):
        dm.load_split("test")


def test_image_folder_refuses_mixed_sizes_and_modes(tmp_path):
    _image_folder(tmp_path)
    write_image_file(tmp_path / "train" / "dog" / "odd.png", torch.zeros(3, 7, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"image file .*odd\.png is \(3, 7, 5\), the first image .* is \(3, 6, 5\)"):
        _ = ImageFolderDataModule(str(tmp_path)).data_info
    from PIL import Image

    Image.new("RGBA", (5, 6)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"odd\.png has mode 'RGBA'; accepted modes: \['L', 'RGB'\]"):
        _ = ImageFolderDataModule(str(tmp_path)).data_info
    with pytest.raises(FileNotFoundError, match=r"has no train/ folder"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))


def test_pydoc_corpus_and_chunks():
    dm = TextDataModule(corpus="pydoc", block_size=16, val_fraction=0.1, test_fraction=0.05)
    text = dm.text
    assert len(text) > 400_000 and dm.data_info == {"vocab": "".join(sorted(set(text))), "block_size": 16}
    parts = [dm.split_tokens(s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(text) and len(parts[1]) == int(len(text) * 0.1)
    vocab = dm.data_info["vocab"]
    assert "".join(vocab[i] for i in parts[2].tolist()) == text[-len(parts[2]) :]  # in order, at the end
    dm.setup("fit")
    x, y = dm.train_set[3]
    assert x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert torch.equal(torch.cat([dm.train_set[i][0] for i in range(3)]), parts[0][:48])


def test_user_text_files_and_errors(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("abc" * 50)
    (tmp_path / "b.txt").write_text("xyz" * 50)
    assert text_data.load_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == "abc" * 50 + "xyz" * 50
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"text file .*bad\.txt is not UTF-8"):
        text_data.load_corpus([str(tmp_path / "bad.txt")])
    with pytest.raises(ValueError, match=r"corpus='shakespeare'; accepted values: \['pydoc', 'jargon'\]"):
        text_data.load_corpus("shakespeare")
    monkeypatch.setattr(text_data, "JARGON_PATH", tmp_path / "absent.txt.gz")
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y jargon-text"):
        text_data.load_corpus("jargon")
    with pytest.raises(ValueError, match=r"the val split has 7 characters, fewer than block_size\+1=33"):
        TextDataModule(corpus=[str(tmp_path / "a.txt")], block_size=32).split_tokens("val")


@pytest.mark.skipif(not text_data.JARGON_PATH.is_file(), reason="Debian package jargon-text not installed")
def test_jargon_corpus():
    text = text_data.load_corpus("jargon")
    assert len(text) > 1_000_000 and "hacker" in text


def test_composed_series_are_seeded():
    np.testing.assert_array_equal(composed_series(3), composed_series(3))
    assert not np.array_equal(composed_series(3), composed_series(4))
    x, y = composed_classes(0)
    assert x.shape == (2000, 128) and set(y.tolist()) == {0, 1, 2, 3}


def test_forecasting_windows_and_normalization():
    dm = SeriesDataModule(task="forecasting", context_length=48, horizon=12, fractions=(0.6, 0.2, 0.2))
    info = dm.data_info
    assert info["in_chans"] == 3 and len(info["mean"]) == len(info["std"]) == 3
    raw = composed_series(0)
    np.testing.assert_allclose(info["mean"], raw[:3600].mean(0), rtol=1e-5)
    dm.setup("fit")
    x, y = dm.train_set[10]
    assert x.shape == (48, 3) and y.shape == (12, 3)
    expected = (raw[10:70] - np.array(info["mean"])) / np.array(info["std"])
    np.testing.assert_allclose(torch.cat([x, y]).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert len(dm.train_set) == 3600 - 60 + 1 and len(dm.val_set) == 1200 - 60 + 1
    dm.setup("predict")
    assert len(dm.predict_set) == 8


def test_series_csv_sources(tmp_path):
    csv = tmp_path / "load.csv"
    rows = ["time,load,temp"] + [f"t{i},{np.sin(i / 5):.4f},{i % 7}" for i in range(200)]
    csv.write_text("\n".join(rows))
    dm = SeriesDataModule(source=str(csv), columns=["load", "temp"], context_length=20, horizon=5)
    assert dm.data_info["channel_names"] == ["load", "temp"] and dm.data_info["in_chans"] == 2
    with pytest.raises(ValueError, match=r"load\.csv row 2 column time: 't0' is not a number"):
        _ = SeriesDataModule(source=str(csv), context_length=20, horizon=5).data_info
    with pytest.raises(ValueError, match=r"columns=\['wind'\] are not in .*load\.csv"):
        _ = SeriesDataModule(source=str(csv), columns=["wind"]).data_info
    ucr = tmp_path / "ucr.csv"
    ucr.write_text("\n".join(f"{'ab'[i % 2]},{i},{i + 1},{i + 2},{i + 3}" for i in range(40)))
    dm = SeriesDataModule(task="classification", source=str(ucr), batch_size=4)
    assert dm.data_info["class_names"] == ["a", "b"] and dm.data_info["length"] == 4
    dm.setup("fit")
    x, y = dm.train_set[0]
    assert x.shape == (4, 1) and y.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match=r"source='missing.csv' is neither 'composed' nor an existing CSV"):
        SeriesDataModule(source="missing.csv")
    with pytest.raises(ValueError, match=r"fractions=\(0.5, 0.5, 0.5\) must be three shares > 0 summing to 1"):
        SeriesDataModule(fractions=(0.5, 0.5, 0.5))
