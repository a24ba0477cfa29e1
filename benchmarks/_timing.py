"""Shared helpers for the scripts in ``benchmarks/`` (design §4, "Measuring").

* :func:`bench` / :func:`bench_interleaved` time closures: CUDA events on a GPU (with an L2 flush before
  every timed call, as ``triton.testing.do_bench`` does), ``time.perf_counter`` on a CPU. Interleaved timing
  runs the candidates round-robin -- each round times every candidate once, the starting candidate rotating
  from round to round -- so that a noisy, shared machine slows all of them alike.
* :func:`fwd_closure` / :func:`fwd_bwd_closure` build the closures for a forward pass (under
  ``torch.no_grad()``) and a forward + backward pass (``torch.autograd.grad`` with a fixed random output
  gradient, so no ``.grad`` accumulates between runs).
* :func:`rel_err`, :func:`check_close` measure ``‖out − ref‖ / ‖ref‖`` for the output and every gradient.
* :func:`machine_info` and :func:`write_rows` write one section per (benchmark, device) of
  ``docs/benchmarks.md``; a re-run replaces its own section and keeps the others.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "docs" / "benchmarks.md"

_MD_TITLE = "# Benchmarks"
_MD_PREAMBLE = (
    "Written by the scripts in `benchmarks/` (`make bench`, or `python benchmarks/<name>.py`). Each\n"
    "section holds one (benchmark, device) run; re-running a script replaces its own section only.\n"
    "Times are medians (or minima, where a section says so) over interleaved repetitions: the candidates\n"
    "are timed round-robin in the same run."
)


# --------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- timing


def _summary(times_ms: Sequence[float]) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "runs": len(times_ms),
        "times_ms": list(times_ms),
    }


class _L2Flush:
    """Overwrites a buffer larger than the GPU's L2 cache (what ``triton.testing.do_bench`` does)."""

    def __init__(self, device: torch.device, nbytes: int = 256 * 1024 * 1024) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def bench_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    reps: int = 10,
    device: str | torch.device | None = None,
    flush_l2: bool = True,
    max_seconds: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several candidates round-robin; returns ``{name: {median_ms, min_ms, runs, times_ms}}``.

    ``warmup`` untimed rounds, then ``reps`` timed rounds (at least 5 on a CPU). In round ``r`` the order of
    the candidates is rotated by ``r`` so that none is always first (or always after the slowest one).
    On CUDA every call is bracketed by CUDA events (the L2 cache is flushed before each, outside the timed
    region) and the events are read after one final synchronize; on a CPU each call is timed with
    ``time.perf_counter``. ``max_seconds`` caps the timed part: the number of rounds is lowered (never
    below 5 on a CPU) to fit, estimated from the last warm-up round.
    """
    dev = resolve_device(device)
    names = list(fns)
    if not names:
        return {}
    if dev.type != "cuda":
        reps = max(reps, 5)
    reps = max(reps, 1)

    round_s = None
    for _ in range(max(warmup, 0)):
        t0 = time.perf_counter()
        for name in names:
            fns[name]()
        synchronize(dev)
        round_s = time.perf_counter() - t0
    if max_seconds is not None and round_s:
        reps = min(reps, max(int(max_seconds / round_s), 5 if dev.type != "cuda" else 1))

    if dev.type == "cuda":
        flush = _L2Flush(dev) if flush_l2 else None
        events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {n: [] for n in names}
        for r in range(reps):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                if flush is not None:
                    flush()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(dev)
        return {n: _summary([s.elapsed_time(e) for s, e in events[n]]) for n in names}

    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            synchronize(dev)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: _summary(times[n]) for n in names}


def bench(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    reps: int = 10,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Time one closure: ``{median_ms, min_ms, runs, times_ms}`` (see :func:`bench_interleaved`)."""
    return bench_interleaved({"fn": fn}, warmup=warmup, reps=reps, device=device)["fn"]


