"""attnzoo causal LMs (``attnzoo_lm_{mixer}_{size}``): registration and meta-device construction, causality, the
incremental decoding path against the full forward for every mixer, the full forward against a float64 formula,
sampling, the mixture-of-heads loss, and bad-input errors."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters

import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models)
from attnzoo.blocks import BasedMixer, LinearAttention
from attnzoo.zoo.lm import LM_MIXER_SPECS, CausalLanguageModel, CausalSelfAttention, KVCache, SlidingWindowAttention
from attnzoo.zoo.lm_cfgs import LM_MIXERS, LM_SIZES
from tests.blocks.helpers import assert_matches_formula, randomize
from tests.kernels.helpers import rel_err

MIXERS = list(LM_MIXER_SPECS)
MIXER_CLASSES = {"swa": SlidingWindowAttention, "linear": LinearAttention, "based": BasedMixer,
                 "moh": CausalSelfAttention, "softmax": CausalSelfAttention}
WINDOW = 6  # swa / based window in the CPU tests: sequences of 16 tokens run past it
SHRUNK = dict(embed_dim=32, depth=2, num_heads=4, max_len=32, backend="torch")  # the tiny models, shrunk for CPU


def _model(mixer: str, mixer_kwargs: dict | None = None, **kwargs) -> CausalLanguageModel:
    options = {"window": WINDOW} if mixer in ("swa", "based") else {}
    return timm.create_model(f"attnzoo_lm_{mixer}_tiny", mixer_kwargs={**options, **(mixer_kwargs or {})},
                             **{**SHRUNK, **kwargs}).eval()


def _tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length))


def test_names_cfgs_and_meta_construction():
    names = {f"attnzoo_lm_{m}_{s}" for m in MIXERS for s in LM_SIZES}
    assert set(timm.list_models("attnzoo_lm_*")) == names and set(LM_MIXERS) == set(MIXERS)
    for name in sorted(names):
        mixer, size = name.split("_")[2:]
        model = timm.create_model(name, device="meta")
        args = LM_SIZES[size]
        assert all(p.device.type == "meta" for p in model.parameters())
        assert model.attn_name == mixer and len(model.blocks) == args["depth"] and model.max_len == args["max_len"]
        assert all(type(b.mixer) is MIXER_CLASSES[mixer] for b in model.blocks)
        assert model.pretrained_cfg.get("input_size") is None  # not an image model: timm passes no in_chans
        assert any(f"T <= {args['max_len']}" in note for note in model.pretrained_cfg["notes"])
        logits = model(torch.zeros(2, 5, dtype=torch.long, device="meta"))
        assert logits.shape == (2, 5, 256) and logits.device.type == "meta"
    model = timm.create_model("attnzoo_lm_based_tiny", vocab_size=65, device="meta", dtype=torch.float64)
    assert model.embed.weight.shape == (65, 192) and model.pos_embed.dtype == torch.float64
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    groups = group_parameters(model, model.group_matcher())  # stem, one group per block (+ the final norm)
    assert len(groups) == 1 + len(model.blocks) and sum(len(g) for g in groups.values()) == len(names)
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model("attnzoo_lm_swa_tiny", not_a_model_arg=1, device="meta")


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal_and_prefix_consistent(mixer):
    """Changing tokens after position p changes no logit up to p (and does change later ones); a prefix alone gives
    the same logits (for swa: shorter than the window, then longer)."""
    model = _model(mixer)
    tokens = _tokens(2, 16)
    with torch.no_grad():
        full = model(tokens)
        for p in (WINDOW - 2, 11):
            assert rel_err(model(tokens[:, :p]), full[:, :p]) <= 1e-5
            changed = tokens.clone()
            changed[:, p:] = (changed[:, p:] + torch.randint(1, 256, changed[:, p:].shape)) % 256
            out = model(changed)
            torch.testing.assert_close(out[:, :p], full[:, :p], rtol=1e-5, atol=1e-6)
            assert (out[:, p:] - full[:, p:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("mixer", MIXERS)
def test_incremental_decoding_equals_forward(mixer):
    """forward_step token by token over 16 tokens (past the window of 6) gives the full forward's logits."""
    model = _model(mixer)
    tokens = _tokens(3, 16)
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_cache(3)
        steps = []
        for t in range(tokens.shape[1]):
            logits, cache = model.forward_step(tokens[:, t], cache)
            steps.append(logits)
    assert rel_err(torch.stack(steps, dim=1), full) <= 1e-5
    assert cache.batch == 3 and cache.position == 16 and len(cache.states) == SHRUNK["depth"]
    if mixer in ("swa", "softmax", "moh"):  # a key/value window: the last window - 1 tokens, or all of them
        kept = WINDOW - 1 if mixer == "swa" else 16
        assert all(isinstance(s, KVCache) and s.keys.shape == (3, 4, kept, 8) for s in cache.states)


@pytest.mark.parametrize("mixer", ["softmax", "swa"])
def test_forward_matches_float64_formula(mixer):
    """Logits and every parameter gradient vs embedding + positions, pre-norm (masked softmax attention + GELU MLP)
    blocks, final norm and the tied head, evaluated in float64; swa over 16 tokens (NA path) and 4 (dense path)."""
    model = randomize(_model(mixer))
    window = WINDOW if mixer == "swa" else None
    for length in (16, 4):
        tokens = _tokens(2, length)
        model.zero_grad()
        model.set_grad_checkpointing(length == 4)  # recomputed blocks give the same values and gradients
        assert_matches_formula(functools.partial(model, tokens), [],
                               lambda p, tokens=tokens: reference_lm(p, tokens, 2, 4, window),
                               dict(model.named_parameters()))
    assert model.grad_checkpointing


