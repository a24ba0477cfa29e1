"""Every recipe in configs/ is a smoke test: fit (fast_dev_run), validate and predict run on CPU with it."""

from pathlib import Path

import pytest
import timm
import yaml

import attnzoo.zoo  # noqa: F401  (registers the zoo)
from attnzoo.train.data import load_fashion_mnist
from attnzoo.train.data.image_files import write_image_file
from tests.train.helpers import CONFIGS, HAS_FMNIST, NEEDS_FMNIST_REASON, cli

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_configs_exist():
    assert {p.parent.name for p in ALL_CONFIGS} >= {"fmnist", "text", "series", "det"}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_fit_validate_predict(path, tmp_path):
    config = _config(path)
    model = config["model"]["init_args"]["model_name"]
    assert model.startswith("attnzoo_") and timm.is_model(model), f"{path} trains {model}, not a zoo model"
    small = ["--data.init_args.batch_size", "4"]
    data = config["data"]["class_path"]
    if data == "FashionMNISTDataModule":
        if not HAS_FMNIST:
            pytest.skip(NEEDS_FMNIST_REASON)
        images, _ = load_fashion_mnist("test")
        files = [str(tmp_path / f"{i}.png") for i in range(2)]
        for f, image in zip(files, images, strict=False):
            write_image_file(f, image[None])
        predict = ["--data.init_args.predict_files", str(files), "--predictions.attention_dir", str(tmp_path / "maps")]
    elif data == "FashionDetectionDataModule":  # composed from Fashion-MNIST; predicts on the first test canvases
        if not HAS_FMNIST:
            pytest.skip(NEEDS_FMNIST_REASON)
        predict = ["--data.init_args.predict_limit", "2", "--predictions.boxes_dir", str(tmp_path / "boxes")]
    elif data == "TextDataModule":
        predict = ["--model.init_args.predict_chars", "4", "--data.init_args.prompts", "['a', 'b']"]
    else:
        predict = ["--data.init_args.predict_limit", "2"]

    fit = cli("fit", tmp_path, "--config", str(path), *small, "--trainer.fast_dev_run=true")
    assert fit.trainer.global_step == 1 and "val_loss" in fit.trainer.callback_metrics
    val = cli("validate", tmp_path, "--config", str(path), *small, "--trainer.limit_val_batches", "2")
    assert val.trainer.callback_metrics["val_loss"].isfinite()
    pred = cli("predict", tmp_path, "--config", str(path), *small, *predict)
    printer = next(c for c in pred.trainer.callbacks if type(c).__name__ == "PredictionPrinter")
    assert len(printer.lines) == 2, printer.lines
    if data == "FashionMNISTDataModule":  # top-5 class names with probabilities, and one attention picture each
        assert printer.lines[0].startswith("0.png: ") and printer.lines[0].count(", ") == 4
        assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["0.png.attention.png", "1.png.attention.png"]
    if data == "FashionDetectionDataModule":  # one line and one picture of the boxes per canvas
        assert [line.split(": ")[0] for line in printer.lines] == ["test_0", "test_1"]
        assert sorted(p.name for p in (tmp_path / "boxes").iterdir()) == ["test_0.boxes.png", "test_1.boxes.png"]
