"""Feature maps φ of linear attention, applied in PyTorch before the core (autograd carries their gradient).

The learnable ``hedgehog`` map lives in the block (``attnzoo.blocks``), since it has weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu1", "relu", "softmax", "taylor2", "identity")
# Maps that mix information across positions cannot run causally.
NON_CAUSAL_ONLY = ("softmax",)


def feature_dim(feature_map: str, d: int) -> int:
    """Size K of φ(x) for inputs of head dim ``d``: 1 + d + d² for ``taylor2``, else ``d``."""
    return 1 + d + d * d if feature_map == "taylor2" else d


def _taylor2(x: torch.Tensor) -> torch.Tensor:
    """[1, x̃, vec(x̃ ⊗ x̃)/√2] with x̃ = x·d^(-1/4), so φ(q)·φ(k) = 1 + s + s²/2 for s = q·k/√d (BASED)."""
    x = x * x.shape[-1] ** -0.25
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * math.sqrt(0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


def apply_feature_map(feature_map: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, H, T, D) -> φ(q), φ(k): (B, H, T, K), K = ``feature_dim(feature_map, D)``.

    ``softmax`` is Efficient Attention's: over q's features and over k's positions (axis 2).
    """
    if feature_map == "elu1":
        return F.elu(q) + 1, F.elu(k) + 1
    if feature_map == "relu":
        return F.relu(q), F.relu(k)
    if feature_map == "softmax":
        return q.softmax(-1), k.softmax(2)
    if feature_map == "taylor2":
        return _taylor2(q), _taylor2(k)
    return q, k
