"""Linear attention against its peers on the design §4 shapes.

CPU (fp32, ``--threads`` torch threads, default 2), section ``linear — cpu``:

* vision, non-causal: B=1, H=4, D=32, T = 1024 … 65536 (elu1 features, normalized): ours (``backend="torch"``)
  vs ``F.scaled_dot_product_attention`` (softmax attention on the same q, k, v: the quadratic peer a vision model
  would otherwise use). Forward at every T, forward + backward while SDPA's backward stays affordable. The notes
  give the crossover (smallest T from which ours is faster) and the ratio at the largest T (goal: ≥ 10×).
* causal: B=1, H=4, T=4096, D=64 (identity features, unnormalized, the core), without decay, with a per-head
  data-dependent log-decay (B, H, T) and a per-channel one (B, H, T, D) (GLA): ours chunked vs the naive
  recurrent loop (token by token, ``S = diag(exp(g_t)) S + k_tᵀ v_t``, ``o_t = scale·q_t S``).

``linear memory — cpu``: ours' peak memory (extra RSS of one call above its inputs, each in a fresh subprocess)
vs T, for the vision case (fwd, fwd+bwd) and the per-channel causal case (fwd+bwd); it must grow linearly.

CUDA (bf16), section ``linear — cuda``: causal (B, T, H, D) = (8, 1024, 8, 64) and (4, 4096, 64, 128), fwd and
fwd+bwd, ours (``backend="triton"``) vs flash-linear-attention's ``chunk_linear_attn`` (no decay) and
``chunk_simple_gla`` (per-head gates) when ``import fla`` works (goal: ≤ 1.2× fla's time); vision non-causal vs
SDPA.

Every candidate is checked before it is timed: ``rel err = ‖out − ref‖ / ‖ref‖`` (and the max over dq, dk, dv).
``speed-up = peer ms / ours ms`` (> 1: ours is faster).

    python benchmarks/linear.py                     # auto device, writes docs/benchmarks.md
    python benchmarks/linear.py --quick --no-write  # smoke test (small shapes)
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _timing import (
    bench_interleaved,
    check_close,
    format_info,
    fwd_bwd_closure,
    fwd_closure,
    machine_info,
    peak_rss_of,
    print_table,
    rel_err,
    resolve_device,
    synchronize,
    write_rows,
)

from attnzoo.kernels import linear_attention

Tensor = torch.Tensor
VISION_GOAL, FLA_GOAL = 10.0, 1.2


@dataclass(frozen=True)
class Case:
    """q, k: (B, H, T, D); ``decay``: None, "head" (B, H, T) or "channel" (B, H, T, D) log-decay (causal only)."""

    name: str
    B: int
    H: int
    T: int
    D: int
    causal: bool
    decay: str | None = None
    peer_modes: tuple[str, ...] = ("fwd", "fwd+bwd")  # where the peer is timed too
    peer_once: bool = False  # time the peer with one call (SDPA's forward at T=65536 takes minutes on a CPU)

    @property
    def shape(self) -> str:
        return f"{self.B}×{self.H}×{self.T}×{self.D}"


def vision(t: int, sdpa_max_t: int) -> Case:
    """The peer SDPA is timed fwd and fwd+bwd up to ``sdpa_max_t`` tokens, beyond: forward, one call."""
    peer_modes = ("fwd", "fwd+bwd") if t <= sdpa_max_t else ("fwd",)
    return Case("vision non-causal", 1, 4, t, 32, False, peer_modes=peer_modes, peer_once=t > sdpa_max_t)


CPU_VISION_T, CPU_QUICK_VISION_T = (1024, 4096, 16384, 65536), (256, 1024, 2048)
SDPA_MAX_T, QUICK_SDPA_MAX_T = 16384, 1024
CPU_CAUSAL = [Case(f"causal{'' if d is None else ', ' + d + ' decay'}", 1, 4, 4096, 64, True, d)
              for d in (None, "head", "channel")]
CPU_QUICK_CAUSAL = [Case("causal, channel decay", 1, 2, 256, 32, True, "channel")]
MEM_T, MEM_QUICK_T = (4096, 16384, 65536), (1024, 4096)
CUDA_CAUSAL = [Case(f"causal{'' if d is None else ', head decay'}", B, H, T, D, True, d)
               for B, T, H, D in ((8, 1024, 8, 64), (4, 4096, 64, 128)) for d in (None, "head")]
CUDA_VISION_T = (4096, 16384, 65536)
CUDA_QUICK = [Case("causal, head decay", 2, 4, 256, 64, True, "head"), vision(1024, 512)]


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(q, k, v) and the log-decay g (fp32; GLA-like: log-sigmoid gates, mostly close to 0) or None."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(case.B, case.H, case.T, case.D, generator=gen).to(device, dtype) for _ in range(3))
    shape = {None: None, "head": (case.B, case.H, case.T), "channel": (case.B, case.H, case.T, case.D)}[case.decay]
    g = None if shape is None else F.logsigmoid(torch.randn(shape, generator=gen) + 4).to(device)
    return (q, k, v), g


# ------------------------------------------------------------------------------------------ candidates


def ours(case: Case, g: Tensor | None, backend: str) -> Callable[..., Tensor]:
    """Causal: the core (identity features, unnormalized). Vision: elu1 features, normalized."""
    kw = {"feature_map": "identity", "normalize": False, "decay": g} if case.causal else {"feature_map": "elu1"}
    return lambda q, k, v: linear_attention(q, k, v, causal=case.causal, backend=backend, **kw)


def naive_recurrent(g: Tensor | None) -> Callable[..., Tensor]:
    """The recurrence token by token: (B, H, T, D) q, k, v -> (B, H, T, D)."""

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, h, t, d = q.shape
        state, outs = q.new_zeros(b, h, d, v.shape[-1]), []
        for i in range(t):
            if g is not None:
                state = state * g[:, :, i].exp().view(b, h, -1, 1).to(state.dtype)
            state = state + k[:, :, i, :, None] * v[:, :, i, None, :]
            outs.append((q[:, :, i, None, :] @ state).squeeze(-2) * d**-0.5)
        return torch.stack(outs, 2)

    return run


def fla_peer(case: Case, g: Tensor | None) -> tuple[str, Callable[..., Tensor]] | None:
    """fla's chunked op on (B, T, H, D) inputs, or None when fla is not importable."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # fla is optional (GPU only); any import failure means "not available"
        print(f"  fla not available: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    fn, name = (chunk_linear_attn, "fla chunk_linear_attn") if g is None else (chunk_simple_gla,
                                                                                "fla chunk_simple_gla")
    kw: dict[str, Any] = {"normalize": False} if g is None else {"g": g.transpose(1, 2).contiguous()}
    if "head_first" in inspect.signature(fn).parameters:
        kw["head_first"] = False
    return name, lambda q, k, v: fn(q, k, v, scale=case.D**-0.5, **kw)[0]


