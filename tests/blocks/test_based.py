"""BasedMixer vs an explicit float64 formula (masked sliding-window softmax + masked Taylor-kernel linear attention,
summed; forward and every gradient), windows shorter/longer than the sequence, the Triton backend, causality,
decoding by steps and by chunks == the full forward, the MultiHeadSelfAttention weight layout, argument and input
errors, meta device."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import BasedMixer, BasedState, MultiHeadSelfAttention
from tests.blocks.helpers import assert_causal, assert_matches_formula, randomize
from tests.blocks.test_linear import assert_rejects, heads, linear_formula, merge, qkv_formula, similarity
from tests.kernels.helpers import rel_err


def based_formula(num_heads: int, linear_heads: int, window: int):
    def formula(p, x):
        q, k, v = qkv_formula(p, x, num_heads)
        T, D = q.shape[2:]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        logits = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill((j > i) | (j <= i - window), -math.inf)
        linear_qk = F.linear(x, p["linear_qk.weight"], p.get("linear_qk.bias"))  # rows [q | k]
        lq, lk = (heads(t, linear_heads) for t in linear_qk.chunk(2, dim=-1))
        linear = linear_formula(similarity("taylor2", lq, lk, p), heads(merge(v), linear_heads), causal=True,
                                normalize=True, scale=1.0)
        return F.linear(merge(logits.softmax(-1) @ v) + merge(linear), p["proj.weight"], p["proj.bias"])

    return formula


# (num_heads, linear_heads, feature_dim, window, T, qkv_bias)
CASES = {
    "window<T": (2, 2, 4, 4, 11, False),
    "more-linear-heads": (2, 4, 3, 3, 9, True),
    "window>T": (2, 1, 4, 16, 9, False),
    "window=1": (4, 2, 2, 1, 6, False),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_formula(case):
    num_heads, linear_heads, feature_dim, window, T, qkv_bias = CASES[case]
    torch.manual_seed(0)
    blk = randomize(BasedMixer(16, num_heads, window=window, feature_dim=feature_dim, linear_heads=linear_heads,
                               qkv_bias=qkv_bias))
    assert_matches_formula(blk, [torch.randn(2, T, 16)], based_formula(num_heads, linear_heads, window))


def test_triton_backend_matches_formula(triton_device):
    torch.manual_seed(0)
    blk = randomize(BasedMixer(16, 2, window=4, feature_dim=4, backend="triton")).to(triton_device)
    assert_matches_formula(blk, [torch.randn(1, 12, 16, device=triton_device)], based_formula(2, 2, 4))


def test_causal():
    torch.manual_seed(0)
    assert_causal(randomize(BasedMixer(16, 2, window=4, feature_dim=4)), torch.randn(2, 12, 16), i=6)


@pytest.mark.parametrize(("window", "chunks"), [(4, (2, 6, 3)), (1, (5, 1, 5)), (16, (7, 4))])
def test_decoding_equals_full_forward(window, chunks):
    torch.manual_seed(0)
    blk = randomize(BasedMixer(16, 2, window=window, feature_dim=4, linear_heads=4))
    x = torch.randn(2, sum(chunks), 16)
    with torch.no_grad():
        full = blk(x)
        state, steps = None, []
        for t in range(x.shape[1]):
            out, state = blk.step(x[:, t], state)
            steps.append(out)
        assert isinstance(state, BasedState) and state.keys.shape == (2, 2, min(window - 1, x.shape[1]), 8)
        assert rel_err(torch.stack(steps, dim=1), full) <= 1e-5
        state, outs = None, []
        for part in torch.split(x, chunks, dim=1):  # chunks shorter and longer than the window
            out, state = blk(part, state, return_state=True)
            outs.append(out)
        assert rel_err(torch.cat(outs, dim=1), full) <= 1e-5


def test_state_dict_layout_matches_mhsa():
    mhsa = randomize(MultiHeadSelfAttention(32, num_heads=4, qkv_bias=True))
    blk = BasedMixer(32, 4, feature_dim=8, linear_heads=2, qkv_bias=True)
    missing, unexpected = blk.load_state_dict(mhsa.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"linear_qk.weight", "linear_qk.bias"}
    assert blk.linear_qk.weight.shape == (2 * 2 * 8, 32)
    assert torch.equal(blk.qkv.weight, mhsa.qkv.weight) and torch.equal(blk.proj.weight, mhsa.proj.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 30, "num_heads": 4}, r"num_heads=4 must be a positive divisor of dim=30"),
        ({"window": 0}, r"window=0 must be an int >= 1"),
        ({"feature_dim": 0}, r"feature_dim=0 must be an int >= 1"),
        ({"linear_heads": 3}, r"linear_heads=3 must be a positive divisor of dim=16"),
        ({"proj_drop": 1.5}, r"proj_drop=1.5 must be in \[0, 1\)"),
        ({"backend": "gpu"}, r"backend='gpu' is not a known backend"),
    ],
)
def test_bad_args(kwargs, message):
    assert_rejects(BasedMixer, kwargs, message)


def test_bad_inputs():
    blk = BasedMixer(16, 2, window=4, feature_dim=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C=16\); got \(2, 5, 12\)"):
        blk(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, C=16\); got \(16,\)"):
        blk.step(torch.randn(16))
    with pytest.raises(TypeError, match=r"state must be a BasedState or None, got dict"):
        blk.step(torch.randn(2, 16), {})


def test_meta_device():
    blk = BasedMixer(32, 4, window=8, feature_dim=4, device="meta")
    assert all(p.device.type == "meta" for p in blk.parameters())
    out = blk(torch.empty(2, 20, 32, device="meta"))
    assert out.shape == (2, 20, 32) and out.device.type == "meta"
