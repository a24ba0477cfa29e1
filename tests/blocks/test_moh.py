"""Mixture-of-heads: the router vs the reference code's formula, MoH blocks (dense, neighborhood, halo) vs the
dense formula (every head computed, then gated), the load-balance loss, deterministic ties, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import HaloAttention, MultiHeadSelfAttention, NeighborhoodAttention2d
from attnzoo.blocks.moh import MoHRouter, auxiliary_loss, top_k_mask
from attnzoo.kernels.attention.reference import attention_reference
from attnzoo.kernels.halo.reference import halo_reference
from attnzoo.kernels.neighborhood.reference import na_reference
from tests.kernels.helpers import rel_err


def router_formula(router: MoHRouter, x: torch.Tensor) -> torch.Tensor:
    """SkyworkAI/MoH ``MoHAttention`` routing on tokens x (T, C) -> gates (T, H), written out as in its code."""
    shared, top_k, heads = router.shared_heads, router.top_k, router.num_heads
    columns = []
    if shared:
        columns.append(F.softmax(x @ router.wg_1.weight.T, -1) * shared if shared > 1 else x.new_ones(len(x), 1))
    if heads > shared:
        gates = F.softmax(x @ router.wg.weight.T, -1)
        mask = F.one_hot(gates.topk(top_k, -1).indices, heads - shared).sum(1).to(gates.dtype)
        routed = gates * mask
        columns.append(routed / routed.sum(-1, keepdim=True) * top_k)
    if shared and heads > shared:
        weights = F.softmax(x @ router.wg_0.weight.T, -1) * 2
        columns = [columns[0] * weights[:, :1], columns[1] * weights[:, 1:]]
    return torch.cat(columns, -1)


@pytest.mark.parametrize(("heads", "shared", "top_k"), [(12, 6, 4), (8, 1, 3), (6, 0, 2), (4, 4, 0), (1, 1, 0)])
def test_router_matches_reference_formula(heads, shared, top_k):
    router = MoHRouter(32, heads, shared, top_k).train()
    x = torch.randn(2, 5, 32)
    gates = router(x)
    assert gates.shape == (2, heads, 5)
    expect = router_formula(router, x.reshape(-1, 32))
    assert rel_err(gates.movedim(1, -1).reshape(-1, heads), expect) < 1e-6
    active = (gates != 0).sum(1)
    assert (active == shared + top_k).all()


def test_load_balance_loss_hand_computed():
    """Two routed heads, top-1, two tokens with probabilities (1/4, 3/4) and (3/4, 1/4): me = ce = (1/2, 1/2),
    so the loss is E² · mean(me · ce) = 4 · 1/4 = 1, times the weight."""
    router = MoHRouter(2, 2, 0, 1, load_balance_weight=0.5).train()
    with torch.no_grad():  # logits (0, ln 3) and (0, -ln 3)
        router.wg.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]) * torch.log(torch.tensor(3.0)))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gates = router(x)
    torch.testing.assert_close(gates, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(router.aux_loss, torch.tensor(0.5))


def test_auxiliary_loss_sums_the_routers_once():
    model = torch.nn.Sequential(MultiHeadSelfAttention(32, 4, moh=dict(shared_heads=1, top_k=2)),
                                MultiHeadSelfAttention(32, 4, moh=dict(shared_heads=2, top_k=1, load_balance_weight=1)))
    model.train()
    model(torch.randn(2, 7, 32))
    expect = model[0].router.aux_loss + model[1].router.aux_loss
    torch.testing.assert_close(auxiliary_loss(model), expect)
    assert auxiliary_loss(model) is None  # cleared: a loss is counted once
    model.eval()
    model(torch.randn(2, 7, 32))
    assert auxiliary_loss(model) is None  # eval forwards record nothing


def test_ties_are_deterministic():
    router = MoHRouter(8, 6, 2, 2)
    torch.nn.init.zeros_(router.wg.weight)  # every routed head ties
    gates = router(torch.randn(3, 8))
    assert (gates[:, 2:4] > 0).all() and not gates[:, 4:].any()  # the lowest indices win, every time
    assert torch.equal(router(torch.randn(3, 8)) != 0, gates != 0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_mask_is_a_stable_sort(k):
    """Rows with ties inside, across and beyond the cut: the mask picks what a stable descending sort keeps."""
    torch.manual_seed(0)
    probs = torch.randint(0, 4, (200, 6)).float() / 4  # few distinct values: ties everywhere
    chosen = probs.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    expect = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, chosen, True)
    assert torch.equal(top_k_mask(probs, k), expect)
    assert torch.equal(top_k_mask(probs.t(), k, dim=0), expect.t())  # heads-first, as the router calls it


def test_top_k_mask_past_256_heads_and_dtype():
    """Ranks past 255 (a wider count than for MoH's few heads) and a clear error for non-float32 input."""
    torch.manual_seed(0)
    probs = torch.randint(0, 50, (4, 300)).float()
    chosen = probs.sort(dim=-1, descending=True, stable=True).indices[:, :270]
    expect = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, chosen, True)
    assert torch.equal(top_k_mask(probs, 270), expect)
    with pytest.raises(ValueError, match="probs must be float32"):
        top_k_mask(probs.double(), 2)


