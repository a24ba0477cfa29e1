"""Export round trip: attnzoo export -> timm.create_model(pretrained=True) gives the trained module's logits;
the exported config carries the data description; the attention picture is written."""

import json

import timm
import torch

from attnzoo.train.cli import run
from attnzoo.train.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from attnzoo.train.data.image_files import write_image_file
from attnzoo.train.export import load_task


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
