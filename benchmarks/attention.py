"""Dense attention benchmark: ``attnzoo.kernels.attention`` against its peers (design §4).

CPU (fp32, 2 threads by default): attnzoo's ``torch`` backend vs ``F.scaled_dot_product_attention`` and the
naive formula (matmul, mask, softmax, matmul; ``repeat_interleave`` for GQA) on ViT-B/16 at 224
(B=32, H=12, N=197, D=64), a causal N=2048 case and a causal GQA case (H=8, H_kv=2).

CUDA (bf16): attnzoo's ``triton`` backend vs SDPA forced to FlashAttention and ``torch.compile``'d
``flex_attention`` (causal ``create_block_mask``; no block mask when non-causal) on ViT-B/16 and the long
case (B=16, H=16, N=8192, D=64), non-causal and causal.

Forward (under ``no_grad``) and forward + backward (``autograd.grad`` with a fixed random output gradient)
are timed separately; candidates are timed round-robin in the same run. ``speed-up = peer_ms / ours_ms``
(> 1: ours is faster). Before timing, every candidate's output and gradients are checked against a
reference (float64 naive on CPU, fp32 SDPA on CUDA): ``rel err = ‖out − ref‖ / ‖ref‖``.

    python benchmarks/attention.py                 # auto device, writes docs/benchmarks.md
    python benchmarks/attention.py --quick --no-write
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _timing import (
    bench_interleaved,
    check_close,
    compiled_flex,
    format_info,
    fwd_bwd_closure,
    fwd_closure,
    machine_info,
    print_table,
    resolve_device,
    write_rows,
)

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    H: int
    H_kv: int
    N: int
    D: int
    causal: bool

    @property
    def M(self) -> int:
        return self.N

    @property
    def shape(self) -> str:
        heads = f"{self.H}" if self.H_kv == self.H else f"{self.H}/{self.H_kv}"
        return f"{self.B}×{heads}×{self.N}×{self.D}"

    def flops(self, backward: bool) -> float:
        """Forward: 4·B·H·N·M·D (halved when causal); forward + backward: 3.5× that."""
        f = 4.0 * self.B * self.H * self.N * self.M * self.D
        if self.causal:
            f /= 2
        return f * 3.5 if backward else f


CPU_CASES = [
    Case("ViT-B/16 224", 32, 12, 12, 197, 64, False),
    Case("causal 2k", 1, 8, 8, 2048, 64, True),
    Case("causal GQA 2k", 1, 8, 2, 2048, 64, True),
]
CPU_QUICK = [
    Case("tiny", 2, 4, 4, 64, 32, False),
    Case("tiny causal", 1, 4, 4, 128, 32, True),
    Case("tiny causal GQA", 1, 4, 2, 128, 32, True),
]
CUDA_CASES = [
    Case("ViT-B/16 224", 32, 12, 12, 197, 64, False),
    Case("ViT-B/16 224 causal", 32, 12, 12, 197, 64, True),
    Case("long 8k", 16, 16, 16, 8192, 64, False),
    Case("long 8k causal", 16, 16, 16, 8192, 64, True),
]
CUDA_QUICK = [
    Case("small", 2, 4, 4, 256, 64, False),
    Case("small causal", 2, 4, 4, 256, 64, True),
]


# ------------------------------------------------------------------------------------------- candidates


def load_ours() -> Callable[..., torch.Tensor]:
    try:
        from attnzoo.kernels import attention
    except ImportError as e:  # pragma: no cover - only while the op is being written
        sys.exit(f"attention.py: cannot import attnzoo.kernels.attention ({e}); is attnzoo installed?")
    return attention


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The textbook formula: softmax(q kᵀ · D^-½ + causal mask) v, with k/v repeated for GQA."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if causal:
        n, m = s.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(s.softmax(dim=-1), v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def cpu_candidates(case: Case) -> dict[str, AttnFn]:
    attention = load_ours()
    c = case.causal
    return {
        "ours (torch)": lambda q, k, v: attention(q, k, v, causal=c, backend="torch"),
        "SDPA": lambda q, k, v: sdpa(q, k, v, c),
        "naive": lambda q, k, v: naive_attention(q, k, v, c),
    }




def _causal_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


def cuda_candidates(case: Case, device: torch.device) -> dict[str, AttnFn]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    attention = load_ours()
    c = case.causal
    flex = compiled_flex()
    block_mask = (
        create_block_mask(_causal_mask_mod, B=None, H=None, Q_LEN=case.N, KV_LEN=case.M, device=device)
        if c
        else None
    )
    gqa = case.H_kv != case.H

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=c, enable_gqa=gqa)

    return {
        "ours (triton)": lambda q, k, v: attention(q, k, v, causal=c, backend="triton"),
        "SDPA flash": flash,
        "flex (compiled)": lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa),
    }


def cuda_reference(causal: bool) -> AttnFn:
    """fp32 SDPA with PyTorch's own backend choice (no N×N matrix for the long case)."""
    return lambda q, k, v: sdpa(q, k, v, causal)


