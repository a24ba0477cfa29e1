"""The demo job end to end at toy size: real data, a few steps, export, timm reload, pictures, summary."""

import json

import pytest
import torch

from attnzoo.train import demo
from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON

pytestmark = pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)


def test_demo_main_runs(tmp_path, capsys):
    limits = [f"--trainer.limit_{stage}_batches=2" for stage in ("train", "val", "test")]
    args = ["--out", str(tmp_path), "--no-triton-check", "--trainer.max_epochs", "1", *limits,
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    summary = demo.main(args)
    assert summary["steps"] == 2 and summary["test_images"] == 256 and 0.0 <= summary["test_acc"] <= 1.0
    assert summary["roundtrip_max_abs_diff"] == 0.0  # the timm-loaded export gives the trained model's logits
    assert len(summary["predictions"]) == demo.NUM_IMAGES
    for name in ("curves.png", "export/attention.png", "export/model.safetensors", "final.ckpt"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_triton_check_of_an_export(tiny_run, tmp_path):
    # The interpreter subprocess the demo runs on a CPU-only machine (on CUDA it runs in-process).
    from attnzoo.train.export import export_checkpoint

    ckpt, _ = tiny_run
    export = export_checkpoint(ckpt, tmp_path / "export")
    check = demo.check_triton(export, torch.randn(2, 1, 28, 28))
    if check["rel_err"] is None:
        pytest.skip(check["mode"])
    assert check["rel_err"] <= 1e-5, check


def test_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--config", str(tmp_path / "absent.yaml")])
    assert "absent.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # options for the CLI are checked by its parser
        demo.main(["--out", str(tmp_path), "--trainer.max_epoch", "1"])
    assert "unrecognized arguments: --trainer.max_epoch" in capsys.readouterr().err