def seq_first(x: Tensor) -> Tensor:
    return x.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- timing


def _fmt_err(e: dict[str, float] | None) -> str:
    return "–" if e is None else f"{e['out']:.1e} / {e['grad']:.1e}" if "grad" in e else f"{e['out']:.1e}"


def run_case(case: Case, device: torch.device, *, warmup: int, reps: int, max_seconds: float | None,
             stat: str) -> list[list[Any]]:
    """Check, then time ours and the case's peer; one table row per pass."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    (q, k, v), g = make_inputs(case, device, dtype)
    backend = "triton" if cuda else "torch"
    cands: dict[str, tuple[Callable[..., Tensor], tuple[Tensor, ...]]] = {"ours": (ours(case, g, backend), (q, k, v))}
    if not case.causal:
        cands["SDPA"] = (F.scaled_dot_product_attention, (q, k, v))
    elif not cuda:
        cands["naive loop"] = (naive_recurrent(g), (q, k, v))
    elif (fla := fla_peer(case, g)) is not None:
        cands[fla[0]] = (fla[1], tuple(seq_first(x) for x in (q, k, v)))

    # Reference: the naive loop in float64 (CPU causal), ours in float64 (CPU vision: T×T is out of reach), the
    # torch path in fp32 (CUDA). Peers that compute something else (SDPA) are not compared.
    if cuda:
        errors = {"ours": check_close(ours(case, g, backend), ours(case, g, "torch"), q, k, v, ref_dtype=torch.float32)}
        for name, (fn, xs) in cands.items():
            if name.startswith("fla"):
                with torch.no_grad():
                    ref = ours(case, g, "torch")(q.float(), k.float(), v.float())
                    errors[name] = {"out": rel_err(fn(*xs).transpose(1, 2), ref)}
    else:
        ref_fn = naive_recurrent(g) if case.causal else ours(case, g, "torch")
        errors = {n: check_close(fn, ref_fn, *xs, ref_dtype=torch.float64)
                  for n, (fn, xs) in cands.items() if n in ("ours", "naive loop")}
    print(f"  [{case.name} {case.shape}] rel err (out / grad): "
          + ", ".join(f"{n} {_fmt_err(e)}" for n, e in errors.items()))

    rows = []
    peer = next((n for n in cands if n != "ours"), None)
    for mode in ("fwd", "fwd+bwd"):
        make = fwd_bwd_closure if mode == "fwd+bwd" else fwd_closure
        closures = {n: make(fn, *xs) for n, (fn, xs) in cands.items() if n == "ours" or mode in case.peer_modes}
        once = {n: closures.pop(n) for n in list(closures) if n != "ours" and case.peer_once}
        t0 = time.perf_counter()
        timed = bench_interleaved(closures, warmup=warmup, reps=reps, device=device, max_seconds=max_seconds)
        timed |= {n: bench_once(fn, device) for n, fn in once.items()}
        ms = {n: t[f"{stat}_ms"] for n, t in timed.items()}
        peer_ms = ms.get(peer)
        print(f"  [{case.name} {case.shape}] {mode:7s}: " + ", ".join(f"{n} {m:.2f} ms" for n, m in ms.items())
              + f"  ({time.perf_counter() - t0:.0f}s)")
        rows.append([case.name, case.shape, mode, ms["ours"], peer, peer_ms,
                     None if peer_ms is None else peer_ms / ms["ours"], _fmt_err(errors["ours"]),
                     _fmt_err(errors.get(peer)), min(t["runs"] for t in timed.values())])
        if cuda:
            torch.cuda.empty_cache()
    return rows


def bench_once(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """One timed call (no warm-up: smaller cases ran the same code first), in ``bench_interleaved``'s format."""
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    ms = (time.perf_counter() - t0) * 1e3
    return {"median_ms": ms, "min_ms": ms, "runs": 1, "times_ms": [ms]}


