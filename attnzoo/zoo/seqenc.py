"""Bidirectional time-series encoder: ``attnzoo_seqenc_{tiny,small}`` (cfgs in ``seqenc_cfgs``).

PatchTST-style (Nie et al., "A Time Series is Worth 64 Words", arXiv:2211.14730): the series (B, T, C_in) is cut
into non-overlapping patches of ``patch_size`` steps, each patch (all channels) is embedded by a linear map, learned
positions are added, and pre-norm blocks mix the patches with a mixer chosen by name (``mixer=``, all
bidirectional): ``softmax`` (dense), ``na`` (1-D neighborhood attention, kernel 7), ``linear`` (elu+1 linear
attention), ``moh`` (dense with mixture-of-heads routing; ``auxiliary_loss()`` gives its load-balance loss).

Heads (one per model):
* classification (``num_classes``): mean over the patches -> linear -> (B, num_classes);
* forecasting (``horizon``): ``horizon`` learned queries cross-attend to the patches (``AttentivePoolingHead``),
  each query -> linear -> one step of every channel: (B, horizon, C_in).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg, register_model
from torch import Tensor, nn

from attnzoo.blocks.cross import AttentivePoolingHead
from attnzoo.blocks.linear import LinearAttention
from attnzoo.blocks.mhsa import MultiHeadSelfAttention
from attnzoo.blocks.neighborhood import NeighborhoodAttention1d
from attnzoo.kernels.validate import check_choice
from attnzoo.zoo.lm import MixerSpec, SequenceBackbone, check_int, moh_options
from attnzoo.zoo.seqenc_cfgs import SEQENC_SIZES, default_cfgs  # noqa: F401  (register_model reads default_cfgs)

__all__ = ["SEQENC_MIXER_SPECS", "SequenceEncoder"]

SEQENC_MIXER_SPECS: dict[str, MixerSpec] = {
    "softmax": (MultiHeadSelfAttention, lambda h: {}),
    "na": (NeighborhoodAttention1d, lambda h: {"kernel_size": 7}),
    "linear": (LinearAttention, lambda h: {"feature_map": "elu1"}),
    "moh": (MultiHeadSelfAttention, lambda h: {"moh": moh_options(h)}),
}


class SequenceEncoder(SequenceBackbone):
    """Bidirectional encoder of multichannel series with a classification or forecasting head (module docstring).

    Args:
        in_chans: channels C_in of the series.
        num_classes: classes of the classification head (0 = none: ``forward`` gives pooled features (B, C)).
        horizon: steps of the forecasting head (0 = none); a model has one head, so num_classes must then be 0.
        patch_size: steps per patch (token); series lengths must be multiples of it.
        max_len: longest series in steps, a multiple of ``patch_size`` (learned positions of max_len / patch_size).
        mixer: a key of ``SEQENC_MIXER_SPECS`` (softmax | na | linear | moh).
        mixer_kwargs: options of the mixer over its defaults (``kernel_size`` for na, ``feature_map`` for linear,
            ``moh=dict(shared_heads=, top_k=)`` for moh, ...); one the mixer does not take is a TypeError.
        embed_dim, depth, num_heads, mlp_ratio: width C, blocks, heads, MLP hidden / C.
        qkv_bias: bias in the q/k/v projections.
        drop_rate: dropout after the embedding, in the mixer / MLP outputs and before the head's linear map.
        drop_path_rate: stochastic depth, linear in depth up to this rate.
        backend: kernel backend of the mixers' ops (None = automatic).

    Shapes: ``forward(x)``: float (B, T, in_chans) -> (B, num_classes), or (B, horizon, in_chans) with a horizon.
    """

    STEM = r"^patch_embed|pos_embed"

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 0,
        horizon: int = 0,
        patch_size: int = 4,
        max_len: int = 1024,
        mixer: str = "softmax",
        mixer_kwargs: dict[str, Any] | None = None,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("in_chans", in_chans, 1), ("num_classes", num_classes, 0), ("horizon", horizon, 0),
                                 ("patch_size", patch_size, 1)):
            check_int(name, value, low)
        if num_classes and horizon:
            raise ValueError(f"num_classes={num_classes} and horizon={horizon}: a model has one head; set "
                             "num_classes for classification or horizon for forecasting")
        check_int("max_len", max_len, patch_size)
        if max_len % patch_size:
            raise ValueError(f"max_len={max_len} must be a multiple of patch_size={patch_size}")
        dd = {"device": device, "dtype": dtype}
        self.in_chans, self.num_classes, self.horizon = in_chans, num_classes, horizon
        self.patch_size, self.max_len = patch_size, max_len
        self.patch_embed = nn.Linear(patch_size * in_chans, embed_dim, **dd)
        self.init_trunk(max_len // patch_size, mixer, SEQENC_MIXER_SPECS, mixer_kwargs, embed_dim, depth, num_heads,
                        mlp_ratio, qkv_bias, drop_rate, drop_path_rate, backend, dd)
        # Neighborhood attention needs at least kernel_size * dilation patches.
        extents = [m.kernel_size[0] * m.dilation[0] for m in self.modules() if isinstance(m, NeighborhoodAttention1d)]
        self.min_len = patch_size * max(extents, default=1)
        if self.min_len > max_len:
            raise ValueError(f"mixer={mixer!r} needs series of >= {self.min_len} steps, more than max_len={max_len}")
        self.forecast_pool = AttentivePoolingHead(embed_dim, horizon, num_heads, mlp_ratio=mlp_ratio,
                                                  qkv_bias=qkv_bias, backend=backend, **dd) if horizon else None
        self.head_drop = nn.Dropout(drop_rate)
        outputs = in_chans if horizon else num_classes
        self.head = nn.Linear(embed_dim, outputs, **dd) if outputs else nn.Identity()
        self.init_weights()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"forecast_pool.query"} if self.horizon else set())

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classification head for ``num_classes`` (0 = none); pooling is the patch mean (``"avg"``)."""
        if self.horizon:
            raise ValueError(f"reset_classifier needs a classification model; this one forecasts (horizon="
                             f"{self.horizon})")
        check_int("num_classes", num_classes, 0)
        check_choice("global_pool", global_pool, (None, "avg"))
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes, **get_device_dtype(self)) if num_classes else nn.Identity()
        self.head.train(self.training)

    def _check_series(self, x: Tensor) -> None:
        layout = f"(B, T, in_chans={self.in_chans})"
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a float series {layout}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float series {layout}; got dtype {x.dtype}")
        if x.dim() != 3 or x.shape[0] < 1 or x.shape[-1] != self.in_chans:
            raise ValueError(f"x must have shape {layout}; got {tuple(x.shape)}")
        T, p = x.shape[1], self.patch_size
        if T % p or not self.min_len <= T <= self.max_len:
            na = f" (mixer={self.attn_name!r} needs >= {self.min_len // p} patches)" if self.min_len > p else ""
            raise ValueError(f"x has T={T} steps; accepted T: multiples of patch_size={p} in [{self.min_len}, "
                             f"max_len={self.max_len}]{na}")

    def forward_features(self, x: Tensor) -> Tensor:
        """x float (B, T, in_chans) -> normed patch tokens (B, T / patch_size, C)."""
        self._check_series(x)
        B, T, _ = x.shape
        n = T // self.patch_size
        return self.mix(self.patch_embed(x.reshape(B, n, -1)))  # a patch: p steps x C_in

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N, C) -> (B, num_classes) (pre_logits: the pooled (B, C)), or with a horizon the forecast
        (B, horizon, in_chans) (pre_logits: the per-step queries (B, horizon, C))."""
        x = self.forecast_pool.pool(x) if self.horizon else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool, **kwargs: Any) -> SequenceEncoder:
    return build_model_with_cfg(SequenceEncoder, variant, pretrained, **kwargs)


@register_model
def attnzoo_seqenc_tiny(pretrained: bool = False, **kwargs: Any) -> SequenceEncoder:
    """Series encoder: patches of 4 steps, 4 blocks of width 128, 4 heads, series up to 1024 steps."""
    return _create("attnzoo_seqenc_tiny", pretrained, **{**SEQENC_SIZES["tiny"], **kwargs})


@register_model
def attnzoo_seqenc_small(pretrained: bool = False, **kwargs: Any) -> SequenceEncoder:
    """Series encoder: patches of 4 steps, 8 blocks of width 256, 8 heads, series up to 2048 steps."""
    return _create("attnzoo_seqenc_small", pretrained, **{**SEQENC_SIZES["small"], **kwargs})
