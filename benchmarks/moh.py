"""Mixture-of-heads benchmark (design §4): does routing to fewer heads cost less?

For each case the same attention is timed three ways, round-robin in one run:

* ``all heads``: the plain layer (every head at weight 1);
* ``MoH``: routed gates (shared heads + top-k of the routed ones) — query tiles / rows whose gates are all zero
  are skipped (Triton kernel on CUDA, row-compacted torch path on CPU);
* ``MoH, every head routed``: top-k = all routed heads, so no gate is zero: the router's overhead.

both for the attention core (``attention(q, k, v, gates=...)`` vs ``attention(q, k, v)``) and for the whole
block (``MultiHeadSelfAttention(..., moh=...)``: router + projections + attention). ``ratio = MoH / all heads``
(goal ≤ 0.8 on GPU at 75 % of the heads); ``router overhead = every-head MoH / all heads − 1`` (goal ≤ 5 %).
The reference MoH code computes every head and multiplies by the gates, i.e. it costs ``all heads`` or more.

    python benchmarks/moh.py                 # auto device, writes docs/benchmarks.md
    python benchmarks/moh.py --quick --no-write
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import torch
from _timing import (
    bench_interleaved,
    format_info,
    fwd_bwd_closure,
    fwd_closure,
    machine_info,
    print_table,
    resolve_device,
    write_rows,
)

from attnzoo.blocks import MultiHeadSelfAttention
from attnzoo.kernels import attention


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    heads: int
    head_dim: int
    shared: int
    top_k: int

    @property
    def active(self) -> float:
        return (self.shared + self.top_k) / self.heads


CASES = (
    Case("256 tok, 12x64, 6 shared + top-4/6", 256, 12, 64, 6, 4),
    Case("14x14 tok, 16x24, 4 shared + top-8/12", 196, 16, 24, 4, 8),
)


def _blocks(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, MultiHeadSelfAttention]:
    """The plain block and its two MoH variants, sharing the plain block's weights."""
    dim = case.heads * case.head_dim
    kw = dict(qkv_bias=True, device=device, dtype=dtype)
    torch.manual_seed(0)
    plain = MultiHeadSelfAttention(dim, case.heads, **kw).eval()
    routed = case.heads - case.shared
    blocks = {"all heads": plain}
    for label, top_k in (("MoH", case.top_k), ("MoH, every head routed", routed)):
        blk = MultiHeadSelfAttention(dim, case.heads, moh=dict(shared_heads=case.shared, top_k=top_k), **kw).eval()
        blk.load_state_dict(plain.state_dict(), strict=False)
        blocks[label] = blk
    return blocks


def _time(fns: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    return bench_interleaved(fns, warmup=args.warmup, reps=args.reps, device=device)


def _ratio(res: dict[str, dict[str, Any]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s time / ``base``'s in the same round: the pairs share the machine's state,
    so drift over the run (another process, clocks) cancels, which a ratio of the two medians does not."""
    return statistics.median(a / b for a, b in zip(res[name]["times_ms"], res[base]["times_ms"], strict=True))


def run_case(case: Case, batch: int, dtype: torch.dtype, device: torch.device, args) -> list[list[Any]]:
    blocks = _blocks(case, dtype, device)
    x = torch.randn(batch, case.tokens, case.heads * case.head_dim, device=device, dtype=dtype)
    with torch.no_grad():
        q, k, v = blocks["all heads"].project_qkv(x)
        gates = {n: b.router(x) for n, b in blocks.items() if b.router is not None}
    measured = (gates["MoH"] != 0).float().mean().item()
    rows = []
    for pass_, closure in (("fwd", fwd_closure), ("fwd+bwd", fwd_bwd_closure)):
        core = _time({"all heads": closure(attention, q, k, v),
                      **{n: closure(attention, q, k, v, gates=g) for n, g in gates.items()}}, args, device)
        layer = _time({n: closure(b, x) for n, b in blocks.items()}, args, device)
        rows.append([case.name, f"{measured:.0%}", pass_,
                     core["all heads"]["median_ms"], core["MoH"]["median_ms"], _ratio(core, "MoH", "all heads"),
                     layer["all heads"]["median_ms"], layer["MoH"]["median_ms"], _ratio(layer, "MoH", "all heads"),
                     f"{_ratio(layer, 'MoH, every head routed', 'all heads') - 1:+.1%}"])
    return rows


HEADER = ["case", "active heads", "pass", "core all (ms)", "core MoH (ms)", "core ratio", "layer all (ms)",
          "layer MoH (ms)", "layer ratio", "router overhead"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (design §4: 2)")
    p.add_argument("--quick", action="store_true", help="batch 1, few repetitions (a smoke run)")
    p.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    device = resolve_device(None if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = 1 if args.quick else (64 if cuda else 8)
    args.reps = args.reps or (3 if args.quick else (50 if cuda else 40))
    rows = [row for case in CASES for row in run_case(case, batch, dtype, device, args)]
    info = machine_info(device) | {"batch": batch, "dtype": str(dtype).removeprefix("torch.")}
    print(format_info(info))
    print_table(HEADER, rows)
    if not args.no_write:
        notes = ("Median ms, round-robin in one run. Ratios are medians over rounds of the per-round ratio (drift "
                 f"cancels), {args.reps} rounds. `ratio` = MoH / all heads (goal ≤ 0.8 on GPU); "
                 "`router overhead` = MoH with every routed head chosen vs the plain layer (goal ≤ 5 %)."
                 " The router's cost is one skinny GEMM (C -> routed + shared + 2 logits), three small softmaxes "
                 "and the gate multiplies (forward and backward); it weighs more where the attention is cheap (16 "
                 "heads of 24).")
        write_rows(f"moh — {device.type}", HEADER, rows, info, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
