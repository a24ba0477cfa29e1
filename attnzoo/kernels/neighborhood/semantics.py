"""Which keys a query sees in neighborhood attention: NATTEN's semantics, one axis at a time.

For an axis of length L, kernel size k, dilation d, stride s: positions split into d interleaved
groups (``i % d``); a query at group index ``j`` of a group of length ``Lg`` has a stride leader

* non-causal: ``min((j // s) * s + s // 2, Lg - 1)`` (the centre of its s-block), and sees group
  indices ``[w, w + k)`` with ``w = clamp(leader - k // 2, 0, Lg - k)`` (windows shift inward at the
  borders, never pad, so every query sees exactly k keys);
* causal: ``min((j // s) * s + s - 1, Lg - 1)`` (the last of its s-block), and sees group indices
  ``[max(leader - k + 1, 0), j]``.

A multi-axis query sees the product of its per-axis sets. Both window ends are non-decreasing in
``j`` and in ``Lg``, which the kernels use to bound the key tiles a query tile can see.
"""

from __future__ import annotations

import torch


def group_length(pos: torch.Tensor, length: int, dilation: int) -> torch.Tensor:
    """Length of the dilation group that position ``pos`` belongs to."""
    return (length - pos % dilation + dilation - 1) // dilation


def window(j: torch.Tensor, group_len: torch.Tensor | int, kernel_size: int, stride: int, causal: bool):
    """Visible group indices ``[lo, hi)`` for group index ``j`` (tensors broadcast)."""
    if causal:
        leader = torch.clamp_max(torch.div(j, stride, rounding_mode="floor") * stride + stride - 1, group_len - 1)
        return torch.clamp_min(leader - kernel_size + 1, 0), j + 1
    leader = torch.clamp_max(torch.div(j, stride, rounding_mode="floor") * stride + stride // 2, group_len - 1)
    lo = torch.minimum(torch.clamp_min(leader - kernel_size // 2, 0), group_len - kernel_size)
    return lo, lo + kernel_size


def axis_mask(length: int, kernel_size: int, dilation: int, stride: int, causal: bool, device=None) -> torch.Tensor:
    """(L, L) bool: ``[i, t]`` is True when query position i sees key position t on this axis."""
    pos = torch.arange(length, device=device)
    lo, hi = window(pos // dilation, group_length(pos, length, dilation), kernel_size, stride, causal)
    key_group = pos // dilation
    same_group = (pos[:, None] % dilation) == (pos[None, :] % dilation)
    return same_group & (key_group[None, :] >= lo[:, None]) & (key_group[None, :] < hi[:, None])


def neighborhood_mask(shape, kernel_size, dilation, stride, causal, device=None) -> torch.Tensor:
    """(N, N) bool over the row-major flattened grid ``shape``; product of the per-axis masks.

    Materializes N×N: for references and tests only.
    """
    mask = torch.ones(1, 1, dtype=torch.bool, device=device)
    for L, k, d, s, c in zip(shape, kernel_size, dilation, stride, causal, strict=True):
        m = axis_mask(L, k, d, s, c, device)
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(mask.shape[0] * L, mask.shape[1] * L)
    return mask


def relative_index(length: int, kernel_size: int, dilation: int, device=None) -> torch.Tensor:
    """(L, L) long: NAT-style relative-position-bias index ``(t_key - j_query) + k - 1`` in group units."""
    g = torch.arange(length, device=device) // dilation
    return g[None, :] - g[:, None] + kernel_size - 1
