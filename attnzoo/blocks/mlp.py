"""The transformer MLP of every zoo model: timm's ``Mlp`` (fc1 -> act -> drop -> norm -> fc2 -> drop, the same
parameters and state-dict keys) whose activation overwrites fc1's output when autograd records nothing.

In inference the activation then needs no second (tokens, hidden) buffer; on a 2-core CPU that alone made a ViT-S
forward about 10 % faster than with timm's ``Mlp`` (``benchmarks/models.py``). Under autograd the activation's
backward needs its input, so training runs timm's forward unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import timm.layers
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Mlp"]

# In-place forms of the activations the zoo uses; any other activation runs as its module.
_IN_PLACE: dict[type[nn.Module], Callable[[nn.Module, Tensor], Tensor]] = {
    nn.GELU: lambda act, x: torch.ops.aten.gelu_(x, approximate=act.approximate),
    nn.SiLU: lambda act, x: F.silu(x, inplace=True),
    nn.ReLU: lambda act, x: F.relu(x, inplace=True),
}


@timm.layers.register_notrace_module  # a leaf for FX: tracing cannot branch on requires_grad
class Mlp(timm.layers.Mlp):
    """timm's ``Mlp``: x (..., in_features) -> (..., out_features), or (B, C, H, W) with ``use_conv``."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        in_place = _IN_PLACE.get(type(self.act))
        # fc1's output is a fresh tensor, so overwriting it is safe once no backward will read it.
        x = in_place(self.act, x) if in_place is not None and not x.requires_grad else self.act(x)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))
