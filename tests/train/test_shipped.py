"""The checkpoints shipped in the package (attnzoo/zoo/weights): cards, files, timm loading (detectors: their own
loader), and each one's card metric reproduced on a fixed part of its test split through the attnzoo CLI (a loose
bound)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from attnzoo.train.cli import AttnzooCLI
from attnzoo.zoo.detection.shipped import load_detector, shipped_detectors
from attnzoo.zoo.pretrained import CARD_KEYS, card, default_cfgs_with_shipped, sha256_of, shipped_names, weights_path

SHIPPED = shipped_names()
DETECTORS = shipped_detectors()
BACKBONES = [n for n in SHIPPED if n not in DETECTORS]  # timm models with a pretrained tag
# (metric, bound): the subset's metric must be at least card + bound (accuracy, mAP) or at most card + bound (bpc).
LOOSE = {"test_acc": -0.05, "test_bpc": 0.25, "test_map_50": -0.05}
TEST_BATCHES = 8


def test_at_least_eight_checkpoints_cover_the_families():
    assert len(SHIPPED) >= 8, SHIPPED
    tasks = {card(n)["task"] for n in SHIPPED}
    assert {"ImageClassifier", "CharLanguageModel", "SeriesClassifier", "DetectionTask"} <= tasks


@pytest.mark.parametrize("name", SHIPPED)
def test_card_and_weights_file(name):
    c = card(name)
    assert set(CARD_KEYS) <= set(c), sorted(set(CARD_KEYS) - set(c))
    assert c["name"] == name
    assert c["sha256"] == sha256_of(weights_path(name)), "the weights file changed after its card was written"
    state = load_file(weights_path(name))
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert sum(v.numel() for v in state.values()) >= c["params"]  # parameters and buffers


@pytest.mark.parametrize("name", BACKBONES)
def test_timm_loads_it_offline(name):
    model_name, tag = name.split(".")
    model = timm.create_model(name, pretrained=True)
    assert model.pretrained_cfg["tag"] == tag
    state = load_file(weights_path(name))
    loaded = model.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in state.items())
    assert tag in [t.split(".", 1)[1] for t in timm.list_pretrained(f"{model_name}.*")]
    cfg = card(name)["pretrained_cfg"]
    if "num_classes" in cfg:
        assert model.num_classes == cfg["num_classes"]
        assert list(model.pretrained_cfg["label_names"]) == cfg["label_names"]
    # the default tag where the checkpoint keeps the model's default build (classes, input size)
    default = timm.create_model(model_name, device="meta")
    keeps_build = all(default.pretrained_cfg.get(k) == model.pretrained_cfg.get(k) for k in ("num_classes",
                                                                                            "input_size"))
    assert (default.pretrained_cfg["tag"] == tag) == keeps_build


def test_fashion_mnist_checkpoints_are_default_tags_and_others_keep_the_default_build():
    assert timm.create_model("attnzoo_nat_mini", pretrained=True).pretrained_cfg["tag"] == "fmnist"
    forecaster = timm.create_model("attnzoo_seqenc_tiny", horizon=4, device="meta")  # the 4-class card is no default
    assert forecaster.pretrained_cfg["tag"] == "untrained" and forecaster.num_classes == 0


@pytest.mark.parametrize("name", SHIPPED)
def test_card_metric_reproduced_on_a_test_subset(name, tmp_path):
    c = card(name)
    weights = (["--model.init_args.detector_weights", name] if name in DETECTORS else
               ["--model.init_args.model_name", name, "--model.init_args.pretrained", "true"])  # fmt: skip
    args = ["--config", c["recipe"], *weights, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--trainer.limit_test_batches", str(TEST_BATCHES), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = AttnzooCLI(args=args, run=False)
    (result,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    checked = [m for m in LOOSE if m in c["metrics"]]
    assert checked, c["metrics"]
    for metric in checked:
        bound = c["metrics"][metric] + LOOSE[metric]
        assert math.isfinite(result[metric])
        if LOOSE[metric] < 0:
            assert result[metric] >= bound, (metric, result[metric], c["metrics"][metric])
        else:
            assert result[metric] <= bound, (metric, result[metric], c["metrics"][metric])


def test_default_cfgs_with_shipped_files_tags_with_the_card_fields():
    name = "attnzoo_nat_mini.fmnist"
    fmnist = {"num_classes": 10, "input_size": (1, 28, 28), "pool_size": (7, 7), "notes": ("family note",)}
    table = default_cfgs_with_shipped({"attnzoo_nat_mini.untrained": fmnist, "other.x": {}})["attnzoo_nat_mini"]
    assert list(table.tags) == ["fmnist", "untrained"]  # same classes and input size: the default tag
    cfg = table.cfgs["fmnist"]
    assert cfg.pool_size == (7, 7) and cfg.notes[0] == "family note"  # the model's own cfg stays
    assert cfg.file == str(weights_path(name)) and "trained by attnzoo" in cfg.notes[1]
    imagenet = default_cfgs_with_shipped({"attnzoo_nat_mini.untrained": {**fmnist, "num_classes": 1000}})
    assert list(imagenet["attnzoo_nat_mini"].tags) == ["untrained", "fmnist"]  # another build: named explicitly
    assert "attnzoo_unknown" in default_cfgs_with_shipped({"attnzoo_unknown.untrained": {}})


def test_unknown_checkpoint_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=SHIPPED[0].replace(".", r"\.")):
        card("attnzoo_nat_mini.nonexistent")
    with pytest.raises(ValueError, match="name='nat_mini'"):
        card("nat_mini")


@pytest.mark.parametrize("name", DETECTORS)
def test_shipped_detector_loads_offline_from_its_card(name):
    detector = load_detector(name)
    assert not detector.training
    state = load_file(weights_path(name))
    loaded = detector.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in state.items())
    cfg = card(name)["pretrained_cfg"]
    assert detector.pretrained_cfg["label_names"] == cfg["label_names"]
    assert len(cfg["label_names"]) == cfg["num_classes"]
    x = torch.randn(2, *cfg["input_size"])
    with torch.no_grad():
        (first, _), (again, _) = detector(x), detector(x)
    assert first.keys() == {"boxes", "labels", "scores"} and all(torch.equal(first[k], again[k]) for k in first)
    assert ((first["labels"] >= 0) & (first["labels"] < cfg["num_classes"])).all()


def test_unknown_detector_names_the_shipped_ones():
    with pytest.raises(ValueError, match=r"name='attnzoo_nat_mini\.fmnist' is not a shipped detector; shipped: "):
        load_detector("attnzoo_nat_mini.fmnist")