def _gated_formula(blk, x, q, k, v, o_heads, gates):
    """proj(concat_h(g_h · o_h)) from every head's ungated output o_heads (B, H, *S, Dv)."""
    out = o_heads * gates[..., None]
    if isinstance(blk, HaloAttention):
        return out.permute(0, 1, 4, 2, 3).reshape(x.shape[0], -1, *out.shape[2:4])
    return blk.proj(out.movedim(1, -2).reshape(*x.shape[:-1], -1))


def _dense_heads(blk, x):
    q, k, v = blk.project_qkv(x)
    return q, k, v, attention_reference(q, k, v, scale=blk.scale)


def _na_heads(blk, x):
    q, k, v = blk.project_qkv(x)
    return q, k, v, na_reference(q, k, v, blk.kernel_size, blk.dilation, blk.stride, blk.is_causal, blk.rpb,
                                 scale=blk.scale)


def _halo_heads(blk, x):
    q, k, v = blk.project_qkv(x)
    o = halo_reference(q, k, v, blk.block_size, blk.halo_size, blk.pad_mode, blk.pos_embed.height_rel,
                       blk.pos_embed.width_rel, blk.scale)
    return q, k, v, o


BLOCKS = {
    "dense": (lambda moh, be: MultiHeadSelfAttention(48, 6, qkv_bias=True, moh=moh, backend=be), (2, 21, 48),
              _dense_heads, lambda x: x),
    "na2d": (lambda moh, be: NeighborhoodAttention2d(48, 6, 3, rel_pos_bias=True, moh=moh, backend=be),
             (2, 7, 9, 48), _na_heads, lambda x: x),
    "halo": (lambda moh, be: HaloAttention(48, num_heads=6, block_size=4, halo_size=1, moh=moh, backend=be),
             (2, 48, 8, 8), _halo_heads, lambda x: x.permute(0, 2, 3, 1)),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", BLOCKS)
def test_moh_block_matches_dense_formula(family, backend, request):
    """Outputs and every parameter gradient equal the MoH reference recipe: all heads computed densely,
    multiplied by the reference router's gates, projected."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    make, shape, heads, tokens = BLOCKS[family]
    blk = make(dict(shared_heads=2, top_k=2), backend).to(device).train()
    ref = copy.deepcopy(blk).double()
    x = torch.randn(*shape, device=device)
    out = blk(x)
    x64 = x.double()
    gates = router_formula(ref.router, tokens(x64).reshape(-1, 48)).view(*tokens(x64).shape[:-1], 6).movedim(-1, 1)
    expect = _gated_formula(ref, x64, *heads(ref, x64), gates)
    assert rel_err(out, expect) < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    expect.backward(grad.double())
    for (name, p), p_ref in zip(blk.named_parameters(), ref.parameters(), strict=True):
        assert rel_err(p.grad, p_ref.grad) < 1e-5, name


def test_all_routed_heads_is_gated_mhsa():
    """top_k = every routed head: no gate is zero, and the block is MHSA with those soft gates."""
    blk = MultiHeadSelfAttention(32, 4, moh=dict(shared_heads=1, top_k=3)).eval()
    x = torch.randn(2, 9, 32)
    gates = blk.router(x)
    assert (gates > 0).all()
    q, k, v = blk.project_qkv(x)
    expect = blk.proj((attention_reference(q, k, v) * gates[..., None]).transpose(1, 2).reshape(2, 9, 32))
    assert rel_err(blk(x), expect) < 1e-5


@pytest.mark.parametrize(
    ("moh", "message"),
    [
        (dict(shared_heads=2, top_k=3), r"top_k=3 must be in \[1, 2\]: the routed heads are num_heads=4"),
        (dict(shared_heads=5, top_k=1), r"shared_heads=5 must be in \[0, num_heads=4\]"),
        (dict(shared_heads=4, top_k=1), r"top_k=1 must be in \[0, 0\]"),
        (dict(shared_heads=1, top_k=0), r"top_k=0 must be in \[1, 3\]"),
        (dict(shared_heads=1), "must be a dict with keys shared_heads, top_k"),
        (dict(shared_heads=1, top_k=1, weight=2), "must be a dict with keys shared_heads, top_k"),
    ],
)
def test_bad_moh_options(moh, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadSelfAttention(32, 4, moh=moh)
