"""Causal character-level language modelling: next-character cross-entropy, bits per character and
perplexity, sampling text from a prompt."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from attnzoo.train.tasks.base import TaskModule

__all__ = ["CharLanguageModel"]


class CharLanguageModel(TaskModule):
    """Character LM over ``timm.create_model(model_name, vocab_size=V, **model_kwargs)``.

    The backbone maps tokens int64 (B, T) to next-token logits (B, T, V) and is causal (position t sees
    tokens <= t). ``data_info`` gives ``vocab`` (the V characters, in token order) and ``block_size`` (the
    training context T); the vocabulary is saved with the checkpoint through ``data_info``.
    Batches: ``(tokens, targets)``, both int64 (B, T), targets = tokens shifted by one. Logs
    ``{stage}_loss`` (nats per char); validation and test also log ``{stage}_bpc`` (bits per char) and
    ``{stage}_ppl`` (per-char perplexity) over the whole split. ``predict_step`` takes a list of prompts
    and returns ``predict_chars`` generated characters after each.

    Args:
        predict_chars: characters ``predict_step`` generates per prompt.
        temperature: sampling temperature (> 0) for ``predict_step``.
        top_k: sample among the k most likely characters only (None = all).
        **kwargs: ``TaskModule`` arguments.
    """

    DATA_KEYS = ("vocab", "block_size")

    def __init__(
        self, model_name: str, predict_chars: int = 200, temperature: float = 1.0, top_k: int | None = None,
        **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(model_name, **kwargs)
        self.vocab: str = self.data_info["vocab"]
        self.block_size: int = self.data_info["block_size"]
        self.stoi = {c: i for i, c in enumerate(self.vocab)}
        _check_sampling(predict_chars, temperature, top_k, len(self.vocab))
        self.predict_chars, self.temperature, self.top_k = predict_chars, temperature, top_k
        self.val_nats = MeanMetric()
        self.test_nats = MeanMetric()

    def backbone_kwargs(self, data_info: dict) -> dict:
        return {"vocab_size": len(data_info["vocab"])}

    def shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log_stage(stage, loss)
        if stage != "train":
            (self.val_nats if stage == "val" else self.test_nats).update(loss, weight=targets.numel())
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics(self.val_nats, "val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.test_nats, "test")

    def _log_epoch_metrics(self, nats: MeanMetric, stage: str) -> None:
        mean = nats.compute()  # synced over processes
        nats.reset()
        self.log(f"{stage}_bpc", mean / math.log(2), prog_bar=stage == "val")
        self.log(f"{stage}_ppl", mean.exp())

    def encode(self, text: str) -> Tensor:
        """text -> int64 (len(text),); every character must be in the vocabulary."""
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"prompt {text!r:.80} has characters outside the model's vocabulary: {unknown}")
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, tokens: Tensor) -> str:
        return "".join(self.vocab[i] for i in tokens.tolist())

    @torch.no_grad()
    def generate(self, prompt: str, n: int, temperature: float = 1.0, top_k: int | None = None) -> str:
        """Sample ``n`` characters after ``prompt`` (non-empty), each from the last ``block_size`` tokens."""
        _check_sampling(n, temperature, top_k, len(self.vocab))
        if not prompt:
            raise ValueError("prompt='' is empty; give at least one character")
        tokens = self.encode(prompt).to(self.device)
        was_training = self.training
        self.eval()  # no dropout while sampling
        for _ in range(n):
            logits = self(tokens[-self.block_size :][None])[0, -1] / temperature
            if top_k is not None:
                logits[logits < logits.topk(top_k).values[-1]] = -math.inf
            tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)])
        self.train(was_training)
        return self.decode(tokens[len(prompt) :])

    def predict_step(self, prompts: list[str], batch_idx: int) -> dict:
        texts = [self.generate(p, self.predict_chars, self.temperature, self.top_k) for p in prompts]
        return {"prompts": list(prompts), "texts": texts}


def _check_sampling(n: int, temperature: float, top_k: int | None, vocab_size: int) -> None:
    if n < 0:
        raise ValueError(f"n={n} characters to generate must be >= 0")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, {vocab_size}] (the vocabulary size) or None")
