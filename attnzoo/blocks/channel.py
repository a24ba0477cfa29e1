"""Channel attention blocks (design §2.6): SE, ECA, FcaNet, ULSAM and channel self-attention (DaViT / XCiT).

``SqueezeExcite``, ``EfficientChannelAttention`` and ``FrequencyChannelAttention`` follow timm's ``create_attn``
convention: the first positional argument is the channel count, the rest are keywords (``rd_ratio``,
``rd_divisor``, ``act_layer``, ``gate_layer``, ``device``, ``dtype`` where timm has them) and the forward maps an
NCHW tensor to the same shape, so a class (or a ``functools.partial`` of one) drops into timm's CNNs::

    timm.create_model("resnet18", block_args=dict(attn_layer=SqueezeExcite))

SE and ECA parameters are named like timm's ``SEModule`` / ``EcaModule`` (``fc1``, ``bn``, ``fc2`` / ``conv``),
so their state dicts load unchanged. ``SubspaceAttention`` (ULSAM) takes the same NCHW input.
``ChannelSelfAttention`` works on (B, N, C) tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import create_act_layer, register_notrace_module
from timm.layers.helpers import make_divisible
from torch import Tensor, nn

from attnzoo.blocks.qkv import QKVProjection

__all__ = [
    "ChannelSelfAttention",
    "EfficientChannelAttention",
    "FrequencyChannelAttention",
    "SqueezeExcite",
    "SubspaceAttention",
    "davit_channel_attention_state_dict",
    "eca_kernel_size",
    "fca_dct_filters",
]

Layer = Callable[..., nn.Module]

# FcaNet's two-step ranking of the 7x7 DCT frequencies (u along H, v along W), best first ("top" selection).
_FCA_TOP_U = (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1)
_FCA_TOP_V = (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3)
FCA_NUM_FREQS = (1, 2, 4, 8, 16, 32)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def _check_nchw(x: Tensor, channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"x must have shape (B, C={channels}, H, W); got {tuple(x.shape)}")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): ``x * gate(fc2(act(bn(fc1(mean_hw(x))))))``.

    Args:
        channels: input channels C.
        rd_ratio: reduction ratio; the bottleneck width is ``make_divisible(C * rd_ratio, rd_divisor)``
            (timm's rounding) unless ``rd_channels`` is given.
        rd_channels: explicit bottleneck width.
        rd_divisor: the bottleneck width is rounded to a multiple of it.
        bias: bias in ``fc1`` / ``fc2``.
        act_layer: activation between the two 1x1 convs (a class or a timm activation name).
        norm_layer: optional norm on the bottleneck (``bn``); None = identity.
        gate_layer: gating non-linearity (a class or a timm activation name), default sigmoid.

    Shapes: ``forward(x)``: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        bias: bool = True,
        act_layer: Layer | str = nn.ReLU,
        norm_layer: Layer | None = None,
        gate_layer: Layer | str = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = _check_positive_int("channels", channels)
        if rd_channels is None:
            if not rd_ratio > 0:
                raise ValueError(f"rd_ratio={rd_ratio!r} must be > 0")
            rd_channels = make_divisible(channels * rd_ratio, _check_positive_int("rd_divisor", rd_divisor),
                                         round_limit=0.0)
        _check_positive_int("rd_channels", rd_channels)
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.bn = norm_layer(rd_channels, **dd) if norm_layer else nn.Identity()
        self.act = create_act_layer(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = create_act_layer(gate_layer)

    def squeeze(self, x: Tensor) -> Tensor:
        """Per-channel descriptor: (B, C, H, W) -> (B, C, 1, 1); SE's is the spatial mean."""
        return x.mean((2, 3), keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        _check_nchw(x, self.channels)
        s = self.fc2(self.act(self.bn(self.fc1(self.squeeze(x)))))
        return x * self.gate(s)


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA-Net's adaptive kernel size ``k = odd(|log2(C) / gamma + beta / gamma|)``: truncated, then an even
    value is raised to the next odd one (the paper's code). timm's ``EcaModule`` additionally clamps k to >= 3,
    which differs only for C < 8."""
    t = int(abs((math.log2(_check_positive_int("channels", channels)) + beta) / gamma))
    return t if t % 2 else t + 1


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al. 2020): ``x * gate(conv1d_k(mean_hw(x)))``, a k-tap convolution across the channel axis
    (zero-padded, no bias) instead of SE's bottleneck MLP.

    Args:
        channels: input channels C.
        kernel_size: odd number of taps; None = ``eca_kernel_size(channels, gamma, beta)``.
        gamma, beta: the adaptive-size rule's constants (paper: 2 and 1).
        gate_layer: gating non-linearity (a class or a timm activation name), default sigmoid.

    Parameters: ``conv`` (Conv1d(1, 1, k)), as in timm's ``EcaModule``.

    Shapes: ``forward(x)``: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        gate_layer: Layer | str = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = _check_positive_int("channels", channels)
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, beta)
        elif _check_positive_int("kernel_size", kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd (the conv is centred on each channel)")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False, device=device, dtype=dtype)
        self.gate = create_act_layer(gate_layer)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        _check_nchw(x, self.channels)
        B, C = x.shape[:2]
        s = self.conv(x.mean((2, 3)).view(B, 1, C))
        return x * self.gate(s).view(B, C, 1, 1)


def _dct_basis(length: int, freqs: Tensor) -> Tensor:
    """Orthonormal DCT-II basis rows: (F,) frequencies -> (F, length), ``cos(pi f (t + 1/2) / L) * c_f / sqrt(L)``
    with ``c_0 = 1``, ``c_f = sqrt(2)``."""
    t = torch.arange(length, dtype=torch.float64)
    basis = torch.cos(math.pi * freqs.double()[:, None] * (t + 0.5) / length) / math.sqrt(length)
    basis[freqs > 0] *= math.sqrt(2.0)
    return basis


def fca_dct_filters(channels: int, dct_size: tuple[int, int], num_freq: int = 16) -> Tensor:
    """FcaNet's DCT filter bank: (C, h, w) float64.

    The C channels are split into ``num_freq`` consecutive groups; group i gets the 2-D DCT basis image of
    FcaNet's i-th best 7x7 frequency (u_i, v_i), scaled to the filter size as ``(u_i * h // 7, v_i * w // 7)``.
    """
    h, w = dct_size
    u = torch.tensor(_FCA_TOP_U[:num_freq]) * (h // 7)
    v = torch.tensor(_FCA_TOP_V[:num_freq]) * (w // 7)
    per_freq = _dct_basis(h, u)[:, :, None] * _dct_basis(w, v)[:, None, :]  # (F, h, w)
    return per_freq.repeat_interleave(channels // num_freq, dim=0)


class FrequencyChannelAttention(SqueezeExcite):
    """FcaNet multi-spectral channel attention (Qin et al. 2021): SE whose squeeze is a bank of 2-D DCT
    projections instead of the spatial mean (the mean is the (0, 0) DCT frequency up to a constant).

    The input is first resized to the DCT size by ``adaptive_avg_pool2d`` (as FcaNet does when the feature
    map and the filter size differ), so any H, W is accepted; channels are split into ``num_freq`` groups,
    each projected onto one of FcaNet's top-ranked frequencies. The filters are a non-persistent buffer
    ``dct_filters`` (C, h, w), rebuilt from the arguments.

    Args:
        channels: input channels C; must be divisible by ``num_freq``.
        num_freq: how many of FcaNet's ranked frequencies to use ("top-k"): 1, 2, 4, 8, 16 (paper) or 32.
        dct_size: DCT filter size (h, w) or an int, each a positive multiple of 7 (the ranking is on a 7x7 grid).
            FcaNet's ResNets use 56/28/14/7 per stage; 7 is the default (same frequencies, cheapest).
        rd_divisor, bias, **se_kwargs: the excitation MLP, as in ``SqueezeExcite`` (``rd_ratio``, ``rd_channels``,
            ``act_layer``, ``norm_layer``, ``gate_layer``, ``device``, ``dtype``); the defaults are FcaNet's
            (``C / 16`` wide, no bias).

    Shapes: ``forward(x)``: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        num_freq: int = 16,
        dct_size: int | tuple[int, int] = 7,
        rd_divisor: int = 1,
        bias: bool = False,
        **se_kwargs,
    ) -> None:
        super().__init__(channels, rd_divisor=rd_divisor, bias=bias, **se_kwargs)
        if num_freq not in FCA_NUM_FREQS:
            raise ValueError(f"num_freq={num_freq!r} is not supported; accepted values: {list(FCA_NUM_FREQS)}")
        if channels % num_freq:
            raise ValueError(f"channels={channels} must be divisible by num_freq={num_freq} (one group per frequency)")
        size = (dct_size, dct_size) if isinstance(dct_size, int) else tuple(dct_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 7 or s % 7 for s in size):
            raise ValueError(f"dct_size={dct_size!r} must be an int or (h, w), each a positive multiple of 7")
        self.num_freq = num_freq
        self.dct_size = size
        self.register_buffer("dct_filters", fca_dct_filters(channels, size, num_freq).to(self.fc1.weight),
                             persistent=False)

    def squeeze(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 1, 1): each channel's projection onto its group's DCT basis image."""
        pooled = F.adaptive_avg_pool2d(x, self.dct_size)
        return (pooled * self.dct_filters).sum((2, 3), keepdim=True)


class SubspaceAttention(nn.Module):
    """ULSAM subspace attention (Saini et al. 2020): one spatial attention map per channel group.

    For each of the G groups F_g (C/G channels)::

        A_g = softmax_hw(act(norm_pw(pw_g(maxpool3x3(act(norm_dw(dw(F_g))))))))    # (B, 1, H, W)
        out_g = F_g * A_g + F_g

    with ``dw`` a depthwise 1x1 conv (per-channel scale and bias), ``pw_g`` a 1x1 conv from the group's
    channels to one map and a 3x3 stride-1 max-pool (padding 1). The norms and activations follow the authors'
    code (BatchNorm + ReLU after each conv); ``norm_layer=None`` removes the norms (the paper's equations).
    All groups run at once: ``conv_dw`` is a (C, 1, 1, 1) depthwise conv, ``conv_pw`` a G-grouped (G, C/G) one.

    Args:
        channels: input channels C; must be divisible by ``groups``.
        groups: number of subspaces G.
        act_layer: activation after each conv (a class or a timm activation name).
        norm_layer: norm after each conv, called as ``norm_layer(num_channels)``; None = no norm.

    Shapes: ``forward(x)``: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        groups: int = 4,
        act_layer: Layer | str = nn.ReLU,
        norm_layer: Layer | None = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = _check_positive_int("channels", channels)
        if channels % _check_positive_int("groups", groups):
            raise ValueError(f"channels={channels} must be divisible by groups={groups}")
        self.groups = groups
        dd = {"device": device, "dtype": dtype}
        self.conv_dw = nn.Conv2d(channels, channels, kernel_size=1, groups=channels, **dd)
        self.norm_dw = norm_layer(channels, **dd) if norm_layer else nn.Identity()
        self.act_dw = create_act_layer(act_layer)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv_pw = nn.Conv2d(channels, groups, kernel_size=1, groups=groups, **dd)
        self.norm_pw = norm_layer(groups, **dd) if norm_layer else nn.Identity()
        self.act_pw = create_act_layer(act_layer)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        _check_nchw(x, self.channels)
        B, C, H, W = x.shape
        a = self.pool(self.act_dw(self.norm_dw(self.conv_dw(x))))
        a = self.act_pw(self.norm_pw(self.conv_pw(a)))  # (B, G, H, W)
        a = a.flatten(2).softmax(-1).view(B, self.groups, 1, H, W)
        return (x.reshape(B, self.groups, C // self.groups, H, W) * (1 + a)).view(B, C, H, W)


@register_notrace_module  # an FX leaf (timm feature extraction): checks shapes eagerly
class ChannelSelfAttention(QKVProjection):
    """Transposed ("channel") self-attention of XCiT's XCA / DaViT's channel attention: within each head the
    D = C / H channels attend to each other, with the N tokens as the feature axis.

    Per head, with q, k, v (D, N) (channels as rows) and a learned per-head temperature tau::

        attn = softmax(tau * norm(q) @ norm(k)^T)     # (D, D), norm = L2 over tokens (or identity)
        out  = attn @ v                               # (D, N)

    The score matrix is D x D, so it is formed explicitly (its contraction runs over all N tokens, which would
    be the "head dim" of a token-attention kernel and has no upper bound).

    Parameters: ``qkv`` (C -> 3C, [q | k | v]), ``temperature`` (H, 1, 1), ``proj``: named and shaped like timm's
    ``xcit.XCA``, whose state dict loads unchanged (``l2_normalize=True``, temperature initialised to 1).
    DaViT's ``ChannelAttention`` computes ``softmax(k^T v * D^-0.5)`` applied to q without normalization, i.e.
    its k, v, q play our q, k, v: with ``l2_normalize=False`` (temperature initialised to D^-0.5) its state dict
    maps through ``davit_channel_attention_state_dict`` (qkv rows reordered [k | v | q], temperature D^-0.5).

    Args:
        dim: token width C.
        num_heads: heads H; ``dim`` must be divisible by it.
        qkv_bias: bias in the qkv projection.
        l2_normalize: L2-normalize q and k over the tokens (XCiT); False = raw scores (DaViT).
        attn_drop: dropout on the (D, D) attention weights.
        proj_drop: dropout after the output projection.

    Shapes: ``forward(x)``: (B, N, C) -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        l2_normalize: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}={p} must be in [0, 1)")
        self.init_qkv(dim, num_heads, num_heads, qkv_bias, False, nn.LayerNorm, dd)
        self.l2_normalize = l2_normalize
        init = 1.0 if l2_normalize else self.head_dim**-0.5
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), init, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, C={self.dim}); got {tuple(x.shape)}")
        B, N, C = x.shape
        q, k, v = (t.transpose(-2, -1) for t in self.project_qkv(x))  # (B, H, D, N): channels are the rows
        if self.l2_normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1))
        out = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, l2_normalize={self.l2_normalize}"


def davit_channel_attention_state_dict(state_dict: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """A timm ``davit.ChannelAttention`` state dict as a ``ChannelSelfAttention(l2_normalize=False)`` one."""
    out = dict(state_dict)
    for name in ("qkv.weight", "qkv.bias"):
        if name in out:
            q, k, v = out[name].chunk(3)
            out[name] = torch.cat([k, v, q])
    proj = out["proj.weight"]
    head_dim = proj.shape[0] // num_heads
    out["temperature"] = torch.full((num_heads, 1, 1), head_dim**-0.5, dtype=proj.dtype, device=proj.device)
    return out
