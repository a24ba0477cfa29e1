"""Resume: a run stopped after its first epoch and resumed from that checkpoint with --ckpt_path ends with the
same weights as the uninterrupted run, with augmentation, mixup and drop-path on (per-batch reseeding)."""

import pytest
import torch

from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON, short_fit

pytestmark = pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)

STOCHASTIC = ["--model.init_args.mixup_alpha", "0.4", "--model.init_args.model_kwargs",
              "{embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: 0.2}"]  # fmt: skip


def test_resume_matches_uninterrupted_run(tmp_path):
    # The uninterrupted run checkpoints after each epoch; its epoch-0 checkpoint is the "interrupted" state.
    full = short_fit(tmp_path / "full", *STOCHASTIC, epochs=2)
    ckpts = sorted((tmp_path / "full").rglob("epoch=0-*.ckpt"))
    assert len(ckpts) == 1, ckpts
    resumed = short_fit(tmp_path / "resumed", *STOCHASTIC, "--ckpt_path", str(ckpts[0]), epochs=2)
    assert resumed.trainer.global_step == full.trainer.global_step == 6
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # ... and the resumed run did train: its weights moved away from the checkpoint it started from.
    start = torch.load(ckpts[0], weights_only=True)["state_dict"]
    assert any(not torch.equal(start[k], b[k]) for k in a if k.startswith("model."))
