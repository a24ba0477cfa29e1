"""Fixtures of the training tests: one short tiny-ViT run whose checkpoint several tests read."""

from pathlib import Path

import pytest

from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON, short_fit


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, object]:
    """(checkpoint of 1 epoch x 3 steps of the tiny ViT on Fashion-MNIST, its LightningCLI)."""
    if not HAS_FMNIST:
        pytest.skip(NEEDS_FMNIST_REASON)
    root = tmp_path_factory.mktemp("tiny_run")
    cli = short_fit(root)
    return Path(cli.trainer.checkpoint_callback.last_model_path), cli
