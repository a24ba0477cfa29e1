"""LinearAttention: every feature map (hedgehog included) with the conv term and output norm vs an explicit float64
quadratic formula (forward and every gradient), the Triton backend, causality, decoding by steps and by chunks
== the full forward, the MultiHeadSelfAttention weight layout, argument and input errors, meta device.

The formula helpers here (projections, similarity matrices, the normalized product, the explicit depthwise conv)
also serve the agent and BASED tests."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import HedgehogFeatureMap, LinearAttention, LinearAttentionState, MultiHeadSelfAttention
from tests.blocks.helpers import assert_causal, assert_matches_formula, randomize
from tests.kernels.helpers import TOL, rel_err

EPS = 1e-6  # the op's default normalizer eps


def heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H·D) -> (B, H, N, D)."""
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def merge(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H·D)."""
    B, H, N, D = t.shape
    return t.transpose(1, 2).reshape(B, N, H * D)


def qkv_formula(p: dict, x: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """timm's ViT ``qkv`` rows [q | k | v] -> q, k, v (B, H, N, D), q and k layer-normed if there are qk norms."""
    q, k, v = (heads(t, num_heads) for t in F.linear(x, p["qkv.weight"], p.get("qkv.bias")).chunk(3, dim=-1))
    if "q_norm.weight" in p:
        q = F.layer_norm(q, q.shape[-1:], p["q_norm.weight"], p["q_norm.bias"])
        k = F.layer_norm(k, k.shape[-1:], p["k_norm.weight"], p["k_norm.bias"])
    return [q, k, v]


