"""Attention blocks (nn.Modules), one family per file, on top of the ops in ``attnzoo.kernels``."""

from attnzoo.blocks.mhsa import MultiHeadSelfAttention

__all__ = ["MultiHeadSelfAttention"]
