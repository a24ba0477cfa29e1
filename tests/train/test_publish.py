"""attnzoo.train.publish: a recipe's run becomes fp16 safetensors + a model card that timm loads."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from attnzoo.train.publish import publish
from attnzoo.zoo.pretrained import CARD_KEYS, sha256_of
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
