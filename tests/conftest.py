"""Test-session set-up. Without a CUDA device the Triton kernels run in Triton's CPU interpreter,
which must be switched on before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from attnzoo.kernels.backend import triton_interpreting


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device() -> str:
    """Device on which the Triton backend runs in this session: CUDA, or CPU under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if triton_interpreting():
        return "cpu"
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
