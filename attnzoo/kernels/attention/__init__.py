"""Dense attention on the shared fused kernel: ``op`` (public function + custom ops), ``triton_kernel``,
``torch_impl`` (the fast PyTorch path) and ``reference`` (the oracle)."""

from attnzoo.kernels.attention.op import attention

__all__ = ["attention"]
