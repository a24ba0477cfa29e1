"""Compile the shared Triton kernels ahead of time for a CUDA target, without a GPU.

Run as a script outside the Triton interpreter (``tests/kernels/test_gpu_compile.py`` does): it builds
the launch configurations the launchers would use on a real device and compiles each kernel to a cubin
for sm_90 (H100/H200), catching errors that the interpreter never sees (types, constexpr globals, layouts,
shared memory). Prints one line per kernel with its shared memory.
"""

from __future__ import annotations

import inspect
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile outside the Triton interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnzoo.kernels.attention import triton_kernel as kernels  # noqa: E402
from attnzoo.kernels.attention import triton_launch as tk  # noqa: E402

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "EK", "EV", "BA", "BB", "LSE", "DELTA", "DBA", "DBB"}
FP32_POINTERS = {"LSE", "DELTA", "DBA", "DBB"}  # buffers the launchers keep in fp32
FLOATS = {"scale", "scale_log2", "sig_bias_log2"}
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
H100 = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # per block on sm_90


def meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def configs():
    """(label, q, geometry, score, bias kind) for each mode the ops launch."""
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


def compile_kernel(kernel, q, geo, score, bias, pass_):
    consts = tk._constexprs(q, geo, score, bias, pass_)
    options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for p in params:
        if p in consts:
            signature[p] = "constexpr"
        elif p in POINTERS:
            signature[p] = "*fp32" if p in FP32_POINTERS else f"*{TYPES[q.dtype]}"
        else:
            signature[p] = "fp32" if p in FLOATS else "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs={(params.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=H100, options=options)


def main() -> int:
    failures = 0
    passes = ((kernels._attn_fwd, "fwd"), (kernels._attn_bwd_dkdv, "dkdv"), (kernels._attn_bwd_dq, "dq"))
    for label, q, geo, score, bias in configs():
        for kernel, pass_ in passes:
            name = f"{label} {kernel.fn.__name__}"
            try:
                compiled = compile_kernel(kernel, q, geo, score, bias, pass_)
            except Exception as error:  # report every failing kernel, not just the first
                failures += 1
                cause = error
                while cause.__cause__ is not None:  # Triton wraps the real error in CompilationErrors
                    cause = cause.__cause__
                print(f"FAIL {name}: {type(cause).__name__}: {str(cause)[-600:]}")
                continue
            md = compiled.metadata
            ok = "cubin" in compiled.asm and md.shared <= MAX_SHARED
            failures += not ok
            print(f"{'ok' if ok else 'FAIL'} {name}: shared memory {md.shared} B")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
