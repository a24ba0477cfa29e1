"""MultiHeadSelfAttention: timm parity, GQA, causality, sigmoid scores, argument errors, meta device."""

import pytest
import torch
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn

from attnzoo.blocks import MultiHeadSelfAttention
from tests.blocks.helpers import assert_causal


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_timm_parity(qk_norm, qkv_bias):
    torch.manual_seed(0)
    ref = TimmAttention(64, num_heads=4, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    if qk_norm:  # non-trivial norm affine parameters, so a mix-up of q_norm/k_norm would show
        for p in (*ref.q_norm.parameters(), *ref.k_norm.parameters()):
            nn.init.normal_(p)
    blk = MultiHeadSelfAttention(64, num_heads=4, qkv_bias=qkv_bias, qk_norm=qk_norm).eval()
    blk.load_state_dict(ref.state_dict(), strict=True)  # names and shapes match timm's
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        assert rel_err(blk(x), ref(x)) <= 1e-5


def test_gqa_shapes_and_grads():
    blk = MultiHeadSelfAttention(64, num_heads=8, num_kv_heads=2, qkv_bias=True, qk_norm=True)
    assert blk.q.weight.shape == (64, 64) and blk.kv.weight.shape == (2 * 2 * 8, 64)
    assert not hasattr(blk, "qkv")
    x = torch.randn(3, 17, 64, requires_grad=True)
    q, k, v = blk.project_qkv(x)
    assert q.shape == (3, 8, 17, 8) and k.shape == v.shape == (3, 2, 17, 8)
    out = blk(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mqa_matches_repeated_kv_heads():
    # MQA = plain MHA whose k/v heads are all copies of the single kv head.
    torch.manual_seed(0)
    mqa = MultiHeadSelfAttention(32, num_heads=4, num_kv_heads=1).eval()
    mha = MultiHeadSelfAttention(32, num_heads=4).eval()
    wk, wv = mqa.kv.weight.chunk(2)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([mqa.q.weight, wk.repeat(4, 1), wv.repeat(4, 1)]))
        mha.proj.load_state_dict(mqa.proj.state_dict())
        x = torch.randn(2, 9, 32)
        assert rel_err(mqa(x), mha(x)) <= 1e-5


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_causal(score, num_kv_heads):
    torch.manual_seed(0)
    blk = MultiHeadSelfAttention(32, num_heads=4, num_kv_heads=num_kv_heads, score=score, causal=True).eval()
    assert_causal(blk, torch.randn(2, 12, 32), i=5)


def test_sigmoid_runs_and_differs_from_softmax():
    torch.manual_seed(0)
    soft = MultiHeadSelfAttention(32, num_heads=4).eval()
    sig = MultiHeadSelfAttention(32, num_heads=4, score="sigmoid").eval()
    sig.load_state_dict(soft.state_dict())
    x = torch.randn(2, 10, 32, requires_grad=True)
    out = sig(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert rel_err(out.detach(), soft(x).detach()) > 1e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 30, "num_heads": 4}, r"num_heads=4 must be a positive divisor of dim=30"),
        ({"dim": 32, "num_heads": 0}, r"num_heads=0 must be a positive divisor of dim=32"),
        (
            {"dim": 32, "num_heads": 8, "num_kv_heads": 3},
            r"num_kv_heads=3 must be a positive divisor of num_heads=8",
        ),
        ({"dim": 32, "num_heads": 8, "num_kv_heads": 0}, r"num_kv_heads=0 must be a positive divisor"),
        (
            {"dim": 32, "score": "relu"},
            r"score='relu' is not supported; accepted values: \['softmax', 'sigmoid'\]",
        ),
        ({"dim": 32, "proj_drop": 1.0}, r"proj_drop=1.0 must be in \[0, 1\)"),
        ({"dim": 0}, r"dim=0 must be a positive integer"),
        ({"dim": 32, "backend": "cuda"}, r"backend='cuda' is not a known backend; accepted values: None, \['triton'"),
    ],
)
def test_bad_args(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadSelfAttention(**kwargs)


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_meta_device(num_kv_heads):
    blk = MultiHeadSelfAttention(64, num_heads=4, num_kv_heads=num_kv_heads, qk_norm=True, device="meta")
    assert all(p.device.type == "meta" for p in blk.parameters())
    out = blk(torch.empty(2, 16, 64, device="meta"))
    assert out.shape == (2, 16, 64) and out.device.type == "meta"


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_reference_backend_agrees(num_kv_heads):
    # The block forwards ``backend``: the oracle and the default path must give the same output.
    torch.manual_seed(0)
    blk = MultiHeadSelfAttention(32, num_heads=4, num_kv_heads=num_kv_heads).eval()
    oracle = MultiHeadSelfAttention(32, num_heads=4, num_kv_heads=num_kv_heads, backend="reference").eval()
    oracle.load_state_dict(blk.state_dict())
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        assert rel_err(blk(x), oracle(x)) <= 1e-5


def test_dtype_kwarg():
    blk = MultiHeadSelfAttention(32, num_heads=4, qk_norm=True, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in blk.parameters())
    assert blk(torch.randn(1, 5, 32, dtype=torch.float64)).dtype == torch.float64
