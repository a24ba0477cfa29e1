"""Backend choice shared by every op: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``torch`` (any device; the CPU default) and ``reference`` (the test oracle)."""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch", "reference")


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (tests). Read before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick the implementation for tensors on ``device``; ``backend`` overrides the automatic choice."""
    if backend is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known backend; expected None or one of {BACKENDS}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the 'triton' package, which is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on device '{device}'; "
                "set TRITON_INTERPRET=1 before importing attnzoo to run the Triton kernels on CPU, "
                "or use backend='torch'"
            )
    return backend
