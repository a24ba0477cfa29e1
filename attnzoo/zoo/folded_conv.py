"""Inference speed for timm's conv layers: in eval mode, a ``ConvNormAct``'s BatchNorm (running statistics, a
per-channel affine map) is folded into its convolution's weight and bias, so the normalization costs no pass over
the activations. Same parameters, buffers and state-dict keys as timm's layer; training mode is unchanged (batch
statistics cannot be folded).
"""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d, ConvNormAct
from torch import Tensor, nn

__all__ = ["FoldedConvNormAct", "fold_batchnorm_in_eval"]


class FoldedConvNormAct(ConvNormAct):
    """timm's ``ConvNormAct`` (conv -> BatchNorm -> act) that runs ``act(conv(x; W·s, (b - μ)·s + β))`` in eval mode,
    with ``s = γ / sqrt(σ² + ε)`` from the BatchNorm's running statistics. x: (B, C_in, H, W) -> (B, C_out, H', W')."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not _foldable(self):
            return super().forward(x)
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if self.conv.bias is not None:
            bias = bias + self.conv.bias * scale
        x = self.conv._conv_forward(x, self.conv.weight * scale.reshape(-1, 1, 1, 1), bias)
        return bn.act(bn.drop(x))


def _foldable(layer: ConvNormAct) -> bool:
    """A plain ``nn.Conv2d`` (not timm's dynamic "same" padding) into an affine BatchNorm with running statistics,
    and no anti-aliasing layer after them."""
    bn = layer.bn
    return (type(layer.conv) is nn.Conv2d and type(bn) is BatchNormAct2d and bn.affine
            and bn.running_var is not None and getattr(layer, "aa", None) is None)  # fmt: skip


def fold_batchnorm_in_eval(model: nn.Module) -> int:
    """Turn every timm ``ConvNormAct`` in ``model`` into a ``FoldedConvNormAct`` (in place, parameters kept);
    returns how many layers fold."""
    layers = [m for m in model.modules() if type(m) is ConvNormAct]
    for layer in layers:
        layer.__class__ = FoldedConvNormAct  # a subclass that adds no state: only forward differs
    return sum(_foldable(layer) for layer in layers)
