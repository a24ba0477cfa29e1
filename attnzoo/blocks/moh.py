"""Mixture-of-heads (MoH, Jin et al. 2024, arXiv:2410.11842): per-token head gates for any softmax-family block.

A block built with ``moh=dict(shared_heads=..., top_k=...)`` owns a ``MoHRouter`` (``router``) and passes its
gates to the attention op, which multiplies each (query, head) output by its gate in the kernel epilogue and
skips query tiles whose gates are all zero (``attnzoo.kernels.gating``). Routing follows the reference code
(SkyworkAI/MoH ``MoHAttention``), with its parameter names:

* routed heads (the last ``H - shared_heads``): ``softmax(wg x)``, top-k, renormalised over the chosen heads,
  times ``top_k``;
* shared heads (the first ``shared_heads``, always on): ``softmax(wg_1 x) * shared_heads`` (ones for a single
  shared head);
* two-stage weighting: ``softmax(wg_0 x) * 2`` scales shared vs routed gates (when both kinds exist);
* Switch-style load-balance loss over the routed heads, ``E² · mean(me · ce)`` (E routed heads, ``me`` the
  mean routing probability, ``ce`` the fraction of tokens that chose each head), times ``load_balance_weight``;
  recorded on every training forward in ``router.aux_loss`` and summed over a model by ``auxiliary_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MOH_OPTIONS = ("shared_heads", "top_k", "load_balance_weight")


class MoHRouter(nn.Module):
    """Head gates for tokens x (B, *S, C) -> (B, H, *S), heads-first like the ops' ``gates``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        shared_heads: int,
        top_k: int,
        load_balance_weight: float = 0.01,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        routed = num_heads - shared_heads
        if not 0 <= shared_heads <= num_heads:
            raise ValueError(f"shared_heads={shared_heads} must be in [0, num_heads={num_heads}]")
        low = 1 if routed else 0
        if not low <= top_k <= routed:
            raise ValueError(f"top_k={top_k} must be in [{low}, {routed}]: the routed heads are num_heads={num_heads} "
                             f"- shared_heads={shared_heads}")
        if load_balance_weight < 0:
            raise ValueError(f"load_balance_weight={load_balance_weight} must be >= 0")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.shared_heads, self.top_k = num_heads, shared_heads, top_k
        self.load_balance_weight = load_balance_weight
        self.wg = nn.Linear(dim, routed, bias=False, **dd) if routed else None
        self.wg_1 = nn.Linear(dim, shared_heads, bias=False, **dd) if shared_heads > 1 else None
        self.wg_0 = nn.Linear(dim, 2, bias=False, **dd) if shared_heads and routed else None
        self.aux_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        # Heads-first logits (G, B·N) from one GEMM for the (at most three) gate projections: a softmax over a
        # few heads is then vectorised along the tokens, several times faster than over rows of 2-12 heads.
        linears = [m for m in (self.wg, self.wg_1, self.wg_0) if m is not None]
        if not linears:  # one shared head and nothing routed: its gate is 1
            return x.new_ones(x.shape[0], self.num_heads, *x.shape[1:-1])
        weight = linears[0].weight if len(linears) == 1 else torch.cat([m.weight for m in linears])
        logits = iter(torch.mm(weight, tokens.t()).split([m.out_features for m in linears]))
        routed = F.softmax(next(logits), dim=0, dtype=torch.float32) if self.wg is not None else None
        shared = F.softmax(next(logits), dim=0, dtype=torch.float32) if self.wg_1 is not None else None
        # Each group's gates sum to its head count, times the two-stage weights: one scale per token and group.
        scale_shared, scale_routed = self.shared_heads, self.top_k
        if self.wg_0 is not None:
            stage = F.softmax(next(logits), dim=0, dtype=torch.float32)
            scale_shared, scale_routed = stage[:1] * (2 * self.shared_heads), stage[1:] * (2 * self.top_k)
        parts = []
        if self.shared_heads:
            # One shared head (here always beside routed ones) has no wg_1: its gate is its stage weight.
            parts.append(scale_shared if shared is None else shared * scale_shared)
        if routed is not None:
            parts.append(self._routed(routed, scale_routed))
        gates = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.dtype)  # (H, B·N)
        return gates.view(self.num_heads, *x.shape[:-1]).movedim(0, 1)

    def _routed(self, probs: Tensor, scale: Tensor | int) -> Tensor:
        """Gates (E, B·N) of the routed heads from their probabilities (E, B·N): the top-k renormalised, times
        ``scale`` (k, or the routed share of the two-stage weights); records the load-balance loss when
        training."""
        experts = probs.shape[0]
        # With every routed head chosen the renormalisation is the identity (a softmax sums to 1).
        chosen = None if self.top_k == experts else top_k_mask(probs, self.top_k, dim=0)
        if self.training:
            ce = probs.new_ones(experts) if chosen is None else chosen.mean(1, dtype=probs.dtype)
            self.aux_loss = self.load_balance_weight * experts**2 * (probs.mean(1) * ce).mean()
        if chosen is None:
            return probs * scale
        top = probs * chosen
        return top * (scale / top.sum(0))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, shared_heads={self.shared_heads}, top_k={self.top_k}, "
                f"load_balance_weight={self.load_balance_weight}")


def top_k_mask(probs: Tensor, k: int, dim: int = -1) -> Tensor:
    """Mask of the k largest of the probabilities ``probs`` (float32, >= 0) along ``dim``, ties to the lower index
    (a stable descending sort's order, on every device: topk's tie order is unspecified). Ranks by pairwise
    comparison of unique integer keys (value, then index): for MoH's few heads, E² comparisons per token cost
    less than a sort and two scatters, or topk."""
    if probs.dtype != torch.float32:
        raise ValueError(f"probs must be float32 (the router's probabilities); got {probs.dtype}")
    p = probs.movedim(dim, 0)  # (E, ...)
    experts = p.shape[0]
    # Non-negative float32 bits order like the values as int32; times E plus the reversed index, no two keys
    # tie and the lower index ranks first.
    order = torch.arange(experts - 1, -1, -1, device=p.device).view(experts, *(1,) * (p.ndim - 1))
    key = p.view(torch.int32).to(torch.int64) * experts + order
    ahead = torch.gt(key[:, None], key[None]).view(torch.uint8)  # [j, i]: head j ranks before head i
    rank = ahead.sum(0, dtype=torch.uint8 if experts <= 256 else torch.int32)
    return (rank < k).movedim(0, dim)


def make_router(moh: dict | None, dim: int, num_heads: int, dd: dict) -> MoHRouter | None:
    """The ``router`` of a block built with ``moh=dict(shared_heads=..., top_k=..., [load_balance_weight=...])``."""
    if moh is None:
        return None
    unknown = set(moh) - set(MOH_OPTIONS)
    if unknown or "shared_heads" not in moh or "top_k" not in moh:
        raise ValueError(f"moh={moh!r} must be a dict with keys shared_heads, top_k and optionally "
                         f"load_balance_weight")
    return MoHRouter(dim, num_heads, **moh, **dd)


def auxiliary_loss(model: nn.Module) -> Tensor | None:
    """Sum of the load-balance losses the model's routers recorded on their last training forward, cleared
    so that a loss is counted once; None when no router recorded one."""
    losses = []
    for module in model.modules():
        if isinstance(module, MoHRouter) and module.aux_loss is not None:
            losses.append(module.aux_loss)
            module.aux_loss = None
    return torch.stack(losses).sum() if losses else None
