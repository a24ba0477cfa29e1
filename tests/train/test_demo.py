"""The demo job end to end at toy size: real data, a few steps, accuracy reported in [0, 1]."""

import importlib.util
import re

import pytest
import torch

from attnzoo.train import demo
from attnzoo.train.data import fashion_mnist as fm

pytestmark = pytest.mark.skipif(
    not (fm.DEBIAN_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist not installed (no idx files in {fm.DEBIAN_ROOT})",
)


def test_demo_main_runs(capsys):
    result = demo.main(["--steps", "5", "--eval-limit", "512", "--no-triton-check", "--device", "cpu"])
    assert result["steps"] == 5 and result["test_images"] == 512
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["train_loss"] > 0
    out = capsys.readouterr().out
    match = re.search(r"test accuracy\s+([\d.]+)% on 512 ", out)
    assert match and 0.0 <= float(match.group(1)) <= 100.0, out


def test_demo_is_deterministic():
    args = ["--steps", "2", "--eval-limit", "256", "--no-triton-check", "--device", "cpu", "--seed", "3"]
    a, b = demo.main(args), demo.main(args)
    assert a["train_loss"] == b["train_loss"] and a["test_accuracy"] == b["test_accuracy"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_check_subprocess():
    # The interpreter path the demo takes on a CPU-only machine (on CUDA it runs in-process).
    torch.manual_seed(0)
    model = demo.TinyViT().eval()
    images, _ = fm.load_fashion_mnist("test")
    check = demo.check_triton(model, images[:2])
    assert len(check["rel_errs"]) == len(model.blocks)
    assert max(check["rel_errs"]) <= 1e-5, check


def test_bad_steps_flag():
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
