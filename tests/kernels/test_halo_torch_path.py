"""Halo attention: the float64 oracle (``reference.halo_reference``) against timm's ``HaloAttn``, and the fast
PyTorch path (``torch_impl.halo_fwd`` / ``halo_bwd``) against the oracle differentiated by autograd."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels.halo import torch_impl
from attnzoo.kernels.halo.reference import halo_reference
from attnzoo.kernels.precision import lse_dtype
from tests.kernels.helpers import assert_path_matches, leaf64, poison_allocations, randn, rel_err

timm_halo = pytest.importorskip("timm.layers.halo_attn")

# name: ((X, Y), block, halo, query stride r, H, H_kv, pad_mode, rel tables ("hw", "h", ""), Dv)
CASES = {
    "16x16_b8_h2": ((16, 16), 8, 2, 1, 2, 2, "zeros", "hw", 16),
    "12x12_b4_h1": ((12, 12), 4, 1, 1, 2, 2, "zeros", "hw", 16),
    "query_stride2": ((16, 16), 8, 2, 2, 2, 2, "zeros", "hw", 16),
    "mask": ((16, 16), 8, 2, 1, 2, 2, "mask", "hw", 16),
    "gqa": ((16, 16), 8, 2, 1, 4, 2, "zeros", "hw", 16),
    "no_rel": ((16, 16), 8, 2, 1, 2, 2, "zeros", "", 16),
    "nonsquare_16x8": ((16, 8), 8, 2, 1, 2, 2, "zeros", "hw", 16),
    "only_rel_h_mqa_mask": ((12, 8), 4, 1, 1, 3, 1, "mask", "h", 16),
    "halo_over_block_stride2_mask": ((16, 8), 4, 5, 2, 2, 1, "mask", "hw", 16),
    "no_halo_dv": ((8, 16), 4, 0, 1, 2, 2, "zeros", "hw", 8),
}


def _inputs(case: str, dtype: torch.dtype, batch: int = 2, dim: int = 16):
    (x, y), bs, hs, r, H, Hkv, mode, rel, dv = CASES[case]
    win = bs + 2 * hs
    q = randn(batch, H, x // r, y // r, dim, dtype=dtype, device="cpu")
    k = randn(batch, Hkv, x, y, dim, dtype=dtype, device="cpu")
    v = randn(batch, Hkv, x, y, dv, dtype=dtype, device="cpu")
    do = randn(batch, H, x // r, y // r, dv, dtype=dtype, device="cpu")
    rel_h = randn(2 * win - 1, dim, dtype=dtype, device="cpu", scale=0.5) if "h" in rel else None
    rel_w = randn(2 * win - 1, dim, dtype=dtype, device="cpu", scale=0.5) if "w" in rel else None
    return (q, k, v, rel_h, rel_w), do, (bs, hs, mode)


def _check(case: str, dtype: torch.dtype, monkeypatch):
    (q, k, v, rel_h, rel_w), do, (bs, hs, mode) = _inputs(case, dtype)
    scale = 0.3
    inputs = (q, k, v, rel_h, rel_w)
    leaves = [None if t is None else leaf64(t) for t in inputs]
    ref, ref_lse = halo_reference(*leaves[:3], bs, hs, mode, leaves[3], leaves[4], scale, return_lse=True)
    present = [t for t in leaves if t is not None]
    ref_grads = torch.autograd.grad(ref, present, do.double())

    poison_allocations(monkeypatch)
    out, lse = torch_impl.halo_fwd(q, k, v, bs, hs, mode, rel_h, rel_w, scale)
    grads = torch_impl.halo_bwd(do, q, k, v, out, lse, bs, hs, mode, rel_h, rel_w, scale)
    assert out.dtype == dtype and out.shape == do.shape
    assert lse.dtype == lse_dtype(dtype) and lse.shape == q.shape[:-1]
    names = ("dq", "dk", "dv", "drel_h", "drel_w")
    assert_path_matches(f"{case} {dtype}", dtype, names, inputs, grads, (out, lse), (ref, ref_lse), ref_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, monkeypatch):
    _check(case, dtype, monkeypatch)


@pytest.mark.parametrize("case", ["mask", "halo_over_block_stride2_mask"])
def test_float64_is_exact(case, monkeypatch):
    _check(case, torch.float64, monkeypatch)


@pytest.mark.parametrize("case", ["gqa", "halo_over_block_stride2_mask"])
def test_uneven_chunks(case, monkeypatch):
    """Chunks of 3 (batch·kv-head) slices out of 4 or 2: the last chunk is shorter, same results."""
    (x, y), bs, hs, r, H, Hkv, *_ = CASES[case]
    win = bs + 2 * hs
    per = (x // bs) * (y // bs) * (H // Hkv) * (bs // r) ** 2 * win * win
    monkeypatch.setattr(torch_impl, "_CHUNK_ELEMENTS", 3 * per)
    _check(case, torch.float32, monkeypatch)


def test_strided_inputs():
    """Inputs that are permuted views (e.g. straight from a conv's channels) give the same results."""
    (q, k, v, rel_h, rel_w), do, (bs, hs, mode) = _inputs("gqa", torch.float32)

    def strided(t):  # same values, channels-first storage
        return t.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)

    qs, ks, vs, dos = (strided(t) for t in (q, k, v, do))
    assert not qs.is_contiguous()
    args = (bs, hs, mode, rel_h, rel_w, 0.3)
    out, lse = torch_impl.halo_fwd(q, k, v, *args)
    out_s, lse_s = torch_impl.halo_fwd(qs, ks, vs, *args)
    assert torch.equal(out, out_s) and torch.equal(lse, lse_s)
    grads = torch_impl.halo_bwd(do, q, k, v, out, lse, *args)
    grads_s = torch_impl.halo_bwd(dos, qs, ks, vs, strided(out), lse, *args)
    for g, gs in zip(grads, grads_s, strict=True):
        assert rel_err(gs, g) <= 1e-6, rel_err(gs, g)


