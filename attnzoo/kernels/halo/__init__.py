"""Halo attention (timm ``HaloAttn`` semantics): ``op`` (halo2d + custom ops), ``torch_impl`` (the fast
PyTorch path) and ``reference`` (the oracle); the Triton kernel is the shared one in
``attnzoo.kernels.attention.triton_kernel`` (halo mode)."""

from attnzoo.kernels.halo.op import halo2d

__all__ = ["halo2d"]
