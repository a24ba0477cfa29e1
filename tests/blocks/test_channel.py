"""Channel attention blocks: SE / ECA / FcaNet / ULSAM / channel self-attention vs explicit float64 formulas
(forward and every gradient), timm parity, drop-in use inside a timm ResNet, argument errors."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import EcaModule, SEModule
from timm.models.davit import ChannelAttention as TimmDavitChannelAttention
from timm.models.xcit import XCA
from torch import nn

from attnzoo.blocks import (
    ChannelSelfAttention,
    EfficientChannelAttention,
    FrequencyChannelAttention,
    SqueezeExcite,
    SubspaceAttention,
)
from attnzoo.blocks.channel import davit_channel_attention_state_dict, eca_kernel_size, fca_dct_filters
from tests.blocks.helpers import assert_matches_formula, randomize
from tests.kernels.helpers import rel_err


def excite(p: dict, s: torch.Tensor, bias: bool) -> torch.Tensor:
    """SE's bottleneck MLP on a channel descriptor s (B, C): sigmoid(W2 relu(W1 s + b1) + b2) -> (B, C)."""
    h = torch.relu(s @ p["fc1.weight"].flatten(1).T + (p["fc1.bias"] if bias else 0))
    return torch.sigmoid(h @ p["fc2.weight"].flatten(1).T + (p["fc2.bias"] if bias else 0))


# ---- SE ----


def test_se_formula_and_timm_parity():
    torch.manual_seed(0)
    se = randomize(SqueezeExcite(32, rd_ratio=0.25))
    assert se.fc1.out_channels == 8
    x = torch.randn(2, 32, 5, 6)
    assert_matches_formula(se, [x], lambda p, x: x * excite(p, x.mean((2, 3)), True)[:, :, None, None])
    ref = SEModule(32, rd_ratio=0.25).eval()
    ref.load_state_dict(se.state_dict(), strict=True)  # names and shapes are timm's
    with torch.no_grad():
        assert rel_err(se(x), ref(x)) <= 1e-6


# ---- ECA ----


@pytest.mark.parametrize(
    ("channels", "k"),
    [(1, 1), (2, 1), (4, 1), (7, 1), (8, 3), (16, 3), (32, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5),
     (2048, 7), (4096, 7)],
)
def test_eca_kernel_size_rule(channels, k):
    # k = odd(|(log2 C + 1) / 2|), worked by hand: e.g. C=128 -> 4 -> 5, C=2048 -> 6 -> 7, C=4 -> 1.5 -> 1.
    assert eca_kernel_size(channels) == k
    assert EfficientChannelAttention(channels).conv.kernel_size == (k,)
    if channels >= 8:  # timm clamps k to >= 3, which only matters below 8 channels
        assert EcaModule(channels).conv.kernel_size == (k,)


def test_eca_gamma_beta_and_explicit_kernel_size():
    assert eca_kernel_size(64, gamma=1, beta=2) == 9  # |6 + 2| = 8 -> 9
    assert EfficientChannelAttention(64, kernel_size=7).conv.kernel_size == (7,)