def hedgehog_formula(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) -> softmax([W x + b, -(W x + b)]) (B, H, N, 2D), W (H, D, D) per head."""
    y = torch.einsum("bhnd,hed->bhne", x, weight) + bias[:, None]
    return torch.cat([y, -y], dim=-1).softmax(-1)


def similarity(feature_map: str, q: torch.Tensor, k: torch.Tensor, p: dict) -> torch.Tensor:
    """φ(q_i)·φ(k_j): (B, H, N, N)."""
    if feature_map == "taylor2":  # 1 + s + s²/2, s = q·k/√D: the kernel itself, not its features
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return 1 + s + s**2 / 2
    if feature_map == "hedgehog":
        q = hedgehog_formula(q, p["feature_map_q.weight"], p["feature_map_q.bias"])
        k = hedgehog_formula(k, p["feature_map_k.weight"], p["feature_map_k.bias"])
    elif feature_map == "softmax":  # Efficient Attention: q over its features, k over positions
        q, k = q.softmax(-1), k.softmax(-2)
    elif feature_map != "identity":
        phi = {"elu1": lambda t: F.elu(t) + 1, "relu": F.relu}[feature_map]
        q, k = phi(q), phi(k)
    return q @ k.transpose(-1, -2)


def linear_formula(sim: torch.Tensor, v: torch.Tensor, causal: bool, normalize: bool, scale: float) -> torch.Tensor:
    """(scale·S [masked]) v, divided by its row sums + eps when normalizing; S (B, H, N, N), v (B, H, N, Dv)."""
    a = scale * (sim.tril() if causal else sim)
    return a @ v / (a.sum(-1, keepdim=True) + EPS) if normalize else a @ v


def depthwise_formula(weight, bias, v, grid_size=None, num_prefix_tokens=0, causal=False) -> torch.Tensor:
    """The depthwise conv of v tokens (B, N, C) as explicit sums of shifted, zero-padded copies."""
    B, N, C = v.shape
    k = weight.shape[-1]
    if grid_size is None:
        left = k - 1 if causal else k // 2
        padded = F.pad(v, (0, 0, left, k - 1 - left))
        return bias + sum(weight[:, 0, o] * padded[:, o:o + N] for o in range(k))
    (X, Y), P = grid_size, num_prefix_tokens
    padded = F.pad(v[:, P:].reshape(B, X, Y, C), (0, 0, k // 2, k // 2, k // 2, k // 2))
    term = bias + sum(weight[:, 0, i, j] * padded[:, i:i + X, j:j + Y] for i in range(k) for j in range(k))
    return torch.cat([v.new_zeros(B, P, C), term.reshape(B, X * Y, C)], dim=1)


def linear_block_formula(num_heads, feature_map, causal=False, grid_size=None, num_prefix_tokens=0):
    def formula(p, x):
        q, k, v = qkv_formula(p, x, num_heads)
        normalize = "out_norm.weight" not in p
        out = merge(linear_formula(similarity(feature_map, q, k, p), v, causal, normalize, q.shape[-1] ** -0.5))
        if not normalize:
            out = F.layer_norm(out, out.shape[-1:], p["out_norm.weight"], p["out_norm.bias"])
        if "dwc.weight" in p:
            out = out + depthwise_formula(p["dwc.weight"], p["dwc.bias"], merge(v), grid_size, num_prefix_tokens,
                                          causal)
        return F.linear(out, p["proj.weight"], p["proj.bias"])

    return formula


def assert_autocast_close(blk: torch.nn.Module, x: torch.Tensor) -> None:
    """Under CPU bf16 autocast the block runs in bf16 (learned tables and fp32 softmax outputs follow q/k/v's dtype)
    and stays within bf16's tolerance of its fp32 output."""
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = blk(x)
        assert out.dtype == torch.bfloat16 and rel_err(out, blk(x)) <= TOL[torch.bfloat16]


def assert_rejects(block: type, kwargs: dict, message: str) -> None:
    """Building ``block(dim=16, num_heads=2, **kwargs)`` raises a ValueError matching ``message``."""
    with pytest.raises(ValueError, match=message):
        block(**{"dim": 16, "num_heads": 2} | kwargs)


# (feature_map, causal, options): every map, each option on some of them.
FORMULA_CASES = [
    ("elu1", False, {"qkv_bias": True, "local_conv": 3}),
    ("relu", False, {"out_norm": True, "qk_norm": True}),
    ("softmax", False, {}),
    ("taylor2", False, {"local_conv": 5}),
    ("identity", False, {"out_norm": True}),  # its normalizer can vanish: the norm fix is what makes it usable
    ("hedgehog", False, {"local_conv": 3, "grid_size": (3, 4), "num_prefix_tokens": 2}),
    ("elu1", True, {"local_conv": 2}),
    ("taylor2", True, {"out_norm": True, "local_conv": 3}),
    ("hedgehog", True, {"qkv_bias": True, "qk_norm": True}),
    ("identity", True, {"out_norm": True}),
]


@pytest.mark.parametrize(("feature_map", "causal", "options"), FORMULA_CASES)
def test_matches_formula(feature_map, causal, options):
    torch.manual_seed(0)
    blk = randomize(LinearAttention(16, num_heads=2, feature_map=feature_map, causal=causal, **options))
    n = 14 if "grid_size" in options else 11
    formula = linear_block_formula(2, feature_map, causal, options.get("grid_size"),
                                   options.get("num_prefix_tokens", 0))
    assert_matches_formula(blk, [torch.randn(2, n, 16)], formula)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_backend_matches_formula(causal, triton_device):
    torch.manual_seed(0)
    blk = randomize(LinearAttention(16, num_heads=2, feature_map="hedgehog", causal=causal, local_conv=3,
                                    backend="triton")).to(triton_device)
    x = torch.randn(2, 21, 16, device=triton_device)
    assert_matches_formula(blk, [x], linear_block_formula(2, "hedgehog", causal))


def test_hedgehog_starts_as_softmax_of_plus_minus_x():
    fmap = HedgehogFeatureMap(3, 4)
    assert torch.equal(fmap.weight, torch.eye(4).expand(3, 4, 4)) and not fmap.bias.any()
    x = torch.randn(2, 3, 5, 4)
    assert rel_err(fmap(x), torch.cat([x, -x], -1).softmax(-1)) <= 1e-6
    assert fmap(x[:, :, 0]).shape == (2, 3, 8)  # a decoding step's (B, H, D) works too


def test_autocast_bf16():
    torch.manual_seed(0)
    blk = randomize(LinearAttention(16, num_heads=2, feature_map="hedgehog", local_conv=3))
    assert_autocast_close(blk, torch.randn(2, 12, 16))


@pytest.mark.parametrize(("feature_map", "local_conv"), [("elu1", 0), ("hedgehog", 3), ("taylor2", 4)])
def test_causal(feature_map, local_conv):
    torch.manual_seed(0)
    blk = randomize(LinearAttention(16, num_heads=2, feature_map=feature_map, causal=True, local_conv=local_conv))
    assert_causal(blk, torch.randn(2, 12, 16), i=6)


@pytest.mark.parametrize(("feature_map", "options"), [
    ("elu1", {"local_conv": 3}),
    ("hedgehog", {"out_norm": True, "local_conv": 2}),
    ("taylor2", {}),
])
def test_decoding_equals_full_forward(feature_map, options):
    torch.manual_seed(0)
    blk = randomize(LinearAttention(16, num_heads=2, feature_map=feature_map, causal=True, **options))
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        full = blk(x)
        state, steps = None, []
        for t in range(x.shape[1]):
            out, state = blk.step(x[:, t], state)
            steps.append(out)
        assert isinstance(state, LinearAttentionState)
        assert rel_err(torch.stack(steps, dim=1), full) <= 1e-5
        # chunk by chunk (prefill, then more tokens) and a step after the chunks
        first, state = blk(x[:, :5], return_state=True)
        second, state = blk(x[:, 5:12], state, return_state=True)
        last, _ = blk.step(x[:, 12], state)
        assert rel_err(torch.cat([first, second, last[:, None]], dim=1), full) <= 1e-5


def test_state_dict_layout_matches_mhsa():
    # The plain block has exactly MultiHeadSelfAttention's (timm ViT's) keys; the options only add their own.
    mhsa = randomize(MultiHeadSelfAttention(32, num_heads=4, qkv_bias=True))
    LinearAttention(32, num_heads=4, qkv_bias=True).load_state_dict(mhsa.state_dict(), strict=True)
    normed = MultiHeadSelfAttention(32, num_heads=4, qk_norm=True)
    LinearAttention(32, num_heads=4, qk_norm=True).load_state_dict(normed.state_dict(), strict=True)
    blk = LinearAttention(32, num_heads=4, qkv_bias=True, feature_map="hedgehog", local_conv=3, out_norm=True)
    missing, unexpected = blk.load_state_dict(mhsa.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {f"{m}.{w}" for m in ("feature_map_q", "feature_map_k", "dwc", "out_norm")
                            for w in ("weight", "bias")}
    assert torch.equal(blk.qkv.weight, mhsa.qkv.weight) and torch.equal(blk.proj.bias, mhsa.proj.bias)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 30, "num_heads": 4}, r"num_heads=4 must be a positive divisor of dim=30"),
        ({"feature_map": "cosine"}, r"feature_map='cosine' is not supported; expected one of \('elu1', 'relu', "
                                    r"'softmax', 'taylor2', 'identity', 'hedgehog'\)"),
        ({"feature_map": "softmax", "causal": True}, r"feature_map='softmax' .* needs causal=False"),
        ({"local_conv": -1}, r"local_conv=-1 must be an int >= 0"),
        ({"local_conv": 4}, r"local_conv=4 must be odd \(a centred window\) unless causal=True"),
        ({"grid_size": (4, 0)}, r"grid_size=\(4, 0\) must be None or two positive ints \(X, Y\)"),
        ({"grid_size": (2, 2), "causal": True}, r"causal=True is for sequences; got grid_size=\(2, 2\)"),
        ({"num_prefix_tokens": 1}, r"num_prefix_tokens=1 needs grid_size=\(X, Y\)"),
        ({"proj_drop": 1.0}, r"proj_drop=1.0 must be in \[0, 1\)"),
        ({"backend": "cuda"}, r"backend='cuda' is not a known backend"),
    ],
)
def test_bad_args(kwargs, message):
    assert_rejects(LinearAttention, kwargs, message)


