"""Linear attention, the second shared kernel family: ``op`` (the public function), ``step`` (decoding),
``arguments`` (checks, ``LinearState``), ``feature_maps``, ``core`` (the unnormalized core as custom ops),
``torch_impl`` (the chunked PyTorch path), ``triton_kernel`` / ``triton_launch`` and ``reference`` (the oracle)."""

from attnzoo.kernels.linear.arguments import LinearState
from attnzoo.kernels.linear.feature_maps import FEATURE_MAPS
from attnzoo.kernels.linear.op import linear_attention
from attnzoo.kernels.linear.step import linear_attention_step

__all__ = ["FEATURE_MAPS", "LinearState", "linear_attention", "linear_attention_step"]
