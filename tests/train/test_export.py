"""Export round trip: attnzoo export -> timm.create_model(pretrained=True) gives the trained module's logits;
the exported config carries the data description; the attention picture is written."""

import json

import timm
import torch

from attnzoo.train.cli import run
from attnzoo.train.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from attnzoo.train.data.image_files import write_image_file
from attnzoo.train.export import load_task
from tests.train.helpers import CONFIGS, cli


def test_export_round_trip(tiny_run, tmp_path, capsys):
    ckpt, _ = tiny_run
    image = tmp_path / "shirt.png"
    write_image_file(image, load_fashion_mnist("test")[0][0][None])
    out = tmp_path / "exported"
    run(["export", "--ckpt_path", str(ckpt), "--output", str(out), "--tag", "fmnist", "--image", str(image)])
    assert f"local-dir:{out}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "attention.png").stat().st_size > 1000

    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == list(FASHION_MNIST_CLASSES)
    assert config["pretrained_cfg"]["tag"] == "fmnist" and config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert config["attnzoo"]["task"] == "ImageClassifier"

    task = load_task(ckpt)
    x = torch.randn(4, 1, 28, 28)
    for model in (
        timm.create_model(f"local-dir:{out}", pretrained=True),
        # the same weights through a registered name and a pretrained-cfg overlay
        timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                          pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": 10}),
    ):  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), task(x), rtol=0, atol=0)
    assert timm.create_model(f"local-dir:{out}", pretrained=True).pretrained_cfg["mean"] == [0.286]


def test_export_round_trip_of_a_language_model(tmp_path):
    fit = cli("fit", tmp_path, "--config", str(CONFIGS / "text" / "lm_char.yaml"), "--model.init_args.model_kwargs",
              "{depth: 1, embed_dim: 32, num_heads: 2}", "--data.init_args.batch_size", "4", "--trainer.max_epochs",
              "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1")  # fmt: skip
    out = tmp_path / "exported"
    run(["export", "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path, "--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == fit.model.hparams.model_name == "attnzoo_lm_swa_tiny"
    assert config["attnzoo"]["data_info"]["vocab"] == fit.model.vocab  # the tokenizer travels with the weights
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    tokens = torch.randint(0, len(fit.model.vocab), (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), fit.model.eval()(tokens), rtol=0, atol=0)
