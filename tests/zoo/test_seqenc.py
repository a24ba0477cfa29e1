"""attnzoo time-series encoders (``attnzoo_seqenc_*``): registration and meta-device construction, both heads for
every mixer (shapes, gradients, bidirectional mixing), the classifier against a float64 formula, the
mixture-of-heads loss, and bad-input errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models)
from attnzoo.zoo.seqenc import SEQENC_MIXER_SPECS, SequenceEncoder
from attnzoo.zoo.seqenc_cfgs import SEQENC_SIZES
from tests.blocks.helpers import assert_matches_formula, randomize
from tests.zoo.test_lm import reference_blocks

MIXERS = list(SEQENC_MIXER_SPECS)
SHRUNK = dict(embed_dim=32, depth=2, num_heads=4, backend="torch")  # the tiny model, shrunk for CPU
HEADS = {"classification": dict(num_classes=5), "forecasting": dict(horizon=6)}


def _model(mixer: str = "softmax", **kwargs) -> SequenceEncoder:
    return timm.create_model("attnzoo_seqenc_tiny", in_chans=3, mixer=mixer, **{**SHRUNK, **kwargs})


def test_names_cfgs_and_meta_construction():
    assert set(timm.list_models("attnzoo_seqenc_*")) == {f"attnzoo_seqenc_{s}" for s in SEQENC_SIZES}
    x = torch.zeros(2, 64, 3, device="meta")
    for size, args in SEQENC_SIZES.items():
        for head, expected in (("classification", (2, 5)), ("forecasting", (2, 6, 3))):
            model = timm.create_model(f"attnzoo_seqenc_{size}", in_chans=3, device="meta", dtype=torch.float64,
                                      **HEADS[head])
            assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in model.parameters())
            assert len(model.blocks) == args["depth"] and model.num_features == args["embed_dim"]
            out = model(x.double())
            assert out.shape == expected and out.device.type == "meta"
        assert model.pretrained_cfg.get("input_size") is None  # not an image model: timm passes no img_size
        assert any("float series (B, T, in_chans)" in note for note in model.pretrained_cfg["notes"])
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model("attnzoo_seqenc_tiny", not_a_model_arg=1, device="meta")


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("head", list(HEADS))
def test_heads_gradients_and_bidirectional_mixing(mixer, head):
    """Output shape per head, a gradient for every parameter, the mixture-of-heads loss for moh only, and tokens
    that depend on later steps (the encoder is not causal)."""
    model = _model(mixer, **HEADS[head]).train()
    x = torch.randn(2, 32, 3)  # 8 patches of 4 steps: enough for na's kernel of 7
    out = model(x)
    assert out.shape == ((2, 5) if head == "classification" else (2, 6, 3))
    aux = model.auxiliary_loss()
    assert (aux is not None) == (mixer == "moh")
    (out.square().mean() + (0 if aux is None else aux)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    later = x.clone()
    later[:, 20:24] += 1.0  # patch 5 only
    with torch.no_grad():
        model.eval()
        a, b = model.forward_features(x), model.forward_features(later)
    assert (a[:, :5] - b[:, :5]).abs().amax(-1).min() > 1e-5


def test_classifier_matches_float64_formula():
    """Logits and every parameter gradient vs patches -> linear embedding + positions, pre-norm (dense softmax +
    GELU MLP) blocks, final norm, patch mean and the linear head, evaluated in float64."""
    model = randomize(_model(num_classes=5))
    x = torch.randn(2, 24, 3)

    def formula(p, x):
        tokens = F.linear(x.reshape(2, 6, 12), p["patch_embed.weight"], p["patch_embed.bias"]) + p["pos_embed"][:, :6]
        feats = reference_blocks(p, tokens, 2, 4, torch.ones(6, 6, dtype=torch.bool))
        return F.linear(feats.mean(1), p["head.weight"], p["head.bias"])

    assert_matches_formula(model, [x], formula)


def test_reset_classifier_and_pre_logits():
    model = _model(num_classes=5).eval()
    x = torch.randn(2, 16, 3)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, 32)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
    forecaster = _model(horizon=4)
    queries = forecaster.forward_head(forecaster.forward_features(x), pre_logits=True)
    assert queries.shape == (2, 4, 32) and forecaster.no_weight_decay() == {"pos_embed", "forecast_pool.query"}
    with pytest.raises(ValueError, match=r"reset_classifier needs a classification model; this one forecasts "
                                         r"\(horizon=4\)"):
        forecaster.reset_classifier(3)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"mixer='rnn' is not supported; expected one of \('softmax', 'na', "
                                         r"'linear', 'moh'\)"):
        _model("rnn", device="meta")
    with pytest.raises(ValueError, match=r"num_classes=3 and horizon=2: a model has one head"):
        _model(num_classes=3, horizon=2, device="meta")
    with pytest.raises(ValueError, match=r"max_len=30 must be a multiple of patch_size=4"):
        _model(max_len=30, device="meta")
    with pytest.raises(ValueError, match=r"mixer='na' needs series of >= 28 steps, more than max_len=24"):
        _model("na", max_len=24, device="meta")
    model = _model("na", num_classes=2, max_len=64)
    with pytest.raises(TypeError, match=r"x must be a float series \(B, T, in_chans=3\); got dtype torch.int64"):
        model(torch.zeros(2, 32, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, in_chans=3\); got \(2, 32, 2\)"):
        model(torch.zeros(2, 32, 2))
    accepted = r"accepted T: multiples of patch_size=4 in \[28, max_len=64\] \(mixer='na' needs >= 7 patches\)"
    for steps in (30, 24, 68):  # not a multiple of the patch, too short for the neighborhood, too long
        with pytest.raises(ValueError, match=rf"x has T={steps} steps; {accepted}"):
            model(torch.zeros(2, steps, 3))
    with pytest.raises(TypeError, match="kernel_size"):
        _model("softmax", mixer_kwargs=dict(kernel_size=3))
