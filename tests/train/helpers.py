"""Shared pieces of the training tests: running the CLI in-process, small settings, tiny sequence backbones.

The zoo's sequence backbones (``attnzoo_lm_*``, ``attnzoo_seqenc_*``) are not written yet, so the language and
series tasks are exercised with two tiny timm-registered models built from attnzoo's attention block. They
follow the contracts the tasks document: tokens (B, T) -> logits (B, T, V) and series (B, T, C) -> (B, N).
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch
from timm.models import register_model
from torch import Tensor, nn

from attnzoo.blocks import MultiHeadSelfAttention
from attnzoo.train.cli import AttnzooCLI, run
from attnzoo.train.data import fashion_mnist as fm

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
VIT_CONFIG = CONFIGS / "fmnist" / "vit_mini.yaml"
HAS_FMNIST = (fm.DEBIAN_ROOT / "train-images-idx3-ubyte.gz").is_file()
NEEDS_FMNIST_REASON = f"Debian package dataset-fashion-mnist not installed (no idx files in {fm.DEBIAN_ROOT})"

# A 1-block, 32-channel ViT on the vit_mini config: a few CPU milliseconds per batch of 16.
TINY_VIT = ["--model.init_args.model_kwargs", "{embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg}",
            "--data.init_args.batch_size", "16"]  # fmt: skip
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

FCOS_CONFIG = CONFIGS / "det" / "fcos_nat_mini.yaml"
# 56 x 56 canvases, a few of them, and a fresh attnzoo_nat_mini cut to one 16-channel block per stage.
TINY_DETECTION_DATA = ["--data.init_args.canvas_size", "56", "--data.init_args.scale_range", "[0.5, 1.5]",
                       "--data.init_args.train_size", "8", "--data.init_args.val_size", "4",
                       "--data.init_args.test_size", "4", "--data.init_args.batch_size", "4",
                       "--model.init_args.pretrained", "false"]  # fmt: skip
TINY_NAT = "embed_dim: 16, depths: [1, 1, 1], num_heads: [1, 1, 2]"


def cli(subcommand: str, root: Path, *args: str) -> AttnzooCLI:
    """``attnzoo <subcommand> ... --trainer.default_root_dir <root>`` in this process, without progress bars."""
    with mock.patch.object(sys, "argv", ["attnzoo"]):  # LightningCLI warns about pytest's own arguments
        return run([subcommand, *args, *QUIET, "--trainer.default_root_dir", str(root)])


def short_fit(root: Path, *args: str, epochs: int = 1, batches: int = 3) -> AttnzooCLI:
    """Fit the tiny ViT (vit_mini config) for ``epochs`` x ``batches`` steps, checkpointing every epoch."""
    return cli("fit", root, "--config", str(VIT_CONFIG), *TINY_VIT, "--trainer.max_epochs", str(epochs),
               "--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "2",
               "--checkpoint.save_top_k=-1", "--checkpoint.every_n_epochs=1", *args)  # fmt: skip


def rel_err(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class TinyCharLM(nn.Module):
    """Tokens int64 (B, T) -> next-token logits (B, T, V): embedding + learned positions, one causal
    attention layer, a linear head."""

    def __init__(self, vocab_size: int, embed_dim: int = 32, num_heads: int = 2, max_len: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.pos = nn.Parameter(torch.randn(max_len, embed_dim) * 0.02)
        self.attn = MultiHeadSelfAttention(embed_dim, num_heads, causal=True)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(x + self.attn(x)))


class TinySeriesEncoder(nn.Module):
    """Series float (B, T, C) -> (B, num_classes): linear embedding, one attention layer, mean pool, head.
    With ``aux_weight`` > 0 it has an ``auxiliary_loss()``: aux_weight x mean square of its last features."""

    def __init__(self, in_chans: int, num_classes: int, embed_dim: int = 32, num_heads: int = 2,
                 aux_weight: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(in_chans, embed_dim)
        self.attn = MultiHeadSelfAttention(embed_dim, num_heads)
        self.head = nn.Linear(embed_dim, num_classes)
        self.aux_weight = aux_weight
        self.features: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        self.features = (x + self.attn(x)).mean(dim=1)
        return self.head(self.features)

    def auxiliary_loss(self) -> Tensor | None:
        return self.aux_weight * self.features.pow(2).mean() if self.aux_weight > 0 else None


_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # create_model's, not the model's


@register_model
def test_tiny_char_lm(pretrained: bool = False, **kwargs) -> TinyCharLM:
    return TinyCharLM(**{k: v for k, v in kwargs.items() if k not in _TIMM_ONLY})


@register_model
def test_tiny_series_encoder(pretrained: bool = False, **kwargs) -> TinySeriesEncoder:
    return TinySeriesEncoder(**{k: v for k, v in kwargs.items() if k not in _TIMM_ONLY})
