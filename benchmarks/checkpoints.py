"""The shipped checkpoints (``attnzoo.zoo.pretrained``): their card metrics and CPU inference throughput.

Each checkpoint is loaded with ``timm.create_model(name, pretrained=True)`` (offline, from the package; a detector
with ``attnzoo.zoo.detection.shipped.load_detector``) and timed
on an eval forward under ``no_grad``: fp32, batch 8, 2 threads, median of interleaved rounds. Inputs per task:
images at the card's input size (img/s), token windows of the card's ``block_size`` (sequences/s and tokens/s),
series of the recipe's length (series/s). Writes the ``checkpoints — cpu`` section of docs/benchmarks.md and
prints the README's results table.

    python benchmarks/checkpoints.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch
from _timing import bench_interleaved, format_info, fwd_closure, machine_info, markdown_table, write_rows

from attnzoo.zoo.detection.shipped import load_detector, shipped_detectors
from attnzoo.zoo.pretrained import card, shipped_names

SERIES_LENGTH = 128  # the composed series of configs/series/classify.yaml


def example_input(c: dict, batch: int) -> tuple[torch.Tensor, str, int]:
    """A batch for the card's task, the unit of its throughput and the items per input (tokens per window)."""
    info = c["data_info"]
    if c["task"] == "CharLanguageModel":
        return torch.randint(0, len(info["vocab"]), (batch, info["block_size"])), "windows/s", info["block_size"]
    if c["task"] == "SeriesClassifier":
        return torch.randn(batch, SERIES_LENGTH, info["in_chans"]), "series/s", 1
    return torch.randn(batch, *c["pretrained_cfg"]["input_size"]), "img/s", 1


def metric_cells(metrics: dict) -> str:
    keys = [k for k in ("test_acc", "test_bpc", "test_map_50", "test_map") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info("cpu")
    rows = []
    for name in shipped_names():
        c = card(name)
        model = load_detector(name) if name in shipped_detectors() else timm.create_model(name, pretrained=True).eval()
        x, unit, per_input = example_input(c, args.batch)
        t = bench_interleaved({"model": fwd_closure(model, x)}, warmup=2, reps=args.reps, device="cpu")["model"]
        rate = args.batch / (t["median_ms"] / 1e3)
        speed = f"{rate:.0f} {unit}" + (f" ({rate * per_input / 1e3:.0f}k tokens/s)" if per_input > 1 else "")
        rows.append([name, c["task"], f"{c['params'] / 1e6:.2f}", metric_cells(c["metrics"]), speed, c["recipe"]])
        print(f"  {name}: {rows[-1][3]}, {speed}", flush=True)
    header = ["checkpoint", "task", "params (M)", "metric (card)", f"CPU speed (batch {args.batch})", "recipe"]
    print(markdown_table(header, rows))
    if not args.no_write:
        notes = (f"`timm.create_model(name, pretrained=True)` (detectors: `load_detector(name)`) from the package; "
                 f"fp32 eval forward, batch {args.batch}, "
                 f"{args.threads} threads, median of interleaved rounds. Metrics from the model cards (measured by "
                 "`attnzoo.train.publish` on the full test split with the shipped fp16 weights).")
        print(f"wrote {write_rows('checkpoints — cpu', header, rows, info, notes=notes)} ({format_info(info)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
