"""Whole-model benchmark: each attnzoo family against its nearest timm model, timed in the same run (issue 6).

CPU: images/s of an eval-mode forward (``no_grad``) and of a training step (train mode, cross-entropy forward
and backward into every parameter) at batch 8, fp32, 2 threads; parameters (M) and GMACs per image
(``torch.utils.flop_counter`` with formulas for the attention ops it cannot see into: our custom ops and ATen's CPU
flash attention). Where a pair shares weights (``same_weights``), timm's weights are loaded into ours
with ``attnzoo.zoo.convert`` first and the relative error of our logits against timm's is reported.
``speed-up = ours images/s / timm images/s`` (> 1: attnzoo faster); ``goal`` is the issue's target (inference).
A new family adds a ``Pair`` to ``PAIRS`` (and ``QUICK``).

    python benchmarks/models.py                  # writes the "models — cpu" section of docs/benchmarks.md
    python benchmarks/models.py --quick --no-write
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from _timing import bench_interleaved, format_info, fwd_closure, machine_info, print_table, rel_err, write_rows
from torch.utils.flop_counter import FlopCounterMode

import attnzoo  # noqa: F401  (registers the zoo)
from attnzoo.zoo.convert import load_converted


@dataclass(frozen=True)
class Pair:
    ours: str
    peer: str  # the nearest timm model
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to both constructors
    same_weights: bool = False  # the peer's state dict converts into ours (identical logits expected)
    goal: float | None = None  # required speed-up (ours / peer images/s)
    input_size: tuple[int, int, int] | None = None  # (C, H, W); None = our model's pretrained cfg


PAIRS = [
    Pair("attnzoo_vit_small", "vit_small_patch16_224", same_weights=True, goal=1.0),
    Pair("attnzoo_vit_tiny", "vit_tiny_patch16_224", same_weights=True),
    Pair("attnzoo_halonet26t", "halonet26t", same_weights=True, goal=1.2),
    Pair("attnzoo_davit_tiny", "davit_tiny", same_weights=True),
    # timm's crossvit_tiny_240 shows its second branch the image resized to 224 px: ours takes the same img_scale
    Pair("attnzoo_crossvit_tiny", "crossvit_tiny_240", dict(img_scale=(1.0, 224 / 240)), same_weights=True),
    # timm has no neighborhood-attention model: its nearest is Swin's shifted-window local attention
    Pair("attnzoo_nat_tiny", "swin_tiny_patch4_window7_224"),
]
QUICK = [
    Pair("attnzoo_vit_tiny", "vit_tiny_patch16_224", dict(img_size=64, depth=2), same_weights=True,
         input_size=(3, 64, 64)),
]


def _attention_flops(q, k, *_, out_shape=None, **__) -> int:
    """Dense attention (q: (B, H, N, D), k: (B, H, M, D)): two matmuls, 4·B·H·N·M·D."""
    return 4 * math.prod(q[:-1]) * k[-2] * q[-1]


def _na_flops(q, k, v, rpb, extra_k, *rest, out_shape=None, **__) -> int:
    """Neighborhood attention: every query sees prod(kernel_size) keys (the op's first list argument) plus the
    extra tokens."""
    kernel_size = next(a for a in rest if isinstance(a, list))
    keys = math.prod(kernel_size) + (extra_k[-2] if extra_k is not None else 0)
    return 4 * math.prod(q[:-1]) * keys * q[-1]


def _halo_flops(q, k, v, *rest, out_shape=None, **__) -> int:
    """Halo attention: every query sees a (block + 2·halo)² window (the op's first two int arguments)."""
    block_size, halo_size = [a for a in rest if type(a) is int][:2]
    return 4 * math.prod(q[:-1]) * (block_size + 2 * halo_size) ** 2 * q[-1]


FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.attnzoo.attention_fwd: _attention_flops,
    torch.ops.attnzoo.na_fwd: _na_flops,
    torch.ops.attnzoo.halo_fwd: _halo_flops,
}


def gmacs(model: torch.nn.Module, image: torch.Tensor) -> float:
    """Multiply-accumulates (G) of one forward on ``image`` (1, C, H, W)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(image)
    return counter.get_total_flops() / 2 / 1e9


def train_step_closure(model: torch.nn.Module, x: torch.Tensor):
    """One training step's compute on a batch: cross-entropy forward and backward into every parameter."""
    target = torch.arange(len(x)) % model.num_classes

    def run() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()

    return run


def run_pair(pair: Pair, batch: int, warmup: int, reps: int, max_seconds: float | None) -> dict[str, Any]:
    torch.manual_seed(0)
    ours = timm.create_model(pair.ours, **pair.kwargs).eval()
    peer = timm.create_model(pair.peer, **pair.kwargs).eval()
    x = torch.randn(batch, *(pair.input_size or ours.pretrained_cfg["input_size"]))
    err = None
    if pair.same_weights:
        load_converted(ours, peer.state_dict())
        with torch.no_grad():
            err = rel_err(ours(x), peer(x))
    t = bench_interleaved({"ours": fwd_closure(ours, x), "peer": fwd_closure(peer, x)}, warmup=warmup, reps=reps,
                          device="cpu", max_seconds=max_seconds)
    ours.train(), peer.train()
    t_train = bench_interleaved({"ours": train_step_closure(ours, x), "peer": train_step_closure(peer, x)},
                                warmup=warmup, reps=reps, device="cpu", max_seconds=max_seconds)
    ips, train_ips = ({n: batch / (res[n]["median_ms"] / 1e3) for n in res} for res in (t, t_train))
    return {
        "pair": pair, "ips": ips, "train_ips": train_ips, "err": err,
        "runs": f"{t['ours']['runs']} / {t_train['ours']['runs']}",
        "params": [sum(p.numel() for p in m.parameters()) / 1e6 for m in (ours, peer)],
        "gmacs": [gmacs(m, x[:1]) for m in (ours, peer)],
    }


def _run_isolated(pair: Pair, batch: int, warmup: int, reps: int, max_seconds: float | None,
                  threads: int) -> dict[str, Any]:
    """``run_pair`` in a fresh process: the allocator's state left by earlier pairs (a heap grown by other
    models' buffers spares later ones page faults) would otherwise favour whichever model runs later."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return pool.submit(run_pair, pair, batch, warmup, reps, max_seconds).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=10, help="timed rounds per model (>= 5)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap on the timed part of one pair")
    p.add_argument("--quick", action="store_true", help="tiny models: a smoke test, not a measurement")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)  # for the machine info: the pairs run in processes of their own
    info = machine_info("cpu")
    print(f"models benchmark on cpu, fp32, batch {args.batch}\n  {format_info(info)}")
    t0 = time.perf_counter()
    rows = []
    for pair in QUICK if args.quick else PAIRS:
        r = _run_isolated(pair, args.batch, 1 if args.quick else 2, 5 if args.quick else args.reps, args.max_seconds,
                          args.threads)
        speedup = r["ips"]["ours"] / r["ips"]["peer"]
        train_speedup = r["train_ips"]["ours"] / r["train_ips"]["peer"]
        print(f"  {pair.ours} {r['ips']['ours']:.1f} img/s vs {pair.peer} {r['ips']['peer']:.1f} img/s: "
              f"{speedup:.2f}x; training {train_speedup:.2f}x"
              + (f" (logits rel err {r['err']:.1e})" if r["err"] is not None else ""))
        rows.append([pair.ours, pair.peer, *r["params"], *r["gmacs"], r["ips"]["ours"], r["ips"]["peer"], speedup,
                     pair.goal, None if pair.goal is None else speedup >= pair.goal, r["train_ips"]["ours"],
                     r["train_ips"]["peer"], train_speedup, r["err"], r["runs"]])
    header = ["attnzoo model", "timm model", "ours params (M)", "timm params (M)", "ours GMACs", "timm GMACs",
              "ours img/s", "timm img/s", "speed-up", "goal", "met", "ours train img/s", "timm train img/s",
              "train speed-up", "logits rel err (same weights)", "runs (eval / train)"]
    print()
    print_table(header, rows)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if not args.no_write:
        notes = (f"fp32, batch {args.batch}, {args.threads} threads; img/s from the median of interleaved rounds "
                 "of an eval forward under `no_grad` and of a training step (train mode, cross-entropy forward and "
                 "backward into every parameter; the goal is for inference). **speed-up = ours img/s / timm img/s** "
                 "(> 1: attnzoo faster). Each pair runs in a fresh process (no allocator state carried over from "
                 "the pairs before it). "
                 "GMACs per image from `torch.utils.flop_counter` (attention ops by formula). Same-weight pairs load "
                 "timm's weights into ours (`attnzoo.zoo.convert`); rel err = ‖ours − timm‖ / ‖timm‖ of the logits."
                 " Where the time differs: the ViT/DaViT/CrossViT pairs run the same ATen kernels (attention: ATen's "
                 "CPU flash kernel), except that the zoo's MLP applies its GELU in place on fc1's output in inference "
                 "(no second hidden buffer to allocate and fault in; how much that saves depends on the allocator's "
                 "state, most in a fresh process), and DaViT's window attention windows its C-wide input and output "
                 "once each (not q, k, v and out); HaloNet runs channels-last with each BatchNorm folded into its "
                 "conv. Training runs timm's MLP unchanged.")
        if args.quick:
            notes += " **--quick smoke-test models, not a measurement.**"
        section = "models — cpu" + (" (quick)" if args.quick else "")
        print(f"wrote section '{section}' of {write_rows(section, header, rows, info, notes=notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
