"""Causal language models over tokens: ``attnzoo_lm_{mixer}_{size}`` (sizes tiny, small; cfgs in ``lm_cfgs``).

A GPT-style decoder: token embedding + learned positions, pre-norm blocks (sequence mixer + MLP), final norm and an
LM head tied to the token embedding. The mixer is chosen by name (``LM_MIXER_SPECS``):

* ``swa``: causal sliding-window softmax attention (``NeighborhoodAttention1d(is_causal=True)``: token t sees
  ``[t - window + 1, t]``);
* ``linear``: causal linear attention (``LinearAttention(causal=True)``, elu+1 features by default);
* ``based``: BASED hybrid, sliding-window softmax + Taylor linear attention (``BasedMixer``);
* ``moh``: causal softmax attention with mixture-of-heads routing (``MultiHeadSelfAttention(moh=...)``); its
  load-balance loss comes from ``auxiliary_loss()``;
* ``softmax``: plain causal softmax attention, the baseline.

Incremental decoding: ``init_cache(batch)`` and ``forward_step(token, cache)`` advance every sequence by one token,
with a key/value cache (the last ``window - 1`` tokens for ``swa``, all earlier tokens for ``softmax`` / ``moh``) or
the recurrent state (``linear``, ``based``); the logits equal the full forward's. ``generate`` samples from a prompt.

The sequence pieces the time-series encoder (``attnzoo.zoo.seqenc``) shares live here too: ``SequenceBlock``,
``create_mixer``, ``moh_options``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, register_model, resolve_pretrained_cfg
from torch import Tensor, nn

from attnzoo.blocks.based import BasedMixer
from attnzoo.blocks.linear import LinearAttention, check_step_token, merge_heads
from attnzoo.blocks.mhsa import MultiHeadSelfAttention
from attnzoo.blocks.mlp import Mlp
from attnzoo.blocks.moh import auxiliary_loss
from attnzoo.blocks.neighborhood import NeighborhoodAttention1d
from attnzoo.kernels import attention
from attnzoo.kernels.validate import check_choice
from attnzoo.zoo._builder import init_linears
from attnzoo.zoo.lm_cfgs import LM_MIXERS, LM_SIZES, default_cfgs  # noqa: F401  (register_model reads default_cfgs)
from attnzoo.zoo.pretrained import shipped_data_info

__all__ = [
    "CausalLanguageModel",
    "CausalSelfAttention",
    "KVCache",
    "LMCache",
    "SequenceBackbone",
    "SequenceBlock",
    "SlidingWindowAttention",
    "check_int",
    "create_mixer",
    "moh_options",
]

# ---- sequence pieces shared with attnzoo.zoo.seqenc ----

# mixer name -> (constructor(dim, num_heads, **options), default options for a given number of heads)
MixerSpec = tuple[Callable[..., nn.Module], Callable[[int], dict[str, Any]]]


def check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def moh_options(num_heads: int) -> dict[str, int]:
    """Default mixture-of-heads routing: a third of the heads shared (at least one), half of the others routed
    to each token (6 heads: 2 shared + 2 of 4 routed)."""
    shared = max(1, num_heads // 3)
    routed = num_heads - shared
    return dict(shared_heads=shared, top_k=max(1, routed // 2) if routed else 0)


def create_mixer(mixer: str, specs: dict[str, MixerSpec], dim: int, num_heads: int, options: dict | None,
                 **common: Any) -> nn.Module:
    """The mixer ``mixer`` (a key of ``specs``; unknown names list the choices) over (B, T, C) tokens, built with
    ``common`` arguments, then its defaults, then ``options`` (later ones win)."""
    check_choice("mixer", mixer, tuple(specs))
    build, defaults = specs[mixer]
    return build(dim, num_heads, **{**common, **defaults(num_heads), **(options or {})})


class SequenceBlock(nn.Module):
    """Pre-norm block: ``x + mixer(norm1(x))``, then ``x + mlp(norm2(x))``; x: (B, T, C).

    ``step(x_t, state)``: (B, C) -> ((B, C), state), one decoding step through the mixer's ``step``.
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.mixer = mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self._mlp(x + self.drop_path1(self.mixer(self.norm1(x))))

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self.mixer.step(self.norm1(x_t), state)
        return self._mlp(x_t + self.drop_path1(y)), state


