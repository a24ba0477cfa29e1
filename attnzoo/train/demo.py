"""The demo job: train a tiny ViT on Fashion-MNIST with plain PyTorch, then check the Triton kernel.

    python -m attnzoo.train.demo [--steps 300] [--seed 0] [--device cpu|cuda] [--eval-limit N]

Model: 4x4 patches of the 28x28 image -> 7x7 = 49 tokens of width 64, 2 pre-norm transformer blocks
(``MultiHeadSelfAttention`` with 4 heads + MLP), mean-pooled tokens -> linear head over 10 classes.
After training it evaluates on the test split and compares ``attention(..., backend="triton")`` with
the ``torch`` backend on the trained model's own q/k/v for 2 test images: directly on CUDA, else in a
subprocess under the Triton interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported,
so it cannot be switched on inside this process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.blocks import MultiHeadSelfAttention
from attnzoo.kernels import attention
from attnzoo.kernels.backend import triton_available, triton_interpreting
from attnzoo.train.data import load_fashion_mnist

# Fashion-MNIST pixel mean/std (over the training set, pixels scaled to [0, 1]).
_MEAN, _STD = 0.2860, 0.3530


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Images uint8 (B, 28, 28) -> logits (B, classes); 49 tokens of width ``dim``."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (28 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def tokens(self, images: Tensor) -> Tensor:
        """uint8 (B, 28, 28) -> embedded patch tokens (B, 49, dim)."""
        x = (images.unsqueeze(1).float() / 255 - _MEAN) / _STD
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(self, images: Tensor) -> Tensor:
        x = self.tokens(images)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1))

    @torch.no_grad()
    def attention_inputs(self, images: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Each block's (q, k, v), heads-first (B, H, 49, D), as its attention op sees them."""
        x, out = self.tokens(images), []
        for blk in self.blocks:
            out.append(blk.attn.project_qkv(blk.norm1(x)))
            x = blk(x)
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def train(model: TinyViT, images: Tensor, labels: Tensor, steps: int, batch_size: int, lr: float, seed: int):
    """AdamW with linear warm-up then cosine decay; batches drawn without replacement per epoch.

    Returns the mean loss over the last 10% of the steps (a less noisy "final" loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)  # own generator: batch order independent of init RNG use
    order, pos, tail = torch.randperm(len(images), generator=gen), 0, []
    model.train()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x, y = images[idx], labels[idx]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
    return sum(tail) / len(tail)


@torch.no_grad()
def evaluate(model: TinyViT, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    correct = sum(
        (model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def _rel_errs(qkvs: list[tuple[Tensor, Tensor, Tensor]]) -> list[float]:
    """Relative error of the Triton backend against the torch backend, per block."""
    errs = []
    for q, k, v in qkvs:
        ref = attention(q, k, v, backend="torch")
        out = attention(q, k, v, backend="triton")
        errs.append(((out - ref).norm() / ref.norm()).item())
    return errs


def check_triton(model: TinyViT, images: Tensor) -> dict:
    """Triton vs torch backend on the model's q/k/v for ``images``: on CUDA directly, else interpreted.

    Returns ``{"mode", "rel_errs" (one per block, or [] if skipped), "seconds"}``."""
    qkvs = model.attention_inputs(images)
    t0 = time.perf_counter()
    if not triton_available():
        return {"mode": "skipped: triton is not installed", "rel_errs": [], "seconds": 0.0}
    if images.device.type == "cuda" or triton_interpreting():
        mode = "cuda" if images.device.type == "cuda" else "TRITON_INTERPRET=1"
        errs = _rel_errs(qkvs)
    else:
        mode = "TRITON_INTERPRET=1 subprocess"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "qkv.pt"
            torch.save([tuple(t.cpu() for t in qkv) for qkv in qkvs], path)
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            cmd = [sys.executable, "-m", "attnzoo.train.demo", "--check-triton", str(path)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"Triton check subprocess exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        errs = json.loads(proc.stdout.strip().splitlines()[-1])["rel_errs"]
    return {"mode": mode, "rel_errs": errs, "seconds": time.perf_counter() - t0}


def _check_triton_child(path: str) -> None:
    # The subprocess: its environment had TRITON_INTERPRET=1 from the start, so triton saw it at import.
    qkvs = torch.load(path)
    print(json.dumps({"rel_errs": _rel_errs(qkvs)}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attnzoo.train.demo", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps (batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=8e-3, help="peak AdamW learning rate")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--no-triton-check", action="store_true", help="skip the Triton-vs-torch kernel check")
    p.add_argument("--check-triton", metavar="QKV_FILE", help=argparse.SUPPRESS)  # internal: the child
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps={args.steps} must be >= 1")
    if args.eval_limit is not None and args.eval_limit < 1:
        p.error(f"--eval-limit={args.eval_limit} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the printed numbers (``test_accuracy`` in [0, 1])."""
    args = parse_args(argv)
    if args.check_triton:
        _check_triton_child(args.check_triton)
        return {}
    seed_everything(args.seed)
    device = torch.device(args.device)
    train_x, train_y = (t.to(device) for t in load_fashion_mnist("train"))
    test_x, test_y = (t[: args.eval_limit].to(device) for t in load_fashion_mnist("test"))
    model = TinyViT().to(device)

    t0 = time.perf_counter()
    train_loss = train(model, train_x, train_y, args.steps, args.batch_size, args.lr, args.seed)
    train_time = time.perf_counter() - t0
    acc = evaluate(model, test_x, test_y)

    result = {
        "device": str(device),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_time_s": train_time,
        "train_loss": train_loss,
        "test_images": len(test_x),
        "test_accuracy": acc,
    }
    rows = [
        ("device", f"{device} ({torch.get_num_threads()} threads)"),
        ("model", f"TinyViT, {result['params']:,} params, 49 tokens x 64, 2 blocks x 4 heads"),
        ("steps", f"{args.steps} x batch {args.batch_size}"),
        ("train time", f"{train_time:.1f} s"),
        ("final train loss", f"{train_loss:.4f} (mean of last 10% of steps)"),
        ("test accuracy", f"{acc:.2%} on {len(test_x)} Fashion-MNIST test images"),
    ]
    if not args.no_triton_check:
        check = check_triton(model, test_x[:2])
        result["triton_rel_err"] = max(check["rel_errs"], default=None)
        errs = ", ".join(f"{e:.2e}" for e in check["rel_errs"])
        rows.append(("triton vs torch", f"rel err per block [{errs}] ({check['mode']}, {check['seconds']:.0f} s)"))
    width = max(len(k) for k, _ in rows)
    print("attnzoo demo: tiny ViT on Fashion-MNIST")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return result


if __name__ == "__main__":
    main()
