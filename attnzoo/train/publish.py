"""Train a recipe and ship the result as a package checkpoint (``attnzoo/zoo/weights/``, see
``attnzoo.zoo.pretrained``): fp16 safetensors of the backbone (a detector: the whole detector) and its model card.

    python -m attnzoo.train.publish --config configs/fmnist/nat_mini.yaml --tag fmnist [--out runs/publish]
        [--resume runs/.../last.ckpt] [any attnzoo fit option, e.g. --trainer.max_epochs 4]

The weights are the run's final weights rounded to float16; the card's metrics are measured with those
rounded weights, on the DataModule's validation and test splits, so that ``attnzoo validate`` /
``attnzoo test`` with ``--model.init_args.model_name <model>.<tag> --model.init_args.pretrained true``
reproduce them once the family's cfg table lists the tag (``shipped_cfg``); for a detector,
``--model.init_args.detector_weights <name>``. A detector ships as ``attnzoo_<arch>_<backbone>.<tag>`` with the
build arguments in its card (``attnzoo.zoo.detection.shipped``); its backbone may start from a pretrained tag.
``--resume`` continues an interrupted run of the same recipe from its Lightning checkpoint (a finished run's
checkpoint only restores its weights); the card then records the checkpoint instead of the training time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from attnzoo.zoo.pretrained import WEIGHTS_DIR, card_path, sha256_of, weights_path

__all__ = ["card_cfg", "main", "publish"]


def card_cfg(data_info: dict) -> dict:
    """The pretrained-cfg fields a checkpoint's data fixes: classes, input size, mean/std (images)."""
    cfg: dict = {}
    if "class_names" in data_info:
        cfg["num_classes"] = len(data_info["class_names"])
        cfg["label_names"] = list(data_info["class_names"])
    if "img_size" in data_info:
        cfg.update(input_size=[data_info["in_chans"], *data_info["img_size"]], mean=list(data_info["mean"]),
                   std=list(data_info["std"]), crop_pct=1.0)  # fmt: skip
    return cfg


def _rounded_to_fp16(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in float16 (floating tensors; others unchanged), and the model set to it."""
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # the metrics are measured with exactly what ships
    return state


def _check_registered_architecture(task) -> None:
    """The trained backbone must be what ``timm.create_model(model_name)`` builds (with the data's classes and
    channels), or the shipped weights would not load: ``model_kwargs`` may only change training settings."""
    import timm

    with torch.device("meta"):
        fresh = timm.create_model(task.hparams.model_name, **task.backbone_kwargs(task.data_info))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in task.model.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:6]
        raise ValueError(f"model_kwargs={task.hparams.model_kwargs} change the architecture of "
                         f"{task.hparams.model_name} (differing weights: {diff}); a shipped checkpoint must load "
                         "into the registered model")  # fmt: skip


def _metrics(results: list[dict]) -> dict[str, float]:
    return {k: round(float(v), 6) for r in results for k, v in r.items() if "_loss" not in k}


def _shipped_name_and_build(task, tag: str) -> tuple[str, dict]:
    """The checkpoint's name and, for a detector, the card's ``detector`` entry (what rebuilds it)."""
    from attnzoo.train.tasks.detection import DetectionTask

    model_name = task.hparams.model_name
    if model_name.startswith("local-dir:"):
        raise ValueError(f"model_name={model_name!r}: publish trains a zoo model name, not an export folder")
    if isinstance(task, DetectionTask):  # the whole detector ships, so its backbone may start from any tag
        backbone = model_name.split(".", 1)[0]
        kwargs = {**task.backbone_kwargs(task.data_info), **(task.hparams.model_kwargs or {})}
        kwargs.pop("features_only")  # create_detector's own
        build = {"arch": task.hparams.detector, "model_name": backbone, "backbone_kwargs": kwargs,
                 "num_classes": len(task.data_info["class_names"]),
                 "detector_kwargs": dict(task.hparams.detector_kwargs or {})}  # fmt: skip
        return f"attnzoo_{build['arch']}_{backbone.removeprefix('attnzoo_')}.{tag}", {"detector": build}
    if "." in model_name:
        raise ValueError(f"model_name={model_name!r}: publish trains a bare zoo model name (no tag)")
    _check_registered_architecture(task)
    return f"{model_name}.{tag}", {}


def publish(config: Path, tag: str, out: Path, fit_args: list[str], weights_dir: Path = WEIGHTS_DIR,
            resume: Path | None = None) -> dict:  # fmt: skip
    """Fit ``config`` (logs in ``out``; from the Lightning checkpoint ``resume`` if given), round to fp16, measure,
    write ``<name>.safetensors`` and its card ``<name>.json`` into ``weights_dir``; returns the card."""
    from attnzoo.train.cli import AttnzooCLI

    cli = AttnzooCLI(args=["--config", str(config), "--trainer.default_root_dir", str(out), *fit_args], run=False)
    trainer, task, data = cli.trainer, cli.model, cli.datamodule
    name, build = _shipped_name_and_build(task, tag)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=data, ckpt_path=resume)
    seconds = time.perf_counter() - t0
    state = _rounded_to_fp16(task.model)
    metrics = {**_metrics(trainer.validate(task, datamodule=data)), **_metrics(trainer.test(task, datamodule=data))}

    weights_dir.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a map in random order, and the card's sha256 must be reproducible
    save_file(state, weights_path(name, weights_dir), metadata={"format": "pt"})
    card = {
        "name": name,
        "task": type(task).__name__,
        "recipe": str(config),
        "overrides": list(fit_args),
        "data": {"datamodule": type(data).__name__, **{k: v for k, v in vars(cli.config.data.init_args).items()
                                                        if k in ("corpus", "source", "task", "block_size")}},
        "metrics": metrics,
        "params": sum(p.numel() for p in task.model.parameters()),
        "dtype": "float16",
        "sha256": sha256_of(weights_path(name, weights_dir)),
        "training": {
            "epochs": trainer.current_epoch, "steps": trainer.global_step,
            **({"resumed_from": str(resume)} if resume else {"seconds": round(seconds, 1)}),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "seed": cli.config.seed_everything,
        },
        "pretrained_cfg": card_cfg(task.data_info),
        "data_info": task.data_info,
        **build,
    }
    card_path(name, weights_dir).write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m attnzoo.train.publish", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # fmt: skip
    p.add_argument("--config", type=Path, required=True, help="the recipe (an attnzoo fit config)")
    p.add_argument("--tag", required=True, help="pretrained tag: the checkpoint is <model_name>.<tag>")
    p.add_argument("--out", type=Path, default=Path("runs/publish"), help="folder for the run's logs")
    p.add_argument("--resume", type=Path, help="a Lightning checkpoint of a run of this recipe to continue")
    args, rest = p.parse_known_args(argv)
    card = publish(args.config, args.tag, args.out / f"{args.config.stem}.{args.tag}", rest, resume=args.resume)
    print(json.dumps({k: card[k] for k in ("name", "metrics", "params", "sha256", "training")}, indent=1))


if __name__ == "__main__":
    main()
