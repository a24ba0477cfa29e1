"""DaViT-style dual-attention backbones (``attnzoo_davit_{mini,tiny,small}``, registered in ``davit_cfgs``).

Paper: `DaViT: Dual Attention Vision Transformers` (Ding et al., ECCV 2022, arXiv:2204.03645); the layout is timm's
``davit`` (conv stem, 4 stages, each block a spatial-attention half followed by a channel-attention half).

Layout: a 7x7 conv stem (stride ``stem_stride``, LayerNorm2d); stage i > 0 opens with LayerNorm2d + a stride-2 conv
(``down_kernel_size`` 2 as DaViT, or 3 as Florence-2's DaViT); then blocks, each two halves on channels-last tokens
(B, H, W, C)::

    x = cpe1(x);  x = x + drop_path(attn(norm1(x)));  x = cpe2(x);  x = x + drop_path(mlp(norm2(x)))

with ``cpe(x) = x + depthwise_conv3x3(x)`` (ConvPosEnc) and ``attn`` the spatial attention in the first half
(``spatial="window"``: DaViT's window attention, ``WindowAttention2d``; ``spatial="na"``: neighborhood attention
with kernel ``window_size``, ``NeighborhoodAttention2d``) and channel self-attention (``ChannelSelfAttention``,
DaViT's un-normalized form) in the second. Head: global pool, LayerNorm, linear (timm's ``NormMlpClassifierHead``).

Weights: named like timm's ``DaVit`` (``stem.conv``, ``stages.i.downsample``, ``stages.i.blocks.j.{0,1}.{cpe1.proj,
norm1, attn.qkv, attn.proj, cpe2.proj, norm2, mlp.fc1, mlp.fc2}``, ``head.norm``, ``head.fc``), plus each channel
attention's ``temperature``. ``davit_rules`` converts timm ``davit_*`` (and original MSFT) checkpoints: the channel
attentions' qkv rows are reordered and their temperature set to DaViT's fixed head_dim^-0.5 (see
``attnzoo.blocks.channel.davit_channel_attention_state_dict``); ``attnzoo_davit_tiny`` then gives timm
``davit_tiny``'s logits, e.g. ``timm.create_model("attnzoo_davit_tiny", pretrained=True,
pretrained_cfg_overlay=dict(file="davit_tiny.pth"))``. Both spatial attentions use the same ``qkv`` / ``proj``
layout, so a checkpoint moves between ``spatial="window"`` and ``"na"``.

Input sizes: every map is ``ceil(side / stride)`` (the 2x2 stride-2 downsampler zero-pads an odd map by one row /
column at the bottom / right, TF "SAME" style, as timm's DaViT) and every stage's map must cover its
``window_size`` (windows and neighborhoods never pad), so a model accepts images with both sides at least a minimum
(193 px for tiny / small, 25 px for mini); smaller ones fail with an error that names it. On maps that are
multiples of the window (224 px for tiny), window attention is exactly DaViT's; on others, the last window along an
axis is shifted inward instead of padding the map with zero tokens (see ``WindowAttention2d``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerNorm2d,
    NormMlpClassifierHead,
    calculate_drop_path_rates,
    get_device_dtype,
    register_notrace_module,
    to_2tuple,
)
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from timm.models.davit import checkpoint_filter_fn as timm_davit_filter_fn
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from attnzoo.blocks import ChannelSelfAttention, NeighborhoodAttention2d
from attnzoo.blocks.channel import davit_channel_attention_state_dict
from attnzoo.blocks.mlp import Mlp
from attnzoo.blocks.qkv import QKVProjection, check_block_options
from attnzoo.kernels import attention
from attnzoo.kernels.validate import check_choice
from attnzoo.zoo.convert import register_converter

__all__ = ["DaVit", "DaVitBlock", "WindowAttention2d", "davit_rules"]

SPATIAL = ("window", "na")


def _window_index(length: int, window: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One axis of ``WindowAttention2d``: ``gather`` (n, window), the positions each of the n = ceil(length / window)
    windows covers (the last one shifted inward to end at ``length``), and for each position (length,) its own
    window and its slot in it (where its output is read)."""
    n = -(-length // window)
    starts = torch.clamp_max(torch.arange(n, device=device) * window, length - window)
    gather = starts[:, None] + torch.arange(window, device=device)
    pos = torch.arange(length, device=device)
    own = pos // window
    return gather, own, pos - starts[own]


@register_notrace_module  # an FX leaf: the window indices depend on the map size
class WindowAttention2d(QKVProjection):
    """Window attention on channels-last maps (DaViT / Swin W-MSA without shift or bias): x (B, H, W, C) -> same.

    The map is cut into ``window_size`` windows; each token attends (softmax, scale D^-0.5) to the tokens of its
    window, in one dense-attention call over all windows (``attnzoo.kernels.attention``). When a side is not a
    multiple of the window, the last window along it is shifted inward to end at the border: it overlaps its
    neighbour, and serves only the positions the previous windows do not cover. This is NATTEN's strided
    neighborhood attention with ``kernel_size = stride = window_size`` (equal to ``na2d`` with those arguments), and
    on multiples of the window it is DaViT's window partition exactly; no zero token is ever attended to.

    Args:
        dim: token width C.
        num_heads: heads H; ``dim`` must be divisible by it.
        window_size: window height and width (int or pair), >= 1; the map must be at least this large.
        qkv_bias: bias in the qkv projection.
        proj_drop: dropout after the output projection.
        backend: kernel backend passed to ``attnzoo.kernels.attention`` (None = automatic).

    Parameters: ``qkv`` (C -> 3C), ``proj``: timm ``davit.WindowAttention``'s names and shapes.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        window_size = to_2tuple(window_size)
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window_size):
            raise ValueError(f"window_size={window_size} must be positive integers")
        check_block_options(proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.init_qkv(dim, num_heads, num_heads, qkv_bias, False, nn.LayerNorm, dd)
        self.window_size = window_size
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, H, W, C={self.dim}) (channels last); got {tuple(x.shape)}")
        B, H, W, C = x.shape
        kh, kw = self.window_size
        if kh > H or kw > W:  # windows never pad: the map must hold one
            raise ValueError(f"a {H}x{W} map is smaller than window_size={self.window_size}; accepted maps: "
                             f"height >= {kh}, width >= {kw}")
        (gather_h, own_h, slot_h), (gather_w, own_w, slot_w) = (
            _window_index(n, k, x.device) for n, k in ((H, kh), (W, kw)))
        nh, nw = len(gather_h), len(gather_w)
        # Window the C-wide input once, project the windows' tokens (q/k/v, proj act per token), un-window the
        # C-wide output once: no per-tensor window copies of q, k, v and out.
        windows = x[:, gather_h[:, None, :, None], gather_w[None, :, None, :]]  # (B, nh, nw, kh, kw, C)
        q, k, v = self.project_qkv(windows.reshape(B * nh * nw, kh * kw, C))
        out = attention(q, k, v, scale=self.scale, backend=self.backend)  # (B·nh·nw, heads, kh·kw, D)
        out = self.proj(out.transpose(1, 2).reshape(B, nh, nw, kh, kw, C))
        out = out[:, own_h[:, None], own_w[None, :], slot_h[:, None], slot_w[None, :]]  # (B, H, W, C)
        return self.proj_drop(out)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}, backend={self.backend!r}"


class ConvPosEnc(nn.Module):
    """DaViT's convolutional position encoding on channels-last maps: ``x + depthwise_conv3x3(x)``, (B, H, W, C)."""

    def __init__(self, dim: int, dd: dict) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class DaVitBlock(nn.Module):
    """One half of a DaViT dual-attention block on channels-last maps, x (B, H, W, C) -> same (module docstring).

    Args:
        dim, num_heads: width C and attention heads.
        mixer: ``"window"`` (``WindowAttention2d``), ``"na"`` (``NeighborhoodAttention2d``, kernel ``window_size``)
            or ``"channel"`` (``ChannelSelfAttention`` over all H·W tokens, DaViT's form: no L2 normalization).
        window_size: window / neighborhood size of the spatial mixers.
        mlp_ratio, qkv_bias, drop_path: MLP hidden width / C, qkv bias, stochastic-depth rate of both residuals.
        norm_layer: channels-last norm, called as ``norm_layer(dim, device=, dtype=)``.
        attn_backend: kernel backend of the spatial attention (None = automatic).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mixer: str,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        attn_backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice("mixer", mixer, (*SPATIAL, "channel"))
        dd = {"device": device, "dtype": dtype}
        self.mixer = mixer
        self.cpe1 = ConvPosEnc(dim, dd)
        self.norm1 = norm_layer(dim, **dd)
        if mixer == "channel":
            self.attn = ChannelSelfAttention(dim, num_heads, qkv_bias=qkv_bias, l2_normalize=False, **dd)
        elif mixer == "window":
            self.attn = WindowAttention2d(dim, num_heads, window_size, qkv_bias=qkv_bias, backend=attn_backend, **dd)
        else:
            self.attn = NeighborhoodAttention2d(dim, num_heads, window_size, qkv_bias=qkv_bias, backend=attn_backend,
                                                **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = ConvPosEnc(dim, dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.cpe1(x)
        y = self.norm1(x)
        y = self.attn(y.flatten(1, 2)).view_as(y) if self.mixer == "channel" else self.attn(y)
        x = self.cpe2(x + self.drop_path1(y))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """LayerNorm2d then a stride-2 conv: (B, C_in, H, W) -> (B, C_out, ceil(H / 2), ceil(W / 2)).

    ``kernel_size`` 2 (DaViT: no overlap; an odd side gets one zero row / column at the bottom / right, TF "SAME"
    style, as timm's DaViT) or 3 (Florence-2's DaViT: overlapping, padding 1).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, norm_layer: type[nn.Module], dd: dict) -> None:
        super().__init__()
        check_choice("down_kernel_size", kernel_size, (2, 3))
        self.norm = norm_layer(in_chs, **dd)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=2, padding=1 if kernel_size == 3 else 0, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if self.conv.kernel_size[0] == 2:
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.conv(x)


