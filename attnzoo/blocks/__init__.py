"""Attention blocks (nn.Modules), one family per file, on top of the ops in ``attnzoo.kernels``."""

from attnzoo.blocks.channel import (
    ChannelSelfAttention,
    EfficientChannelAttention,
    FrequencyChannelAttention,
    SqueezeExcite,
    SubspaceAttention,
)
from attnzoo.blocks.cross import AttentivePoolingHead, CrossAttention, CrossViTFusion
from attnzoo.blocks.halo import HaloAttention
from attnzoo.blocks.mhsa import MultiHeadSelfAttention
from attnzoo.blocks.moh import MoHRouter, auxiliary_loss
from attnzoo.blocks.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d

__all__ = [
    "AttentivePoolingHead",
    "ChannelSelfAttention",
    "CrossAttention",
    "CrossViTFusion",
    "EfficientChannelAttention",
    "FrequencyChannelAttention",
    "HaloAttention",
    "MoHRouter",
    "MultiHeadSelfAttention",
    "NeighborhoodAttention1d",
    "NeighborhoodAttention2d",
    "NeighborhoodAttention3d",
    "SqueezeExcite",
    "SubspaceAttention",
    "auxiliary_loss",
]