def do_bench_median(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds from ``triton.testing.do_bench`` (CUDA only; warm-up/repetition given in ms)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


# ------------------------------------------------------------------------------------------- closures


def fwd_closure(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, **kwargs: Any) -> Callable[[], Any]:
    """``fn(*inputs, **kwargs)`` under ``torch.no_grad()``."""

    def run() -> torch.Tensor:
        with torch.no_grad():
            return fn(*inputs, **kwargs)

    return run


def make_grad_inputs(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Detached copies of ``inputs`` that require grad."""
    return tuple(x.detach().clone().requires_grad_(True) for x in inputs)


def fwd_bwd_closure(
    fn: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    grad_out: torch.Tensor | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Callable[[], Any]:
    """Forward + backward: ``torch.autograd.grad(fn(*inputs), inputs, grad_out)``.

    ``inputs`` are detached and set to require grad; ``grad_out`` defaults to a fixed random tensor shaped
    like the output (drawn once, from ``seed``). Using ``autograd.grad`` leaves no ``.grad`` to clear.
    """
    xs = make_grad_inputs(*inputs)
    if grad_out is None:
        with torch.no_grad():
            out = fn(*xs, **kwargs)
        gen = torch.Generator(device=out.device).manual_seed(seed)
        grad_out = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=gen)
        del out

    def run() -> tuple[torch.Tensor, ...]:
        out = fn(*xs, **kwargs)
        return torch.autograd.grad(out, xs, grad_out)

    return run


# ----------------------------------------------------------------------------------------- correctness


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` computed in float64 (``inf`` if ``out`` has NaN/inf)."""
    out64, ref64 = out.detach().double(), ref.detach().to(device=out.device, dtype=torch.float64)
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def check_close(
    fn: Callable[..., torch.Tensor],
    ref_fn: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    ref_dtype: torch.dtype | None = torch.float64,
    backward: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Relative errors of ``fn`` against ``ref_fn`` (run on inputs cast to ``ref_dtype``).

    Returns ``{"out": e}`` and, if ``backward``, also ``{"grad0": ..., "grad1": ..., "grad": max}`` for a
    random output gradient shared by both.
    """
    xs = make_grad_inputs(*inputs) if backward else inputs
    rx = tuple(
        x.detach().to(ref_dtype or x.dtype).clone().requires_grad_(backward)
        for x in inputs
    )
    if backward:
        out = fn(*xs)
        ref = ref_fn(*rx)
    else:
        with torch.no_grad():
            out = fn(*xs)
            ref = ref_fn(*rx)
    errs = {"out": rel_err(out, ref)}
    if backward:
        gen = torch.Generator(device=out.device).manual_seed(seed)
        g = torch.randn(out.shape, dtype=torch.float32, device=out.device, generator=gen)
        grads = torch.autograd.grad(out, xs, g.to(out.dtype))
        ref_grads = torch.autograd.grad(ref, rx, g.to(ref.dtype))
        for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
            errs[f"grad{i}"] = rel_err(a, b)
        errs["grad"] = max(errs[f"grad{i}"] for i in range(len(grads)))
    return errs


# ------------------------------------------------------------------------------------------- reporting


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev or None


def machine_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """CPU model, visible cores, torch threads, GPU name (CUDA), versions, date, git revision."""
    dev = resolve_device(device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
        "git": _git_rev(),
        # 1-minute load average when the run started: > threads means other work shared the cores.
        "load": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info


def format_info(info: Mapping[str, Any]) -> str:
    """One line: machine and versions."""
    hw = f"CPU: {info['cpu']} ({info['cores']} cores visible, {info['threads']} torch threads)"
    if info.get("gpu"):
        hw = f"GPU: {info['gpu']} (CUDA {info.get('cuda')}); " + hw
    vers = ", ".join(
        f"{k} {info[k]}" for k in ("torch", "triton", "timm", "python") if info.get(k)
    )
    tail = f"; {info['date']}"
    if info.get("load") is not None:
        tail += f", load avg {info['load']} at start"
    if info.get("git"):
        tail += f", git {info['git']}"
    return f"{hw}; {vers}{tail}."


def _fmt_cell(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != x:  # NaN
            return "–"
        if x == 0:
            return "0"
        ax = abs(x)
        if ax >= 100:
            return f"{x:.0f}"
        if ax >= 10:
            return f"{x:.1f}"
        if ax >= 0.01:
            return f"{x:.2f}"
        return f"{x:.1e}"
    return str(x).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Aligned plain-text table on stdout."""
    cells = [[str(h) for h in header]] + [[_fmt_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(preamble, [(heading line, body)]) for the ``## `` sections of a markdown file."""
    pre: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            sections.append((line.rstrip(), []))
        elif sections:
            sections[-1][1].append(line)
        else:
            pre.append(line)
    return "\n".join(pre), [(h, "\n".join(b)) for h, b in sections]


def write_rows(
    section: str,
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    info: Mapping[str, Any],
    *,
    notes: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Path:
    """Replace (or append) the ``## {section}`` section of ``docs/benchmarks.md``.

    ``section`` is e.g. ``"attention — cpu"``. The section gets the machine/versions line, optional
    ``notes`` (markdown) and the table; all other sections are kept as they are.
    """
    target = Path(path) if path is not None else BENCHMARKS_MD
    heading = f"## {section.strip()}"
    body_parts = ["", format_info(info), ""]
    if notes:
        body_parts += [notes.strip(), ""]
    body_parts += [markdown_table(header, rows), ""]
    body = "\n".join(body_parts)

    if target.exists():
        pre, sections = _split_sections(target.read_text())
    else:
        pre, sections = "", []
    if not pre.strip():
        pre = f"{_MD_TITLE}\n\n{_MD_PREAMBLE}\n"
    for i, (h, _) in enumerate(sections):
        if h == heading:
            sections[i] = (heading, body)
            break
    else:
        sections.append((heading, body))

    out = pre.rstrip("\n") + "\n"
    for h, b in sections:
        out += "\n" + h + "\n\n" + b.strip("\n") + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(out)
    return target


_FLEX: Callable[..., torch.Tensor] | None = None


def compiled_flex() -> Callable[..., torch.Tensor]:
    """The peer ``torch.compile(flex_attention)``, built once; one compiled callable serves every case
    (shapes, masks, dtypes, grad or not), so the recompile limits are raised."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# ------------------------------------------------------------------------------------------------ memory


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: write 5 to ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_of(run: Callable[[], Any]) -> dict[str, Any]:
    """Peak RSS of one ``run()`` above the RSS just before it (Linux; run in a fresh process after a warm-up):
    ``{"peak_bytes", "reset"}``, ``reset`` False when the peak could not be reset (then it is a bound)."""
    gc.collect()
    reset = _reset_peak_rss()
    rss0 = _proc_status_kb("VmRSS") if reset else _proc_status_kb("VmHWM")
    run()
    return {"peak_bytes": max(_proc_status_kb("VmHWM") - rss0, 0) * 1024, "reset": reset}