class SequenceBackbone(nn.Module):
    """Base of the sequence models: learned positions, pre-norm ``SequenceBlock``s with a mixer chosen by name, a
    final norm; timm's training hooks and the mixture-of-heads loss. A subclass embeds its input and calls
    ``init_trunk`` in ``__init__`` and ``init_weights`` at its end; ``STEM`` matches its embedding parameters."""

    STEM = r"^pos_embed"

    def init_trunk(self, num_positions: int, mixer: str, specs: dict[str, MixerSpec], mixer_kwargs: dict | None,
                   embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_rate: float,
                   drop_path_rate: float, backend: str | None, dd: dict) -> None:
        """Arguments as the subclasses'; ``num_positions`` is the length of the positional embedding (tokens)."""
        check_int("depth", depth, 1)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.attn_name = mixer
        self.grad_checkpointing = False
        self.pos_embed = nn.Parameter(torch.empty(1, num_positions, embed_dim, **dd))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # no tensor: meta-device safe
        self.blocks = nn.Sequential(*[
            SequenceBlock(embed_dim, create_mixer(mixer, specs, embed_dim, num_heads, mixer_kwargs, qkv_bias=qkv_bias,
                                                  proj_drop=drop_rate, backend=backend, **dd),
                          mlp_ratio, drop_rate, rate, **dd)
            for rate in rates
        ])
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def init_weights(self) -> None:
        """trunc-normal(0.02) positions and linear weights, zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        init_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=self.STEM, blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def auxiliary_loss(self) -> Tensor | None:
        """The mixture-of-heads load-balance losses of the last training forward, summed (then cleared); None when
        the mixer has no router."""
        return auxiliary_loss(self)

    def mix(self, x: Tensor) -> Tensor:
        """Embedded tokens (B, N, C) -> with positions, through the blocks, normed (B, N, C)."""
        x = self.pos_drop(x + self.pos_embed[:, : x.shape[1]])
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


# ---- causal softmax mixers with a key/value cache ----


class KVCache(NamedTuple):
    """Decoding state of a softmax mixer: the keys and values (B, H_kv, L, D) later tokens still see."""

    keys: Tensor
    values: Tensor


class _KVDecoding:
    """Mixin for a causal softmax mixer on ``QKVProjection`` (``project_qkv``, ``scale``, ``router``, ``proj``):
    ``step`` attends to the cached keys/values plus the current token's, keeping the last ``cache_size`` (None =
    all)."""

    cache_size: int | None = None

    def _attend(self, x: Tensor, past: KVCache | None, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) after ``past`` -> (output (B, T, C), keys and values (B, H_kv, L + T, D))."""
        q, k, v = self.project_qkv(x)
        if past is not None:
            k, v = torch.cat([past.keys, k], dim=2), torch.cat([past.values, v], dim=2)
        gates = None if self.router is None else self.router(x)
        out = attention(q, k, v, causal=causal, scale=self.scale, gates=gates, backend=self.backend)
        return self.proj_drop(self.proj(merge_heads(out))), k, v

    def step(self, x_t: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """One decoding step: x_t (B, C) -> (output (B, C), the cache after x_t); ``state`` None starts a sequence."""
        check_step_token(x_t, self.dim)
        if state is not None and not isinstance(state, KVCache):
            raise TypeError(f"state must be a KVCache or None, got {type(state).__name__}")
        out, k, v = self._attend(x_t[:, None], state, causal=False)  # every cached token is visible
        start = 0 if self.cache_size is None else max(k.shape[2] - self.cache_size, 0)
        return out[:, 0], KVCache(k[:, :, start:], v[:, :, start:])


class CausalSelfAttention(_KVDecoding, MultiHeadSelfAttention):
    """Causal softmax ``MultiHeadSelfAttention`` (``moh=`` for mixture-of-heads) with a decoding ``step`` over a
    cache of all earlier tokens. Arguments as ``MultiHeadSelfAttention`` (softmax scores, always causal).

    Shapes: ``forward(x)``: (B, T, C) -> (B, T, C); ``step(x_t, state)``: (B, C) -> ((B, C), KVCache).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_kv_heads: int | None = None, qkv_bias: bool = False,
                 qk_norm: bool = False, proj_drop: float = 0.0, backend: str | None = None, moh: dict | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(dim, num_heads, num_kv_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, causal=True,
                         proj_drop=proj_drop, backend=backend, moh=moh, device=device, dtype=dtype)


class SlidingWindowAttention(_KVDecoding, NeighborhoodAttention1d):
    """Causal sliding-window softmax attention: token t sees tokens ``[t - window + 1, t]`` (1-D causal neighborhood
    attention, kernel size ``window``); decoding keeps the last ``window - 1`` keys/values.

    Args:
        dim, num_heads: token width C and heads H (C divisible by H).
        window: keys each token sees (itself and the ``window - 1`` before it), >= 2.
        num_kv_heads, qkv_bias, qk_norm, proj_drop, backend, moh: as ``NeighborhoodAttention1d``.

    Shapes: ``forward(x)``: (B, T, C) -> (B, T, C), any T >= 1; ``step(x_t, state)``: (B, C) -> ((B, C), KVCache).
    """

    def __init__(self, dim: int, num_heads: int = 8, window: int = 64, *, num_kv_heads: int | None = None,
                 qkv_bias: bool = False, qk_norm: bool = False, proj_drop: float = 0.0, backend: str | None = None,
                 moh: dict | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        check_int("window", window, 2)
        super().__init__(dim, num_heads, window, is_causal=True, num_kv_heads=num_kv_heads, qkv_bias=qkv_bias,
                         qk_norm=qk_norm, proj_drop=proj_drop, backend=backend, moh=moh, device=device, dtype=dtype)
        self.window = window
        self.cache_size = window - 1

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        self._check_inputs(x, None)
        if x.shape[1] < self.window:
            # The window holds every earlier token: plain causal attention (NA needs kernel_size <= T).
            return self._attend(x, None, causal=True)[0]
        return super().forward(x)


LM_MIXER_SPECS: dict[str, MixerSpec] = {
    "swa": (SlidingWindowAttention, lambda h: {"window": 64}),
    "linear": (partial(LinearAttention, causal=True), lambda h: {"feature_map": "elu1"}),
    "based": (BasedMixer, lambda h: {"window": 64, "feature_dim": 16}),
    "moh": (CausalSelfAttention, lambda h: {"moh": moh_options(h)}),
    "softmax": (CausalSelfAttention, lambda h: {}),
}


# ---- the model ----


class LMCache(NamedTuple):
    """Decoding state of a ``CausalLanguageModel``: the batch size, the position of the next token, and one mixer
    state per block (None before the first token)."""

    batch: int
    position: int
    states: tuple[Any, ...]


class CausalLanguageModel(SequenceBackbone):
    """Decoder-only language model over token ids (module docstring).

    Args:
        vocab_size: token ids are in ``[0, vocab_size)``; 256 = bytes / characters.
        max_len: context length: the learned positional embedding's length, the longest accepted sequence.
        mixer: sequence mixer, a key of ``LM_MIXER_SPECS`` (swa | linear | based | moh | softmax).
        mixer_kwargs: options of the mixer over its defaults (``window`` for swa / based, ``feature_map`` for
            linear, ``moh=dict(shared_heads=, top_k=)`` for moh, ...); one the mixer does not take is a TypeError.
        embed_dim, depth, num_heads, mlp_ratio: width C, blocks, heads, MLP hidden / C.
        qkv_bias: bias in the mixers' q/k/v projections.
        drop_rate: dropout after the embeddings and in the mixer / MLP outputs.
        drop_path_rate: stochastic depth, linear in depth up to this rate.
        backend: kernel backend of the mixers' ops (None = automatic).

    Shapes: ``forward(tokens)``: int64 (B, T), 1 <= T <= max_len -> logits (B, T, vocab_size);
    ``forward_step(token, cache)``: int64 (B,) -> (logits (B, vocab_size), cache).
    """

    STEM = r"^embed|pos_embed"

    def __init__(
        self,
        vocab_size: int = 256,
        max_len: int = 1024,
        mixer: str = "softmax",
        mixer_kwargs: dict[str, Any] | None = None,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, 1)
        check_int("max_len", max_len, 1)
        dd = {"device": device, "dtype": dtype}
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, embed_dim, **dd)
        self.init_trunk(max_len, mixer, LM_MIXER_SPECS, mixer_kwargs, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                        drop_rate, drop_path_rate, backend, dd)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's init: normal(0.02) token embedding, trunc-normal(0.02) positions and linear weights, zero biases."""
        nn.init.normal_(self.embed.weight, std=0.02)
        super().init_weights()

    # ---- full forward ----

    def _check_tokens(self, tokens: Tensor, name: str, shape: str) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"{name} must be int64 token ids {shape}, got {type(tokens).__name__}")
        if tokens.dtype != torch.long:
            raise TypeError(f"{name} must be int64 token ids {shape}; got dtype {tokens.dtype}")
        # Out-of-range ids would index past the embedding (a device-side assert on CUDA); meta tensors hold none.
        if tokens.numel() and tokens.device.type != "meta" and not torch.compiler.is_compiling():
            low, high = (int(t) for t in torch.aminmax(tokens))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"{name} has ids in [{low}, {high}]; accepted ids: [0, vocab_size={self.vocab_size})")

    def _check_sequence(self, tokens: Tensor, name: str = "tokens") -> None:
        shape = f"(B, T) with 1 <= T <= max_len={self.max_len}"
        self._check_tokens(tokens, name, shape)
        if tokens.dim() != 2 or tokens.shape[0] < 1 or not 1 <= tokens.shape[1] <= self.max_len:
            hint = " (the context length: learned positions)" if tokens.dim() == 2 else ""
            raise ValueError(f"{name} must have shape {shape}{hint}; got {tuple(tokens.shape)}")

    def forward_features(self, tokens: Tensor) -> Tensor:
        """tokens int64 (B, T) -> normed hidden states (B, T, C)."""
        self._check_sequence(tokens)
        return self.mix(self.embed(tokens))

    def forward_head(self, x: Tensor) -> Tensor:
        """Hidden states (..., C) -> logits (..., vocab_size) through the tied embedding."""
        return F.linear(x, self.embed.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens int64 (B, T) -> next-token logits (B, T, vocab_size); position t sees tokens <= t."""
        return self.forward_head(self.forward_features(tokens))

    # ---- incremental decoding ----

    def init_cache(self, batch: int) -> LMCache:
        """An empty decoding cache for ``batch`` sequences."""
        check_int("batch", batch, 1)
        return LMCache(batch, 0, (None,) * len(self.blocks))

    def forward_step(self, token: Tensor, cache: LMCache) -> tuple[Tensor, LMCache]:
        """The next token of every sequence, int64 (B,) -> (its next-token logits (B, vocab_size), the cache
        after it); equal to ``forward`` at that position."""
        if not isinstance(cache, LMCache):
            raise TypeError(f"cache must be an LMCache from init_cache, got {type(cache).__name__}")
        self._check_tokens(token, "token", f"(B,) with B={cache.batch}")
        if token.dim() != 1 or token.shape[0] != cache.batch:
            raise ValueError(f"token must have shape (B,) with B={cache.batch} (the cache's batch); got "
                             f"{tuple(token.shape)}")
        if cache.position >= self.max_len:
            raise ValueError(f"the cache holds {cache.position} tokens, the context length max_len={self.max_len}; "
                             "no position is left")
        x = self.pos_drop(self.embed(token) + self.pos_embed[0, cache.position])
        states = []
        for block, state in zip(self.blocks, cache.states, strict=True):
            x, state = block.step(x, state)
            states.append(state)
        logits = self.forward_head(self.norm(x))
        return logits, LMCache(cache.batch, cache.position + 1, tuple(states))

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt`` with the decoding cache, in eval mode.

        Args:
            prompt: int64 (B, T0) token ids, T0 >= 1; T0 + max_new_tokens must not exceed ``max_len``.
            max_new_tokens: tokens to add, >= 0.
            temperature: softmax temperature (> 0), or 0 for greedy decoding (argmax).
            top_k: sample among the k most likely tokens only, 1 <= k <= vocab_size (None = all).
            generator: random generator of the sampling (on the model's device), for reproducible samples.

        Returns:
            int64 (B, T0 + max_new_tokens): the prompt followed by the new tokens.
        """
        self._check_sequence(prompt, "prompt")
        _check_sampling(max_new_tokens, temperature, top_k, self.vocab_size)
        B, T0 = prompt.shape
        if T0 + max_new_tokens > self.max_len:
            raise ValueError(f"prompt length {T0} + max_new_tokens={max_new_tokens} exceeds the context length "
                             f"max_len={self.max_len}")
        was_training = self.training
        self.eval()
        try:
            cache = self.init_cache(B)
            for t in range(T0):
                logits, cache = self.forward_step(prompt[:, t], cache)
            tokens = [prompt]
            for i in range(max_new_tokens):
                token = _sample(logits, temperature, top_k, generator)
                tokens.append(token[:, None])
                if i + 1 < max_new_tokens:
                    logits, cache = self.forward_step(token, cache)
        finally:
            self.train(was_training)
        return torch.cat(tokens, dim=1)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, vocab_size: int) -> None:
    check_int("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
            0 <= temperature < math.inf):
        raise ValueError(f"temperature={temperature!r} must be a finite float >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k={top_k!r} must be None or an int in [1, vocab_size={vocab_size}]")


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next tokens int64 (B,) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


