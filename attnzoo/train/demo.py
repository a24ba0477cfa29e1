"""The demo job (``make demo``): train a zoo model on Fashion-MNIST on the CPU, export it, load it back with
timm, predict test images, and draw the training curves and an attention map.

    python -m attnzoo.train.demo [--config configs/fmnist/davit_mini.yaml] [--out runs/demo] [--no-triton-check]
        [any attnzoo fit option, e.g. --trainer.max_epochs 1 --trainer.limit_train_batches 20]

Training is the attnzoo CLI's (the config's task, data, optimizer and trainer settings). Then the final
weights are tested on the 10000 test images, exported (``attnzoo export``) and loaded back with
``timm.create_model("local-dir:<out>/export", pretrained=True)``, which classifies a handful of test images
saved as PNG files. Finally the exported model runs once more with its attention on the Triton kernels
(on CUDA, else under ``TRITON_INTERPRET=1`` in a subprocess) and its logits are compared with the torch path.

Writes into ``--out``: ``logs/version_<n>/`` (TensorBoard, metrics.csv, checkpoints), ``final.ckpt``,
``export/`` (model.safetensors, config.json, attention.png), ``images/`` (the test images),
``curves.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = REPO_CONFIGS / "fmnist" / "davit_mini.yaml"
NUM_IMAGES = 8  # test images classified by the exported model


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The demo's own options, and the rest: options for the attnzoo CLI (checked by its parser)."""
    p = argparse.ArgumentParser(prog="python -m attnzoo.train.demo", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # fmt: skip
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="an attnzoo fit config (Fashion-MNIST)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--no-triton-check", action="store_true", help="skip the Triton-vs-torch check")
    p.add_argument("--check-triton", metavar="EXPORT_DIR", help=argparse.SUPPRESS)  # internal: the child
    args, rest = p.parse_known_args(argv)
    if not args.check_triton and not args.config.is_file():
        p.error(f"--config={args.config} does not exist (the configs/ folder is in the source checkout)")
    return args, rest


def save_test_images(folder: Path, n: int) -> list[tuple[Path, str]]:
    """The first ``n`` Fashion-MNIST test images as PNG files; returns (path, true class name) pairs."""
    from attnzoo.train.data import FASHION_MNIST_CLASSES, load_fashion_mnist
    from attnzoo.train.data.image_files import write_image_file

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("test")
    out = []
    for i in range(n):
        path = folder / f"test_{i:02d}.png"
        write_image_file(path, images[i][None])
        out.append((path, FASHION_MNIST_CLASSES[labels[i]]))
    return out


def classify_files(model: torch.nn.Module, files: list[Path]) -> tuple[list[str], torch.Tensor]:
    """Top-1 class names from a timm model loaded from an export (its pretrained cfg: mean/std, label_names),
    and the inputs it saw, normalized (N, C, H, W)."""
    from attnzoo.train.data.image_files import normalize_images, read_image_file

    cfg = model.pretrained_cfg
    x = normalize_images(torch.stack([read_image_file(f) for f in files]), cfg["mean"], cfg["std"])
    with torch.no_grad():
        top1 = model(x).argmax(-1)
    return [cfg["label_names"][i] for i in top1.tolist()], x


def set_attention_backend(model: torch.nn.Module, backend: str | None) -> None:
    """Point every attention block of ``model`` (modules with a ``backend`` setting) at ``backend``."""
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend


def _triton_rel_err(export_dir: str, x: torch.Tensor) -> float:
    import timm

    import attnzoo.zoo  # noqa: F401

    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval().to(x.device)
    with torch.no_grad():
        set_attention_backend(model, "torch")
        ref = model(x)
        set_attention_backend(model, "triton")
        out = model(x)
    return ((out - ref).norm() / ref.norm()).item()


