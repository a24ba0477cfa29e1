"""Local attention against its peers on the design §4 shapes: neighborhood attention (``na1d`` / ``na2d`` /
``na3d``) and halo attention (``halo2d`` and the ``HaloAttention`` block vs timm's ``HaloAttn``).

Neighborhood attention (``--only na``), three sections of ``docs/benchmarks.md``:

* ``local — cpu``: B=1, 56×56, H=4, D=32, fp32, k=7 and k=13. Forward: ours (``backend="torch"``) vs
  ``torch.compile(flex_attention)`` with a ``create_block_mask`` built from a NATTEN 2-D ``mask_mod``
  (clamped windows), SDPA with the dense boolean (N, N) mask (exact NA), SDPA with no mask (full attention:
  the wrong pattern, a floor for any dense method) and NATTEN's own CPU path when ``import natten`` works.
  Forward + backward: ours vs the two SDPAs (Flex and NATTEN have no CPU backward: "n/a").
* ``local memory — cpu``: peak memory of ours (fwd, fwd+bwd) at 64², 128², 256² maps (B=1, H=4, D=32, k=7),
  each measured in a fresh subprocess as ``VmHWM`` (peak RSS, reset through ``/proc/self/clear_refs``) minus
  the RSS just before the call, inputs already allocated; dense-masked SDPA at 64² and 128² for contrast.
* ``local — cuda``: bf16 on the design §4 / NATTEN shapes: NA-2D vision (B=64, 56×56, H=4, D=32, k=7; fwd and
  fwd+bwd), NA-1D (L=32768, H=1, D=128, k=2048), NA-2D (256×256, H=24, D=128, k=80), NA-3D (30×48×80, H=24,
  D=128, k=18×24×24). Ours (``backend="triton"``) vs compiled Flex with a block mask, SDPA without a mask
  (dense floor), NATTEN when installed, and NATTEN's published H100 forward times as constant columns.

Before timing, every candidate is checked: on CPU against dense-masked SDPA in fp32 (``rel err = ‖out − ref‖ /
‖ref‖``, output and max over dq, dk, dv) and in float64; on CUDA ours against compiled Flex in fp32 (bf16 if
fp32 Flex fails). ``speed-up = peer ms / ours ms`` (> 1: ours is faster).

Halo attention (``--only halo``, CPU only; the issue's goal: ≥ 2× faster than timm's ``HaloAttn`` at ≤ 1.1× its
memory), two sections:

* ``local halo — cpu``: B=256, 16×16, C=256 (8 heads × 32), block 8, halo 2, fp32. **op**: ours
  (``halo2d(..., backend="torch")`` on heads-first q, k, v) vs timm's attention core (``HaloAttn.forward`` after
  the q / kv convs: pad, unfold, matmul, timm's own ``PosEmbedRel`` module, softmax, matmul, fold) on the same
  q, k, v (in timm's conv layout) and tables; **block**: ``attnzoo.blocks.HaloAttention`` vs
  ``timm.layers.halo_attn.HaloAttn`` with the same state dict. fwd and fwd+bwd, checked against timm in fp32 and
  float64 first.
* ``local halo memory — cpu``: peak extra RSS of ours and timm (op and block, fwd and fwd+bwd), one fresh
  subprocess per measurement, and the ratio ours / timm.

    python benchmarks/local.py                     # auto device, both benchmarks, writes docs/benchmarks.md
    python benchmarks/local.py --only halo         # the halo sections only (CPU)
    python benchmarks/local.py --quick --no-write  # smoke test (small shapes)
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
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
    make_grad_inputs,
    peak_rss_of,
    print_table,
    rel_err,
    resolve_device,
    write_rows,
)

Tensor = torch.Tensor

# NATTEN's published H100 forward times (bf16, head dim 128; hopper-fna incl. token permutation), in ms.
PUBLISHED_H100_MS = {"NA-1D long": 94.8e-3, "NA-2D large": 18.6, "NA-3D video": 84.4}


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    H: int
    grid: tuple[int, ...]
    D: int
    kernel: tuple[int, ...]
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    published_ms: float | None = None

    @property
    def N(self) -> int:
        return math.prod(self.grid)

    @property
    def shape(self) -> str:
        return "×".join(str(x) for x in (self.B, self.H, *self.grid, self.D))

    @property
    def k(self) -> str:
        return str(self.kernel[0]) if len(set(self.kernel)) == 1 else "×".join(str(x) for x in self.kernel)

    def flops(self, backward: bool) -> float:
        """Useful FLOPs: 4·B·H·N·prod(k)·D forward (QKᵀ and PV), 3.5× that for fwd+bwd."""
        f = 4.0 * self.B * self.H * self.N * math.prod(self.kernel) * self.D
        return f * 3.5 if backward else f


def _case2d(name: str, B: int, H: int, side: int, D: int, k: int, **kw: Any) -> Case:
    return Case(name, B, H, (side, side), D, (k, k), **kw)


CPU_CASES = [_case2d("NA-2D 56² k7", 1, 4, 56, 32, 7), _case2d("NA-2D 56² k13", 1, 4, 56, 32, 13)]
CPU_QUICK = [_case2d("tiny 24² k7", 1, 2, 24, 32, 7)]
MEM_SIDES, MEM_QUICK_SIDES = (64, 128, 256), (32, 64)
MEM_SDPA_MAX_SIDE = 128  # dense-masked SDPA is quadratic: 256² would need ~20 GB (not run with --quick)

CUDA_CASES = [
    _case2d("NA-2D vision", 64, 4, 56, 32, 7),
    Case("NA-1D long", 1, 1, (32768,), 128, (2048,), ("fwd",), PUBLISHED_H100_MS["NA-1D long"]),
    _case2d("NA-2D large", 1, 24, 256, 128, 80, modes=("fwd",), published_ms=PUBLISHED_H100_MS["NA-2D large"]),
    Case("NA-3D video", 1, 24, (30, 48, 80), 128, (18, 24, 24), ("fwd",), PUBLISHED_H100_MS["NA-3D video"]),
]
CUDA_QUICK = [
    _case2d("small 2-D", 2, 2, 24, 32, 7),
    Case("small 1-D", 1, 1, (1024,), 128, (128,), ("fwd",)),
    Case("small 3-D", 1, 2, (6, 8, 10), 128, (3, 4, 4), ("fwd",)),
]


# ------------------------------------------------------------------------------------------ candidates


@dataclass
class Cand:
    """A candidate: ``fn`` on its own layout; ``to_native`` / ``from_native`` map from/to (B, H, *grid, D)."""

    fn: Callable[..., Tensor]
    to_native: Callable[[Tensor], Tensor] = field(default=lambda x: x)
    from_native: Callable[[Tensor], Tensor] = field(default=lambda x: x)
    backward: bool = True

    def on_grid(self) -> Callable[..., Tensor]:
        """The candidate on (B, H, *grid, D) inputs (layout changes included; for checks, not for timing)."""
        return lambda *xs: self.from_native(self.fn(*(self.to_native(x) for x in xs)))


def _flat(x: Tensor) -> Tensor:
    return x.flatten(2, -2)


def _unflat(grid: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    return lambda x: x.unflatten(2, grid)


def load_ours() -> dict[int, Callable[..., Tensor]]:
    try:
        from attnzoo.kernels.neighborhood import na1d, na2d, na3d
    except ImportError as e:  # pragma: no cover - only while the op is being written
        sys.exit(f"local.py: cannot import attnzoo.kernels.neighborhood ({e}); is attnzoo installed?")
    return {1: na1d, 2: na2d, 3: na3d}


def ours_cand(case: Case, backend: str) -> Cand:
    op = load_ours()[len(case.grid)]
    ks = case.kernel
    return Cand(lambda q, k, v: op(q, k, v, ks, backend=backend))


def natten_mask_mod(grid: tuple[int, ...], kernel: tuple[int, ...]) -> Callable[..., Tensor]:
    """NATTEN's neighborhood (stride 1, no dilation, not causal) as a Flex ``mask_mod`` on flat indices.

    Integer ops only: row-major coordinates per axis, window start ``clamp(i - k // 2, 0, L - k)`` (windows
    shift inward at the borders), visible when the key coordinate lies in ``[start, start + k)`` on every axis.
    """
    axes = list(zip(grid, kernel, strict=True))

    def mask_mod(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        rq, rk, ok = q_idx, kv_idx, None
        for L, k in reversed(axes):
            qc, kc = rq % L, rk % L
            rq, rk = rq // L, rk // L
            start = (qc - k // 2).clamp(0, L - k)
            inside = (kc >= start) & (kc < start + k)
            ok = inside if ok is None else ok & inside
        return ok

    return mask_mod


def dense_mask(case: Case, device: torch.device) -> Tensor:
    """(N, N) bool visible-pair mask from the project's own semantics (the oracle for the mask_mod too)."""
    from attnzoo.kernels.neighborhood.semantics import neighborhood_mask

    n = len(case.grid)
    return neighborhood_mask(case.grid, case.kernel, (1,) * n, (1,) * n, (False,) * n, device=device)