# ------------------------------------------------------------------------------------------------ runs


def make_inputs(
    case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(case.B, case.H, case.N, case.D, device=device, dtype=dtype, generator=g)
    k = torch.randn(case.B, case.H_kv, case.M, case.D, device=device, dtype=dtype, generator=g)
    v = torch.randn(case.B, case.H_kv, case.M, case.D, device=device, dtype=dtype, generator=g)
    return q, k, v


def _fmt_err(e: dict[str, float] | None) -> str:
    if e is None:
        return "error"
    return f"{e['out']:.1e} / {e['grad']:.1e}"


def run_case(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    *,
    warmup: int,
    reps: int,
    modes: tuple[str, ...],
    max_seconds: float | None = None,
    stat: str = "median",
) -> list[dict[str, Any]]:
    """Check then time every candidate on one case; one result dict per mode."""
    if device.type == "cuda":
        cands = cuda_candidates(case, device)
        ref_fn, ref_dtype = cuda_reference(case.causal), torch.float32
    else:
        cands = cpu_candidates(case)
        ref_fn, ref_dtype = (lambda q, k, v: naive_attention(q, k, v, case.causal)), torch.float64
    inputs = make_inputs(case, device, dtype)

    # Correctness first (forward and all three gradients); a candidate that fails is reported, not timed.
    errors: dict[str, dict[str, float] | None] = {}
    for name, fn in cands.items():
        try:
            errors[name] = check_close(fn, ref_fn, *inputs, ref_dtype=ref_dtype, backward=True)
        except Exception as exc:  # a peer may not support a shape/dtype; keep benchmarking the others
            print(f"  [{case.name}] {name}: check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            errors[name] = None
    line = ", ".join(f"{n}: {_fmt_err(e)}" for n, e in errors.items())
    print(f"  [{case.name}] rel err vs {'float64 naive' if ref_dtype == torch.float64 else 'fp32 SDPA'} "
          f"(out / max grad): {line}")
    ours = next(iter(cands))
    e_ours = errors[ours]
    if e_ours is not None:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        peer_errs = [e for n, e in errors.items() if n != ours and e is not None]
        tol = max([tol] + [3 * max(e["out"], e["grad"]) for e in peer_errs])
        if max(e_ours["out"], e_ours["grad"]) > tol:
            print(f"  [{case.name}] WARNING: {ours} rel err {_fmt_err(e_ours)} exceeds {tol:.1e}")
    live = {n: f for n, f in cands.items() if errors[n] is not None}
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results = []
    for mode in modes:
        backward = mode == "fwd+bwd"
        closures = {}
        for name, fn in live.items():
            closures[name] = fwd_bwd_closure(fn, *inputs) if backward else fwd_closure(fn, *inputs)
        t0 = time.perf_counter()
        timings = bench_interleaved(
            closures, warmup=warmup, reps=reps, device=device, max_seconds=max_seconds
        )
        del closures
        if device.type == "cuda":
            torch.cuda.empty_cache()
        runs = max((t["runs"] for t in timings.values()), default=0)
        res = {"case": case, "mode": mode, "names": list(cands), "ms": {}, "errors": errors, "runs": runs}
        for name in cands:
            res["ms"][name] = timings[name][f"{stat}_ms"] if name in timings else None
        msg = ", ".join(f"{n} {_ms(res['ms'][n])}" for n in cands)
        print(f"  [{case.name}] {mode:7s} {stat} of {runs}: {msg}  ({time.perf_counter() - t0:.1f}s)")
        results.append(res)
    return results


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f} ms"


def build_table(results: list[dict[str, Any]], device: torch.device) -> tuple[list[str], list[list[Any]]]:
    names = results[0]["names"]
    ours, peers = names[0], names[1:]
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    header = ["case", "B×H×N×D", "causal", "pass"]
    header += [f"{n} ms" for n in names]
    header += [f"speed-up vs {p}" for p in peers]
    header += [f"ours {unit}", "ours rel err (out / grad)", "runs"]
    rows = []
    for r in results:
        case: Case = r["case"]
        ms = r["ms"]
        row: list[Any] = [case.name, case.shape, case.causal, r["mode"]]
        row += [ms[n] for n in names]
        for p in peers:
            row.append(ms[p] / ms[ours] if ms[p] is not None and ms[ours] else None)
        flops = case.flops(r["mode"] == "fwd+bwd")
        row.append(flops / (ms[ours] * 1e-3) / scale if ms[ours] else None)
        row.append(_fmt_err(r["errors"][ours]))
        row.append(r["runs"])
        rows.append(row)
    return header, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per candidate (CPU ≥ 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per candidate")
    p.add_argument(
        "--max-seconds", type=float, default=None,
        help="cap on the timed part of one (case, pass); fewer rounds if needed\n"
        "(default on CPU: 20 unless --reps is given; none on CUDA)",
    )
    p.add_argument(
        "--stat", choices=["median", "min"], default="median",
        help="statistic reported per candidate (min is steadier on a busy shared machine)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd,fwd+bwd")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in ("fwd", "fwd+bwd") for m in modes):
        p.error(f"--modes: expected a subset of fwd,fwd+bwd, got {args.modes!r}")

    torch.manual_seed(0)
    if device.type == "cuda":
        cases = CUDA_QUICK if args.quick else CUDA_CASES
        dtype = torch.bfloat16
        warmup, reps = (2, 5) if args.quick else (10, 50)
    else:
        torch.set_num_threads(args.threads)
        cases = CPU_QUICK if args.quick else CPU_CASES
        dtype = torch.float32
        warmup, reps = (1, 5) if args.quick else (1, 10)
    max_seconds = args.max_seconds
    if max_seconds is None and device.type == "cpu" and args.reps is None:
        max_seconds = 20.0
    warmup = args.warmup if args.warmup is not None else warmup
    reps = args.reps if args.reps is not None else reps

    info = machine_info(device)
    print(f"attention benchmark on {device.type}, {str(dtype).removeprefix('torch.')}, "
          f"warmup {warmup}, reps {reps}")
    print(f"  {format_info(info)}")
    t0 = time.perf_counter()
    results = []
    for case in cases:
        results += run_case(
            case, device, dtype, warmup=warmup, reps=reps, modes=modes, max_seconds=max_seconds,
            stat=args.stat,
        )
    header, rows = build_table(results, device)

    print()
    print_table(header, rows)
    print(f"speed-up = peer_ms / ours_ms (> 1: ours faster); {args.stat} of interleaved runs; "
          f"total {time.perf_counter() - t0:.0f}s")

    if not args.no_write:
        ref = "float64 naive formula" if device.type == "cpu" else "fp32 SDPA"
        notes = (
            f"{str(dtype).removeprefix('torch.')}; {args.stat} of `runs` interleaved rounds (each timing every "
            f"candidate once) after {warmup} warm-up round(s). "
            f"**speed-up = peer ms / ours ms** (> 1 means attnzoo is faster). "
            f"FLOPs: 4·B·H·N·N·D forward (halved when causal), 3.5× for fwd+bwd. "
            f"rel err = ‖out − ref‖ / ‖ref‖ against the {ref} (grad: max over dq, dk, dv)."
        )
        if args.quick:
            notes += " **--quick smoke-test shapes, not a measurement.**"
        section = f"attention — {device.type}" + (" (quick)" if args.quick else "")
        path = write_rows(section, header, rows, info, notes=notes)
        print(f"wrote section '{section}' of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
