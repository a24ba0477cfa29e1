"""HaloAttention: same-weights parity with timm's HaloAttn and halonet26t, grads, state dict, errors."""

import dataclasses
import functools

import pytest
import timm
import torch
from timm.layers import create_feature_extractor
from timm.layers.halo_attn import HaloAttn
from timm.models.byoanet import model_cfgs
from timm.models.byobnet import ByobNet
from torch import nn

from attnzoo.blocks import HaloAttention


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _pair(backend: str | None = None, pad_mode: str = "zeros", **kwargs) -> tuple[HaloAttn, HaloAttention]:
    """timm's HaloAttn and ours with the same (random) weights."""
    torch.manual_seed(0)
    ref = HaloAttn(**kwargs).eval()
    for p in ref.parameters():  # biases are zero-initialised; give every parameter a visible value
        if p.ndim == 1:
            nn.init.normal_(p, std=0.1)
    blk = HaloAttention(**kwargs, pad_mode=pad_mode, backend=backend).eval()
    blk.load_state_dict(ref.state_dict(), strict=True)
    return ref, blk


CONFIGS = {
    "b8h2": dict(block_size=8, halo_size=2),
    "b8h2s2": dict(block_size=8, halo_size=2, stride=2),  # strided query blocks (timm's block_stride = 2)
    "b4h1": dict(block_size=4, halo_size=1),
    "b4h1s2": dict(block_size=4, halo_size=1, stride=2),
    "b8h3_bias_scalepos": dict(block_size=8, halo_size=3, qkv_bias=True, scale_pos_embed=True),
    "b8h2s2_avgdown": dict(block_size=8, halo_size=2, stride=2, avg_down=True),  # full-res queries + avg pool
    "b6h2s2_odd": dict(block_size=6, halo_size=2, stride=2, num_heads=2),  # 6 / 2 blocks are odd: still strided
    # q/k head dim != v head dim: eca_halonext26ts (dim_head=16) and haloregnetz_b (qk_ratio=0.33) settings
    "b8h2_dim_head8": dict(block_size=8, halo_size=2, dim_head=8),
    "b4h1_qk_ratio": dict(block_size=4, halo_size=1, qk_ratio=0.33),
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_timm_parity(name, backend):
    cfg = {"num_heads": 4, **CONFIGS[name]}
    ref, blk = _pair(dim=32, dim_out=48, **cfg, backend=backend)
    b = cfg["block_size"]
    x = torch.randn(2, 32, 2 * b, 3 * b)  # non-square, several blocks per side: interior and border blocks
    with torch.no_grad():
        out, expected = blk(x), ref(x)
    assert out.shape == expected.shape
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("dim_head", [None, 8], ids=["equal_dims", "dim_head8"])
def test_block_timm_parity_triton(dim_head, triton_device):
    ref, blk = _pair(dim=16, dim_out=32, num_heads=2, block_size=4, halo_size=1, stride=2, dim_head=dim_head,
                     backend="triton")
    ref, blk = ref.to(triton_device), blk.to(triton_device)
    x = torch.randn(1, 16, 8, 12, device=triton_device)
    with torch.no_grad():
        assert rel_err(blk(x), ref(x)) <= 1e-5


@pytest.fixture(scope="module")
def halonet26t_pair():
    """timm's halonet26t and the same ByobNet with HaloAttention swapped in, sharing one random state dict."""
    torch.manual_seed(0)
    ref = timm.create_model("halonet26t", pretrained=False).eval()
    # timm zero-inits the last BN of every residual branch, which would hide the attention from the logits
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
            nn.init.normal_(m.running_mean, std=0.1)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
    ours = ByobNet(dataclasses.replace(model_cfgs["halonet26t"], self_attn_layer=HaloAttention)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    # 256 px is the smallest input it takes: the last halo block runs at stride 32, on one 8x8 block.
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = ref(x)
    return ours, x, expected


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_halonet26t_timm_parity(halonet26t_pair, backend):
    # design §2.4: timm's halonet26t with our attention swapped in, same weights, logits within 1e-4.
    ours, x, expected = halonet26t_pair
    attns = [m for m in ours.modules() if isinstance(m, HaloAttention)]
    assert len(attns) == 3  # stage 3: one block, stage 4: two (the first one strided)
    for m in attns:
        m.backend = backend
    with torch.no_grad():
        logits = ours(x)
    assert rel_err(logits, expected) <= 1e-4


def test_halonet26t_sees_the_attention(halonet26t_pair):
    # guards the parity test: masking the padded keys instead (pad_mode="mask") must move the logits
    ours, x, expected = halonet26t_pair
    for m in ours.modules():
        if isinstance(m, HaloAttention):
            m.backend, m.pad_mode = "torch", "mask"
    try:
        with torch.no_grad():
            assert rel_err(ours(x), expected) > 1e-3
    finally:
        for m in ours.modules():
            if isinstance(m, HaloAttention):
                m.pad_mode = "zeros"


def test_byobnet_takes_partial():
    # self_attn_layer may carry our extra arguments (get_attn passes any callable through)
    cfg = dataclasses.replace(
        model_cfgs["halonet26t"], self_attn_layer=functools.partial(HaloAttention, backend="reference")
    )
    with torch.device("meta"):
        model = ByobNet(cfg)
    assert {m.backend for m in model.modules() if isinstance(m, HaloAttention)} == {"reference"}


def test_state_dict_matches_timm():
    ref, blk = _pair(dim=32, dim_out=64, num_heads=4, block_size=8, halo_size=2, stride=2)
    assert {k: v.shape for k, v in blk.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert set(blk.state_dict()) == {"q.weight", "kv.weight", "pos_embed.height_rel", "pos_embed.width_rel"}


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grads_reach_every_parameter(backend):
    blk = HaloAttention(16, 32, num_heads=2, block_size=4, halo_size=1, qkv_bias=True, backend=backend)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    out = blk(x)
    assert out.shape == (2, 32, 8, 8)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    names = {name for name, _ in blk.named_parameters()}
    assert {"pos_embed.height_rel", "pos_embed.width_rel", "q.weight", "kv.weight"} <= names
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _check_grads_match_timm(backend: str, device: str = "cpu") -> None:
    ref, blk = _pair(dim=16, dim_out=32, num_heads=2, block_size=4, halo_size=1, stride=2, backend=backend)
    ref, blk = ref.to(device), blk.to(device)
    x = torch.randn(2, 16, 8, 8, device=device)
    g = torch.randn(2, 32, 4, 4, device=device)
    (ref(x) * g).sum().backward()
    (blk(x) * g).sum().backward()
    grads = dict(blk.named_parameters())
    for name, p in ref.named_parameters():
        assert rel_err(grads[name].grad, p.grad) <= 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grads_match_timm(backend):
    _check_grads_match_timm(backend)


@pytest.mark.slow
def test_grads_match_timm_triton(triton_device):
    _check_grads_match_timm("triton", triton_device)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_pad_mode_mask(backend):
    x = torch.randn(1, 16, 8, 8)
    _, zeros = _pair(dim=16, num_heads=2, block_size=4, halo_size=1, backend=backend)
    _, masked = _pair(dim=16, num_heads=2, block_size=4, halo_size=1, backend=backend, pad_mode="mask")
    with torch.no_grad():
        assert rel_err(masked(x), zeros(x)) > 1e-3  # every block of a 2x2-block map touches the border
    # without a halo nothing is padded, so the two modes agree
    _, zeros = _pair(dim=16, num_heads=2, block_size=4, halo_size=0, backend=backend)
    _, masked = _pair(dim=16, num_heads=2, block_size=4, halo_size=0, backend=backend, pad_mode="mask")
    with torch.no_grad():
        assert rel_err(masked(x), zeros(x)) <= 1e-6


def test_bad_input_size():
    blk = HaloAttention(16, num_heads=2, block_size=8, halo_size=2)
    with pytest.raises(ValueError, match=r"multiples of block_size=8.*12x16"):
        blk(torch.randn(1, 16, 12, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=3), "num_heads=3"),
        (dict(stride=3), "stride=3"),
        (dict(pad_mode="reflect"), "pad_mode='reflect'"),
        (dict(backend="cuda"), "backend='cuda'"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HaloAttention(16, **kwargs)


def test_timm_fx_feature_extraction():
    # timm's FX feature extraction (and its test battery's FX tests) keep HaloAttention as a leaf module
    blk = HaloAttention(16, 32, num_heads=2, block_size=4, halo_size=1).eval()
    model = nn.Sequential(nn.Conv2d(8, 16, 1), blk)
    extractor = create_feature_extractor(model, return_nodes=["1"])
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(extractor(x)["1"], model(x))


def test_meta_device():
    blk = HaloAttention(32, 64, num_heads=4, block_size=8, halo_size=2, device="meta")
    assert all(p.device.type == "meta" for p in blk.parameters())
    assert blk.pos_embed.height_rel.shape == (2 * 12 - 1, 16)