# ---- timm entrypoints: one per mixer and size ----


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CausalLanguageModel:
    if pretrained and "vocab_size" not in kwargs:  # a shipped checkpoint's vocabulary, from its card
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        info = shipped_data_info(cfg.file) if cfg.file else None
        if info is not None:
            kwargs["vocab_size"] = len(info["vocab"])
    return build_model_with_cfg(CausalLanguageModel, variant, pretrained, **kwargs)


def _register(mixer: str, size: str) -> Callable[..., CausalLanguageModel]:
    name = f"attnzoo_lm_{mixer}_{size}"

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> CausalLanguageModel:
        if "mixer" in kwargs:
            raise TypeError(f"{name} fixes mixer={mixer!r}; got mixer={kwargs['mixer']!r} (use attnzoo_lm_"
                            f"{kwargs['mixer']}_{size})")
        return _create(name, pretrained, **{**LM_SIZES[size], "mixer": mixer, **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    args = LM_SIZES[size]
    entrypoint.__doc__ = (f"Causal LM, {LM_MIXERS[mixer][0]}: {args['depth']} blocks of width {args['embed_dim']}, "
                          f"{args['num_heads']} heads, context {args['max_len']}.")
    return register_model(entrypoint)


for _mixer in LM_MIXER_SPECS:
    for _size in LM_SIZES:
        globals()[f"attnzoo_lm_{_mixer}_{_size}"] = _register(_mixer, _size)
