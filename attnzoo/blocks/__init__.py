"""Attention blocks (nn.Modules), one family per file, on top of the ops in ``attnzoo.kernels``."""

from attnzoo.blocks.agent import AgentAttention
from attnzoo.blocks.based import BasedMixer, BasedState
from attnzoo.blocks.channel import (
    ChannelSelfAttention,
    EfficientChannelAttention,
    FrequencyChannelAttention,
    SqueezeExcite,
    SubspaceAttention,
)
from attnzoo.blocks.cross import AttentivePoolingHead, CrossAttention, CrossViTFusion
from attnzoo.blocks.halo import HaloAttention
from attnzoo.blocks.linear import HedgehogFeatureMap, LinearAttention, LinearAttentionState
from attnzoo.blocks.mhsa import MultiHeadSelfAttention
from attnzoo.blocks.mlp import Mlp
from attnzoo.blocks.moh import MoHRouter, auxiliary_loss
from attnzoo.blocks.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d

__all__ = [
    "AgentAttention",
    "AttentivePoolingHead",
    "BasedMixer",
    "BasedState",
    "ChannelSelfAttention",
    "CrossAttention",
    "CrossViTFusion",
    "EfficientChannelAttention",
    "FrequencyChannelAttention",
    "HaloAttention",
    "HedgehogFeatureMap",
    "LinearAttention",
    "LinearAttentionState",
    "Mlp",
    "MoHRouter",
    "MultiHeadSelfAttention",
    "NeighborhoodAttention1d",
    "NeighborhoodAttention2d",
    "NeighborhoodAttention3d",
    "SqueezeExcite",
    "SubspaceAttention",
    "auxiliary_loss",
]
