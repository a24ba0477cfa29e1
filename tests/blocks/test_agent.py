"""AgentAttention vs an explicit float64 formula (block-mean agents, the two softmax attentions with the row/column
agent biases, the depthwise-conv term; forward and every gradient) on a grid with prefix tokens and on a sequence,
the Triton backend, uneven pooling bins, the MultiHeadSelfAttention weight layout, argument and input errors,
meta device."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import AgentAttention, MultiHeadSelfAttention
from tests.blocks.helpers import assert_matches_formula, randomize
from tests.blocks.test_linear import assert_autocast_close, assert_rejects, depthwise_formula, merge, qkv_formula


def agent_bias_formula(table: torch.Tensor, grid_size, num_prefix_tokens: int) -> torch.Tensor:
    """(H, n, X + Y) row/column tables -> bias (H, n, N): t[h, a, i] + t[h, a, X + j] at token P + i·Y + j."""
    X = grid_size[0]
    grid = table[..., :X, None] + table[..., None, X:]  # (H, n, X, Y)
    return F.pad(grid.flatten(-2), (num_prefix_tokens, 0))


def agent_formula(num_heads: int, num_agents: int, grid_size=None, num_prefix_tokens: int = 0):
    def formula(p, x):
        q, k, v = qkv_formula(p, x, num_heads)
        B, H, N, D = q.shape
        P = num_prefix_tokens
        if grid_size is None:  # bins of N / n consecutive tokens
            agents = q.reshape(B, H, num_agents, N // num_agents, D).mean(3)
        else:  # a √n×√n agent grid of (X/√n)×(Y/√n) blocks
            (X, Y), s = grid_size, math.isqrt(num_agents)
            agents = q[:, :, P:].reshape(B, H, s, X // s, s, Y // s, D).mean((3, 5)).reshape(B, H, num_agents, D)
        to_tokens = agents @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, n, N)
        to_agents = q @ agents.transpose(-1, -2) / math.sqrt(D)  # (B, H, N, n)
        if "agent_token_bias" in p:
            to_tokens = to_tokens + agent_bias_formula(p["agent_token_bias"], grid_size, P)
            to_agents = to_agents + agent_bias_formula(p["token_agent_bias"], grid_size, P).transpose(-1, -2)
        out = merge(to_agents.softmax(-1) @ (to_tokens.softmax(-1) @ v))
        if "dwc.weight" in p:
            out = out + depthwise_formula(p["dwc.weight"], p["dwc.bias"], merge(v), grid_size, P)
        return F.linear(out, p["proj.weight"], p["proj.bias"])

    return formula


CASES = {
    "grid+bias+prefix": ({"num_agents": 4, "grid_size": (4, 6), "num_prefix_tokens": 2, "agent_bias": True}, 26),
    "grid": ({"num_agents": 9, "grid_size": (3, 6), "qkv_bias": True, "qk_norm": True, "local_conv": 5}, 18),
    "sequence": ({"num_agents": 4, "local_conv": 3}, 12),
    "sequence-noconv": ({"num_agents": 3, "local_conv": 0, "qkv_bias": True}, 12),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_formula(case):
    options, n = CASES[case]
    torch.manual_seed(0)
    blk = randomize(AgentAttention(16, num_heads=2, **options))
    formula = agent_formula(2, options["num_agents"], options.get("grid_size"), options.get("num_prefix_tokens", 0))
    assert_matches_formula(blk, [torch.randn(2, n, 16)], formula)


def test_triton_backend_matches_formula(triton_device):
    torch.manual_seed(0)
    options = {"num_agents": 4, "grid_size": (4, 4), "num_prefix_tokens": 1, "agent_bias": True}
    blk = randomize(AgentAttention(16, num_heads=2, backend="triton", **options)).to(triton_device)
    assert_matches_formula(blk, [torch.randn(2, 17, 16, device=triton_device)], agent_formula(2, 4, (4, 4), 1))


@pytest.mark.parametrize(("options", "n"), [({"num_agents": 4, "grid_size": (5, 3)}, 15), ({"num_agents": 5}, 13)])
def test_uneven_pooling_bins(options, n):
    # Grids / sequences not divisible by the agent grid: agents are adaptive-average-pooling bins (they overlap).
    torch.manual_seed(0)
    blk = randomize(AgentAttention(16, num_heads=2, local_conv=0, **options))
    x = torch.randn(2, n, 16)
    q = qkv_formula(dict(blk.named_parameters()), x, 2)[0]
    pooled = blk._agents(q)
    assert pooled.shape == (2, 2, options["num_agents"], 8)
    if "grid_size" in options:  # rows 5 -> bins [0, 3) and [2, 5); columns 3 -> [0, 2) and [1, 3)
        grid = q.reshape(2, 2, 5, 3, 8)
        expect = grid[:, :, 2:5, 1:3].mean((2, 3))
    else:  # 13 tokens -> the last bin is [10, 13)
        expect = q[:, :, 10:13].mean(2)
    torch.testing.assert_close(pooled[:, :, -1], expect)
    out = blk(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_autocast_bf16():
    torch.manual_seed(0)
    blk = randomize(AgentAttention(16, num_heads=2, num_agents=4, grid_size=(4, 4), agent_bias=True))
    assert_autocast_close(blk, torch.randn(2, 16, 16))


def test_state_dict_layout_matches_mhsa():
    mhsa = randomize(MultiHeadSelfAttention(32, num_heads=4, qkv_bias=True))
    AgentAttention(32, num_heads=4, qkv_bias=True, local_conv=0).load_state_dict(mhsa.state_dict(), strict=True)
    normed = MultiHeadSelfAttention(32, num_heads=4, qk_norm=True)
    AgentAttention(32, num_heads=4, qk_norm=True, local_conv=0).load_state_dict(normed.state_dict(), strict=True)
    blk = AgentAttention(32, num_heads=4, qkv_bias=True, grid_size=(7, 7), agent_bias=True)
    missing, unexpected = blk.load_state_dict(mhsa.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {"dwc.weight", "dwc.bias", "agent_token_bias", "token_agent_bias"}
    assert blk.dwc.weight.shape == (32, 1, 3, 3) and blk.agent_token_bias.shape == (4, 49, 14)
    assert torch.equal(blk.qkv.weight, mhsa.qkv.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 30, "num_heads": 4}, r"num_heads=4 must be a positive divisor of dim=30"),
        ({"num_agents": 0}, r"num_agents=0 must be a positive int"),
        ({"num_agents": 8, "grid_size": (4, 4)}, r"num_agents=8 must be a square"),
        ({"num_agents": 16, "grid_size": (8, 3)}, r"num_agents=16 \(a 4x4 agent grid\) needs grid_size >= \(4, 4\) "
                                                  r"per axis; got grid_size=\(8, 3\)"),
        ({"grid_size": (7, 7, 7)}, r"grid_size=\(7, 7, 7\) must be None or two positive ints \(X, Y\)"),
        ({"agent_bias": True}, r"agent_bias=True needs grid_size=\(X, Y\)"),
        ({"num_prefix_tokens": 1}, r"num_prefix_tokens=1 needs grid_size=\(X, Y\)"),
        ({"local_conv": 2}, r"local_conv=2 must be odd"),
        ({"proj_drop": -0.1}, r"proj_drop=-0.1 must be in \[0, 1\)"),
    ],
)
def test_bad_args(kwargs, message):
    assert_rejects(AgentAttention, kwargs, message)


def test_bad_inputs():
    seq = AgentAttention(16, num_heads=2, num_agents=6)
    with pytest.raises(ValueError, match=r"num_agents=6 must be <= the number of tokens N=5"):
        seq(torch.randn(1, 5, 16))
    grid = AgentAttention(16, num_heads=2, num_agents=4, grid_size=(4, 4))
    with pytest.raises(ValueError, match=r"x has N=17 tokens; grid_size=\(4, 4\) with num_prefix_tokens=0 needs "
                                         r"N = 0 \+ 4x4 = 16"):
        grid(torch.randn(1, 17, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C=16\); got \(16, 16\)"):
        grid(torch.randn(16, 16))


def test_meta_device():
    blk = AgentAttention(32, num_heads=4, num_agents=4, grid_size=(4, 4), num_prefix_tokens=1, agent_bias=True,
                         device="meta")
    assert all(p.device.type == "meta" for p in blk.parameters())
    out = blk(torch.empty(2, 17, 32, device="meta"))
    assert out.shape == (2, 17, 32) and out.device.type == "meta"