def test_bad_inputs():
    grid = LinearAttention(16, num_heads=2, grid_size=(3, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"x has N=12 tokens; grid_size=\(3, 4\) with num_prefix_tokens=1 needs "
                                         r"N = 1 \+ 3x4 = 13"):
        grid(torch.randn(1, 12, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C=16\); got \(1, 13, 8\)"):
        grid(torch.randn(1, 13, 8))
    with pytest.raises(ValueError, match=r"state and return_state need causal=True"):
        grid(torch.randn(1, 13, 16), return_state=True)
    with pytest.raises(ValueError, match=r"state and return_state need causal=True"):
        grid.step(torch.randn(1, 16))
    causal = LinearAttention(16, num_heads=2, causal=True, local_conv=3)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, C=16\); got \(2, 1, 16\)"):
        causal.step(torch.randn(2, 1, 16))
    with pytest.raises(TypeError, match=r"state must be a LinearAttentionState or None, got tuple"):
        causal(torch.randn(2, 3, 16), state=(None, None))
    _, state = causal(torch.randn(2, 3, 16), return_state=True)
    with pytest.raises(ValueError, match=r"state.conv has shape \(2, 1, 16\); expected \(B, local_conv - 1, C\)="
                                         r"\(2, 2, 16\)"):
        causal(torch.randn(2, 3, 16), state._replace(conv=state.conv[:, :1]))


def test_meta_device():
    blk = LinearAttention(32, num_heads=4, feature_map="hedgehog", local_conv=3, out_norm=True, grid_size=(4, 4),
                          num_prefix_tokens=1, device="meta")
    assert all(p.device.type == "meta" for p in blk.parameters())
    out = blk(torch.empty(2, 17, 32, device="meta"))
    assert out.shape == (2, 17, 32) and out.device.type == "meta"
