"""Every recipe in configs/ is a smoke test: fit (fast_dev_run), validate and predict run on CPU with it (on a
tiny stand-in backbone where the recipe's zoo model is not registered yet)."""

from pathlib import Path

import pytest
import timm
import yaml

import attnzoo.zoo  # noqa: F401  (registers the zoo)
from attnzoo.train.data import load_fashion_mnist
from attnzoo.train.data.image_files import write_image_file
from tests.train.helpers import CONFIGS, HAS_FMNIST, NEEDS_FMNIST_REASON, cli  # registers the stand-ins

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
# Tiny test backbones (tests/train/helpers.py) for recipes whose zoo model is not registered yet.
STAND_INS = {"CharLanguageModel": "test_tiny_char_lm", "SeriesClassifier": "test_tiny_series_encoder"}


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_configs_exist():
    assert {p.parent.name for p in ALL_CONFIGS} >= {"fmnist", "text", "series"}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_fit_validate_predict(path, tmp_path):
    config = _config(path)
    model = config["model"]["init_args"]["model_name"]
    assert model.startswith("attnzoo_"), f"{path} trains {model}; shipped configs use zoo models"
    small = ["--data.init_args.batch_size", "4"]
    if not timm.is_model(model):  # the zoo's sequence backbones are still to come: run the recipe on a stand-in
        small += ["--model.init_args.model_name", STAND_INS[config["model"]["class_path"]]]
    data = config["data"]["class_path"]
    if data == "FashionMNISTDataModule":
        if not HAS_FMNIST:
            pytest.skip(NEEDS_FMNIST_REASON)
        images, _ = load_fashion_mnist("test")
        files = [str(tmp_path / f"{i}.png") for i in range(2)]
        for f, image in zip(files, images, strict=False):
            write_image_file(f, image[None])
        predict = ["--data.init_args.predict_files", str(files), "--predictions.attention_dir", str(tmp_path / "maps")]
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
