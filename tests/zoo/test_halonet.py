"""attnzoo HaloNets: same logits as timm's halonet26t with the same weights (directly and through create_model's
checkpoint loading), image-size errors, stage shapes, output_stride, backend plumbing."""

import pytest
import timm
import torch

import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models)
from attnzoo.blocks import HaloAttention
from tests.kernels.helpers import rel_err


@pytest.fixture(scope="module")
def timm_halonet26t():
    """timm's halonet26t (random init; its last BN per block not zeroed, so the attention shows in the logits),
    an input at its smallest size (256 px: the last halo block sees one 8x8 block at stride 32), and its logits."""
    torch.manual_seed(0)
    ref = timm.create_model("halonet26t", zero_init_last=False).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        logits = ref(x)
    return ref, x, logits


def _halo_attentions(model):
    return [m for m in model.modules() if isinstance(m, HaloAttention)]


# The Triton backend is not run on the whole 256-px model: under the CPU interpreter it takes minutes. The fused
# halo kernel is checked against timm's HaloAttn per block on Triton (tests/blocks/test_halo.py), and the model's
# Triton plumbing on attnzoo_halonet_tiny below. The torch backend (the CPU default) is checked through
# create_model's checkpoint loading, the reference backend by loading the state dict directly.
def test_timm_checkpoint_file_loads_through_create_model(timm_halonet26t, tmp_path):
    ref, x, expected = timm_halonet26t
    path = tmp_path / "halonet26t.pth"
    torch.save(ref.state_dict(), path)
    file = dict(file=str(path))
    model = timm.create_model("attnzoo_halonet26t", pretrained=True, pretrained_cfg_overlay=file, attn_backend="torch")
    assert len(_halo_attentions(model)) == 3 and {m.backend for m in _halo_attentions(model)} == {"torch"}
    with torch.no_grad():
        assert rel_err(model.eval()(x), expected) <= 1e-4
        # guard: the comparison sees the attention (a changed relative-position table moves the logits)
        _halo_attentions(model)[-1].pos_embed.height_rel.mul_(-1)
        assert rel_err(model(x), expected) > 1e-3
    # another label set: every weight but the classifier comes from the file
    model = timm.create_model("attnzoo_halonet26t", pretrained=True, num_classes=10, pretrained_cfg_overlay=file)
    assert model.get_classifier().weight.shape == (10, 2048)
    loaded, source = model.state_dict(), ref.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if not k.startswith("head."))


def test_halonet26t_reference_backend_same_logits_as_timm(timm_halonet26t):
    ref, x, expected = timm_halonet26t
    model = timm.create_model("attnzoo_halonet26t", attn_backend="reference").eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert {m.backend for m in _halo_attentions(model)} == {"reference"}
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-4


@pytest.mark.parametrize(
    "name, size, match",
    [
        ("attnzoo_halonet26t", (288, 256), r"288x256 .*block 8 at stride 16, block 8 at stride 32.*accepted image "
                                           r"sizes: height a multiple of 256.*width a multiple of 256"),
        ("attnzoo_halonet_tiny", (64, 96), r"64x96 .*block 4 at stride 16.*width a multiple of 64"),
        ("attnzoo_halonet_tiny", (32, 32), r"32x32 .*height a multiple of 64"),
    ],
)
def test_bad_image_size_names_accepted_sizes(name, size, match):
    model = timm.create_model(name).eval()
    features = timm.create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, *size)
    for forward in (model, model.forward_features, features):
        with pytest.raises(ValueError, match=match):
            forward(x)


def test_tiny_stage_shapes_and_feature_info():
    torch.manual_seed(0)
    model = timm.create_model("attnzoo_halonet_tiny").eval()
    features = timm.create_model("attnzoo_halonet_tiny", features_only=True).eval()
    features.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("head.")})
    reductions = [2, 4, 8, 16, 32]
    assert features.feature_info.reduction() == reductions
    assert features.feature_info.channels() == [32, 64, 128, 256, 512]
    x = torch.randn(1, 3, 64, 128)  # non-square, the smallest height
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        maps = features(x)
        assert model.forward_head(final).shape == (1, 1000)
    assert final.shape == (1, 512, 2, 4)
    for r, c, inter, feat in zip(reductions, features.feature_info.channels(), intermediates, maps, strict=True):
        assert inter.shape == feat.shape == (1, c, 64 // r, 128 // r)
        assert torch.equal(inter, feat)


def test_image_multiple_follows_output_stride():
    with torch.device("meta"):
        assert timm.create_model("attnzoo_halonet26t").image_multiple == 256
        model = timm.create_model("attnzoo_halonet26t", output_stride=16)  # the last stage dilates: all at stride 16
        assert model.image_multiple == 128
        assert model.forward_features(torch.empty(1, 3, 128, 384)).shape == (1, 2048, 8, 24)
        with pytest.raises(ValueError, match=r"block 8 at stride 16\).*height a multiple of 128"):
            model.forward_features(torch.empty(1, 3, 64, 128))


def test_no_weight_decay_is_the_relative_position_tables():
    with torch.device("meta"):
        model = timm.create_model("attnzoo_halonet_tiny")
    expected = {f"{name}.pos_embed.{t}" for name, m in model.named_modules() if isinstance(m, HaloAttention)
                for t in ("height_rel", "width_rel")}
    assert len(expected) == 4 and model.no_weight_decay() == expected


@pytest.mark.slow
def test_tiny_triton_backend_matches_torch(triton_device):
    torch.manual_seed(0)
    ours = timm.create_model("attnzoo_halonet_tiny", attn_backend="torch", zero_init_last=False).eval()
    tri = timm.create_model("attnzoo_halonet_tiny", attn_backend="triton").eval()
    tri.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ours(x)
        assert rel_err(tri.to(triton_device)(x.to(triton_device)), expected) <= 1e-5
