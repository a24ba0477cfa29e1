"""NeighborhoodAttention1d/2d/3d: shapes, equality with a manual projection -> na*d (reference) -> projection,
relative-position bias, GQA, extra tokens, causality, argument errors, meta device, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from attnzoo.kernels.neighborhood import na1d, na2d, na3d
from tests.blocks.helpers import assert_causal

BLOCKS = {1: NeighborhoodAttention1d, 2: NeighborhoodAttention2d, 3: NeighborhoodAttention3d}
OPS = {1: na1d, 2: na2d, 3: na3d}
GRIDS = {1: (13,), 2: (6, 7), 3: (4, 5, 4)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def manual(blk, x, extra=None):
    """The block's computation written out: qkv projection -> na*d (reference backend) -> output projection."""
    C, H, Hkv, D = blk.dim, blk.num_heads, blk.num_kv_heads, blk.head_dim
    if Hkv == H:
        wq, wk, wv = blk.qkv.weight.split(C)
        bq, bk, bv = blk.qkv.bias.split(C)
    else:
        wq, bq = blk.q.weight, blk.q.bias
        wk, wv = blk.kv.weight.chunk(2)
        bk, bv = blk.kv.bias.chunk(2)

    def heads(t, w, b, n):  # (B, *S, C) -> (B, n, *S, D)
        return F.linear(t, w, b).unflatten(-1, (n, D)).movedim(-2, 1)

    q, k, v = heads(x, wq, bq, H), heads(x, wk, bk, Hkv), heads(x, wv, bv, Hkv)
    tokens = [] if blk.extra_kv is None else [blk.extra_kv.expand(x.shape[0], -1, -1)]
    tokens += [] if extra is None else [extra]
    ek = ev = None
    if tokens:
        t = torch.cat(tokens, 1)
        ek, ev = heads(t, wk, bk, Hkv), heads(t, wv, bv, Hkv)
    out = OPS[blk.spatial](q, k, v, blk.kernel_size, blk.dilation, blk.stride, blk.is_causal, rpb=blk.rpb,
                           extra_k=ek, extra_v=ev, backend="reference")
    return blk.proj(out.movedim(1, -2).flatten(-2))


