"""The attention map of a model's last attention block, for any of the zoo's attentions, and its picture.

Every zoo attention projects its input with ``project_qkv(x) -> q, k, v`` (v heads-first, (B, H, *S, D)) and
mixes v linearly: out_q = Σ_k P_qk v_k. So with v replaced by a zero tensor z that requires grad, the gradient
of Σ out (taken before the output projection) with respect to z_k is Σ_q P_qk in every channel: the attention
key k receives from all queries. A hook swaps v this way in the last block, stops the forward there, and
reads the map from the gradient. This works through the fused ops (dense, neighborhood, halo) unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attention_received", "last_attention_block", "last_attention_map", "save_overlay"]


class _Stop(Exception):
    """Raised by the capture hook: nothing after the last attention block is needed."""


def last_attention_block(model: nn.Module) -> nn.Module:
    """The last module (in registration order) with a ``project_qkv`` method."""
    blocks = [m for m in model.modules() if callable(getattr(m, "project_qkv", None))]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no attention block (no module with project_qkv)")
    return blocks[-1]


def last_attention_map(model: nn.Module, images: Tensor) -> Tensor:
    """``attention_received`` with each map scaled to [0, 1]: images (B, C, H, W) -> (B, h, w)."""
    maps = attention_received(model, images)
    lo, hi = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def attention_received(model: nn.Module, images: Tensor) -> Tensor:
    """Attention each position receives in the last attention block: Σ over queries, mean over heads.

    images: (B, C, H, W), as the model takes them -> (B, h, w) on the block's grid (prefix tokens such as a
    class token left out)."""
    block = last_attention_block(model)
    captured: dict[str, Tensor] = {}
    original = block.project_qkv

    def project_qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = original(x)
        captured["v"] = torch.zeros_like(v).requires_grad_()
        return q, k, captured["v"]

    def capture(_module, args, output=None):
        captured["out"] = args[0] if output is None else output  # the mixed values, before any projection
        raise _Stop

    proj = getattr(block, "proj", None)
    hook = proj.register_forward_pre_hook(capture) if proj is not None else block.register_forward_hook(capture)
    block.project_qkv = project_qkv
    was_training = model.training
    model.eval()
    try:
        # Lightning predicts under inference mode, in which nothing records gradients: leave it for this pass.
        with torch.inference_mode(False), torch.enable_grad():
            with contextlib.suppress(_Stop):
                model(images.clone())  # a normal tensor, not an inference-mode one
            if "out" not in captured:
                raise RuntimeError(f"the forward of {type(model).__name__} did not reach its last attention block")
            (grad,) = torch.autograd.grad(captured["out"].sum(), captured["v"])
    finally:
        hook.remove()
        del block.project_qkv  # back to the class method
        model.train(was_training)
    received = grad[..., 0].detach().mean(dim=1)  # (B, *S): Σ_q P_qk, averaged over heads
    return _to_grid(model, block, received)


def _to_grid(model: nn.Module, block: nn.Module, received: Tensor) -> Tensor:
    """(B, h, w) stays; a token sequence (B, N) loses its prefix tokens and is laid out on the patch grid."""
    if received.dim() == 3:
        return received
    n = received.shape[1]
    grid = getattr(block, "grid_size", None) or getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        side = math.isqrt(n)
        grid = (side, side)
    prefix = n - grid[0] * grid[1]
    if prefix < 0 or received.dim() != 2:
        raise ValueError(f"cannot lay out the last attention block's {tuple(received.shape[1:])} keys as an image grid")
    return received[:, prefix:].reshape(-1, *grid)


def save_overlay(path: str | Path, image: Tensor, amap: Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    """Write a PNG: the image, and the image with ``amap`` upsampled to it and overlaid.

    image: normalized float (C, H, W) with C in (1, 3); amap: (h, w) in [0, 1]; mean/std undo the normalization."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    C, H, W = image.shape
    pixels = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    pixels = pixels.clamp(0, 1).permute(1, 2, 0).numpy()
    heat = F.interpolate(amap[None, None].float().cpu(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    fig = Figure(figsize=(4, 2.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, title in enumerate(("input", "last-block attention")):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(pixels[..., 0] if C == 1 else pixels, cmap="gray" if C == 1 else None, vmin=0, vmax=1)
        if i:
            ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.savefig(path)