class DaVitStage(nn.Module):
    """An optional ``Downsample``, then one dual block per ``drop_path`` rate (spatial half, channel half):
    (B, C_in, H, W) -> (B, dim, H', W'), NCHW outside, channels-last inside."""

    def __init__(
        self,
        in_chs: int,
        dim: int,
        downsample: bool,
        spatial: str,
        window_size: int,
        drop_path: Sequence[float],
        down_kernel_size: int,
        norm_layer: type[nn.Module],
        norm_layer_cl: type[nn.Module],
        dd: dict,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.window_size = window_size  # the stage's map must cover it
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, dim, down_kernel_size, norm_layer, dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(
            nn.Sequential(*(DaVitBlock(dim, mixer=mixer, window_size=window_size, drop_path=p, norm_layer=norm_layer_cl,
                                       **block_kwargs, **dd) for mixer in (spatial, "channel")))
            for p in drop_path
        ))

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x)
        return x.permute(0, 3, 1, 2)


@torch.fx.wrap  # a leaf for every FX tracer (timm's feature extraction included): checks real shapes
def _checked_image(x: Tensor, minimum: int, needs: str) -> Tensor:
    """x: (B, C, H, W), returned unchanged; a side below ``minimum`` raises ValueError naming the accepted sizes."""
    height, width = x.shape[-2:]
    if min(height, width) < minimum:
        raise ValueError(f"a {height}x{width} image is too small for this DaViT model ({needs}); accepted image "
                         f"sizes: height >= {minimum}, width >= {minimum}")
    return x