def test_default_scale():
    (q, k, v, rel_h, rel_w), _, (bs, hs, mode) = _inputs("16x16_b8_h2", torch.float64)
    out, _ = torch_impl.halo_fwd(q, k, v, bs, hs, mode, rel_h, rel_w, None)
    ref = halo_reference(q, k, v, bs, hs, mode, rel_h, rel_w)
    assert rel_err(out, ref) <= 1e-12
    assert rel_err(ref, halo_reference(q, k, v, bs, hs, mode, rel_h, rel_w, q.shape[-1] ** -0.5)) == 0


def test_rejects_bad_arguments():
    q = torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="pad_mode"):
        torch_impl.halo_fwd(q, q, q, 4, 1, "reflect", None, None, None)
    with pytest.raises(ValueError, match="divisible"):
        torch_impl.halo_fwd(q, q, q, 3, 1, "zeros", None, None, None)
    with pytest.raises(ValueError, match="downsampled"):
        torch_impl.halo_fwd(torch.randn(1, 2, 3, 3, 4), q, q, 4, 1, "zeros", None, None, None)
    with pytest.raises(ValueError, match="kv heads"):
        torch_impl.halo_fwd(torch.randn(1, 3, 8, 8, 4), q, q, 4, 1, "zeros", None, None, None)


def _timm_qkv(attn, x):
    """q/k/v of timm's HaloAttn as (B, heads, X, Y, d): its kv conv interleaves [k_h, v_h] per head."""
    B, _, X, Y = x.shape
    heads, dqk, dv = attn.num_heads, attn.dim_head_qk, attn.dim_head_v
    q = attn.q(x)
    q = q.reshape(B, heads, dqk, *q.shape[2:]).permute(0, 1, 3, 4, 2)
    k, v = attn.kv(x).reshape(B, heads, dqk + dv, X, Y).split([dqk, dv], 2)
    return q, k.permute(0, 1, 3, 4, 2), v.permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_matches_timm_halo_attn(stride):
    """Same weights, same input: timm's module output == our oracle (and the fast path), re-folded like timm."""
    torch.manual_seed(0)
    attn = timm_halo.HaloAttn(64, num_heads=4, stride=stride, block_size=8, halo_size=2).double().eval()
    with torch.no_grad():  # non-trivial tables (timm's init is ~scale-sized)
        attn.pos_embed.height_rel.normal_()
        attn.pos_embed.width_rel.normal_()
    x = torch.randn(2, 64, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        expected = attn(x)
        q, k, v = _timm_qkv(attn, x)
        args = (8, 2, "zeros", attn.pos_embed.height_rel, attn.pos_embed.width_rel, attn.scale)
        for out in (halo_reference(q, k, v, *args), torch_impl.halo_fwd(q, k, v, *args)[0]):
            folded = out.permute(0, 1, 4, 2, 3).reshape(expected.shape)  # (B, heads·dv, Xq, Yq)
            assert rel_err(folded, expected) <= 1e-6