def flex_cand(case: Case, device: torch.device) -> tuple[Cand, dict[str, Any]]:
    """Compiled Flex with a block mask; returns the candidate and setup facts (build time, sparsity)."""
    from torch.nn.attention.flex_attention import create_block_mask

    flex = compiled_flex()  # first: raises the recompile limits that the compiled mask builder shares
    # On the GPU the block mask is built compiled (no (N, N) mask in memory: 13 G pairs for NA-3D); on the CPU
    # eagerly, as reference/kernels.md §3.3 measured it.
    build = torch.compile(create_block_mask) if device.type == "cuda" else create_block_mask
    t0 = time.perf_counter()
    bm = build(natten_mask_mod(case.grid, case.kernel), None, None, case.N, case.N, device=device)
    facts = {"mask_s": time.perf_counter() - t0, "sparsity": bm.sparsity()}
    cand = Cand(lambda q, k, v: flex(q, k, v, block_mask=bm), _flat, _unflat(case.grid),
                backward=device.type == "cuda")
    return cand, facts


def sdpa_mask_cand(case: Case, mask: Tensor) -> Cand:
    return Cand(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), _flat, _unflat(case.grid))


def sdpa_full_cand(case: Case) -> Cand:
    return Cand(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _flat, _unflat(case.grid))


def natten_status() -> str | None:
    """None when ``import natten`` works, else why not ("not installed" or the import error)."""
    if importlib.util.find_spec("natten") is None:
        return "not installed"
    try:
        import natten  # noqa: F401
    except Exception as e:  # a broken install is reported, not fatal
        return f"import failed ({type(e).__name__})"
    return None


def add_natten(cands: dict, unavailable: dict, case: Case, device: torch.device) -> None:
    """NATTEN as a candidate when it imports, else the reason it is missing."""
    why = natten_status()
    if why is None:
        cands["NATTEN"] = natten_cand(case, device)
    else:
        unavailable["NATTEN"] = why


def natten_cand(case: Case, device: torch.device) -> Cand:
    import natten

    op = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(case.grid)]
    ks = case.kernel if len(case.grid) > 1 else case.kernel[0]
    # NATTEN is heads-last: (B, *grid, H, D); the layout change happens once, outside the timed region.
    return Cand(lambda q, k, v: op(q, k, v, kernel_size=ks), lambda x: x.movedim(1, -2).contiguous(),
                lambda x: x.movedim(-2, 1), backward=device.type == "cuda")


# ---------------------------------------------------------------------------------------------- inputs


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.H, *case.grid, case.D)
    return tuple(torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(3))


def _fmt_err(e: dict[str, float] | None) -> str:
    if e is None:
        return "error"
    if "grad" in e:
        return f"{e['out']:.1e} / {e['grad']:.1e}"
    return f"{e['out']:.1e}"


def _ms(x: Any) -> str:
    return f"{x:.3f} ms" if isinstance(x, float) else str(x)


def _ratio(peer: Any, ours: Any) -> float | None:
    return peer / ours if isinstance(peer, float) and isinstance(ours, float) and ours > 0 else None