class DaVit(nn.Module):
    """DaViT-style hierarchical backbone with window or neighborhood spatial attention (module docstring).

    Args:
        num_classes: classifier outputs (0 = no classifier).
        in_chans: image channels.
        global_pool: head pooling (``"avg"``, ``"max"``, ..., ``""`` for none).
        embed_dims: width of each stage.
        depths: dual blocks (spatial + channel half) per stage.
        num_heads: attention heads per stage (spatial and channel halves alike).
        window_size: window / neighborhood size, one for all stages or one per stage.
        spatial: ``"window"`` (DaViT's window attention) or ``"na"`` (neighborhood attention).
        stem_stride: 4 (DaViT) or 2 (for small images); the 7x7 stem conv gives ``ceil(side / stem_stride)`` maps.
        down_kernel_size: 2 (DaViT) or 3 (Florence-2) for the stride-2 conv opening stages 1, 2, ...
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: bias in the q/k/v projections.
        norm_eps: epsilon of every LayerNorm.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over the blocks up to this value.
        attn_backend: kernel backend of the spatial attentions (None = automatic: Triton on CUDA, else torch).

    Shapes: ``forward(x)``: (B, in_chans, H, W) -> (B, num_classes); ``forward_features(x)`` ->
    (B, num_features, ceil(H / r), ceil(W / r)) with r = ``stem_stride * 2**(num_stages - 1)``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (1, 1, 3, 1),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        spatial: str = "window",
        stem_stride: int = 4,
        down_kernel_size: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = len(embed_dims)
        windows = (window_size,) * num_stages if isinstance(window_size, int) else tuple(window_size)
        if not len(depths) == len(num_heads) == len(windows) == num_stages:
            raise ValueError(f"embed_dims={tuple(embed_dims)}, depths={tuple(depths)}, num_heads={tuple(num_heads)} "
                             f"and window_size={window_size!r} must give one entry per stage")
        check_choice("spatial", spatial, SPATIAL)
        check_choice("stem_stride", stem_stride, (2, 4))
        norm_layer = partial(LayerNorm2d, eps=norm_eps)
        norm_layer_cl = partial(nn.LayerNorm, eps=norm_eps)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = embed_dims[-1]
        self.attn_name = f"{spatial} + channel"
        self.grad_checkpointing = False

        self.stem = nn.Sequential()  # named stem.conv / stem.norm like timm's DaViT Stem
        self.stem.add_module("conv", nn.Conv2d(in_chans, embed_dims[0], 7, stride=stem_stride, padding=3, **dd))
        self.stem.add_module("norm", norm_layer(embed_dims[0], **dd))
        drop_paths = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(DaVitStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], i > 0, spatial, windows[i], drop_paths[i],
                down_kernel_size, norm_layer, norm_layer_cl, dd, num_heads=num_heads[i], mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, attn_backend=attn_backend,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stem_stride * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head = NormMlpClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=norm_layer, **dd)
        self.head_hidden_size = self.head.num_features
        self.spatial = spatial
        self.apply(init_weights_vit_timm)  # timm's DaViT init: trunc-normal(0.02) linear weights, zero biases

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The channel attentions' per-head temperatures (a logit scale, like a norm gain) skip weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith(".temperature")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """A new classifier (``global_pool`` None keeps the pooling; ``reset_other`` also drops the head's norm),
        on the model's device and dtype."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
                        **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def _window_strides(self) -> list[tuple[int, int]]:
        return [(s.window_size, f["reduction"]) for s, f in zip(self.stages, self.feature_info, strict=False)]

    @property
    def min_image_side(self) -> int:
        """The smallest image side: every stage's map, ``ceil(side / reduction)``, must cover its window."""
        return max((w - 1) * r + 1 for w, r in self._window_strides())

    def _checked_input(self, x: Tensor) -> Tensor:
        needs = f"{self.spatial} attention with window_size " + ", ".join(
            f"{w} at stride {r}" for w, r in self._window_strides())
        return _checked_image(x, self.min_image_side, needs)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs ``indices`` (None = all, int = last n, negative allowed) as (B, C, H, W) maps.
        ``norm`` has nothing to apply: DaViT's final norm follows the pooling, inside the head.
        Returns (forward_features output, intermediates) or just the intermediates."""
        check_choice("output_fmt", output_fmt, ("NCHW",))
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x = self.stem(self._checked_input(x))
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices``; the head (its norm included: DaViT has no norm outside it,
        so ``prune_norm`` has nothing more to drop) goes when asked or when the features now end earlier.
        Returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> last-stage map (B, num_features, H', W')."""
        return self.stages(self.stem(self._checked_input(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def davit_rules(state_dict: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """timm ``davit_*`` checkpoints (or the original MSFT ones, renamed by timm's filter) -> ``DaVit``: every channel
    attention without a ``temperature`` gets DaViT's qkv order and temperature; zoo checkpoints pass unchanged."""
    out = dict(timm_davit_filter_fn(state_dict, model))  # a copy: the caller's dict stays as it was
    adapted = []
    for prefix, attn in model.named_modules():
        p = prefix + "."
        if not isinstance(attn, ChannelSelfAttention) or p + "qkv.weight" not in out or p + "temperature" in out:
            continue
        own = {k[len(p):]: v for k, v in out.items() if k.startswith(p)}
        out.update({p + k: v for k, v in davit_channel_attention_state_dict(own, attn.num_heads).items()})
        adapted += [p + k for k in own if k.startswith("qkv.")]
    return out, adapted


register_converter(DaVit, davit_rules)