CONFIGS = {
    "plain": {},
    "rpb+registers": {"rel_pos_bias": True, "num_extra_tokens": 2},
    "dilated-strided": {"dilation": 2, "stride": 2, "kernel_size": 2},
    "causal+rpb": {"is_causal": True, "rel_pos_bias": True},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_matches_manual_computation(spatial, config):
    torch.manual_seed(spatial)
    kwargs = {"kernel_size": 3, **CONFIGS[config]}
    blk = BLOCKS[spatial](32, num_heads=4, **kwargs).eval()
    x = torch.randn(2, *GRIDS[spatial], 32)
    with torch.no_grad():
        out = blk(x)
        assert out.shape == x.shape
        assert rel_err(out, manual(blk, x)) <= 1e-5


def test_per_axis_arguments_and_external_extra_2d():
    torch.manual_seed(0)
    blk = NeighborhoodAttention2d(32, 4, kernel_size=(3, 4), dilation=(2, 1), stride=(1, 2),
                                  is_causal=(True, False), num_extra_tokens=1).eval()
    assert blk.kernel_size == (3, 4) and blk.dilation == (2, 1) and blk.stride == (1, 2)
    assert blk.is_causal == (True, False)
    x, extra = torch.randn(2, 7, 8, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        assert rel_err(blk(x, extra), manual(blk, x, extra)) <= 1e-5


def test_reference_backend_agrees():
    torch.manual_seed(0)
    kwargs = {"kernel_size": 3, "num_kv_heads": 2, "rel_pos_bias": True, "num_extra_tokens": 2, "qk_norm": True}
    blk = NeighborhoodAttention2d(32, 4, **kwargs).eval()
    oracle = NeighborhoodAttention2d(32, 4, backend="reference", **kwargs).eval()
    oracle.load_state_dict(blk.state_dict())
    x, extra = torch.randn(2, 6, 5, 32), torch.randn(2, 2, 32)
    with torch.no_grad():
        assert rel_err(blk(x, extra), oracle(x, extra)) <= 1e-5


def test_parameter_names_and_shapes():
    blk = NeighborhoodAttention2d(48, 6, kernel_size=(3, 5), rel_pos_bias=True, num_extra_tokens=4)
    shapes = {name: tuple(p.shape) for name, p in blk.named_parameters()}
    assert shapes == {
        "qkv.weight": (144, 48), "qkv.bias": (144,), "rpb": (6, 5, 9), "extra_kv": (4, 48),
        "proj.weight": (48, 48), "proj.bias": (48,),
    }
    assert 0.01 < blk.rpb.std().item() < 0.03 and blk.extra_kv.std().item() < 0.03  # trunc_normal(std=.02), as NAT
    plain = NeighborhoodAttention1d(16, 2, 3, qkv_bias=False)
    assert plain.rpb is None and plain.extra_kv is None and plain.qkv.bias is None


def test_rpb_gradient_flows():
    torch.manual_seed(0)
    blk = NeighborhoodAttention2d(32, 4, kernel_size=3, rel_pos_bias=True)
    x = torch.randn(2, 6, 6, 32, requires_grad=True)
    blk(x).square().sum().backward()
    assert blk.rpb.grad is not None and blk.rpb.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # ... and it matches the gradient through the reference path.
    grad = blk.rpb.grad.clone()
    blk.zero_grad()
    manual(blk, x).square().sum().backward()
    assert rel_err(grad, blk.rpb.grad) <= 1e-4


def test_gqa_matches_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = NeighborhoodAttention1d(32, 4, 5, num_kv_heads=2, num_extra_tokens=2, rel_pos_bias=True).eval()
    assert not hasattr(gqa, "qkv") and gqa.q.weight.shape == (32, 32) and gqa.kv.weight.shape == (2 * 2 * 8, 32)
    mha = NeighborhoodAttention1d(32, 4, 5, num_extra_tokens=2, rel_pos_bias=True).eval()

    def rep(t):  # kv head j serves query heads 2j, 2j+1: repeat each head's rows twice
        return t.unflatten(0, (2, 8)).repeat_interleave(2, 0).flatten(0, 1)

    (wk, wv), (bk, bv) = gqa.kv.weight.chunk(2), gqa.kv.bias.chunk(2)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([gqa.q.weight, rep(wk), rep(wv)]))
        mha.qkv.bias.copy_(torch.cat([gqa.q.bias, rep(bk), rep(bv)]))
        for name in ("rpb", "extra_kv", "proj.weight", "proj.bias"):
            mha.get_parameter(name).copy_(gqa.get_parameter(name))
        x = torch.randn(2, 15, 32)
        assert rel_err(gqa(x), mha(x)) <= 1e-5
        assert rel_err(gqa(x), manual(gqa, x)) <= 1e-5


def test_extra_tokens_change_output():
    torch.manual_seed(0)
    reg = NeighborhoodAttention2d(32, 4, kernel_size=3, num_extra_tokens=3).eval()
    plain = NeighborhoodAttention2d(32, 4, kernel_size=3).eval()
    plain.load_state_dict(reg.state_dict(), strict=False)  # same weights, no registers
    x, extra = torch.randn(2, 5, 6, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        assert rel_err(reg(x), plain(x)) > 1e-3  # registers are seen
        assert rel_err(plain(x, extra), plain(x)) > 1e-3  # external tokens are seen
        assert rel_err(reg(x, extra), reg(x)) > 1e-3  # both together
        # Learnable registers are the same as passing those tokens from outside, registers first.
        assert rel_err(reg(x), plain(x, reg.extra_kv.expand(2, -1, -1))) <= 1e-5
        both = torch.cat([reg.extra_kv.expand(2, -1, -1), extra], 1)
        assert rel_err(reg(x, extra), plain(x, both)) <= 1e-5


# The torch backend's ``na_bwd`` returns dk and dextra_k as views of one buffer, which torch.library forbids
# (outputs of a custom op must not alias each other): any backward through extra tokens fails there.


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_extra_tokens_get_gradients(backend):
    torch.manual_seed(0)
    blk = NeighborhoodAttention2d(32, 4, kernel_size=3, num_extra_tokens=3, rel_pos_bias=True, backend=backend)
    x = torch.randn(2, 5, 6, 32)
    extra = torch.randn(2, 4, 32, requires_grad=True)
    blk(x, extra).square().sum().backward()
    assert blk.extra_kv.grad is not None and blk.extra_kv.grad.abs().sum() > 0
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("num_extra_tokens", [0, 2])
def test_causal_1d_ignores_later_tokens(num_extra_tokens):
    torch.manual_seed(0)
    blk = NeighborhoodAttention1d(32, 4, kernel_size=4, is_causal=True, rel_pos_bias=True,
                                  num_extra_tokens=num_extra_tokens).eval()
    assert_causal(blk, torch.randn(2, 16, 32), i=6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "message"),
    [
        (NeighborhoodAttention2d, {"dim": 30, "num_heads": 4}, ValueError,
         r"num_heads=4 must be a positive divisor of dim=30"),
        (NeighborhoodAttention2d, {"dim": 32, "num_heads": 8, "num_kv_heads": 3}, ValueError,
         r"num_kv_heads=3 must be a positive divisor of num_heads=8"),
        (NeighborhoodAttention2d, {"dim": 0}, ValueError, r"dim=0 must be a positive integer"),
        (NeighborhoodAttention2d, {"stride": 2, "rel_pos_bias": True}, ValueError,
         r"rel_pos_bias=True needs stride 1 on every axis .*got stride=\(2, 2\)"),
        (NeighborhoodAttention2d, {"kernel_size": (3, 1)}, ValueError,
         r"kernel_size=\(3, 1\) must be >= 2 on every axis"),
        (NeighborhoodAttention1d, {"dilation": 0}, ValueError, r"dilation=\(0,\) must be >= 1"),
        (NeighborhoodAttention2d, {"stride": (1, 4)}, ValueError,
         r"stride=\(1, 4\) must be in \[1, kernel_size\] on every axis \(kernel_size=\(3, 3\)\)"),
        (NeighborhoodAttention3d, {"kernel_size": (3, 3)}, TypeError,
         r"kernel_size=\(3, 3\) must be a int or a tuple of 3 ints"),
        (NeighborhoodAttention2d, {"kernel_size": True}, TypeError, r"kernel_size=True must be a int"),
        (NeighborhoodAttention2d, {"is_causal": 1}, TypeError, r"is_causal=1 must be a bool or a tuple of 2 bools"),
        (NeighborhoodAttention2d, {"num_extra_tokens": -1}, ValueError,
         r"num_extra_tokens=-1 must be an integer >= 0"),
        (NeighborhoodAttention2d, {"qk_scale": 0.0}, ValueError, r"qk_scale=0.0 must be a finite float > 0"),
        (NeighborhoodAttention2d, {"proj_drop": 1.0}, ValueError, r"proj_drop=1.0 must be in \[0, 1\)"),
        (NeighborhoodAttention2d, {"backend": "cuda"}, ValueError,
         r"backend='cuda' is not a known backend; accepted values: None, \['triton'"),
    ],
)
def test_bad_args(cls, kwargs, error, message):
    kwargs = {"dim": 32, "num_heads": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=message):
        cls(**kwargs)


def test_bad_inputs_surface_clear_errors():
    blk = NeighborhoodAttention2d(32, 4, kernel_size=(3, 7), dilation=(2, 1))
    with pytest.raises(ValueError, match=r"kernel_size\[1\]=7 must be in \[2, 6\]"):  # the op's check
        blk(torch.randn(1, 8, 6, 32))
    with pytest.raises(ValueError, match=r"dilation\[0\]=2 must be >= 1 with kernel_size\*dilation=3\*2=6 <= 5"):
        blk(torch.randn(1, 5, 9, 32))
    with pytest.raises(ValueError, match=r"x must have shape \(B, X, Y, C=32\) \(channels last\); got \(1, 8, 32\)"):
        blk(torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match=r"extra must have shape \(B=1, E, C=32\) to match x; got \(1, 2, 16\)"):
        blk(torch.randn(1, 8, 8, 32), torch.randn(1, 2, 16))


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_meta_device(spatial, num_kv_heads):
    blk = BLOCKS[spatial](32, 4, kernel_size=3, num_kv_heads=num_kv_heads, qk_norm=True, rel_pos_bias=True,
                          num_extra_tokens=2, device="meta")
    assert all(p.device.type == "meta" for p in blk.parameters())
    x = torch.empty(2, *GRIDS[spatial], 32, device="meta")
    out = blk(x, torch.empty(2, 3, 32, device="meta"))
    assert out.shape == x.shape and out.device.type == "meta"


def test_dtype_kwarg():
    blk = NeighborhoodAttention1d(16, 2, kernel_size=3, rel_pos_bias=True, num_extra_tokens=1, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in blk.parameters())
    assert blk(torch.randn(1, 7, 16, dtype=torch.float64)).dtype == torch.float64


def test_compile_fullgraph():
    torch.manual_seed(0)
    blk = NeighborhoodAttention2d(32, 4, kernel_size=3, num_kv_heads=2, qk_norm=True, rel_pos_bias=True)
    x = torch.randn(2, 6, 6, 32)
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, blk(x)) <= 1e-5
    out.square().sum().backward()
    assert blk.rpb.grad is not None and blk.rpb.grad.abs().sum() > 0
    # Extra tokens, forward and backward.
    reg = NeighborhoodAttention2d(32, 4, kernel_size=3, num_kv_heads=2, num_extra_tokens=2).eval()
    extra = torch.randn(2, 1, 32, requires_grad=True)
    out = torch.compile(reg, fullgraph=True, backend="aot_eager")(x, extra)
    assert rel_err(out, reg(x, extra)) <= 1e-5
    out.sum().backward()
    assert reg.extra_kv.grad.abs().sum() > 0 and extra.grad.abs().sum() > 0
