"""The zoo's model table: ``model_rows(pattern)`` gives name, parameters, input size, attention and pretrained tags
of every registered model; the ``attnzoo models`` CLI prints it and the README's model table is generated from it.

    python -m attnzoo.zoo.listing [--markdown] [--pattern "attnzoo_vit_*"]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch

import attnzoo.zoo  # noqa: F401  (registers the models)

__all__ = ["HEADER", "ModelRow", "format_table", "model_rows"]

HEADER = ("model", "params (M)", "input size", "attention", "pretrained tags")


@dataclass(frozen=True)
class ModelRow:
    name: str
    params: int
    input_size: tuple[int, ...] | None  # (C, H, W) of the default cfg; None when the cfg has none
    attention: str  # the model's ``attn_name`` ("" when it does not name one)
    pretrained: tuple[str, ...]  # tags that have weights

    def cells(self) -> tuple[str, ...]:
        size = "x".join(map(str, self.input_size)) if self.input_size else "-"
        return (self.name, f"{self.params / 1e6:.1f}", size, self.attention or "-", ", ".join(self.pretrained) or "-")


def model_rows(pattern: str = "attnzoo_*") -> list[ModelRow]:
    """One row per model matching ``pattern`` (fnmatch over ``timm.list_models``), built on the meta device."""
    rows = []
    for name in timm.list_models(pattern):
        with torch.device("meta"):
            model = timm.create_model(name, device="meta")
        tags = tuple(t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*"))
        rows.append(ModelRow(name, sum(p.numel() for p in model.parameters()),
                             model.pretrained_cfg.get("input_size"), getattr(model, "attn_name", ""), tags))
    return rows


def format_table(rows: Sequence[ModelRow], markdown: bool = False) -> str:
    """The rows as a markdown table, or as aligned plain text."""
    cells = [HEADER, *(r.cells() for r in rows)]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join([lines[0], "|" + "---|" * len(HEADER), *lines[1:]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip() for c in cells)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List the attnzoo models registered with timm.")
    parser.add_argument("--pattern", default="attnzoo_*", help="fnmatch pattern over model names")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (the README's)")
    args = parser.parse_args(argv)
    print(format_table(model_rows(args.pattern), markdown=args.markdown))


if __name__ == "__main__":
    main()
