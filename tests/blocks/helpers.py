"""Shared checks for the block tests."""

from __future__ import annotations

import torch


def assert_causal(blk: torch.nn.Module, x: torch.Tensor, i: int) -> None:
    """Outputs up to token i of x (B, N, C) ignore the tokens after it, and the later outputs do change."""
    y = x.clone()
    y[:, i + 1 :] = torch.randn_like(y[:, i + 1 :])  # change only the tokens after position i
    with torch.no_grad():
        a, b = blk(x), blk(y)
    torch.testing.assert_close(a[:, : i + 1], b[:, : i + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, i + 1 :], b[:, i + 1 :])