def _safe(label: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a peer may not support a shape/dtype/device: report it, keep going
        print(f"  [{label}] {what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return None


def time_candidates(
    cands: dict[str, Cand],
    inputs: Sequence[Tensor],
    mode: str,
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    max_seconds: float | None,
    stat: str,
) -> tuple[dict[str, float], int]:
    """Interleaved timing of every candidate on its native layout; returns ({name: ms}, rounds)."""
    backward = mode == "fwd+bwd"
    closures = {}
    for name, c in cands.items():
        native = [c.to_native(x) for x in inputs]
        closures[name] = fwd_bwd_closure(c.fn, *native) if backward else fwd_closure(c.fn, *native)
    timings = bench_interleaved(closures, warmup=warmup, reps=reps, device=device, max_seconds=max_seconds)
    del closures
    if device.type == "cuda":
        torch.cuda.empty_cache()
    runs = max((t["runs"] for t in timings.values()), default=0)
    return {n: t[f"{stat}_ms"] for n, t in timings.items()}, runs


# --------------------------------------------------------------------------------------------------- CPU

CPU_PEERS = ("flex (compiled)", "SDPA dense mask", "SDPA full (no mask)", "NATTEN")


def run_cpu_case(case: Case, *, warmup: int, reps: int, max_seconds: float | None, stat: str) -> list[dict]:
    dev = torch.device("cpu")
    label = case.name
    inputs = make_inputs(case, dev, torch.float32)
    mask = dense_mask(case, dev)

    # The Flex mask_mod must select exactly the project's visible pairs.
    idx = torch.arange(case.N)
    mm = natten_mask_mod(case.grid, case.kernel)(None, None, idx[:, None], idx[None, :])
    mask_ok = bool(torch.equal(mm, mask))
    print(f"  [{label}] Flex mask_mod == semantics.neighborhood_mask: {mask_ok} "
          f"(density {mask.float().mean().item():.2%})")
    del mm

    cands: dict[str, Cand] = {"ours (torch)": ours_cand(case, "torch")}
    unavailable: dict[str, str] = {}
    flex = _safe(label, "flex setup", lambda: flex_cand(case, dev))
    facts: dict[str, Any] = {}
    if flex is not None and mask_ok:
        cands["flex (compiled)"], facts = flex
    else:
        unavailable["flex (compiled)"] = "error" if flex is None else "mask mismatch"
    cands["SDPA dense mask"] = sdpa_mask_cand(case, mask)
    cands["SDPA full (no mask)"] = sdpa_full_cand(case)
    add_natten(cands, unavailable, case, dev)

    # First call of compiled Flex = compilation; timed separately so the warm-up rounds stay short.
    if "flex (compiled)" in cands:
        t0 = time.perf_counter()
        with torch.no_grad():
            ok = _safe(label, "flex compile", lambda: cands["flex (compiled)"].on_grid()(*inputs))
        facts["compile_s"] = time.perf_counter() - t0
        if ok is None:
            del cands["flex (compiled)"]
            unavailable["flex (compiled)"] = "error"
        else:
            print(f"  [{label}] flex: block mask {facts['mask_s']:.1f}s (sparsity {facts['sparsity']:.1f}%), "
                  f"first call (compile) {facts['compile_s']:.1f}s")

    # Correctness: against dense-masked SDPA in fp32 (same dtype) and in float64 (the oracle).
    ref = cands["SDPA dense mask"].on_grid()
    err32: dict[str, dict[str, float] | None] = {}
    err64: dict[str, dict[str, float] | None] = {}
    for name, c in cands.items():
        if name in ("SDPA dense mask", "SDPA full (no mask)"):  # the reference itself; a different pattern
            continue
        bwd = c.backward
        fn = c.on_grid()
        err32[name] = _safe(label, f"{name} check", lambda fn=fn, bwd=bwd: check_close(
            fn, ref, *inputs, ref_dtype=torch.float32, backward=bwd))
        err64[name] = _safe(label, f"{name} check", lambda fn=fn, bwd=bwd: check_close(
            fn, ref, *inputs, ref_dtype=torch.float64, backward=bwd))
    err64["SDPA dense mask"] = check_close(ref, ref, *inputs, ref_dtype=torch.float64, backward=True)
    shown = list(err64)
    print(f"  [{label}] rel err (out / max grad) vs SDPA dense mask fp32: "
          + ", ".join(f"{n}: {_fmt_err(err32.get(n))}" for n in shown if n in err32))
    print(f"  [{label}] rel err (out / max grad) vs SDPA dense mask float64: "
          + ", ".join(f"{n}: {_fmt_err(err64.get(n))}" for n in shown))
    ours = "ours (torch)"
    e = err64.get(ours)
    match = e is not None and max(e.values()) <= 1e-5
    if not match:
        print(f"  [{label}] WARNING: ours does not match dense-masked SDPA (rel err {_fmt_err(e)} > 1e-5)")
        if e is None:
            sys.exit(f"local.py: ours failed on {label}")
    for name in ("flex (compiled)", "NATTEN"):
        en = err64.get(name)
        if name in cands and (en is None or en["out"] > 1e-5):
            print(f"  [{label}] WARNING: {name} rel err {_fmt_err(en)}; not timed")
            del cands[name]
            unavailable[name] = "mismatch" if en is not None else "error"

    results = []
    for mode in case.modes:
        live = {n: c for n, c in cands.items() if mode == "fwd" or c.backward}
        t0 = time.perf_counter()
        ms, runs = time_candidates(live, inputs, mode, dev, warmup=warmup, reps=reps, max_seconds=max_seconds,
                                   stat=stat)
        row_ms: dict[str, Any] = {ours: ms[ours]}
        for p in CPU_PEERS:
            if p in ms:
                row_ms[p] = ms[p]
            elif p in unavailable:
                row_ms[p] = unavailable[p]
            else:
                row_ms[p] = "n/a"  # present but no CPU backward
        print(f"  [{label}] {mode:7s} {stat} of {runs}: " + ", ".join(f"{n} {_ms(v)}" for n, v in row_ms.items())
              + f"  ({time.perf_counter() - t0:.1f}s)")
        results.append({"case": case, "mode": mode, "ms": row_ms, "runs": runs, "err32": err32.get(ours),
                        "err64": err64.get(ours), "facts": facts, "match": match})
    return results


def cpu_table(results: list[dict], stat: str) -> tuple[list[str], list[list[Any]]]:
    ours = "ours (torch)"
    header = ["case", "B×H×X×Y×D", "k", "pass", f"{ours} ms"] + [f"{p} ms" for p in CPU_PEERS]
    header += [f"speed-up vs {p}" for p in CPU_PEERS]
    header += ["ours GFLOP/s", "ours rel err vs SDPA mask fp32 (out / grad)", "vs float64", "runs"]
    rows = []
    for r in results:
        case: Case = r["case"]
        ms = r["ms"]
        row: list[Any] = [case.name, case.shape, case.k, r["mode"], ms[ours]] + [ms[p] for p in CPU_PEERS]
        row += [_ratio(ms[p], ms[ours]) for p in CPU_PEERS]
        row.append(case.flops(r["mode"] == "fwd+bwd") / (ms[ours] * 1e-3) / 1e9)
        err64 = _fmt_err(r["err64"]) + ("" if r["match"] else " MISMATCH")
        row += [_fmt_err(r["err32"]), err64, r["runs"]]
        rows.append(row)
    return header, rows


# ------------------------------------------------------------------------------------------- CPU memory


def mem_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: peak RSS of one call minus the RSS just before it."""
    torch.set_num_threads(spec["threads"])
    side, mode, impl, k = spec["side"], spec["mode"], spec["impl"], spec["k"]
    B, H, D = spec["B"], spec["H"], spec["D"]
    na2d = load_ours()[2]

    def make(s: int) -> tuple[Callable[..., Tensor], tuple[Tensor, ...], Tensor]:
        case = _case2d("mem", B, H, s, D, min(k, s))
        q, kk, v = make_inputs(case, torch.device("cpu"), torch.float32)
        if impl == "ours":
            fn: Callable[..., Tensor] = lambda q, k_, v: na2d(q, k_, v, case.kernel, backend="torch")
        else:
            fn = sdpa_mask_cand(case, dense_mask(case, torch.device("cpu"))).on_grid()
        if mode == "fwd+bwd":
            q, kk, v = (x.requires_grad_(True) for x in (q, kk, v))
        return fn, (q, kk, v), torch.randn_like(q)

    def call(fn: Callable[..., Tensor], xs: tuple[Tensor, ...], g: Tensor) -> None:
        if mode == "fwd+bwd":
            out = fn(*xs)
            torch.autograd.grad(out, xs, g)
        else:
            with torch.no_grad():
                fn(*xs)

    call(*make(16))  # load libraries, thread pools and kernels on a small map first
    fn, xs, g = make(side)
    return peak_rss_of(lambda: call(fn, xs, g))


def measure_memory(side: int, mode: str, impl: str, threads: int, k: int = 7) -> dict[str, Any] | None:
    spec = {"side": side, "mode": mode, "impl": impl, "threads": threads, "k": k, "B": 1, "H": 4, "D": 32}
    return spawn_mem_worker(spec, f"{side}² {mode} {impl}")


def spawn_mem_worker(spec: dict[str, Any], label: str) -> dict[str, Any] | None:
    """Run this script as ``--mem-worker SPEC`` in a fresh interpreter; its last stdout line is the result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  [memory {label}] worker failed (rc {proc.returncode}): {tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(sides: Sequence[int], threads: int, sdpa_max_side: int = MEM_SDPA_MAX_SIDE,
               jobs: int = 2) -> tuple[list[str], list[list[Any]], str]:
    """Rows (map, N, pass, ours peak MB, bytes/token, ratio vs previous map, SDPA-mask ...) and a verdict.

    The subprocesses run ``jobs`` at a time: each measures its own peak RSS, so running side by side changes
    their speed, not their numbers.
    """
    specs = [(side, mode, impl) for mode in ("fwd", "fwd+bwd") for side in sides
             for impl in ("ours", "sdpa-mask") if impl == "ours" or side <= sdpa_max_side]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        found = dict(zip(specs, pool.map(lambda s: measure_memory(*s, threads), specs), strict=True))
    print(f"  {len(specs)} measurements in {time.perf_counter() - t0:.1f}s")
    header = ["map", "N", "pass", "ours peak MB", "ours bytes/token", "per-token vs previous map",
              "SDPA dense mask peak MB", "SDPA dense mask bytes/token"]
    rows: list[list[Any]] = []
    verdicts = []
    for mode in ("fwd", "fwd+bwd"):
        prev = None
        ratios = []
        for side in sides:
            n = side * side
            m, s = found[(side, mode, "ours")], found.get((side, mode, "sdpa-mask"))
            per_tok = m["peak_bytes"] / n if m else None
            ratio = per_tok / prev if per_tok and prev else None
            if ratio is not None:
                ratios.append(ratio)
            prev = per_tok or prev
            rows.append([f"{side}²", n, mode, m["peak_bytes"] / 2**20 if m else None, per_tok, ratio,
                         s["peak_bytes"] / 2**20 if s else "–", s["peak_bytes"] / n if s else "–"])
        linear = bool(ratios) and max(ratios) <= 1.5
        verdicts.append(f"{mode}: per-token ratios between successive maps "
                        + ", ".join(f"{x:.2f}" for x in ratios)
                        + (" → linear or better (every ratio ≤ 1.5)" if linear else " → NOT linear (a ratio > 1.5)"))
    verdict = "; ".join(verdicts)
    if not all(x["reset"] for x in found.values() if x):
        verdict += " (peak RSS could not be reset: baselines are the pre-call peak, so numbers are lower bounds)"
    return header, rows, verdict


# -------------------------------------------------------------------------------------------------- CUDA

CUDA_PEERS = ("flex (compiled)", "SDPA full (no mask)", "NATTEN")


def run_cuda_case(case: Case, device: torch.device, *, warmup: int, reps: int, max_seconds: float | None,
                  stat: str) -> list[dict]:
    label = case.name
    dtype = torch.bfloat16
    inputs = make_inputs(case, device, dtype)
    ours = "ours (triton)"
    cands: dict[str, Cand] = {ours: ours_cand(case, "triton")}
    unavailable: dict[str, str] = {}
    facts: dict[str, Any] = {}
    if case.N <= 16384:  # the dense check of the mask_mod is N×N
        idx = torch.arange(case.N, device=device)
        mm = natten_mask_mod(case.grid, case.kernel)(None, None, idx[:, None], idx[None, :])
        print(f"  [{label}] Flex mask_mod == semantics.neighborhood_mask: "
              f"{bool(torch.equal(mm, dense_mask(case, device)))}")
        del mm
    flex = _safe(label, "flex setup", lambda: flex_cand(case, device))
    if flex is not None:
        cands["flex (compiled)"], facts = flex
        print(f"  [{label}] flex block mask {facts['mask_s']:.1f}s, sparsity {facts['sparsity']:.1f}%")
    else:
        unavailable["flex (compiled)"] = "error"
    cands["SDPA full (no mask)"] = sdpa_full_cand(case)
    add_natten(cands, unavailable, case, device)

    # Correctness: ours (and NATTEN) against compiled Flex on the same mask, fp32 when Flex runs in fp32.
    bwd = "fwd+bwd" in case.modes
    errs: dict[str, dict[str, float] | None] = {}
    ref_label = "flex fp32"
    if "flex (compiled)" in cands:
        ref = cands["flex (compiled)"].on_grid()
        for name in [n for n in (ours, "NATTEN") if n in cands]:
            fn = cands[name].on_grid()
            e = _safe(label, f"{name} check vs flex fp32",
                      lambda fn=fn: check_close(fn, ref, *inputs, ref_dtype=torch.float32, backward=bwd))
            if e is None:
                ref_label = "flex bf16"
                e = _safe(label, f"{name} check vs flex bf16",
                          lambda fn=fn: check_close(fn, ref, *inputs, ref_dtype=None, backward=bwd))
            errs[name] = e
        torch.cuda.empty_cache()
    else:
        ref_label = "–"
        errs[ours] = None
    print(f"  [{label}] rel err vs {ref_label} (out / max grad): "
          + ", ".join(f"{n}: {_fmt_err(e)}" for n, e in errs.items()))
    if errs.get(ours) is None:
        # Ours failed its check or Flex is missing: make sure ours at least runs before timing it.
        ok = _safe(label, "ours", lambda: cands[ours].fn(*inputs))
        if ok is None:
            del cands[ours]
    elif max(errs[ours].values()) > 2e-2:
        print(f"  [{label}] WARNING: ours rel err {_fmt_err(errs[ours])} vs {ref_label} exceeds 2e-2")

    results = []
    for mode in case.modes:
        live = {n: c for n, c in cands.items() if mode == "fwd" or c.backward}
        t0 = time.perf_counter()
        ms, runs = time_candidates(live, inputs, mode, device, warmup=warmup, reps=reps, max_seconds=max_seconds,
                                   stat=stat)
        row_ms: dict[str, Any] = {ours: ms.get(ours, "error")}
        for p in CUDA_PEERS:
            row_ms[p] = ms[p] if p in ms else unavailable.get(p, "n/a")
        peak = _cuda_peak_mb(cands[ours], inputs, mode, device) if ours in cands else None
        print(f"  [{label}] {mode:7s} {stat} of {runs}: " + ", ".join(f"{n} {_ms(v)}" for n, v in row_ms.items())
              + f"  ({time.perf_counter() - t0:.1f}s)")
        results.append({"case": case, "mode": mode, "ms": row_ms, "runs": runs, "err": errs.get(ours),
                        "ref": ref_label, "peak_mb": peak, "facts": facts})
    return results


def _cuda_peak_mb(c: Cand, inputs: Sequence[Tensor], mode: str, device: torch.device) -> float:
    """Extra GPU memory of one call of ``c`` above what was allocated before it (inputs included there)."""
    run = fwd_bwd_closure(c.fn, *inputs) if mode == "fwd+bwd" else fwd_closure(c.fn, *inputs)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    del run
    torch.cuda.empty_cache()
    return peak


def cuda_table(results: list[dict]) -> tuple[list[str], list[list[Any]]]:
    ours = "ours (triton)"
    header = ["case", "B×H×grid×D", "k", "pass", f"{ours} ms"] + [f"{p} ms" for p in CUDA_PEERS]
    header += ["NATTEN H100 published ms"]
    header += [f"speed-up vs {p}" for p in CUDA_PEERS] + ["published / ours"]
    header += ["ours TFLOP/s", "ours peak MB", "ours rel err (out / grad)", "runs"]
    rows = []
    for r in results:
        case: Case = r["case"]
        ms = r["ms"]
        pub = case.published_ms if r["mode"] == "fwd" else None
        o = ms[ours]
        row: list[Any] = [case.name, case.shape, case.k, r["mode"], o] + [ms[p] for p in CUDA_PEERS] + [pub]
        row += [_ratio(ms[p], o) for p in CUDA_PEERS] + [_ratio(pub, o)]
        row.append(case.flops(r["mode"] == "fwd+bwd") / (o * 1e-3) / 1e12 if isinstance(o, float) else None)
        row += [r["peak_mb"], f"{_fmt_err(r['err'])} vs {r['ref']}", r["runs"]]
        rows.append(row)
    return header, rows


# -------------------------------------------------------------------------------------------------- halo


@dataclass(frozen=True)
class HaloCase:
    """Design §4 halo shape: B images of side×side, C = heads·D channels, block × block queries, halo ``halo``."""

    B: int = 256
    heads: int = 8
    side: int = 16
    D: int = 32
    block: int = 8
    halo: int = 2

    @property
    def C(self) -> int:
        return self.heads * self.D

    @property
    def qkv_shape(self) -> tuple[int, ...]:
        return (self.B, self.heads, self.side, self.side, self.D)

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.B, self.C, self.side, self.side)


HALO_CASE = HaloCase()
HALO_QUICK = HaloCase(B=8)
HALO_CAP_S = 60.0  # default cap (s) on the timed part of one (level, pass): one timm fwd+bwd takes seconds
HALO_SPEED_GOAL, HALO_MEM_GOAL = 2.0, 1.1  # the goal: ≥ 2× faster, ≤ 1.1× memory than timm, on CPU
HALO_LEVELS, HALO_IMPLS = ("op", "block"), ("ours", "timm")


@dataclass
class HaloCand:
    """``fn(*inputs)`` on its native layout; fwd+bwd differentiates ``inputs`` and ``params`` (module weights)."""

    fn: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]
    out_shape: tuple[int, ...]
    params: tuple[Tensor, ...] = ()


def timm_halo_attn(hc: HaloCase, seed: int = 0) -> torch.nn.Module:
    """timm's own ``HaloAttn`` with the case's geometry (its q / kv weights and relative-position tables)."""
    from timm.layers.halo_attn import HaloAttn

    torch.manual_seed(seed)
    return HaloAttn(hc.C, num_heads=hc.heads, block_size=hc.block, halo_size=hc.halo)


def ours_halo_block(hc: HaloCase, timm_attn: torch.nn.Module) -> torch.nn.Module:
    """``attnzoo.blocks.HaloAttention`` loaded with ``timm_attn``'s state dict (backend None: torch on CPU)."""
    from attnzoo.blocks import HaloAttention

    block = HaloAttention(hc.C, num_heads=hc.heads, block_size=hc.block, halo_size=hc.halo)
    block.load_state_dict(timm_attn.state_dict(), strict=True)
    return block


def timm_halo_core(attn: Any, q: Tensor, kv: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """timm's ``HaloAttn.forward`` after its q / kv 1×1 convs, on the conv outputs q (B, heads·D, H, W) and
    kv (B, heads·2D, H, W) (per head [k | v], heads outermost): pad + unfold the kv windows, q·kᵀ·scale plus
    timm's own ``PosEmbedRel`` module (``rel_logits_1d``) run with the tables ``rel_h`` / ``rel_w``, softmax,
    ·v, fold back to (B, heads·D, H, W). The lines are timm 1.0's, with ``self`` -> ``attn``."""
    B, _, H, W = q.shape
    num_h_blocks = H // attn.block_size
    num_w_blocks = W // attn.block_size
    num_blocks = num_h_blocks * num_w_blocks
    q = q.reshape(
        -1, attn.dim_head_qk, num_h_blocks, attn.block_size_ds, num_w_blocks, attn.block_size_ds
    ).permute(0, 1, 3, 5, 2, 4)
    q = q.reshape(B * attn.num_heads, attn.dim_head_qk, -1, num_blocks).transpose(1, 3)
    kv = F.pad(kv, [attn.halo_size, attn.halo_size, attn.halo_size, attn.halo_size])
    kv = kv.unfold(2, attn.win_size, attn.block_size).unfold(3, attn.win_size, attn.block_size).reshape(
        B * attn.num_heads, attn.dim_head_qk + attn.dim_head_v, num_blocks, -1).permute(0, 2, 3, 1)
    k, v = torch.split(kv, [attn.dim_head_qk, attn.dim_head_v], dim=-1)
    # timm's PosEmbedRel module itself, with the tables passed in (so that they are differentiable inputs).
    rel = torch.func.functional_call(attn.pos_embed, {"height_rel": rel_h, "width_rel": rel_w}, (q,))
    if attn.scale_pos_embed:
        a = (q @ k.transpose(-1, -2) + rel) * attn.scale
    else:
        a = (q @ k.transpose(-1, -2)) * attn.scale + rel
    a = a.softmax(dim=-1)
    out = (a @ v).transpose(1, 3)
    out = out.reshape(-1, attn.block_size_ds, attn.block_size_ds, num_h_blocks, num_w_blocks)
    return out.permute(0, 3, 1, 4, 2).contiguous().view(
        B, attn.dim_out_v, H // attn.block_stride, W // attn.block_stride)


def to_timm_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Heads-first (B, heads, H, W, D) q, k, v -> timm's conv-output layout q (B, heads·D, H, W), kv."""
    B, nh, H, W, D = q.shape
    qc = q.permute(0, 1, 4, 2, 3).reshape(B, nh * D, H, W)
    kvc = torch.cat([k, v], dim=-1).permute(0, 1, 4, 2, 3).reshape(B, nh * 2 * D, H, W)
    return qc.contiguous(), kvc.contiguous()


def from_timm_out(out: Tensor, heads: int) -> Tensor:
    """timm's (B, heads·D, H, W) output -> heads-first (B, heads, H, W, D)."""
    return out.unflatten(1, (heads, -1)).permute(0, 1, 3, 4, 2)


def ours_halo_op(hc: HaloCase, scale: float) -> Callable[..., Tensor]:
    from attnzoo.kernels.halo import halo2d

    return lambda q, k, v, rh, rw: halo2d(q, k, v, hc.block, hc.halo, rel_h=rh, rel_w=rw, scale=scale,
                                          backend="torch")


def timm_halo_op_on_grid(attn: Any, heads: int) -> Callable[..., Tensor]:
    """timm's core on heads-first q, k, v (layout changes included; for the checks, not for timing)."""
    return lambda q, k, v, rh, rw: from_timm_out(timm_halo_core(attn, *to_timm_qkv(q, k, v), rh, rw), heads)


def halo_cands(hc: HaloCase, level: str, impls: Sequence[str] = HALO_IMPLS, seed: int = 0) -> dict[str, HaloCand]:
    """The candidates of one level on the same data: ``"op"`` (q, k, v, tables) or ``"block"`` (x, weights)."""
    attn = timm_halo_attn(hc, seed)
    g = torch.Generator().manual_seed(seed)
    cands: dict[str, HaloCand] = {}
    if level == "op":
        q, k, v = (torch.randn(hc.qkv_shape, generator=g) for _ in range(3))
        rh, rw = (t.detach().clone() for t in (attn.pos_embed.height_rel, attn.pos_embed.width_rel))
        if "ours" in impls:
            cands["ours"] = HaloCand(ours_halo_op(hc, attn.scale), (q, k, v, rh, rw), hc.qkv_shape)
        if "timm" in impls:
            qc, kvc = to_timm_qkv(q, k, v)
            cands["timm"] = HaloCand(lambda qc, kvc, rh, rw: timm_halo_core(attn, qc, kvc, rh, rw),
                                     (qc, kvc, rh, rw), tuple(qc.shape))
        return cands
    x = torch.randn(hc.x_shape, generator=g)
    if "ours" in impls:
        block = ours_halo_block(hc, attn)
        cands["ours"] = HaloCand(block, (x,), hc.x_shape, tuple(block.parameters()))
    if "timm" in impls:
        cands["timm"] = HaloCand(attn, (x,), hc.x_shape, tuple(attn.parameters()))
    return cands


def halo_closure(c: HaloCand, mode: str, seed: int = 0) -> Callable[[], Any]:
    """fwd (no_grad) or fwd + ``autograd.grad`` w.r.t. the inputs and the module weights (fixed output grad)."""
    if mode == "fwd":
        return fwd_closure(c.fn, *c.inputs)
    xs = make_grad_inputs(*c.inputs)
    leaves = (*xs, *c.params)
    g = torch.randn(c.out_shape, generator=torch.Generator().manual_seed(seed))

    def run() -> tuple[Tensor, ...]:
        return torch.autograd.grad(c.fn(*xs), leaves, g)

    return run


def halo_block_check(ours: torch.nn.Module, ref: torch.nn.Module, x: Tensor, ref_dtype: torch.dtype,
                     seed: int = 0) -> dict[str, float]:
    """Relative errors of block ``ours`` (fp32) against a ``ref_dtype`` copy of ``ref``: output, and max over
    the gradients of x and of every weight (matched by name)."""
    refm = copy.deepcopy(ref).to(ref_dtype)
    xo = x.detach().clone().requires_grad_(True)
    xr = x.detach().to(ref_dtype).requires_grad_(True)
    out, rout = ours(xo), refm(xr)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    po, pr = dict(ours.named_parameters()), dict(refm.named_parameters())
    names = sorted(po)
    grads = torch.autograd.grad(out, [xo, *(po[n] for n in names)], g)
    rgrads = torch.autograd.grad(rout, [xr, *(pr[n] for n in names)], g.to(ref_dtype))
    errs = {"out": rel_err(out, rout)}
    for name, a, b in zip(["x", *names], grads, rgrads, strict=True):
        errs[f"grad {name}"] = rel_err(a, b)
    errs["grad"] = max(v for n, v in errs.items() if n.startswith("grad "))
    return errs


def halo_checks(hc: HaloCase) -> dict[str, dict[str, dict[str, float] | None]]:
    """{level: {"err32": ours vs timm fp32, "err64": ours vs timm float64, "timm64": timm fp32 vs float64}}."""
    found: dict[str, dict[str, dict[str, float] | None]] = {}
    op = halo_cands(hc, "op")
    attn = timm_halo_attn(hc)
    ours_fn, timm_fn = ours_halo_op(hc, attn.scale), timm_halo_op_on_grid(attn, hc.heads)
    xs = op["ours"].inputs
    found["op"] = {
        "err32": _safe("halo op", "check", lambda: check_close(ours_fn, timm_fn, *xs, ref_dtype=torch.float32)),
        "err64": _safe("halo op", "check", lambda: check_close(ours_fn, timm_fn, *xs, ref_dtype=torch.float64)),
        "timm64": _safe("halo op", "check", lambda: check_close(timm_fn, timm_fn, *xs, ref_dtype=torch.float64)),
    }
    del op
    gc.collect()
    blk = halo_cands(hc, "block")
    ours_m, timm_m, x = blk["ours"].fn, blk["timm"].fn, blk["ours"].inputs[0]
    found["block"] = {
        "err32": _safe("halo block", "check", lambda: halo_block_check(ours_m, timm_m, x, torch.float32)),
        "err64": _safe("halo block", "check", lambda: halo_block_check(ours_m, timm_m, x, torch.float64)),
        "timm64": _safe("halo block", "check", lambda: halo_block_check(timm_m, timm_m, x, torch.float64)),
    }
    return found


def run_halo(hc: HaloCase, *, warmup: int, reps: int, max_seconds: float | None, stat: str) -> list[dict]:
    """Checks, then interleaved timing of ours vs timm per (level, pass); one result dict per row."""
    t0 = time.perf_counter()
    checks = halo_checks(hc)
    for level, e in checks.items():
        print(f"  [halo {level}] rel err (out / max grad): ours vs timm fp32 {_fmt_err(e['err32'])}, "
              f"ours vs timm float64 {_fmt_err(e['err64'])}, timm fp32 vs float64 {_fmt_err(e['timm64'])}"
              f"  ({time.perf_counter() - t0:.1f}s so far)")
        if e["err64"] is None or max(e["err64"].values()) > 1e-5:
            print(f"  [halo {level}] WARNING: ours does not match timm float64 (rel err {_fmt_err(e['err64'])} > 1e-5)")
    gc.collect()
    results = []
    for level in HALO_LEVELS:
        cands = halo_cands(hc, level)
        for mode in ("fwd", "fwd+bwd"):
            t0 = time.perf_counter()
            closures = {name: halo_closure(c, mode) for name, c in cands.items()}
            timings = bench_interleaved(closures, warmup=warmup, reps=reps, device="cpu", max_seconds=max_seconds)
            del closures
            gc.collect()
            ms = {n: t[f"{stat}_ms"] for n, t in timings.items()}
            runs = max(t["runs"] for t in timings.values())
            print(f"  [halo {level}] {mode:7s} {stat} of {runs}: ours {_ms(ms['ours'])}, timm {_ms(ms['timm'])}, "
                  f"speed-up {ms['timm'] / ms['ours']:.2f}×  ({time.perf_counter() - t0:.1f}s)")
            results.append({"level": level, "mode": mode, "ms": ms, "runs": runs, **checks[level]})
        del cands
        gc.collect()
    return results


def halo_table(hc: HaloCase, results: list[dict]) -> tuple[list[str], list[list[Any]]]:
    header = ["level", "input", "pass", "ours ms", "timm ms", "speed-up (timm / ours)",
              f"≥ {HALO_SPEED_GOAL:g}×", "ours rel err vs timm fp32 (out / grad)", "ours vs timm float64",
              "timm fp32 vs float64", "runs"]
    shapes = {"op": "q, k, v " + "×".join(map(str, hc.qkv_shape)), "block": "x " + "×".join(map(str, hc.x_shape))}
    rows = []
    for r in results:
        ours, peer = r["ms"]["ours"], r["ms"]["timm"]
        speed = _ratio(peer, ours)
        name = "op: halo2d vs timm core" if r["level"] == "op" else "block: HaloAttention vs timm HaloAttn"
        rows.append([name, shapes[r["level"]], r["mode"], ours, peer, speed,
                     speed is not None and speed >= HALO_SPEED_GOAL, _fmt_err(r["err32"]), _fmt_err(r["err64"]),
                     _fmt_err(r["timm64"]), r["runs"]])
    return header, rows


def halo_mem_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One halo measurement in this (fresh) process: peak RSS of one call minus the RSS just before it."""
    torch.set_num_threads(spec["threads"])
    level, impl, mode = spec["level"], spec["impl"], spec["mode"]
    hc = HaloCase(B=spec["B"])
    # Load libraries, thread pools and kernels on a 2-image batch first.
    halo_closure(halo_cands(HaloCase(B=2), level, (impl,))[impl], mode)()
    c = halo_cands(hc, level, (impl,))[impl]
    return peak_rss_of(halo_closure(c, mode))  # the closure builds its inputs and output grad: no call yet


def run_halo_memory(hc: HaloCase, threads: int, jobs: int = 2) -> tuple[list[str], list[list[Any]], str]:
    """Rows (level, pass, ours peak MB, timm peak MB, ratio, goal) and a verdict on the op ratios."""
    specs = [(level, mode, impl) for level in HALO_LEVELS for mode in ("fwd", "fwd+bwd") for impl in HALO_IMPLS]
    t0 = time.perf_counter()

    def one(s: tuple[str, str, str]) -> dict[str, Any] | None:
        level, mode, impl = s
        spec = {"bench": "halo", "level": level, "mode": mode, "impl": impl, "B": hc.B, "threads": threads}
        return spawn_mem_worker(spec, f"halo {level} {mode} {impl}")

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        found = dict(zip(specs, pool.map(one, specs), strict=True))
    print(f"  {len(specs)} measurements in {time.perf_counter() - t0:.1f}s")
    header = ["level", "pass", "ours peak MB", "timm peak MB", "ours / timm", f"≤ {HALO_MEM_GOAL:g}×"]
    rows: list[list[Any]] = []
    verdicts = []
    for level in HALO_LEVELS:
        for mode in ("fwd", "fwd+bwd"):
            o, t = found[(level, mode, "ours")], found[(level, mode, "timm")]
            om = o["peak_bytes"] / 2**20 if o else None
            tm = t["peak_bytes"] / 2**20 if t else None
            ratio = om / tm if om is not None and tm else None
            ok = ratio is not None and ratio <= HALO_MEM_GOAL
            name = "op: halo2d vs timm core" if level == "op" else "block: HaloAttention vs timm HaloAttn"
            rows.append([name, mode, om, tm, ratio, ok])
            if level == "op":
                verdicts.append(f"{mode} ours/timm {ratio:.2f}" if ratio is not None else f"{mode} failed")
    verdict = "op: " + ", ".join(verdicts)
    verdict += (f" → goal ≤ {HALO_MEM_GOAL:g}× met" if all(r[5] for r in rows if r[0].startswith("op"))
                else f" → goal ≤ {HALO_MEM_GOAL:g}× NOT met")
    if not all(x["reset"] for x in found.values() if x):
        verdict += " (peak RSS could not be reset: baselines are the pre-call peak, so numbers are lower bounds)"
    return header, rows, verdict


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--only", choices=["na", "halo", "all"], default="all",
                   help="neighborhood attention, the halo op/block vs timm (CPU only), or both")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per candidate (CPU ≥ 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per candidate")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on the timed part of one (case, pass); fewer rounds if needed\n"
                   f"(default: 40 on CPU, 60 on CUDA, {HALO_CAP_S:g} for halo, unless --reps is given)")
    p.add_argument("--stat", choices=["median", "min"], default="median", help="statistic reported per candidate")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs and memory workers)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    p.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory sections")
    p.add_argument("--mem-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.mem_worker is not None:
        spec = json.loads(args.mem_worker)
        print(json.dumps(halo_mem_worker(spec) if spec.get("bench") == "halo" else mem_worker(spec)))
        return 0

    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.only in ("na", "all"):
        na_main(args, device)
    if args.only in ("halo", "all"):
        if device.type == "cpu":
            if args.only == "all":
                print()
            halo_main(args)
        else:
            print("halo: the halo benchmark (vs timm's HaloAttn) is CPU-only; run with --device cpu --only halo")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


def _timing_params(args: argparse.Namespace, quick: tuple, full: tuple) -> tuple[int, int, float | None]:
    """(warmup, reps, max_seconds): the quick/full defaults, overridden by the command line."""
    warmup, reps, cap = quick if args.quick else full
    warmup = args.warmup if args.warmup is not None else warmup
    max_seconds = args.max_seconds if args.max_seconds is not None else (cap if args.reps is None else None)
    reps = args.reps if args.reps is not None else reps
    return warmup, reps, max_seconds


def halo_main(args: argparse.Namespace) -> None:
    """The halo op and block vs timm's HaloAttn on CPU (timing and memory sections)."""
    hc = HALO_QUICK if args.quick else HALO_CASE
    warmup, reps, max_seconds = _timing_params(args, (1, 5, None), (2, 20, HALO_CAP_S))
    suffix = " (quick)" if args.quick else ""
    info = machine_info("cpu")
    print(f"local halo benchmark on cpu, float32, B={hc.B}, {hc.side}×{hc.side}, C={hc.C} ({hc.heads} heads × "
          f"{hc.D}), block {hc.block}, halo {hc.halo}; warmup {warmup}, reps {reps}")
    print(f"  {format_info(info)}")
    results = run_halo(hc, warmup=warmup, reps=reps, max_seconds=max_seconds, stat=args.stat)
    header, rows = halo_table(hc, results)
    load_end = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    print()
    print_table(header, rows)
    print(f"speed-up = timm_ms / ours_ms (> 1: ours faster); {args.stat} of interleaved runs")
    if not args.no_write:
        notes = (
            f"The issue's goal: halo op (B={hc.B}, {hc.side}×{hc.side}, C={hc.C}, {hc.heads} heads × {hc.D}, block "
            f"{hc.block}, halo {hc.halo}) ≥ {HALO_SPEED_GOAL:g}× faster than timm's HaloAttn at ≤ "
            f"{HALO_MEM_GOAL:g}× its memory, on CPU. float32, {args.threads} torch threads; {args.stat} of `runs` "
            f"interleaved rounds (each timing both candidates once) after {warmup} warm-up round(s); **speed-up = "
            "timm ms / ours ms** (> 1 means attnzoo is faster). **op**: ours = `attnzoo.kernels.halo.halo2d(q, k, "
            "v, block, halo, rel_h, rel_w, scale, backend=\"torch\")` on heads-first (B, heads, H, W, D) q, k, v; "
            "timm = timm's `HaloAttn.forward` after the q / kv convs (pad, unfold, q·kᵀ·scale + its own "
            "`PosEmbedRel` module, softmax, ·v, fold) on the same q, k, v in its conv layout (q (B, C, H, W), kv "
            "(B, 2C, H, W); the layout change is outside the timed region) and the same tables. fwd+bwd = forward "
            "+ `autograd.grad` for q, k, v (timm: q, kv) and both tables. **block**: `attnzoo.blocks.HaloAttention` "
            "(backend None → torch on CPU) vs `timm.layers.halo_attn.HaloAttn` with the same state dict, on x "
            f"({', '.join(map(str, hc.x_shape))}); fwd+bwd differentiates x and every weight. rel err = ‖out − ref‖ "
            "/ ‖ref‖ (grad: max over the differentiated tensors) against timm in fp32 and in float64, on the timed "
            "data; timm fp32 vs float64 for scale."
        )
        if load_end is not None:
            notes += f" Load avg {load_end} when the timings ended (> threads: other work shared the cores)."
        if args.quick:
            notes += " **--quick smoke-test shapes, not a measurement.**"
        section = f"local halo — cpu{suffix}"
        path = write_rows(section, header, rows, info, notes=notes)
        print(f"wrote section '{section}' of {path}")

    if args.no_memory:
        return
    print()
    print(f"halo memory: B={hc.B}, fp32, ours vs timm, op and block (one fresh subprocess per measurement)")
    mem_info = machine_info("cpu")  # before the measurements: its load average is the one at their start
    mheader, mrows, verdict = run_halo_memory(hc, args.threads, jobs=2)
    print()
    print_table(mheader, mrows)
    print(verdict)
    if not args.no_write:
        mnotes = (
            "Peak memory of one call above its inputs: each measurement runs in a fresh subprocess (after a "
            "2-image warm-up call), resets the peak RSS (`/proc/self/clear_refs`) and reports `VmHWM` minus the "
            "RSS just before the call. Inputs already allocated then: op — q, k, v (ours) or q, kv in timm's conv "
            "layout (the same bytes), the tables and, for fwd+bwd, the output gradient; block — x, the weights and "
            "the output gradient. fwd under `no_grad`; fwd+bwd = forward + `autograd.grad` as timed in `local halo "
            f"— cpu` (the gradients it returns count). Goal: ours / timm ≤ {HALO_MEM_GOAL:g} for the op. "
            f"Verdict: {verdict}."
        )
        if args.quick:
            mnotes += " **--quick smoke-test shapes, not a measurement.**"
        section = f"local halo memory — cpu{suffix}"
        path = write_rows(section, mheader, mrows, mem_info, notes=mnotes)
        print(f"wrote section '{section}' of {path}")


def na_main(args: argparse.Namespace, device: torch.device) -> None:
    """Neighborhood attention vs its peers (timing on ``device``; the memory-scaling section on CPU)."""
    if device.type == "cuda":
        cases = CUDA_QUICK if args.quick else CUDA_CASES
        warmup, reps, max_seconds = _timing_params(args, (2, 5, None), (5, 30, 60.0))
    else:
        cases = CPU_QUICK if args.quick else CPU_CASES
        warmup, reps, max_seconds = _timing_params(args, (1, 5, None), (2, 20, 40.0))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    suffix = " (quick)" if args.quick else ""

    info = machine_info(device)
    print(f"local (neighborhood attention) benchmark on {device.type}, {dtype}, warmup {warmup}, reps {reps}")
    print(f"  {format_info(info)}")

    results: list[dict] = []
    for case in cases:
        if device.type == "cuda":
            results += run_cuda_case(case, device, warmup=warmup, reps=reps, max_seconds=max_seconds, stat=args.stat)
        else:
            results += run_cpu_case(case, warmup=warmup, reps=reps, max_seconds=max_seconds, stat=args.stat)
    header, rows = cuda_table(results) if device.type == "cuda" else cpu_table(results, args.stat)
    load_end = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    print()
    print_table(header, rows)
    print(f"speed-up = peer_ms / ours_ms (> 1: ours faster); {args.stat} of interleaved runs")

    common = (
        f"{dtype}; {args.stat} of `runs` interleaved rounds (each timing every candidate once) after {warmup} "
        f"warm-up round(s); **speed-up = peer ms / ours ms** (> 1 means attnzoo is faster). Useful FLOPs: "
        f"4·B·H·N·prod(k)·D forward, 3.5× for fwd+bwd. Flex: `torch.compile(flex_attention)` with "
        f"`create_block_mask` (128×128 blocks) from a NATTEN `mask_mod` (clamped windows, integer ops)."
    )
    if device.type == "cpu":
        facts = {r["case"].k: r["facts"] for r in results if r["mode"] == "fwd" and r["facts"]}
        flex_setup = "; ".join(
            f"k={k}: block sparsity {f['sparsity']:.1f}%, create_block_mask {f['mask_s']:.1f}s, "
            f"first (compiling) call {f.get('compile_s', float('nan')):.1f}s" for k, f in facts.items())
        notes = (
            common + f" {args.threads} torch threads. SDPA dense mask = `F.scaled_dot_product_attention` with the "
            "(N, N) bool visible-pair mask (exact NA); SDPA full = no mask (all pairs: not NA, a floor for any "
            "dense method). Flex and NATTEN have no CPU backward (n/a). rel err = ‖out − ref‖ / ‖ref‖ against "
            "dense-masked SDPA in fp32 and in float64 (grad: max over dq, dk, dv)."
            + (f" Flex setup: {flex_setup}." if flex_setup else "")
        )
    else:
        notes = (
            common + " SDPA full = PyTorch's own backend choice with no mask (dense floor, not NA). NATTEN H100 "
            "published = NATTEN's profiler figures (hopper-fna, incl. token permutation, bf16, head dim 128; "
            "reference/kernels.md §1.5): a constant, not measured here; **published / ours** > 1 means ours is "
            "faster, and compares GPUs only when this GPU is an H100. ours peak MB = GPU memory allocated by one "
            "call above its inputs. rel err of ours against compiled Flex on the same mask (fp32 Flex when it "
            "runs, else bf16)."
        )
    if load_end is not None:
        notes += f" Load avg {load_end} when the timings ended (> threads: other work shared the cores)."
    if args.quick:
        notes += " **--quick smoke-test shapes, not a measurement.**"
    if not args.no_write:
        section = f"local — {device.type}{suffix}"
        path = write_rows(section, header, rows, info, notes=notes)
        print(f"wrote section '{section}' of {path}")

    if device.type == "cpu" and not args.no_memory:
        sides = MEM_QUICK_SIDES if args.quick else MEM_SIDES
        print()
        print(f"memory scaling: B=1, H=4, D=32, k=7, fp32, maps {', '.join(f'{s}²' for s in sides)} "
              "(one fresh subprocess per measurement)")
        mheader, mrows, verdict = run_memory(sides, args.threads, 0 if args.quick else MEM_SDPA_MAX_SIDE,
                                             jobs=4 if args.quick else 2)
        print()
        print_table(mheader, mrows)
        print(verdict)
        if not args.no_write:
            mnotes = (
                "Peak memory of one call above its inputs: each measurement runs in a fresh subprocess (after a "
                "16² warm-up call), resets the peak RSS (`/proc/self/clear_refs`), and reports `VmHWM` minus the "
                "RSS just before the call (q, k, v, the output gradient and, for SDPA, the (N, N) mask already "
                "allocated). fwd under `no_grad`; fwd+bwd = forward + `autograd.grad` for q, k, v. bytes/token = "
                f"peak / N. Dense-masked SDPA only on the smallest map(s) (quadratic). Verdict: {verdict}."
            )
            if args.quick:
                mnotes += " **--quick smoke-test shapes, not a measurement.**"
            section = f"local memory — cpu{suffix}"
            path = write_rows(section, mheader, mrows, machine_info("cpu"), notes=mnotes)
            print(f"wrote section '{section}' of {path}")


if __name__ == "__main__":
    sys.exit(main())
