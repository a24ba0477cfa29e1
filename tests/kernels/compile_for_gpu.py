"""Compile the shared Triton kernels ahead of time for a CUDA target, without a GPU.

Run as a script outside the Triton interpreter (``tests/kernels/test_gpu_compile.py`` does): it builds
the launch configurations the launchers would use on a real device and compiles each kernel to a cubin
for sm_90 (H100/H200), catching errors that the interpreter never sees (types, constexpr globals, layouts,
shared memory). Prints one line per kernel with its shared memory. The linear-attention variants are the launches
its launchers make on meta tensors, recorded instead of run.
"""

from __future__ import annotations

import inspect
import os
import sys
from contextlib import ExitStack
from unittest.mock import patch

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile outside the Triton interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnzoo.kernels.attention import triton_kernel as kernels  # noqa: E402
from attnzoo.kernels.attention import triton_launch as tk  # noqa: E402
from attnzoo.kernels.linear import triton_launch as linear_launch  # noqa: E402

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "EK", "EV", "BA", "BB", "LSE", "DELTA", "DBA", "DBB", "KM",
            "GATES"}
FP32_POINTERS = {"LSE", "DELTA", "DBA", "DBB", "GATES"}  # buffers the launchers keep in fp32
U8_POINTERS = {"KM"}  # the key padding keep-mask, as bytes
FLOATS = {"scale", "scale_log2", "sig_bias_log2"}
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
H100 = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # per block on sm_90


def meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def configs():
    """(label, q, geometry, score, bias kind[, _constexprs options]) for each mode the ops launch."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    q, k = meta(2, 8, 197, 64, dtype=bf16), meta(2, 4, 197, 64, dtype=bf16)
    yield "dense causal bf16 D64", q, tk.dense_geometry(q, k, True), "softmax", tk.BIAS_NONE.value
    q = meta(1, 2, 300, 128, dtype=fp32)
    yield "dense sigmoid fp32 D128", q, tk.dense_geometry(q, q, False), "sigmoid", tk.BIAS_NONE.value
    q = meta(1, 2, 77, 24, dtype=fp16)
    yield "dense fp16 D24", q, tk.dense_geometry(q, q, False), "softmax", tk.BIAS_NONE.value
    q = meta(1, 4, 56, 56, 32, dtype=bf16)
    geo = tk.neighborhood_geometry(q, (7, 7), (1, 1), (1, 1), (False, False))
    yield "na2d rpb bf16 D32", q, geo, "softmax", tk.BIAS_TABLE.value
    q = meta(1, 2, 8, 12, 16, 128, dtype=fp16)
    geo = tk.neighborhood_geometry(q, (3, 5, 7), (1, 2, 2), (1, 1, 2), (True, False, False))
    yield "na3d causal dilated fp16 D128", q, geo, "softmax", tk.BIAS_NONE.value
    q, k = meta(4, 8, 16, 16, 32, dtype=bf16), meta(4, 8, 16, 16, 32, dtype=bf16)
    yield "halo zeros rel bf16 D32", q, tk.halo_geometry(q, k, 8, 2, True), "softmax", tk.BIAS_QUERY.value
    q, k = meta(4, 8, 16, 16, 16, dtype=bf16), meta(4, 8, 16, 16, 16, dtype=bf16)  # eca_halonext26ts head dims
    yield ("halo zeros rel bf16 D16 Dv32", q, tk.halo_geometry(q, k, 8, 2, True), "softmax", tk.BIAS_QUERY.value,
           dict(v_dim=32))
    q, k = meta(8, 12, 77, 64, dtype=fp16), meta(8, 12, 300, 64, dtype=fp16)
    yield ("dense cross key-padded fp16 D64", q, tk.dense_geometry(q, k, False), "softmax", tk.BIAS_NONE.value,
           dict(key_mask=True))
    q = meta(8, 12, 256, 64, dtype=bf16)  # mixture-of-heads gates (design §4 MoH shapes)
    yield "dense moh bf16 D64", q, tk.dense_geometry(q, q, False), "softmax", tk.BIAS_NONE.value, dict(gated=True)
    q = meta(8, 16, 14, 14, 24, dtype=bf16)
    geo = tk.neighborhood_geometry(q, (7, 7), (1, 1), (1, 1), (False, False))
    yield "na2d moh rpb bf16 D24", q, geo, "softmax", tk.BIAS_TABLE.value, dict(gated=True)


def compile_kernel(kernel, q, geo, score, bias, pass_, options=None):
    consts = tk._constexprs(q, geo, score, bias, pass_, **(options or {}))
    options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for p in params:
        if p in consts:
            signature[p] = "constexpr"
        elif p in POINTERS:
            signature[p] = "*fp32" if p in FP32_POINTERS else "*u8" if p in U8_POINTERS else f"*{TYPES[q.dtype]}"
        else:
            signature[p] = "fp32" if p in FLOATS else "i32"
    return compile_signature(kernel, signature, consts, options)


def compile_signature(kernel, signature, consts, options):
    params = list(signature)
    src = ASTSource(fn=kernel, signature=signature, constexprs={(params.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=H100, options=options)


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _arg_type(arg) -> str:
    if isinstance(arg, torch.Tensor):
        return f"*{TYPES[arg.dtype]}"
    return "fp32" if isinstance(arg, float) else "i32"


def recorded_launches(module, run):
    """The Triton launches ``run()`` makes through ``module``'s kernels, as (kernel, signature, constexprs,
    options), with the kernels recorded instead of run (so a launcher runs on meta tensors)."""
    launches = []
    names = [n for n, obj in vars(module).items() if isinstance(obj, triton.runtime.JITFunction)]
    with ExitStack() as stack:
        for n in names:
            stack.enter_context(patch.object(module, n, _Recorder(getattr(module, n), launches)))
        run()
    result = []
    for kernel, args, kwargs in launches:
        options = {o: kwargs.pop(o) for o in ("num_warps", "num_stages")}
        params = list(inspect.signature(kernel.fn).parameters)
        positional = dict(zip(params[:len(args)], args, strict=True))
        signature = {p: "constexpr" if p in kwargs else _arg_type(positional[p]) for p in params}
        result.append((kernel, signature, kwargs, options))
    return result


def linear_variants():
    """(label, kernel, signature, constexprs, options) of each distinct kernel the linear-attention launchers run
    (forward and backward) for causal attention with each decay mode in fp16 and bf16, and non-causal bf16."""
    fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
    cases = [(dtype, True, decay, 128, 128) for dtype in (fp16, bf16) for decay in (None, "scalar", "vector")]
    cases.append((bf16, False, None, 64, 65))  # vision: normalizer column on v
    for dtype, causal, decay, dk, dv in cases:
        b, h, t = 2, 4, 1000
        q, do = meta(b, h, t, dk, dtype=dtype), meta(b, h, t, dv, dtype=dtype)
        g = None if decay is None else meta(*((b, h, t, dk) if decay == "vector" else (b, h, t)), dtype=fp32)
        state = meta(b, h, dk, dv, dtype=fp32) if causal else None
        kw = dict(scale=dk**-0.5, causal=causal, chunk_size=64, initial_state=state)

        def run(q=q, do=do, g=g, state=state, kw=kw):
            linear_launch.linear_fwd_triton(q, q, do, g, **kw)
            linear_launch.linear_bwd_triton(q, q, do, g, do, state, **kw)

        label = f"linear {'causal' if causal else 'non-causal'} {decay or 'no'} decay {TYPES[dtype]} Dk{dk} Dv{dv}"
        seen = set()
        for kernel, signature, consts, options in recorded_launches(linear_launch, run):
            key = (kernel.fn.__name__, tuple(signature.values()), tuple(consts.items()))
            if key not in seen:
                seen.add(key)
                direction = "reverse" if consts["REVERSE"] else "forward"
                yield f"{label} {kernel.fn.__name__} {direction}", kernel, signature, consts, options


def check(name, build, *args) -> int:
    """Compile one kernel variant with ``build(*args)``, print ok/FAIL with its shared memory; 1 if it failed."""
    try:
        compiled = build(*args)
    except Exception as error:  # report every failing kernel, not just the first
        cause = error
        while cause.__cause__ is not None:  # Triton wraps the real error in CompilationErrors
            cause = cause.__cause__
        print(f"FAIL {name}: {type(cause).__name__}: {str(cause)[-600:]}")
        return 1
    md = compiled.metadata
    ok = "cubin" in compiled.asm and md.shared <= MAX_SHARED
    print(f"{'ok' if ok else 'FAIL'} {name}: shared memory {md.shared} B")
    return int(not ok)


def main() -> int:
    failures = 0
    passes = ((kernels._attn_fwd, "fwd"), (kernels._attn_bwd_dkdv, "dkdv"), (kernels._attn_bwd_dq, "dq"))
    for label, q, geo, score, bias, *options in configs():
        for kernel, pass_ in passes:
            failures += check(f"{label} {kernel.fn.__name__}", compile_kernel, kernel, q, geo, score, bias, pass_,
                              *options)
    for name, *launch in linear_variants():
        failures += check(name, compile_signature, *launch)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
