"""Attention blocks (nn.Modules), one family per file, on top of the ops in ``attnzoo.kernels``."""

from attnzoo.blocks.halo import HaloAttention
from attnzoo.blocks.mhsa import MultiHeadSelfAttention
from attnzoo.blocks.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d

__all__ = [
    "HaloAttention",
    "MultiHeadSelfAttention",
    "NeighborhoodAttention1d",
    "NeighborhoodAttention2d",
    "NeighborhoodAttention3d",
]
