"""The ``torch`` implementation of the fused attention op: exact, any device, no (N, M) matrix
larger than one query chunk. On CPU, dense softmax attention goes to ATen's fused flash kernel."""

from __future__ import annotations

import torch

from attnzoo.kernels import gating
from attnzoo.kernels.precision import compute_dtype, lse_dtype

# Scores held at once per chunk (elements); bounds memory to ~64 MB of fp32 scores.
_CHUNK_ELEMENTS = 1 << 24



# ATen's fused CPU flash attention (private ops, present since torch 2.2); the chunked path stands in without them.
_HAS_ATEN_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _use_aten_flash(q: torch.Tensor, v: torch.Tensor, score: str) -> bool:
    return _HAS_ATEN_FLASH and q.device.type == "cpu" and score == "softmax" and v.shape[-1] == q.shape[-1]


def _additive_mask(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, M) keep-mask -> (B, 1, 1, M) additive logit mask for ATen (0 kept, -inf dropped)."""
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, float("-inf"))[:, None, None]


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, 1)


def _chunks(q: torch.Tensor, m: int):
    """Query ranges so that one chunk's scores stay within the memory budget."""
    b, h, n = q.shape[:3]
    step = max(1, min(n, _CHUNK_ELEMENTS // max(1, b * h * m)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _hidden(s: torch.Tensor, start: int, causal: bool, key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which of the scores ``s`` (B, Hkv, G, c, M) of queries [start, start + c) are masked, or None."""
    hidden = None
    if causal:
        rows = torch.arange(start, start + s.shape[-2], device=s.device)[:, None]
        hidden = torch.arange(s.shape[-1], device=s.device)[None, :] > rows
    if key_mask is not None:
        dropped = ~key_mask[:, None, None, None, :]
        hidden = dropped if hidden is None else hidden | dropped
    return hidden


def _probs(s: torch.Tensor, hidden: torch.Tensor | None, score: str, bias: float, lse: torch.Tensor | None):
    """Probabilities for scores ``s`` (B, Hkv, G, c, M) and the log-sum-exp of softmax rows.

    A query that sees no key gets lse = +inf, so its probabilities (and output) are 0.
    """
    if score == "softmax":
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(s, -1)
            lse = lse.masked_fill(lse == float("-inf"), float("inf"))
        return torch.exp(s - lse[..., None]), lse
    p = torch.sigmoid(s + bias)
    return (p if hidden is None else p.masked_fill(hidden, 0.0)), None


def _grouped(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, N, X) -> (B, H_kv, G, N, X) view."""
    return t.view(t.shape[0], hkv, t.shape[1] // hkv, *t.shape[2:])


def attention_fwd(q, k, v, causal, scale, score, sigmoid_bias, key_mask=None):
    """q: (B, H, N, D), k: (B, H_kv, M, D), v: (B, H_kv, M, Dv) -> out (B, H, N, Dv), lse (B, H, N).

    key_mask: (B, M) bool, True = the key is seen. A query that sees no key outputs 0.
    """
    group = q.shape[1] // k.shape[1]
    if _use_aten_flash(q, v, score):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_kv(k, group), _expand_kv(v, group), 0.0, causal, attn_mask=_additive_mask(key_mask, q.dtype),
            scale=scale)
        # ATen lays both out heads-second in memory; the op's contract is contiguous (B, H, N, ...).
        return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()
    cdt = compute_dtype(q.dtype)
    hkv = k.shape[1]
    qg = _grouped(q, hkv)
    kt, vc = k.to(cdt).transpose(-1, -2).unsqueeze(2), v.to(cdt).unsqueeze(2)
    out = q.new_empty((*q.shape[:3], v.shape[-1]))
    lse = torch.zeros(q.shape[:3], device=q.device, dtype=cdt)
    og, lg = _grouped(out, hkv), _grouped(lse, hkv)
    for a, b in _chunks(q, k.shape[2]):
        s = (qg[:, :, :, a:b].to(cdt) @ kt) * scale
        p, chunk_lse = _probs(s, _hidden(s, a, causal, key_mask), score, sigmoid_bias, None)
        og[:, :, :, a:b] = (p @ vc).to(q.dtype)
        if chunk_lse is not None:
            lg[:, :, :, a:b] = chunk_lse
    return out, lse


def attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias, key_mask=None):
    """Gradients (dq, dk, dv) recomputed per query chunk from the saved ``lse``."""
    group = q.shape[1] // k.shape[1]
    if _use_aten_flash(q, v, score):
        ke, ve = _expand_kv(k, group), _expand_kv(v, group)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.contiguous(), q, ke, ve, out, lse.float() if q.dtype != torch.float64 else lse, 0.0, causal,
            attn_mask=_additive_mask(key_mask, q.dtype), scale=scale)
        if group > 1:
            dk = _grouped(dk, k.shape[1]).sum(2)
            dv = _grouped(dv, k.shape[1]).sum(2)
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    cdt = compute_dtype(q.dtype)
    hkv = k.shape[1]
    qg, dog, og, lg = _grouped(q, hkv), _grouped(do, hkv), _grouped(out, hkv), _grouped(lse, hkv)
    kc, vc = k.to(cdt).unsqueeze(2), v.to(cdt).unsqueeze(2)
    dq = q.new_empty(q.shape)
    dqg = _grouped(dq, hkv)
    dk = torch.zeros(k.shape, device=k.device, dtype=cdt)
    dv = torch.zeros(v.shape, device=v.device, dtype=cdt)
    for a, b in _chunks(q, k.shape[2]):
        qc, doc = qg[:, :, :, a:b].to(cdt), dog[:, :, :, a:b].to(cdt)
        s = (qc @ kc.transpose(-1, -2)) * scale
        p, _ = _probs(s, _hidden(s, a, causal, key_mask), score, sigmoid_bias,
                      lg[:, :, :, a:b] if score == "softmax" else None)
        dp = doc @ vc.transpose(-1, -2)
        if score == "softmax":
            delta = (doc * og[:, :, :, a:b].to(cdt)).sum(-1, keepdim=True)
            ds = p * (dp - delta)
        else:
            ds = p * (1 - p) * dp
        dv += (p.transpose(-1, -2) @ doc).sum(2)
        dk += (ds.transpose(-1, -2) @ qc).sum(2) * scale
        dqg[:, :, :, a:b] = ((ds @ kc) * scale).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, H, n) of t (B, H, N, X) -> (B, H, n, X)."""
    return t.gather(2, index[..., None].expand(*index.shape, t.shape[-1]))


def _scatter_rows(shape, index: torch.Tensor, rows: torch.Tensor, fill: float) -> torch.Tensor:
    out = torch.full(shape, fill, dtype=rows.dtype, device=rows.device)
    if rows.ndim == 3:
        return out.scatter_(2, index, rows)
    return out.scatter_(2, index[..., None].expand(*index.shape, rows.shape[-1]), rows)


def gated_attention_fwd(q, k, v, causal, scale, score, sigmoid_bias, key_mask, gates):
    """``attention_fwd`` with per-(query, head) output gates (B, H, N) (see ``attnzoo.kernels.gating``).

    Without a causal mask only the rows with a non-zero gate are computed when few enough are active (MoH's
    top-k); a causal mask ties a row to its position, so then every row is computed and gated.
    """
    index = None if causal else gating.active_rows(gates)
    if index is None:
        out, lse = attention_fwd(q, k, v, causal, scale, score, sigmoid_bias, key_mask)
    else:
        out_c, lse_c = attention_fwd(_rows(q, index), k, v, False, scale, score, sigmoid_bias, key_mask)
        out = _scatter_rows((*q.shape[:3], v.shape[-1]), index, out_c, 0.0)
        lse = _scatter_rows(q.shape[:3], index, lse_c, float("inf"))
    return gating.gate_output(out, gates), lse


def gated_attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias, key_mask, gates):
    """(dq, dk, dv) of ``gated_attention_fwd`` from its gated output ``out`` and gradient ``do``."""
    do, out = gating.ungated(do, out, gates)
    index = None if causal else gating.active_rows(gates)
    if index is None:
        return attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias, key_mask)
    dq_c, dk, dv = attention_bwd(_rows(do, index), _rows(q, index), k, v, _rows(out, index), lse.gather(2, index),
                                 False, scale, score, sigmoid_bias, key_mask)
    return _scatter_rows(q.shape, index, dq_c, 0.0), dk, dv
