"""The simplest exact formula for halo attention: the test oracle, never a production path.

Semantics (timm's ``HaloAttn``): the key map is cut into ``block_size``² blocks; the queries of a block (a
``bq``² block of the query grid, ``bq = block_size // r`` for a query grid downsampled by ``r``) attend to the
``win``² window (``win = block_size + 2·halo_size``) centred on it. Window position ``(jx, jy)`` of block
``(bx, by)`` is key ``(bx·block_size − halo + jx, by·block_size − halo + jy)``; the relative logit of the query
at in-block position ``(ix, iy)`` is ``q·rel_h[jx − ix + win − 1] + q·rel_w[jy − iy + win − 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _windows(t: torch.Tensor, block_size: int, halo_size: int, win: int) -> torch.Tensor:
    """(B, H, X, Y, C) -> (B, H, nbx, nby, win·win, C): zero-padded overlapping windows."""
    t = F.pad(t, (0, 0, halo_size, halo_size, halo_size, halo_size))
    t = t.unfold(2, win, block_size).unfold(3, win, block_size)  # (B, H, nbx, nby, C, win, win)
    B, H, nbx, nby, C = t.shape[:5]
    return t.permute(0, 1, 2, 3, 5, 6, 4).reshape(B, H, nbx, nby, win * win, C)


def halo_reference(
    q, k, v, block_size, halo_size, pad_mode="zeros", rel_h=None, rel_w=None, scale=None, *, return_lse=False
):
    """q: (B, H, Xq, Yq, D), k/v: (B, H_kv, X, Y, D) -> (B, H, Xq, Yq, D); differentiable by autograd.

    ``pad_mode="zeros"``: window positions outside the map are keys with k = v = 0 that take part in the
    softmax (timm); ``"mask"``: they are excluded. ``rel_h``/``rel_w``: (2·win − 1, D) or None.
    ``return_lse=True`` also returns the per-query log-sum-exp of the logits, (B, H, Xq, Yq).
    """
    if pad_mode not in ("zeros", "mask"):
        raise ValueError(f"pad_mode must be 'zeros' or 'mask', got {pad_mode!r}")
    B, H, Xq, Yq, D = q.shape
    Hkv, X, Y = k.shape[1], k.shape[2], k.shape[3]
    bs, hs = int(block_size), int(halo_size)
    win = bs + 2 * hs
    r = X // Xq
    bq = bs // r
    nbx, nby = X // bs, Y // bs
    group = H // Hkv
    scale = D**-0.5 if scale is None else scale

    # (B, H, nbx, nby, bq·bq, D): the queries of each block, row-major over (ix, iy)
    qb = q.reshape(B, H, nbx, bq, nby, bq, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, nbx, nby, bq * bq, D)
    kw = _windows(k, bs, hs, win).repeat_interleave(group, 1)
    vw = _windows(v, bs, hs, win).repeat_interleave(group, 1)
    s = (qb @ kw.transpose(-1, -2)) * scale  # (B, H, nbx, nby, bq·bq, win·win)

    i = torch.arange(bq, device=q.device)
    j = torch.arange(win, device=q.device)
    rel_idx = j[None, :] - i[:, None] + win - 1  # (bq, win): table row for in-block i, window position j
    q6 = qb.reshape(B, H, nbx, nby, bq, bq, D)
    if rel_h is not None:  # logit[ix, iy, jx, jy] += q[ix, iy] · rel_h[rel_idx[ix, jx]]
        lh = torch.einsum("...xyd,xjd->...xyj", q6, rel_h[rel_idx].to(q.dtype))
        s = s + lh[..., :, None].expand(*lh.shape, win).reshape(s.shape)
    if rel_w is not None:  # logit[ix, iy, jx, jy] += q[ix, iy] · rel_w[rel_idx[iy, jy]]
        lw = torch.einsum("...xyd,yjd->...xyj", q6, rel_w[rel_idx].to(q.dtype))
        s = s + lw[..., None, :].expand(*lw.shape[:-1], win, win).reshape(s.shape)
    if pad_mode == "mask":
        ones = torch.ones(1, 1, X, Y, 1, dtype=torch.bool, device=q.device)
        inside = _windows(ones, bs, hs, win)[0, 0, :, :, :, 0]  # (nbx, nby, win·win)
        s = s.masked_fill(~inside[:, :, None, :], float("-inf"))
    o = s.softmax(-1) @ vw  # (B, H, nbx, nby, bq·bq, Dv)

    def unblock(t):
        c = t.shape[-1]
        return t.reshape(B, H, nbx, nby, bq, bq, c).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, Xq, Yq, c)

    o = unblock(o)
    return (o, unblock(s.logsumexp(-1, keepdim=True))[..., 0]) if return_lse else o
