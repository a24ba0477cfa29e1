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


def uses_aten_flash(q: torch.Tensor, v: torch.Tensor, score: str) -> bool:
    """Whether ``attention_fwd`` runs ATen's CPU flash kernel: its output (gated or not) is then laid out as
    ``aten_flash_out_like``."""
    return _HAS_ATEN_FLASH and q.device.type == "cpu" and score == "softmax" and v.shape[-1] == q.shape[-1]


def aten_flash_out_like(q: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as ATen's CPU flash output for ``q`` (B, H, N, D): in q's memory order, e.g.
    tokens-major (B, N, H, D) for q from a packed qkv projection, so that merging the heads is a view."""
    return torch.empty_like(_unit_dim(q))


def _additive_mask(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, M) keep-mask -> (B, 1, 1, M) additive logit mask for ATen (0 kept, -inf dropped)."""
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~key_mask, float("-inf"))[:, None, None]


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, 1)


def _unit_dim(t: torch.Tensor) -> torch.Tensor:
    """ATen's CPU flash kernels read the head dim as unit-stride rows: copy a strided one."""
    return t if t.stride(-1) == 1 else t.contiguous()


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
    """q: (B, H, N, D), k: (B, H_kv, M, D), v: (B, H_kv, M, Dv) -> out (B, H, N, Dv), lse (B, H, N), contiguous
    except ATen's out (``uses_aten_flash``), laid out as ``aten_flash_out_like(q)``: not copied, so that the
    blocks' ``out.transpose(1, 2).reshape(B, N, H·Dv)`` is a view, as after SDPA.

    key_mask: (B, M) bool, True = the key is seen. A query that sees no key outputs 0.
    """
    group = q.shape[1] // k.shape[1]
    if uses_aten_flash(q, v, score):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _unit_dim(q), _unit_dim(_expand_kv(k, group)), _unit_dim(_expand_kv(v, group)), 0.0, causal,
            attn_mask=_additive_mask(key_mask, q.dtype), scale=scale)
        return out, lse.to(lse_dtype(q.dtype)).contiguous()
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
    if uses_aten_flash(q, v, score):
        ke, ve = _unit_dim(_expand_kv(k, group)), _unit_dim(_expand_kv(v, group))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _unit_dim(do), _unit_dim(q), ke, ve, out, lse.float() if q.dtype != torch.float64 else lse, 0.0, causal,
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


def _sequences(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, L, X) -> (B·H, 1, L, X): one single-head sequence per query head (GQA kv repeated)."""
    t = _expand_kv(t, heads // t.shape[1])
    return t.reshape(-1, 1, *t.shape[2:])


def _take(t: torch.Tensor | None, index: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sequences ``index`` of t (S, 1, L, X) or (S, L), and of those the ``rows`` (len(index), n) when given."""
    if t is None:
        return None
    t = t.index_select(0, index)
    if rows is None:
        return t
    if t.ndim == 2:
        return t.gather(1, rows)
    return t.gather(2, rows[:, None, :, None].expand(-1, 1, -1, t.shape[-1]))


def _put(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Inverse of ``_take``: write src into sequences ``index`` (and ``rows``) of dst."""
    if rows is not None:
        full = dst.index_select(0, index)
        if dst.ndim == 2:
            src = full.scatter(1, rows, src)
        else:
            src = full.scatter(2, rows[:, None, :, None].expand(-1, 1, -1, src.shape[-1]), src)
    dst.index_copy_(0, index, src)


def _groups(plan):
    return ((plan.whole, None), (plan.sparse, plan.rows))


def gated_attention_fwd(q, k, v, causal, scale, score, sigmoid_bias, key_mask, gates):
    """``attention_fwd`` with per-(query, head) output gates (B, H, N) (see ``attnzoo.kernels.gating``).

    Without a causal mask, (batch, head) sequences with few active rows (MoH's routed heads) are computed only
    on those rows, the rest (e.g. shared heads) whole; a causal mask ties a row to its position, so then every
    row is computed and gated. The output is laid out as ``attention_fwd``'s, whichever rows were computed.
    """
    plan = None if causal else gating.row_plan(gates)
    if plan is None:  # out is fresh and already in attention_fwd's layout: gate it in place
        out, lse = attention_fwd(q, k, v, causal, scale, score, sigmoid_bias, key_mask)
        return gating.gate_output(out, gates, out), lse
    B, H, N = q.shape[:3]
    qs, ks, vs = _sequences(q, H), _sequences(k, H), _sequences(v, H)
    km = None if key_mask is None else key_mask.repeat_interleave(H, 0)
    out = q.new_zeros((B * H, 1, N, v.shape[-1]))
    lse = torch.full((B * H, 1, N), float("inf"), device=q.device, dtype=lse_dtype(q.dtype))
    for index, rows in _groups(plan):
        if index.numel():
            o, l = attention_fwd(_take(qs, index, rows), _take(ks, index), _take(vs, index), False, scale, score,
                                 sigmoid_bias, _take(km, index))
            _put(out, index, o, rows)
            _put(lse.view(B * H, N), index, l.view(len(index), -1), rows)
    dst = aten_flash_out_like(q) if uses_aten_flash(q, v, score) else None
    return gating.gate_output(out.view(B, H, N, -1), gates, dst), lse.view(B, H, N)


def gated_attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias, key_mask, gates):
    """(dq, dk, dv) of ``gated_attention_fwd`` from its gated output ``out`` and gradient ``do``."""
    do, out = gating.ungated(do, out, gates)
    plan = None if causal else gating.row_plan(gates)
    if plan is None:
        return attention_bwd(do, q, k, v, out, lse, causal, scale, score, sigmoid_bias, key_mask)
    B, H, N = q.shape[:3]
    qs, ks, vs, dos, outs = (_sequences(t, H) for t in (q, k, v, do, out))
    lses = lse.reshape(B * H, N)
    km = None if key_mask is None else key_mask.repeat_interleave(H, 0)
    dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(ks), torch.zeros_like(vs)
    for index, rows in _groups(plan):
        if index.numel():
            g_dq, g_dk, g_dv = attention_bwd(
                _take(dos, index, rows), _take(qs, index, rows), _take(ks, index), _take(vs, index),
                _take(outs, index, rows), _take(lses, index, rows)[:, None], False, scale, score, sigmoid_bias,
                _take(km, index))
            _put(dq, index, g_dq, rows)
            _put(dk, index, g_dk)
            _put(dv, index, g_dv)
    hkv = k.shape[1]
    return (dq.view(q.shape), dk.view(B, hkv, H // hkv, *k.shape[2:]).sum(2),
            dv.view(B, hkv, H // hkv, *v.shape[2:]).sum(2))
