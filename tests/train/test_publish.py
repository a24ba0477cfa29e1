"""attnzoo.train.publish: a recipe's run becomes fp16 safetensors + a model card that timm loads."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from attnzoo.train.publish import publish
from attnzoo.train.tasks import DetectionTask
from attnzoo.zoo.detection import create_detector
from attnzoo.zoo.pretrained import CARD_KEYS, sha256_of
from attnzoo.zoo.weight_files import load_weights
from tests.train import helpers as h
from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON, QUIET, TINY_VIT, VIT_CONFIG

pytestmark = pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)
FAST = ["--trainer.fast_dev_run=true", "--data.init_args.batch_size", "8", *QUIET]


def test_publish_writes_a_checkpoint_timm_loads(tmp_path):
    card = publish(VIT_CONFIG, "unit", tmp_path / "run", FAST, weights_dir=tmp_path / "weights")
    weights = tmp_path / "weights" / "attnzoo_vit_mini.unit.safetensors"
    written = json.loads((tmp_path / "weights" / "attnzoo_vit_mini.unit.json").read_text())
    assert written == card and set(CARD_KEYS) <= set(card)
    assert card["sha256"] == sha256_of(weights)
    assert {"val_acc", "test_acc"} <= set(card["metrics"]) and 0.0 <= card["metrics"]["test_acc"] <= 1.0
    assert card["pretrained_cfg"]["input_size"] == [1, 28, 28] and card["pretrained_cfg"]["num_classes"] == 10

    model = timm.create_model("attnzoo_vit_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    x = torch.randn(3, 1, 28, 28)
    again = timm.create_model("attnzoo_vit_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))
    # the weights are float16-exact: what the card's metrics were measured with
    assert all(torch.equal(p, p.half().float()) for p in model.parameters())


def test_publish_refuses_an_architecture_timm_cannot_rebuild(tmp_path):
    with pytest.raises(ValueError, match="change the architecture of attnzoo_vit_mini"):
        publish(VIT_CONFIG, "unit", tmp_path / "run", [*FAST, *TINY_VIT], weights_dir=tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


def test_publish_ships_a_whole_detector_and_resumes_a_finished_run(tmp_path):
    args = [*h.TINY_DETECTION_DATA, "--model.init_args.model_kwargs", f"{{out_indices: [1, 2], {h.TINY_NAT}}}",
            "--model.init_args.detector_kwargs", "{fpn_channels: 32, extra_blocks: pool}", "--trainer.max_epochs", "1",
            *QUIET]  # fmt: skip
    card = publish(h.FCOS_CONFIG, "unit", tmp_path / "run", args, weights_dir=tmp_path / "weights")
    weights = tmp_path / "weights" / "attnzoo_fcos_nat_mini.unit.safetensors"
    assert card["name"] == "attnzoo_fcos_nat_mini.unit" and card["sha256"] == sha256_of(weights)
    assert {"val_map_50", "test_map", "test_map_50"} <= set(card["metrics"])
    assert not [k for k in card["metrics"] if "_loss" in k]
    build = card["detector"]
    assert (build["arch"], build["model_name"], build["num_classes"]) == ("fcos", "attnzoo_nat_mini", 10)
    assert build["backbone_kwargs"]["in_chans"] == 1 and build["backbone_kwargs"]["out_indices"] == [1, 2]

    # the card rebuilds the detector, and the file loads into it exactly as into the task
    rebuilt = create_detector(build["arch"], build["model_name"], build["num_classes"],
                              backbone_kwargs=build["backbone_kwargs"], **build["detector_kwargs"]).eval()  # fmt: skip
    load_weights(rebuilt, weights)
    task = DetectionTask("attnzoo_nat_mini", data_info=card["data_info"], detector_weights=str(weights),
                         model_kwargs={k: v for k, v in build["backbone_kwargs"].items() if k != "in_chans"},
                         detector_kwargs=build["detector_kwargs"]).eval()  # fmt: skip
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        ours, again = rebuilt(x), task(x)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ours, again, strict=True) for k in a)

    # a finished run's checkpoint: nothing more is trained, the same weights ship
    (ckpt,) = (tmp_path / "run").rglob("last.ckpt")
    resumed = publish(h.FCOS_CONFIG, "unit", tmp_path / "run2", args, weights_dir=tmp_path / "again", resume=ckpt)
    assert resumed["sha256"] == card["sha256"] and resumed["metrics"] == card["metrics"]
    assert resumed["training"]["resumed_from"] == str(ckpt) and "seconds" not in resumed["training"]
    assert resumed["training"]["steps"] == card["training"]["steps"] == 2