def check_triton(export_dir: Path, x: torch.Tensor) -> dict:
    """Relative error of the exported model's logits for ``x`` with Triton attention vs torch attention:
    on CUDA directly, else in a subprocess under the Triton interpreter (which must be on before triton
    is first imported, so it cannot be switched on in this process)."""
    from attnzoo.kernels.backend import triton_available

    t0 = time.perf_counter()
    if not triton_available():
        return {"mode": "skipped: triton is not installed", "rel_err": None, "seconds": 0.0}
    if torch.cuda.is_available():
        return {"mode": "cuda", "rel_err": _triton_rel_err(str(export_dir), x.cuda()),
                "seconds": time.perf_counter() - t0}  # fmt: skip
    inputs = export_dir / "triton_check_inputs.pt"
    torch.save(x, inputs)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "attnzoo.train.demo", "--check-triton", str(export_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    inputs.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"Triton check subprocess exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rel_err = json.loads(proc.stdout.strip().splitlines()[-1])["rel_err"]
    return {"mode": "TRITON_INTERPRET=1 subprocess", "rel_err": rel_err, "seconds": time.perf_counter() - t0}


def _check_triton_child(export_dir: str) -> None:
    x = torch.load(Path(export_dir) / "triton_check_inputs.pt")
    print(json.dumps({"rel_err": _triton_rel_err(export_dir, x)}))


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary it prints and writes (``test_acc`` in [0, 1])."""
    args, cli_args = parse_args(argv)
    if args.check_triton:
        _check_triton_child(args.check_triton)
        return {}
    import timm
    from lightning.pytorch.loggers import CSVLogger

    from attnzoo.train.cli import AttnzooCLI
    from attnzoo.train.curves import plot_curves
    from attnzoo.train.export import export_checkpoint

    start = time.perf_counter()
    out: Path = args.out
    cli = AttnzooCLI(args=["--config", str(args.config), "--trainer.default_root_dir", str(out), *cli_args], run=False)
    trainer, task = cli.trainer, cli.model
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=cli.datamodule)
    train_time = time.perf_counter() - t0
    (test,) = trainer.test(task, datamodule=cli.datamodule)
    trainer.save_checkpoint(out / "final.ckpt", weights_only=False)  # a full checkpoint: it can resume

    files = save_test_images(out / "images", NUM_IMAGES)
    export_dir = export_checkpoint(out / "final.ckpt", out / "export", tag="fmnist", image=files[0][0])
    loaded = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    predicted, x = classify_files(loaded, [f for f, _ in files])
    with torch.no_grad():
        roundtrip = (loaded(x) - task.eval()(x)).abs().max().item()
    csv_logger = next(lg for lg in trainer.loggers if isinstance(lg, CSVLogger))
    plot_curves(Path(csv_logger.log_dir) / "metrics.csv", out / "curves.png")

    summary = {
        "model": task.hparams.model_name,
        "params": sum(p.numel() for p in task.model.parameters()),
        "threads": torch.get_num_threads(),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_time_s": round(train_time, 1),
        "test_acc": test["test_acc"],
        "test_images": min(len(cli.datamodule.test_set), trainer.num_test_batches[0] * cli.datamodule.batch_size),
        "roundtrip_max_abs_diff": roundtrip,
        "predictions": [
            {"file": f.name, "true": t, "predicted": p} for (f, t), p in zip(files, predicted, strict=True)
        ],
    }
    if not args.no_triton_check:
        check = check_triton(export_dir, x[:2])
        summary["triton_rel_err"], summary["triton_mode"] = check["rel_err"], check["mode"]
    summary["total_time_s"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path) -> None:
    right = sum(p["true"] == p["predicted"] for p in s["predictions"])
    predicted = ", ".join(p["predicted"] for p in s["predictions"])
    rows = [
        ("model", f"{s['model']}, {s['params']:,} params"),
        ("training", f"{s['epochs']} epochs, {s['steps']} steps, {s['train_time_s']:.0f} s on {s['threads']} threads"),
        ("test accuracy", f"{s['test_acc']:.2%} on {s['test_images']} Fashion-MNIST test images"),
        ("export", f"{out / 'export'} (logits max |diff| to the trained model {s['roundtrip_max_abs_diff']:.1e})"),
        ("predictions", f"{right}/{len(s['predictions'])} test PNGs right: {predicted}"),
        ("pictures", f"{out / 'curves.png'}, {out / 'export' / 'attention.png'}"),
    ]
    if "triton_mode" in s:
        err = "" if s["triton_rel_err"] is None else f"logits rel err {s['triton_rel_err']:.2e} "
        rows.append(("triton vs torch", f"{err}({s['triton_mode']})"))
    rows.append(("total time", f"{s['total_time_s']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    print(f"attnzoo demo: {s['model']} on Fashion-MNIST")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
