"""timm's model contract for every ``attnzoo_*`` vision model, including what timm's own battery skips for
third-party models (``forward_intermediates``, the feature getter) or cannot reach (``torch.compile``).

Structure (shapes, devices, dtypes, kwargs) is checked for every model on the meta device, at no compute cost;
values (intermediates vs features, compiled vs eager) for the smallest model of each family, whose sizes share
the code."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg_value, model_entrypoint

import attnzoo  # noqa: F401

# Vision models: their default cfg takes (C, H, W) images (sequence models document other inputs).
VISION = [n for n in timm.list_models("attnzoo_*") if len(get_pretrained_cfg_value(n, "input_size") or ()) == 3]


def _family(name: str) -> str:
    """timm's module key of the model: the zoo file that registers it."""
    return model_entrypoint(name).__module__.rsplit(".", 1)[-1]


FAMILIES = sorted({_family(n) for n in VISION})


def _images(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, *get_pretrained_cfg_value(name, "input_size"), device=device, dtype=dtype)


def _reduced(x: torch.Tensor, reduction: int) -> tuple[int, ...]:
    return tuple(math.ceil(s / reduction) for s in x.shape[2:])


def _on_meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, device="meta", **kwargs).eval()


def test_every_family_registers_vision_models():
    assert {"attnzoo_vit_tiny", "attnzoo_vit_small", "attnzoo_vit_tiny_patch4_28"} <= set(VISION)


@pytest.mark.parametrize("name", VISION)
def test_name_and_module_are_ours(name):
    assert model_entrypoint(name).__module__.startswith("attnzoo.zoo.")  # not overwritten by / overwriting timm's
    assert all(n.startswith("attnzoo_") for n in timm.list_models(module=_family(name)))  # no shared module key


@pytest.mark.parametrize("name", VISION)
def test_structure_on_meta_device(name):
    model = _on_meta(name, dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    x = _images(name, "meta", torch.float64)
    out = model(x)
    assert out.shape == (1, model.num_classes) and out.device.type == "meta" and out.dtype == torch.float64
    final, intermediates = model.forward_intermediates(x)
    assert final.shape == model.forward_features(x).shape
    assert [t.shape for t in intermediates] == [(1, f["num_chs"], *_reduced(x, f["reduction"]))
                                                for f in model.feature_info]
    features = _on_meta(name, features_only=True)
    expected = zip(features.feature_info.channels(), features.feature_info.reduction(), strict=True)
    assert [m.shape for m in features(x.float())] == [(1, c, *_reduced(x, r)) for c, r in expected]
    with pytest.raises(TypeError, match="not_a_model_arg"):
        _on_meta(name, not_a_model_arg=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_values_and_compile_of_the_smallest_model(family):
    """forward_intermediates ends in forward_features, the feature getter gives finite maps, and
    ``torch.compile(fullgraph=True)`` traces the model to one graph that gives the eager logits."""
    name = min((n for n in VISION if _family(n) == family),
               key=lambda n: sum(p.numel() for p in _on_meta(n).parameters()))
    model = timm.create_model(name).eval()
    x = _images(name)
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        logits = model.forward_head(final)
        maps = timm.create_model(name, features_only=True).eval()(x)
    assert all(torch.isfinite(m).all() for m in maps)
    torch._dynamo.reset()  # a fresh cache: earlier compiles of the same classes must not count as recompiles
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), logits, rtol=1e-5, atol=1e-5)