def reference_lm(p: dict, tokens: torch.Tensor, depth: int, num_heads: int, window: int | None) -> torch.Tensor:
    """Logits of a CausalLanguageModel with softmax attention over the causal window (None: all earlier tokens)."""
    T = tokens.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)
    visible = (j <= i) & ((i - j < window) if window else True)
    x = p["embed.weight"][tokens] + p["pos_embed"][:, :T]
    x = reference_blocks(p, x, depth, num_heads, visible)
    return F.linear(x, p["embed.weight"])


def reference_blocks(p: dict, x: torch.Tensor, depth: int, num_heads: int, visible: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) through ``depth`` pre-norm blocks (softmax attention where ``visible`` (N, N), GELU MLP) and the
    final norm; parameters named as in ``SequenceBlock``."""
    B, N, C = x.shape
    D = C // num_heads

    def norm(name, t):
        return F.layer_norm(t, (C,), p[f"{name}.weight"], p[f"{name}.bias"])

    def linear(name, t):
        return F.linear(t, p[f"{name}.weight"], p.get(f"{name}.bias"))

    for b in range(depth):
        blk = f"blocks.{b}"
        q, k, v = linear(f"{blk}.mixer.qkv", norm(f"{blk}.norm1", x)).reshape(B, N, 3, num_heads, D).permute(
            2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2) * D**-0.5).masked_fill(~visible, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + linear(f"{blk}.mixer.proj", attn)
        x = x + linear(f"{blk}.mlp.fc2", F.gelu(linear(f"{blk}.mlp.fc1", norm(f"{blk}.norm2", x))))
    return norm("norm", x)


@pytest.mark.parametrize("mixer", ["swa", "linear"])
def test_generate(mixer):
    """Seeded sampling repeats; greedy (temperature 0, or top_k=1) follows the full forward's argmax; the prompt
    leads the output and the model's train/eval mode is restored."""
    model = _model(mixer).train()
    prompt = _tokens(2, 8)  # longer than the window

    def sample(seed, **kwargs):
        return model.generate(prompt, 10, generator=torch.Generator().manual_seed(seed), **kwargs)

    first = sample(0, temperature=1.5)
    assert first.shape == (2, 18) and first.dtype == torch.long and torch.equal(first[:, :8], prompt)
    assert torch.equal(sample(0, temperature=1.5), first) and not torch.equal(sample(1, temperature=1.5), first)
    assert model.training
    greedy = sample(0, temperature=0.0)
    with torch.no_grad():
        model.eval()
        expected = prompt
        for _ in range(10):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected) and torch.equal(sample(3, top_k=1), expected)
    top3 = sample(0, top_k=3)
    with torch.no_grad():
        logits = model(top3[:, :-1])[:, 7:]
    assert (logits.topk(3, -1).indices == top3[:, 8:, None]).any(-1).all()


@pytest.mark.parametrize("mixer", MIXERS)
def test_auxiliary_loss_only_for_moh(mixer):
    model = _model(mixer).train()
    model(_tokens(2, 8))
    aux = model.auxiliary_loss()
    if mixer != "moh":
        assert aux is None
        return
    assert aux.shape == () and aux.item() > 0
    aux.backward()
    routers = [b.mixer.router for b in model.blocks]
    assert all(r.wg.weight.grad is not None and r.wg.weight.grad.abs().sum() > 0 for r in routers)
    assert model.auxiliary_loss() is None  # counted once
    model.eval()(_tokens(2, 8))
    assert model.auxiliary_loss() is None  # recorded on training forwards only


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"mixer='rnn' is not supported; expected one of \('swa', 'linear', "
                                         r"'based', 'moh', 'softmax'\)"):
        CausalLanguageModel(mixer="rnn", device="meta")
    with pytest.raises(TypeError, match=r"attnzoo_lm_swa_tiny fixes mixer='swa'"):
        timm.create_model("attnzoo_lm_swa_tiny", mixer="linear", device="meta")
    with pytest.raises(TypeError, match="kernel_size"):
        _model("swa", mixer_kwargs=dict(kernel_size=3))
    with pytest.raises(ValueError, match=r"window=1 must be an int >= 2"):
        _model("swa", mixer_kwargs=dict(window=1))
    model = _model("swa")
    with pytest.raises(TypeError, match=r"tokens must be int64 token ids .*got dtype torch.float32"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T\) with 1 <= T <= max_len=32"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"max_len=32 \(the context length: learned positions\); got \(1, 33\)"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens has ids in \[0, 256\]; accepted ids: \[0, vocab_size=256\)"):
        model(torch.tensor([[0, 256]]))
    cache = model.init_cache(2)
    with pytest.raises(ValueError, match=r"token must have shape \(B,\) with B=2 \(the cache's batch\); got \(3,\)"):
        model.forward_step(torch.zeros(3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"the cache holds 32 tokens, the context length max_len=32"):
        model.forward_step(torch.zeros(2, dtype=torch.long), cache._replace(position=32))
    with pytest.raises(TypeError, match="cache must be an LMCache"):
        model.forward_step(torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"batch=0 must be an int >= 1"):
        model.init_cache(0)
    prompt = torch.zeros(1, 30, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prompt length 30 \+ max_new_tokens=3 exceeds the context length max_len"):
        model.generate(prompt, 3)
    with pytest.raises(ValueError, match=r"temperature=-1.0 must be a finite float >= 0"):
        model.generate(prompt, 1, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_k=0 must be None or an int in \[1, vocab_size=256\]"):
        model.generate(prompt, 1, top_k=0)
