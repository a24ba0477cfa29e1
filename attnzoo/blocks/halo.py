"""Halo attention block (design §2.4), a drop-in for timm's ``HaloAttn`` on top of ``attnzoo.kernels.halo``.

The constructor arguments, parameter names and shapes are timm's (``q``, ``kv``, ``pos_embed.height_rel``,
``pos_embed.width_rel``, ``pool``), so a timm ``HaloAttn`` state dict loads unchanged and the module can be
swapped into timm's halo models (``ByobNet(replace(model_cfgs['halonet26t'], self_attn_layer=HaloAttention))``).
Instead of timm's unfold / matmul / fold, the heads-first q, k, v grids go to the fused ``halo2d`` op.
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from timm.layers.helpers import make_divisible
from timm.layers.weight_init import trunc_normal_
from torch import Tensor, nn

from attnzoo.blocks.moh import make_router
from attnzoo.kernels import BACKENDS
from attnzoo.kernels.halo import halo2d

__all__ = ["HaloAttention", "HaloPosEmbedRel"]

PAD_MODES = ("zeros", "mask")


class HaloPosEmbedRel(nn.Module):
    """Decomposed relative position tables, named and shaped like timm's ``PosEmbedRel``.

    ``height_rel`` / ``width_rel``: (2 * win_size - 1, dim_head). The lookup itself happens inside ``halo2d``
    (logit += q·height_rel[jx - ix + win - 1] + q·width_rel[jy - iy + win - 1]), so this module only holds them.
    """

    def __init__(
        self,
        block_size: int,
        win_size: int,
        dim_head: int,
        scale: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.block_size = block_size
        self.dim_head = dim_head
        self.scale = scale
        self.height_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **dd))
        self.width_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.height_rel, std=self.scale)
        nn.init.normal_(self.width_rel, std=self.scale)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, win_size={(self.height_rel.shape[0] + 1) // 2}, dim_head={self.dim_head}"


# A leaf for timm's FX feature extraction: the shape check and the op's argument checks are not symbolically
# traceable (``torch.compile`` and ``torch.export`` go through the module fine).
@register_notrace_module
class HaloAttention(nn.Module):
    """Halo attention (Vaswani et al. 2021, arXiv:2103.12731) with timm ``HaloAttn`` semantics.

    The feature map is split into ``block_size``² query blocks; each block attends the
    ``(block_size + 2 * halo_size)``² window centred on it. With ``pad_mode="zeros"`` (timm, what its
    pretrained halonets were trained with) keys outside the map are zero vectors that stay in the softmax;
    ``pad_mode="mask"`` leaves them out.

    Args:
        dim: input channels C.
        dim_out: output channels (= ``num_heads * dim_head_v``); None = ``dim``.
        feat_size: unused, accepted for argument compatibility with timm's bottleneck / lambda layers.
        stride: 1 or 2. With 2 the queries are the stride-2 subgrid (timm's ``block_stride``), or, when
            ``avg_down`` or ``block_size`` is odd, full-resolution queries followed by a 2x2 average pool.
        num_heads: attention heads.
        dim_head: q/k head dim; None = ``make_divisible(dim_out * qk_ratio, 8) // num_heads``.
        block_size: query block side b (the input H and W must be multiples of it).
        halo_size: halo h around each block.
        qk_ratio: q/k width relative to ``dim_out`` when ``dim_head`` is None.
        qkv_bias: bias in the q and kv 1x1 convs.
        avg_down: downsample with an average pool instead of strided query blocks.
        scale_pos_embed: scale the relative logits by ``dim_head ** -0.5`` as well as q·k.
        pad_mode: ``"zeros"`` (timm) or ``"mask"``, see above.
        backend: kernel backend passed to ``halo2d`` (None = automatic).
        moh: mixture-of-heads routing, ``dict(shared_heads=, top_k=[, load_balance_weight=])``: a ``router``
            (``attnzoo.blocks.moh``) gates each (token, head) output; None = every head at weight 1.
            Tokens are routed at their query positions.

    Shapes: ``forward(x)``: (B, C, H, W) -> (B, dim_out, H / stride, W / stride).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        feat_size: tuple[int, int] | None = None,
        stride: int = 1,
        num_heads: int = 8,
        dim_head: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        avg_down: bool = False,
        scale_pos_embed: bool = False,
        pad_mode: str = "zeros",
        backend: str | None = None,
        moh: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim_out = dim_out or dim
        _validate(dim_out, stride, num_heads, block_size, halo_size, pad_mode, backend)
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk**-0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + halo_size * 2
        self.pad_mode = pad_mode
        self.backend = backend
        self.block_stride = 1
        use_avg_pool = False
        if stride > 1:
            use_avg_pool = avg_down or block_size % stride != 0
            self.block_stride = 1 if use_avg_pool else stride
            self.block_size_ds = block_size // self.block_stride

        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        # Output channels are per head [k (dim_head_qk) | v (dim_head_v)], heads outermost, as in timm.
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **dd)
        self.pos_embed = HaloPosEmbedRel(self.block_size_ds, self.win_size, self.dim_head_qk, self.scale, **dd)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.router = make_router(moh, dim, num_heads, dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5  # fan-in
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Heads-first grids of x (B, C, H, W): q (B, nh, H / s, W / s, D), k and v (B, nh, H, W, D)."""
        B, _, H, W = x.shape
        q = self.q(x)
        q = q.reshape(B, self.num_heads, self.dim_head_qk, q.shape[-2], q.shape[-1]).permute(0, 1, 3, 4, 2)
        kv = self.kv(x).reshape(B, self.num_heads, self.dim_head_qk + self.dim_head_v, H, W).permute(0, 1, 3, 4, 2)
        k, v = kv.split([self.dim_head_qk, self.dim_head_v], dim=-1)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, dim_out, H / stride, W / stride)."""
        B, _, H, W = x.shape
        if H % self.block_size or W % self.block_size:
            raise ValueError(
                f"HaloAttention needs the input height and width to be multiples of block_size={self.block_size}, "
                f"got an input of size {H}x{W}"
            )
        q, k, v = self.project_qkv(x)
        rel_h, rel_w = self.pos_embed.height_rel, self.pos_embed.width_rel
        if self.scale_pos_embed:  # (q·k + q·r) * s == s * q·k + q·(s * r)
            rel_h, rel_w = rel_h * self.scale, rel_w * self.scale
        out = halo2d(
            q,
            k,
            v,
            self.block_size,
            self.halo_size,
            pad_mode=self.pad_mode,
            rel_h=rel_h,
            rel_w=rel_w,
            scale=self.scale,
            backend=self.backend,
            gates=self._gates(x, q.shape[2]),
        )
        out = out.permute(0, 1, 4, 2, 3).reshape(B, self.dim_out_v, out.shape[2], out.shape[3])
        return self.pool(out)

    def _gates(self, x: Tensor, query_rows: int) -> Tensor | None:
        """Router gates (B, H, Hq, Wq) from the input pixels at the query positions (every r-th, r = H / Hq)."""
        if self.router is None:
            return None
        r = x.shape[2] // query_rows
        return self.router(x[:, :, ::r, ::r].permute(0, 2, 3, 1))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, dim_head={self.dim_head_qk}, block_size={self.block_size}, "
            f"halo_size={self.halo_size}, block_stride={self.block_stride}, pad_mode={self.pad_mode!r}, "
            f"backend={self.backend!r}"
        )


def _validate(
    dim_out: int, stride: int, num_heads: int, block_size: int, halo_size: int, pad_mode: str, backend: str | None
) -> None:
    # Checked once at construction so a bad config fails with a readable message, not a reshape error.
    if num_heads < 1 or dim_out % num_heads:
        raise ValueError(f"num_heads={num_heads} must be a positive divisor of dim_out={dim_out}")
    if stride not in (1, 2):
        raise ValueError(f"stride={stride} is not supported; accepted values: 1, 2")
    if block_size < 1 or halo_size < 0:
        raise ValueError(f"block_size={block_size} must be >= 1 and halo_size={halo_size} >= 0")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r} is not supported; accepted values: {list(PAD_MODES)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known backend; accepted values: None, {list(BACKENDS)}")
