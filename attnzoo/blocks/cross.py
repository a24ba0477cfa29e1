"""Cross-attention blocks (design §2.6) on the shared fused kernel (``attnzoo.kernels.attention``).

``CrossAttention`` is the generic layer: queries from one stream, keys and values from another, a key-padding
mask and an optional Flamingo-style zero-init tanh gate. ``CrossViTFusion`` (CrossViT's class-token fusion
between branches) and ``AttentivePoolingHead`` (learned queries over the tokens: the V-JEPA / AIM attentive
probe) are built on it.

Naming: the query projection is ``q`` (C -> C) and the key/value projection ``kv`` (C_kv -> 2C, rows [k | v]),
as in ``QKVProjection``'s split layout (and timm's ``AttentionPoolLatent``): the two inputs differ, so no fused
``qkv`` exists, and keys and values always share one input, so they share one matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from attnzoo.blocks.mlp import Mlp
from attnzoo.blocks.qkv import check_block_options, check_heads, heads_first
from attnzoo.kernels import attention
from attnzoo.kernels.validate import check_int

__all__ = ["AttentivePoolingHead", "CrossAttention", "CrossViTFusion", "timm_crossvit_fusion_state_dict"]

Layer = Callable[..., nn.Module]


def _check_tokens(name: str, t: Tensor, width: int, batch: int | None = None) -> None:
    if t.dim() != 3 or t.shape[-1] != width or (batch is not None and t.shape[0] != batch):
        b = "B" if batch is None else f"B={batch}"
        raise ValueError(f"{name} must have shape ({b}, tokens, C={width}); got {tuple(t.shape)}")


class CrossAttention(nn.Module):
    """Multi-head cross attention: each token of x attends to the tokens of ``context``.

    ``out = tanh(gate) * proj(attention(q(x), k(context), v(context)))``, without the tanh factor when
    ``gate=False``. The gate is a learnable scalar initialised to 0 (Flamingo's gated cross-attention), so a
    gated layer added to a pretrained model starts as an exact no-op, and learns how much to let through.

    Args:
        dim: width C of x (and of the output).
        num_heads: heads H; ``dim`` must be divisible by it (head dim D = C / H).
        kv_dim: width C_kv of ``context``; None = ``dim``.
        qkv_bias: bias in the ``q`` / ``kv`` projections.
        qk_norm: normalize q and k per head (``norm_layer(D)``) before the scores.
        attn_drop: must be 0: the fused kernel never forms the attention weights, so it cannot drop them
            (accepted for signature compatibility with timm's attention layers).
        proj_drop: dropout after the output projection.
        gate: multiply the output by ``tanh(gate)``, a zero-initialised scalar parameter ``gate``.
        norm_layer: constructor of the qk-norm layer, called as ``norm_layer(D, device=, dtype=)``.
        backend: kernel backend passed to ``attnzoo.kernels.attention`` (None = automatic).

    Shapes: ``forward(x, context, key_padding_mask=None)``: x (B, N, C), context (B, M, C_kv) -> (B, N, C).
    ``key_padding_mask`` (B, M) bool marks padded context tokens with True (``nn.MultiheadAttention``'s
    convention); a query whose keys are all padded gets a zero attention output (so ``proj``'s bias alone).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        kv_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        gate: bool = False,
        norm_layer: Layer = nn.LayerNorm,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        check_heads(dim, num_heads, num_heads)
        check_int("kv_dim", kv_dim, 1)
        if attn_drop != 0.0:
            raise ValueError(
                f"attn_drop={attn_drop} is not supported: the fused attention kernel does not materialize the "
                "attention weights; accepted value: 0.0 (use proj_drop)")
        check_block_options(proj_drop, backend)
        dd = {"device": device, "dtype": dtype}
        self.dim, self.kv_dim, self.num_heads = dim, kv_dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(kv_dim, 2 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gate = nn.Parameter(torch.zeros((), **dd)) if gate else None

    def forward(self, x: Tensor, context: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C), context: (B, M, C_kv), key_padding_mask: (B, M) bool, True = padded -> (B, N, C)."""
        _check_tokens("x", x, self.dim)
        _check_tokens("context", context, self.kv_dim, batch=x.shape[0])
        B, N, C = x.shape
        M = context.shape[1]
        q = self.q_norm(self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        k, v = heads_first(self.kv(context).reshape(B, M, 2, self.num_heads, self.head_dim))
        out = attention(q, self.k_norm(k), v, scale=self.scale, key_padding_mask=key_padding_mask,
                        backend=self.backend)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return out if self.gate is None else torch.tanh(self.gate) * out

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, kv_dim={self.kv_dim}, "
                f"gate={self.gate is not None}, backend={self.backend!r}")


class ClassTokenCrossAttention(nn.Module):
    """CrossViT's ``CrossAttentionBlock``: the class token attends to itself and the patch tokens.

    ``cls + drop_path(attn(norm1(cls), norm1([cls, patches])))``: cls (B, 1, C), patches (B, P, C) -> (B, 1, C).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_drop: float, drop_path: float,
                 norm_layer: Layer, backend: str | None, dd: dict) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, backend=backend, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, cls: Tensor, patches: Tensor) -> Tensor:
        tokens = self.norm1(torch.cat([cls, patches], dim=1))
        return cls + self.drop_path(self.attn(tokens[:, :1], tokens))


class CrossViTFusion(nn.Module):
    """CrossViT's cross-attention fusion between branches (the fusion half of timm's ``MultiScaleBlock``).

    Branch i's class token is projected to the width of branch j = (i + 1) mod n (``projs[i]``: norm, act,
    linear), attends to itself and branch j's patch tokens (``fusion[i]``, with branch j's head count), is
    projected back (``revert_projs[i]``) and replaces branch i's class token; the patch tokens pass through.

    Parameters are laid out like timm's ``MultiScaleBlock`` with one fusion layer per branch (every released
    CrossViT): ``projs``, ``revert_projs`` and ``fusion.{i}.norm1`` are the same; timm's separate
    ``fusion.{i}.attn.wq / wk / wv`` are our ``attn.q`` and the stacked ``attn.kv`` (see
    ``timm_crossvit_fusion_state_dict``).

    Args:
        dims: token width of each branch (>= 2 branches).
        num_heads: heads of each branch; fusion i uses ``num_heads[(i + 1) % n]``.
        qkv_bias: bias in the q / kv projections.
        proj_drop: dropout after each attention's output projection.
        drop_path: stochastic-depth rate on each fused class-token update.
        act_layer, norm_layer: the projections' activation and norm (and the fusion's pre-norm).
        backend: kernel backend passed to ``attnzoo.kernels.attention``.

    Shapes: ``forward(xs)``: a sequence of n tensors (B, 1 + P_i, dims[i]) (class token first) -> a list of
    tensors of the same shapes.
    """

    def __init__(
        self,
        dims: Sequence[int],
        num_heads: Sequence[int],
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Layer = nn.GELU,
        norm_layer: Layer = nn.LayerNorm,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = len(dims)
        if n < 2 or len(num_heads) != n:
            raise ValueError(f"dims={tuple(dims)} and num_heads={tuple(num_heads)} must have one entry per branch "
                             "(>= 2 branches)")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path={drop_path} must be in [0, 1)")
        dd = {"device": device, "dtype": dtype}
        self.dims = tuple(dims)
        nxt = [(i + 1) % n for i in range(n)]
        self.projs = nn.ModuleList(
            nn.Sequential(norm_layer(dims[i], **dd), act_layer(), nn.Linear(dims[i], dims[j], **dd))
            for i, j in enumerate(nxt))
        self.fusion = nn.ModuleList(
            ClassTokenCrossAttention(dims[j], num_heads[j], qkv_bias, proj_drop, drop_path, norm_layer, backend, dd)
            for j in nxt)
        self.revert_projs = nn.ModuleList(
            nn.Sequential(norm_layer(dims[j], **dd), act_layer(), nn.Linear(dims[j], dims[i], **dd))
            for i, j in enumerate(nxt))

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """xs: n tensors (B, 1 + P_i, dims[i]) -> n tensors of the same shapes, class tokens fused."""
        n = len(self.dims)
        if len(xs) != n:
            raise ValueError(f"xs must hold one tensor per branch ({n}); got {len(xs)}")
        for i, x in enumerate(xs):
            _check_tokens(f"xs[{i}]", x, self.dims[i], batch=xs[0].shape[0])
        cls = [proj(x[:, :1]) for proj, x in zip(self.projs, xs, strict=True)]
        outs = []
        for i, (fusion, revert) in enumerate(zip(self.fusion, self.revert_projs, strict=True)):
            fused = fusion(cls[i], xs[(i + 1) % n][:, 1:])
            outs.append(torch.cat([revert(fused), xs[i][:, 1:]], dim=1))
        return outs


def timm_crossvit_fusion_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A timm crossvit ``MultiScaleBlock`` state dict (one fusion layer per branch) as a ``CrossViTFusion`` one:
    ``attn.wq`` -> ``attn.q``, ``attn.wk`` / ``attn.wv`` stacked into ``attn.kv``; the branch transformer
    ``blocks`` are dropped; everything else is kept."""
    out = {}
    for name, t in state_dict.items():
        if name.startswith("blocks."):
            continue
        if ".attn.wv." in name:
            continue
        if ".attn.wk." in name:
            t = torch.cat([t, state_dict[name.replace(".attn.wk.", ".attn.wv.")]])
            name = name.replace(".attn.wk.", ".attn.kv.")
        out[name.replace(".attn.wq.", ".attn.q.")] = t
    return out


class AttentivePoolingHead(nn.Module):
    """Attentive probe / pooling head (V-JEPA's ``AttentivePooler``, AIM's attention-pooling classifier):
    Q learned query tokens cross-attend to the (normed) tokens, then an MLP refines them::

        z = query + attn(query, norm(x))           # (B, Q, C)
        z = z + mlp(norm_mlp(z))                   # if mlp_ratio > 0
        logits = head(mean_q(z))                   # (B, num_classes); (B, C) features if num_classes == 0

    Args:
        dim: token width C.
        num_queries: number Q of learned queries ``query`` (1, Q, C), trunc-normal(std=0.02) initialised.
        num_heads: heads of the cross attention; ``dim`` must be divisible by it.
        num_classes: classifier outputs; 0 = no classifier (``head`` is Identity).
        mlp_ratio: hidden width of the MLP as a multiple of C; 0 = no MLP.
        qkv_bias, qk_norm: as in ``CrossAttention``.
        norm_layer, act_layer: the norms (tokens, MLP input) and the MLP activation.
        backend: kernel backend passed to ``attnzoo.kernels.attention``.

    Shapes: ``forward(x, key_padding_mask=None)``: x (B, N, C), key_padding_mask (B, N) bool (True = padded
    token, ignored) -> (B, num_classes), or (B, C) when ``num_classes == 0``. ``pool(x, key_padding_mask)``
    returns the per-query outputs (B, Q, C). A sample whose tokens are all padded gets ``query`` (+ MLP).
    """

    def __init__(
        self,
        dim: int,
        num_queries: int = 1,
        num_heads: int = 8,
        num_classes: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_layer: Layer = nn.LayerNorm,
        act_layer: Layer = nn.GELU,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("num_queries", num_queries, 1)
        check_int("num_classes", num_classes, 0)
        if not mlp_ratio >= 0:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} must be >= 0")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_queries, self.num_classes = dim, num_queries, num_classes
        self.query = nn.Parameter(torch.empty(1, num_queries, dim, **dd))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = norm_layer(dim, **dd)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=norm_layer,
                                   backend=backend, **dd)
        hidden = int(dim * mlp_ratio)
        self.norm_mlp = norm_layer(dim, **dd) if hidden else nn.Identity()
        self.mlp = Mlp(dim, hidden, act_layer=act_layer, **dd) if hidden else None
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes else nn.Identity()

    def pool(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C), key_padding_mask: (B, N) bool, True = padded -> per-query outputs (B, Q, C)."""
        query = self.query.expand(x.shape[0], -1, -1)
        z = query + self.attn(query, self.norm(x), key_padding_mask)
        return z if self.mlp is None else z + self.mlp(self.norm_mlp(z))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C) -> (B, num_classes), or pooled features (B, C) when ``num_classes == 0``."""
        return self.head(self.pool(x, key_padding_mask).mean(1))