HEADER = ["case", "B×H×T×D", "pass", "ours ms", "peer", "peer ms", "speed-up", "ours rel err (out / grad)",
          "peer rel err", "runs"]


def crossover(rows: list[list[Any]]) -> str:
    """Vision forward rows: the smallest T from which ours is faster than SDPA, and the ratio at the largest T."""
    fwd = [(int(r[1].split("×")[2]), r[6]) for r in rows if r[0] == "vision non-causal" and r[2] == "fwd"]
    faster = [t for t, ratio in fwd if ratio is not None and ratio > 1]
    slower = [t for t, ratio in fwd if ratio is not None and ratio <= 1]
    if not fwd:
        return "no vision rows"
    if not faster:
        where = "ours is slower than SDPA at every T measured"
    elif not slower:
        where = f"ours is faster than SDPA from the smallest T measured ({min(faster)}) on"
    else:
        where = f"crossover between T={max(slower)} and T={min(t for t in faster if t > max(slower))}"
    t_max, ratio = fwd[-1]
    return f"{where}; forward speed-up {ratio:.1f}× at T={t_max} (goal ≥ {VISION_GOAL:g}×)"


# ----------------------------------------------------------------------------------------------- memory


def mem_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: peak RSS of one call minus the RSS just before it."""
    torch.set_num_threads(spec["threads"])
    causal = spec["kind"] == "causal"

    def make(t: int):
        case = Case(spec["kind"], 1, 4, t, 32, causal, "channel" if causal else None)
        (q, k, v), g = make_inputs(case, torch.device("cpu"), torch.float32)
        if spec["mode"] == "fwd":
            return fwd_closure(ours(case, g, "torch"), q, k, v)
        return fwd_bwd_closure(ours(case, g, "torch"), q, k, v)

    make(256)()  # load libraries and thread pools first
    return peak_rss_of(make(spec["T"]))


def measure_memory(kind: str, mode: str, t: int, threads: int) -> int | None:
    spec = json.dumps({"kind": kind, "mode": mode, "T": t, "threads": threads})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mem-worker", spec],
                          capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode != 0:
        print(f"  [memory {kind} {mode} T={t}] worker failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_memory(ts: tuple[int, ...], threads: int) -> tuple[list[str], list[list[Any]], str]:
    header = ["case", "pass", "T", "peak MB", "bytes/token", "per-token vs previous T"]
    rows, worst = [], 0.0
    for kind, mode in (("vision", "fwd"), ("vision", "fwd+bwd"), ("causal", "fwd+bwd")):
        prev = None
        for t in ts:
            peak = measure_memory(kind, mode, t, threads)
            per_token = None if peak is None else peak / t
            growth = per_token / prev if per_token and prev else None
            worst = max(worst, growth or 0.0)
            rows.append([f"{kind} (B=1, H=4, D=32{', channel decay' if kind == 'causal' else ''})", mode, t,
                         None if peak is None else peak / 2**20, per_token, growth])
            prev = per_token
    verdict = (f"bytes/token grow at most {worst:.2f}× from one T to the next (4× more tokens): "
               + ("linear in T" if worst <= 1.5 else "NOT linear in T"))
    return header, rows, verdict


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per candidate (CPU ≥ 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per candidate")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on the timed part of one (case, pass); default 60 on CPU unless --reps is given")
    p.add_argument("--stat", choices=["median", "min"], default="median", help="statistic reported per candidate")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs and memory workers)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory section")
    p.add_argument("--mem-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_worker is not None:
        print(json.dumps(mem_worker(json.loads(args.mem_worker))))
        return 0

    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if cuda:
        cases = CUDA_QUICK if args.quick else CUDA_CAUSAL + [vision(t, max(CUDA_VISION_T)) for t in CUDA_VISION_T]
        warmup, reps, max_seconds = (2, 5, None) if args.quick else (10, 50, None)
    else:
        vision_t, sdpa_max_t = (CPU_QUICK_VISION_T, QUICK_SDPA_MAX_T) if args.quick else (CPU_VISION_T, SDPA_MAX_T)
        cases = [vision(t, sdpa_max_t) for t in vision_t] + (CPU_QUICK_CAUSAL if args.quick else CPU_CAUSAL)
        warmup, reps, max_seconds = (1, 5, None) if args.quick else (1, 10, 60.0)
    warmup = args.warmup if args.warmup is not None else warmup
    max_seconds = args.max_seconds if args.max_seconds is not None else (max_seconds if args.reps is None else None)
    reps = args.reps if args.reps is not None else reps

    info = machine_info(device)
    print(f"linear attention benchmark on {device.type}, {'bfloat16' if cuda else 'float32'}, warmup {warmup}, "
          f"reps {reps}\n  {format_info(info)}")
    rows: list[list[Any]] = []
    for case in cases:
        rows += run_case(case, device, warmup=warmup, reps=reps, max_seconds=max_seconds, stat=args.stat)
    summary = crossover(rows)
    load_end = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    print()
    print_table(HEADER, rows)
    print(f"speed-up = peer ms / ours ms (> 1: ours faster); {args.stat} of interleaved runs. {summary}")
    suffix = " (quick)" if args.quick else ""
    if not args.no_write:
        notes = (
            f"{'bf16' if cuda else f'fp32, {args.threads} torch threads'}; {args.stat} of `runs` interleaved rounds "
            f"after {warmup} warm-up round(s); **speed-up = peer ms / ours ms** (> 1 means attnzoo is faster). "
            "vision = `linear_attention(q, k, v)` (elu1 features, normalized, non-causal) vs SDPA (softmax "
            "attention on the same q, k, v); causal = the unnormalized core (identity features, scale D^-½) with "
            "GLA-like log-sigmoid gates (per head (B, H, T) or per channel (B, H, T, D)). "
        )
        if cuda:
            notes += (f"Peers: fla's `chunk_linear_attn` (normalize=False) / `chunk_simple_gla` on (B, T, H, D) "
                      f"copies (layout change outside the timed region), goal ≤ {FLA_GOAL:g}× fla's time; rel err "
                      "against attnzoo's torch path in fp32 (fla: output only). ")
        else:
            notes += ("naive loop = the recurrence token by token in PyTorch (autograd for its backward). rel err: "
                      "vision vs ours in float64 (a T×T reference is out of reach), causal vs the naive loop in "
                      f"float64 (max over dq, dk, dv). Beyond T={SDPA_MAX_T}: SDPA forward only, timed by one call. ")
        notes += summary + "."
        if load_end is not None:
            notes += f" Load avg {load_end} when the timings ended (> threads: other work shared the cores)."
        if args.quick:
            notes += " **--quick smoke-test shapes, not a measurement.**"
        path = write_rows(f"linear — {device.type}{suffix}", HEADER, rows, info, notes=notes)
        print(f"wrote section 'linear — {device.type}{suffix}' of {path}")

    if cuda or args.no_memory:
        return 0
    print("\nmemory vs T (one fresh subprocess per measurement)")
    mem_info = machine_info("cpu")
    mheader, mrows, verdict = run_memory(MEM_QUICK_T if args.quick else MEM_T, args.threads)
    print_table(mheader, mrows)
    print(verdict)
    if not args.no_write:
        mnotes = ("Peak memory of one call above its inputs: each measurement runs in a fresh subprocess (after a "
                  "T=256 warm-up call), resets the peak RSS (`/proc/self/clear_refs`) and reports `VmHWM` minus the "
                  "RSS just before the call (q, k, v, gates and the output gradient already allocated). fwd under "
                  f"`no_grad`; fwd+bwd = forward + `autograd.grad` for q, k, v. Verdict: {verdict}.")
        if args.quick:
            mnotes += " **--quick smoke-test shapes, not a measurement.**"
        path = write_rows(f"linear memory — cpu{suffix}", mheader, mrows, mem_info, notes=mnotes)
        print(f"wrote section 'linear memory — cpu{suffix}' of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
