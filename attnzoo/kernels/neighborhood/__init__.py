"""Neighborhood attention (NATTEN semantics): ``op`` (na1d/na2d/na3d + custom ops), ``semantics`` (which
keys a query sees), ``torch_impl`` (the fast PyTorch path) and ``reference`` (the oracle); the Triton
kernel is the shared one in ``attnzoo.kernels.attention.triton_kernel``."""

from attnzoo.kernels.neighborhood.op import na1d, na2d, na3d

__all__ = ["na1d", "na2d", "na3d"]
