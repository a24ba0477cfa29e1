"""Numeric conventions shared by the ``torch`` implementations of the ops."""

from __future__ import annotations

import math

import torch

# Scores are kept in base 2 (logit·log2 e) and exponentiated with exp2: ATen's vectorized exp2 runs at the same
# speed for every input, while exp takes a slow path on -inf (masked) and underflowing arguments.
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the torch paths: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a saved log-sum-exp (the same as the accumulation dtype)."""
    return compute_dtype(dtype)