def eca_formula(p: dict, x: torch.Tensor) -> torch.Tensor:
    """z_c = sum_j w_j * y_{c + j - k//2} over the zero-padded channel means y; out = x * sigmoid(z)."""
    w = p["conv.weight"].flatten()
    k, C = w.numel(), x.shape[1]
    y = F.pad(x.mean((2, 3)), (k // 2, k // 2))
    z = sum(w[j] * y[:, j : j + C] for j in range(k))
    return x * torch.sigmoid(z)[:, :, None, None]


@pytest.mark.parametrize("kernel_size", [None, 5])
def test_eca_formula_and_timm_parity(kernel_size):
    torch.manual_seed(0)
    eca = randomize(EfficientChannelAttention(128, kernel_size=kernel_size))
    assert eca.conv.kernel_size == (5,)
    x = torch.randn(2, 128, 4, 3)
    assert_matches_formula(eca, [x], eca_formula)
    ref = EcaModule(128, kernel_size=5).eval()
    ref.load_state_dict(eca.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(eca(x), ref(x)) <= 1e-6


# ---- FcaNet ----

# FcaNet's top-16 frequencies on the 7x7 grid, in rank order (the paper's selection).
TOP16 = [(0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0),
         (5, 0), (1, 6), (3, 0), (0, 4), (0, 6), (0, 3), (3, 5), (2, 2)]


def dct_filters_by_loops(channels: int, h: int, w: int, freqs: list[tuple[int, int]]) -> torch.Tensor:
    """The 2-D DCT-II basis images, one scalar at a time: channel c uses frequency group c // (C / F)."""
    def basis(pos, freq, size):
        return math.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size) * (math.sqrt(2) if freq else 1.0)

    out = torch.empty(channels, h, w, dtype=torch.float64)
    for c in range(channels):
        u, v = freqs[c // (channels // len(freqs))]
        u, v = u * (h // 7), v * (w // 7)
        for i in range(h):
            for j in range(w):
                out[c, i, j] = basis(i, u, h) * basis(j, v, w)
    return out


@pytest.mark.parametrize(("channels", "size", "num_freq"), [(32, (7, 7), 16), (16, (14, 21), 16), (8, (7, 14), 4)])
def test_fca_dct_filter_bank(channels, size, num_freq):
    ref = dct_filters_by_loops(channels, *size, TOP16[:num_freq])
    assert rel_err(fca_dct_filters(channels, size, num_freq), ref) <= 1e-12
    fca = FrequencyChannelAttention(channels, num_freq=num_freq, dct_size=size)
    assert fca.dct_filters.shape == (channels, *size) and "dct_filters" not in fca.state_dict()
    # Orthonormal basis: each basis image has unit norm, and the (0, 0) one is the constant 1/sqrt(hw).
    assert torch.allclose(ref.flatten(1).norm(dim=1), torch.ones(channels, dtype=torch.float64))
    assert torch.allclose(ref[0], torch.full(size, 1 / math.sqrt(size[0] * size[1]), dtype=torch.float64))


def test_fca_formula():
    # A 14x14 map is average-pooled to the 7x7 DCT size in 2x2 blocks, then projected onto the DCT filters.
    torch.manual_seed(0)
    fca = randomize(FrequencyChannelAttention(32))
    assert fca.fc1.out_channels == 2 and fca.fc1.bias is None
    filters = dct_filters_by_loops(32, 7, 7, TOP16)

    def formula(p, x):
        pooled = x.reshape(2, 32, 7, 2, 7, 2).mean((3, 5))
        return x * excite(p, (pooled * filters).sum((2, 3)), False)[:, :, None, None]

    assert_matches_formula(fca, [torch.randn(2, 32, 14, 14)], formula)


@pytest.mark.parametrize("hw", [(7, 7), (5, 9), (30, 12)])
def test_fca_any_input_size(hw):
    # Sizes that differ from the DCT size go through adaptive average pooling (smaller ones are upsampled).
    torch.manual_seed(0)
    fca = randomize(FrequencyChannelAttention(16))
    x = torch.randn(1, 16, *hw)
    with torch.no_grad():
        s = (F.adaptive_avg_pool2d(x, 7) * fca.dct_filters).sum((2, 3), keepdim=True)
        assert rel_err(fca(x), x * torch.sigmoid(fca.fc2(torch.relu(fca.fc1(s))))) <= 1e-6


# ---- ULSAM ----


def ulsam_formula(groups: int, norm: bool, bn: dict):
    """Per group g: A_g = softmax_hw(relu(bn(pw_g(maxpool3(relu(bn(dw(F_g)))))))), out_g = F_g * A_g + F_g."""
    def batch_norm(t, prefix, p, idx):
        if not norm:
            return t
        mean, var = bn[prefix + "running_mean"][idx], bn[prefix + "running_var"][idx]
        shape = (1, -1, 1, 1)
        return ((t - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * p[prefix + "weight"][idx].view(shape)
                + p[prefix + "bias"][idx].view(shape))

    def formula(p, x):
        C = x.shape[1]
        cg = C // groups
        outs = []
        for g in range(groups):
            ch = slice(g * cg, (g + 1) * cg)
            f = x[:, ch]
            dw = f * p["conv_dw.weight"][ch].view(1, -1, 1, 1) + p["conv_dw.bias"][ch].view(1, -1, 1, 1)
            a = F.max_pool2d(torch.relu(batch_norm(dw, "norm_dw.", p, ch)), 3, stride=1, padding=1)
            a = (a * p["conv_pw.weight"][g].view(1, -1, 1, 1)).sum(1, keepdim=True) + p["conv_pw.bias"][g]
            a = torch.relu(batch_norm(a, "norm_pw.", p, slice(g, g + 1)))
            a = a.flatten(2).softmax(-1).view_as(a)
            outs.append(f * a + f)
        return torch.cat(outs, dim=1)

    return formula


def center_before_softmax(blk: SubspaceAttention, x: torch.Tensor) -> None:
    """Shift the last bias before the pointwise ReLU so that half of each group's map is clipped. Unclipped, the
    softmax's shift invariance makes that bias's exact gradient zero, which fp32 can only match up to noise."""
    with torch.no_grad():
        pre = blk.norm_pw(blk.conv_pw(blk.pool(blk.act_dw(blk.norm_dw(blk.conv_dw(x))))))
        last_bias = blk.conv_pw.bias if isinstance(blk.norm_pw, nn.Identity) else blk.norm_pw.bias
        # The midpoint of the two middle values (an even count): no element lands on the ReLU's kink.
        last_bias -= pre.transpose(0, 1).flatten(1).quantile(0.5, dim=1)


@pytest.mark.parametrize(("groups", "norm_layer"), [(4, nn.BatchNorm2d), (3, None), (1, nn.BatchNorm2d)])
def test_ulsam_formula(groups, norm_layer):
    torch.manual_seed(0)
    blk = randomize(SubspaceAttention(12, groups=groups, norm_layer=norm_layer))
    assert blk.conv_pw.weight.shape == (groups, 12 // groups, 1, 1)
    x = torch.randn(2, 12, 6, 5)
    center_before_softmax(blk, x)
    bn = {n: b.double() for n, b in blk.named_buffers()}
    assert_matches_formula(blk, [x], ulsam_formula(groups, norm_layer is not None, bn))


# ---- Inside a timm CNN ----


@pytest.mark.parametrize("attn_layer", [SqueezeExcite, EfficientChannelAttention, FrequencyChannelAttention,
                                        SubspaceAttention])
def test_drop_in_timm_resnet(attn_layer):
    # timm's ResNet blocks build ``create_attn(attn_layer, channels, device=, dtype=)`` into ``block.se``;
    # zero_init_last would zero the input of every attention module (the last BN before it), hiding its gradients.
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5, zero_init_last=False, block_args={"attn_layer": attn_layer},
                              channels=(16, 32, 48, 64), stem_width=16)  # a narrow resnet18 keeps the test fast
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert len(blocks) == 8 and all(isinstance(b.se, attn_layer) for b in blocks)
    assert [b.se.channels for b in blocks[::2]] == [16, 32, 48, 64]
    out = model(torch.randn(2, 3, 48, 48))  # 2x2 maps in the last stage: ULSAM's softmax is not constant
    assert out.shape == (2, 5)
    out.square().sum().backward()
    for b in blocks:
        grads = [p.grad for p in b.se.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---- Channel self-attention ----


def xca_formula(num_heads: int, l2_normalize: bool):
    """Per head h, channels as rows: q, k, v (D, N); out_h = softmax(tau_h * n(q) n(k)^T) v, n = L2 over tokens."""
    def formula(p, x):
        C = x.shape[-1]
        D = C // num_heads
        qkv = x @ p["qkv.weight"].T + p["qkv.bias"]
        heads = []
        for h in range(num_heads):
            q, k, v = (qkv[:, :, i * C + h * D : i * C + (h + 1) * D].transpose(1, 2) for i in range(3))
            if l2_normalize:
                q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
            attn = torch.softmax(p["temperature"][h] * (q @ k.transpose(1, 2)), dim=-1)
            heads.append((attn @ v).transpose(1, 2))  # (B, N, D)
        return torch.cat(heads, dim=-1) @ p["proj.weight"].T + p["proj.bias"]

    return formula


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_channel_self_attention_formula(l2_normalize):
    torch.manual_seed(0)
    blk = randomize(ChannelSelfAttention(24, num_heads=3, qkv_bias=True, l2_normalize=l2_normalize))
    assert blk.temperature.shape == (3, 1, 1)
    assert_matches_formula(blk, [torch.randn(2, 10, 24)], xca_formula(3, l2_normalize))


def test_channel_self_attention_temperature_init():
    assert torch.equal(ChannelSelfAttention(32, num_heads=4).temperature, torch.ones(4, 1, 1))
    assert torch.equal(ChannelSelfAttention(32, num_heads=4, l2_normalize=False).temperature,
                       torch.full((4, 1, 1), 8**-0.5))


def compare_with_timm(blk: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Forward and input gradient of two fp32 modules holding the same weights."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = blk(xa), ref(xb)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert rel_err(out, expected) <= 1e-5 and rel_err(xa.grad, xb.grad) <= 1e-5


def test_channel_self_attention_loads_timm_xca():
    torch.manual_seed(0)
    ref = randomize(XCA(32, num_heads=4, qkv_bias=True))
    blk = ChannelSelfAttention(32, num_heads=4, qkv_bias=True).eval()
    blk.load_state_dict(ref.state_dict(), strict=True)
    compare_with_timm(blk, ref, torch.randn(2, 17, 32))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_channel_self_attention_loads_timm_davit(qkv_bias):
    torch.manual_seed(0)
    ref = randomize(TimmDavitChannelAttention(32, num_heads=4, qkv_bias=qkv_bias))
    blk = ChannelSelfAttention(32, num_heads=4, qkv_bias=qkv_bias, l2_normalize=False).eval()
    blk.load_state_dict(davit_channel_attention_state_dict(ref.state_dict(), num_heads=4), strict=True)
    compare_with_timm(blk, ref, torch.randn(2, 17, 32))


# ---- Errors ----


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SubspaceAttention(30, groups=4), r"channels=30 must be divisible by groups=4"),
        (lambda: SubspaceAttention(4, groups=0), r"groups=0 must be a positive integer"),
        (lambda: FrequencyChannelAttention(40), r"channels=40 must be divisible by num_freq=16"),
        (lambda: FrequencyChannelAttention(32, num_freq=3), r"num_freq=3 is not supported; accepted values: \[1, 2"),
        (lambda: FrequencyChannelAttention(32, dct_size=10), r"dct_size=10 must be an int or \(h, w\), each a"),
        (lambda: FrequencyChannelAttention(32, dct_size=(7, 0)), r"dct_size=\(7, 0\) must be"),
        (lambda: EfficientChannelAttention(64, kernel_size=4), r"kernel_size=4 must be odd"),
        (lambda: EfficientChannelAttention(0), r"channels=0 must be a positive integer"),
        (lambda: SqueezeExcite(32, rd_ratio=0), r"rd_ratio=0 must be > 0"),
        (lambda: ChannelSelfAttention(30, num_heads=4), r"num_heads=4 must be a positive divisor of dim=30"),
        (lambda: ChannelSelfAttention(32, attn_drop=1.0), r"attn_drop=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_args(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("blk", "shape", "message"),
    [
        (SqueezeExcite(16), (2, 8, 4, 4), r"x must have shape \(B, C=16, H, W\); got \(2, 8, 4, 4\)"),
        (EfficientChannelAttention(16), (2, 16, 4), r"x must have shape \(B, C=16, H, W\); got \(2, 16, 4\)"),
        (FrequencyChannelAttention(16), (2, 32, 7, 7), r"x must have shape \(B, C=16, H, W\); got \(2, 32, 7, 7\)"),
        (SubspaceAttention(16), (16, 4, 4), r"x must have shape \(B, C=16, H, W\); got \(16, 4, 4\)"),
        (ChannelSelfAttention(16, num_heads=2), (2, 5, 8), r"x must have shape \(B, N, C=16\); got \(2, 5, 8\)"),
    ],
)
def test_bad_input_shape(blk, shape, message):
    with pytest.raises(ValueError, match=message):
        blk(torch.randn(shape))


def test_meta_device_and_dtype():
    for blk in (FrequencyChannelAttention(32, device="meta"), SubspaceAttention(32, device="meta")):
        assert blk(torch.empty(2, 32, 7, 7, device="meta")).shape == (2, 32, 7, 7)
    fca = FrequencyChannelAttention(32, dtype=torch.float64)
    assert fca.dct_filters.dtype == torch.float64
    assert fca(torch.randn(1, 32, 7, 7, dtype=torch.float64)).isfinite().all()
