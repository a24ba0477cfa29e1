"""timm's own model test battery (``tests/test_models.py`` of the installed timm's source distribution) over every
``attnzoo_*`` model.

The sdist is fetched at test time with ``pip download`` into a cache outside the repository (``$ATTNZOO_CACHE``,
default ``~/.cache/attnzoo``) and never copied here; without it and without a reachable package index the test
is skipped. The battery runs in a pytest subprocess (its ~18k parametrized items stay out of this session),
with ``battery_conftest`` registering the zoo first and ``-k`` selecting our models: the smallest model of each
vision family by default, every one with ``ATTNZOO_TIMM_BATTERY_K="attnzoo and not torchscript"``.
TorchScript is deselected: the zoo's kernels are
``torch.library`` custom ops behind Python argument checks, which ``torch.jit.script`` (deprecated) cannot
compile; FX, ``torch.compile`` and export are covered. Every selected test must pass.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMM_VERSION = importlib.metadata.version("timm")
# ``-k`` expression of the run. By default the smallest model of every vision family (the whole zoo takes ~12 CPU
# minutes, over the 2-core CI budget); ATTNZOO_TIMM_BATTERY_K="attnzoo and not torchscript" runs every model.
SMALLEST = ("attnzoo_vit_tiny_patch4_28", "attnzoo_nat_mini", "attnzoo_dinat_mini", "attnzoo_halonet_tiny",
            "attnzoo_davit_mini", "attnzoo_crossvit_mini")
SELECT = os.environ.get("ATTNZOO_TIMM_BATTERY_K", f"({' or '.join(SMALLEST)}) and not torchscript")


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnzoo"
    return Path(os.environ.get("ATTNZOO_CACHE", default))


def _timm_tests() -> Path:
    """timm's ``tests/`` folder for the installed version, extracted from its sdist (downloaded once)."""
    root = _cache_dir() / f"timm-{TIMM_VERSION}-sdist"
    tests = root / f"timm-{TIMM_VERSION}" / "tests"
    if (tests / "test_models.py").is_file():
        return tests
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / f"timm-{TIMM_VERSION}.tar.gz"
    if not tarball.is_file():
        cmd = [sys.executable, "-m", "pip", "download", f"timm=={TIMM_VERSION}", "--no-binary", ":all:", "--no-deps",
               "--quiet", "-d", str(root)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode or not tarball.is_file():
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"pip could not fetch the timm {TIMM_VERSION} sdist (package index unreachable?): {reason}")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"timm-{TIMM_VERSION}/tests/")]
        tar.extractall(root, members=members, filter="data")
    return tests


@pytest.mark.slow
def test_timm_model_battery():
    tests = _timm_tests()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", str(tests / "test_models.py"), "-k", SELECT, "-p", "battery_conftest",
           "-p", "no:cacheprovider", "-q", "-rfE", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    done = subprocess.run(cmd, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=1800, check=False)
    tail = "\n".join(done.stdout.splitlines()[-60:])
    assert done.returncode == 0, f"timm's battery failed (exit {done.returncode}):\n{tail}\n{done.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) > 0, f"timm's battery selected no zoo test:\n{tail}"
