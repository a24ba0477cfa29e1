"""The attnzoo command itself: subcommands, help, the zoo listing, precision. (``python -m attnzoo`` runs in
test_ddp.py.)"""

import pytest

from attnzoo.train.cli import run
from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON, TINY_VIT, VIT_CONFIG, cli


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "export", "models"):
        assert sub in out


def test_models_lists_the_zoo(capsys):
    run(["models", "--pattern", "attnzoo_nat*"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "params", "(M)"]
    names = [line.split()[0] for line in lines[1:]]
    assert "attnzoo_nat_mini" in names and all(n.startswith("attnzoo_nat") for n in names)


def test_export_help(capsys):
    with pytest.raises(SystemExit):
        run(["export", "--help"])
    out = capsys.readouterr().out
    assert "--ckpt_path" in out and "local-dir" in out


@pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)
def test_mixed_precision_fit(tmp_path):
    run_ = cli("fit", tmp_path, "--config", str(VIT_CONFIG), *TINY_VIT, "--trainer.fast_dev_run=true",
               "--trainer.precision", "bf16-mixed")  # fmt: skip
    assert run_.trainer.precision == "bf16-mixed" and run_.trainer.callback_metrics["train_loss"].isfinite()
