"""Character-level text data: the embedded corpora (design §3) or the user's plain-text files.

Corpora: ``"pydoc"`` = CPython's ``pydoc_data.topics`` (about 465k characters, part of every CPython),
``"jargon"`` = the Jargon File from Debian's ``jargon-text`` (about 1.6M characters, public domain).
"""

from __future__ import annotations

import gzip
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from attnzoo.train.data.base import ZooDataModule

__all__ = ["CORPORA", "JARGON_PATH", "CharChunks", "TextDataModule", "load_corpus"]

JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
CORPORA = ("pydoc", "jargon")


def _read_text(path: Path, hint: str = "") -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"text file {path} does not exist{hint}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not UTF-8 ({exc}); convert it first") from exc


def load_corpus(corpus: str | list[str]) -> str:
    """A built-in corpus by name (``CORPORA``), or the concatenation of the given UTF-8 text files."""
    if isinstance(corpus, list):
        if not corpus:
            raise ValueError("corpus=[] lists no text files")
        return "".join(_read_text(Path(p)) for p in corpus)
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return "".join(topics[k] for k in sorted(topics))
    if corpus == "jargon":
        return _read_text(JARGON_PATH, hint="; install it as root with `apt-get install -y jargon-text`")
    raise ValueError(f"corpus={corpus!r}; accepted values: {list(CORPORA)} or a list of text file paths")


class CharChunks(Dataset):
    """Consecutive non-overlapping windows of a token sequence: item i = (tokens[s : s + T],
    tokens[s + 1 : s + T + 1]) with s = i·T, both int64 (T,)."""

    def __init__(self, tokens: Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.tokens[i * self.block_size : (i + 1) * self.block_size + 1]
        return chunk[:-1], chunk[1:]


class TextDataModule(ZooDataModule):
    """Next-character prediction over a corpus split into train / val / test (consecutive parts, in order).

    The vocabulary is every character of the whole corpus, sorted; ``data_info`` = ``{"vocab", "block_size"}``
    goes into the checkpoint with the model. Batches: ``(tokens, targets)`` int64 (B, block_size).
    ``predict`` yields the ``prompts`` (lists of strings, ``batch_size`` at a time).

    Args:
        corpus: ``"pydoc"``, ``"jargon"`` or a list of UTF-8 text file paths (``.gz`` is decompressed).
        block_size: characters per training window (the context length T).
        batch_size, num_workers: loader settings.
        val_fraction, test_fraction: shares of the corpus (at its end: val, then test), each in (0, 0.5).
        prompts: texts the language model continues in ``predict``.
    """

    predict_collate = list  # a batch of prompts stays a list of strings

    def __init__(
        self, corpus: str | list[str] = "pydoc", block_size: int = 128, batch_size: int = 64, num_workers: int = 0,
        val_fraction: float = 0.05, test_fraction: float = 0.05, prompts: list[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers)
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 0.5:
                raise ValueError(f"{name}={frac} must be in (0, 0.5)")
        self.corpus = corpus
        self.block_size = block_size
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.prompts = prompts if prompts is not None else ["\n"]

    @cached_property
    def text(self) -> str:
        return load_corpus(self.corpus)

    @cached_property
    def data_info(self) -> dict:
        return {"vocab": "".join(sorted(set(self.text))), "block_size": self.block_size}

    def split_tokens(self, split: str) -> Tensor:
        """int64 token ids of ``split`` in {"train", "val", "test"}."""
        n = len(self.text)
        n_test, n_val = int(n * self.fractions["test"]), int(n * self.fractions["val"])
        bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
        lo, hi = bounds[split]
        stoi = {c: i for i, c in enumerate(self.data_info["vocab"])}
        tokens = torch.tensor([stoi[c] for c in self.text[lo:hi]], dtype=torch.long)
        if len(tokens) <= self.block_size:
            raise ValueError(f"the {split} split has {len(tokens)} characters, fewer than block_size+1="
                             f"{self.block_size + 1}; use a larger corpus or a smaller block_size")  # fmt: skip
        return tokens

    def make_dataset(self, split: str) -> Dataset | list[str]:
        return self.prompts if split == "predict" else CharChunks(self.split_tokens(split), self.block_size)
