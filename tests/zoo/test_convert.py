"""Checkpoint conversion: timm ``vit_*`` -> ``attnzoo_vit_*`` (same logits and gradients as timm), switching
``attn=`` (shared weights kept, new ones reported), timm's pretrained loader, and the errors."""

from __future__ import annotations

import pytest
import timm
import torch

import attnzoo  # noqa: F401
from attnzoo.zoo.convert import convert_state_dict, load_converted, register_converter
from attnzoo.zoo.vit import VisionTransformer
from tests.kernels.helpers import rel_err

SMALL = dict(img_size=64, depth=2)  # 4x4 patch grid, two blocks: the layout of the full model, quick to run


@pytest.mark.parametrize(("timm_name", "ours", "kwargs"), [
    ("vit_small_patch16_224", "attnzoo_vit_small", {}),
    ("vit_tiny_patch16_224", "attnzoo_vit_tiny", dict(class_token=False, global_pool="avg")),  # fc_norm, GAP
])
def test_timm_vit_gives_the_same_logits_and_gradients(timm_name, ours, kwargs):
    theirs = timm.create_model(timm_name, **SMALL, **kwargs)
    model = timm.create_model(ours, **SMALL, **kwargs)
    report = load_converted(model, theirs.state_dict())
    assert report.new == report.dropped == report.adapted == ()
    assert set(report.kept) == set(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert rel_err(out, theirs(x)) <= 1e-6  # the same weights through the same arithmetic
    ref = theirs.double()(x.double())  # float64 reference, for the gradients too
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn_like(out)
    grads = dict(zip(dict(model.named_parameters()), torch.autograd.grad(out, list(model.parameters()), g),
                     strict=True))
    ref_grads = dict(zip(dict(theirs.named_parameters()), torch.autograd.grad(ref, list(theirs.parameters()),
                                                                              g.double()), strict=True))
    assert grads.keys() == ref_grads.keys()
    errors = {n: rel_err(grads[n], ref_grads[n]) for n in grads}
    assert max(errors.values()) <= 1e-5, errors


def test_switching_attention_keeps_every_shared_weight():
    dense = timm.create_model("attnzoo_vit_tiny", **SMALL)
    na = timm.create_model("attnzoo_vit_tiny", **SMALL, attn="na", attn_kwargs=dict(kernel_size=3, rel_pos_bias=True))
    initial = {k: v.clone() for k, v in na.state_dict().items()}
    report = load_converted(na, dense.state_dict())
    rpb = tuple(f"blocks.{i}.attn.rpb" for i in range(2))
    assert report.new == rpb and report.dropped == ()
    assert set(report.kept) == set(dense.state_dict())
    for key, value in na.state_dict().items():
        torch.testing.assert_close(value, initial[key] if key in rpb else dense.state_dict()[key], rtol=0, atol=0)
    back = load_converted(timm.create_model("attnzoo_vit_tiny", **SMALL, attn="halo",
                                            attn_kwargs=dict(block_size=2, halo_size=1)), na.state_dict())
    assert back.dropped == rpb and back.new == ()


def test_other_grid_resamples_pos_embed():
    theirs = timm.create_model("vit_tiny_patch16_224", **SMALL)
    model = timm.create_model("attnzoo_vit_tiny", img_size=96, depth=2)  # 6x6 grid
    report = load_converted(model, {"state_dict": theirs.state_dict()})  # a training checkpoint wrapper
    assert report.adapted == ("pos_embed",) and report.new == ()
    expected = timm.layers.resample_abs_pos_embed(theirs.pos_embed.detach(), [6, 6], [4, 4], 1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def test_timm_loader_reads_a_timm_vit_file(tmp_path):
    theirs = timm.create_model("vit_tiny_patch16_224", **SMALL)
    path = tmp_path / "vit_tiny.pth"
    torch.save(theirs.state_dict(), path)
    model = timm.create_model("attnzoo_vit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    x = torch.randn(1, 3, 64, 64)
    assert rel_err(model(x), theirs(x)) <= 1e-6
    # a new label set and grayscale input: timm's loader re-initialises the head, the patch conv is channel-summed
    gray = timm.create_model("attnzoo_vit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             num_classes=10, in_chans=1, **SMALL)
    torch.testing.assert_close(gray.patch_embed.proj.weight, theirs.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.blocks[1].mlp.fc2.weight, theirs.blocks[1].mlp.fc2.weight)
    assert gray.head.out_features == 10


def test_conversion_errors():
    theirs = timm.create_model("vit_tiny_patch16_224", **SMALL)
    wider = timm.create_model("attnzoo_vit_small", **SMALL)
    with pytest.raises(ValueError, match=r"checkpoint key 'cls_token' has shape \(1, 1, 192\) but the model's is "
                                         r"\(1, 1, 384\); no conversion rule maps one onto the other"):
        convert_state_dict(theirs.state_dict(), wider)
    odd = {**theirs.state_dict(), "pos_embed": torch.zeros(1, 1 + 15, 192)}
    with pytest.raises(ValueError, match=r"checkpoint pos_embed \(1, 16, 192\) is not 1 prefix tokens \+ a square"):
        convert_state_dict(odd, timm.create_model("attnzoo_vit_tiny", **SMALL))
    with pytest.raises(ValueError, match="a converter for VisionTransformer is already registered"):
        register_converter(VisionTransformer, lambda state_dict, model: (state_dict, []))
