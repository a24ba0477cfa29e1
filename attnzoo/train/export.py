"""``attnzoo export``: a trained task's backbone as a timm folder (timm's ``save_for_hf`` layout).

    attnzoo export --ckpt_path runs/fmnist/logs/version_0/checkpoints/last.ckpt --output exported/ \\
        [--tag fmnist] [--image shirt.png]

The folder holds ``model.safetensors`` and ``config.json`` (architecture, model_args, label names, the
pretrained cfg with the data's input size and mean/std, and under ``attnzoo`` the task and its ``data_info``,
e.g. an LM's vocabulary). Load it with ``timm.create_model("local-dir:exported/", pretrained=True)`` after
``import attnzoo.zoo``. ``--image`` also writes ``attention.png``: that image with the attention map of the
model's last attention block.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["export_checkpoint", "export_main", "load_task"]


def load_task(ckpt_path: str | Path, map_location: str = "cpu"):
    """The ``TaskModule`` subclass saved in a Lightning checkpoint of the attnzoo CLI, in eval mode."""
    from attnzoo.train.tasks import TaskModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    class_path = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {}).get("_class_path")
    # Only a task class in an already imported module qualifies: a checkpoint must not pick code to import.
    module, _, name = (class_path or "").rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, TaskModule)):
        raise ValueError(f"checkpoint {path} names the task class {class_path!r}, which is not an imported "
                         "TaskModule subclass (was the checkpoint written by the attnzoo CLI?)")  # fmt: skip
    # The checkpoint holds every weight: no initial weights (weights=, pretrained=) to read again.
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, weights=None,
                                    pretrained=False).eval()  # fmt: skip


def export_checkpoint(ckpt_path: str | Path, output: str | Path, tag: str = "export",
                      image: str | Path | None = None) -> Path:  # fmt: skip
    """Write the backbone of the task in ``ckpt_path`` to the folder ``output``; returns ``output``."""
    from timm.models import save_for_hf

    task = load_task(ckpt_path)
    info = task.data_info
    output = Path(output)
    model_config: dict = {"pretrained_cfg": {"tag": tag},
                          "attnzoo": {"task": type(task).__name__, "data_info": info}}  # fmt: skip
    data_config = None
    if "class_names" in info:
        model_config["label_names"] = list(info["class_names"])
    if "img_size" in info:
        data_config = {"input_size": (info["in_chans"], *info["img_size"]), "mean": tuple(info["mean"]),
                       "std": tuple(info["std"]), "crop_pct": 1.0}  # fmt: skip
    if "input_size" in task.model.pretrained_cfg:  # image models: timm's own writer
        save_for_hf(task.model, output, model_config=model_config, data_config=data_config, safe_serialization=True)
    else:
        _save_sequence_model(task, output, model_config)
    if image is not None:
        _write_attention_picture(task, image, output / "attention.png")
    return output


def _save_sequence_model(task, output: Path, model_config: dict) -> None:
    """timm's ``save_for_hf`` layout for a model without an image input (timm's writer needs ``input_size``):
    ``model.safetensors`` and a ``config.json`` whose ``model_args`` are the arguments the task built it with."""
    from safetensors.torch import save_file
    from timm.models import filter_pretrained_cfg

    model = task.model
    name = task.hparams.model_name
    if "." in name or name.startswith("local-dir:"):
        raise ValueError(f"model_name={name!r}: export of a sequence model needs the bare zoo name it was built from")
    pretrained_cfg = filter_pretrained_cfg(dict(model.pretrained_cfg), remove_source=True, remove_null=True)
    pretrained_cfg.update(model_config.pop("pretrained_cfg", {}))
    # Missing ones would read as timm's defaults (1000 classes, 3 x 224 x 224) when loading, i.e. as arguments.
    pretrained_cfg.update(num_classes=None, input_size=None)
    pretrained_cfg.pop("architecture", None)
    config = {
        "architecture": name,
        "num_features": model.num_features,
        "model_args": {**(task.hparams.model_kwargs or {}), **task.backbone_kwargs(task.data_info)},
        "pretrained_cfg": pretrained_cfg,
        **model_config,
    }
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, output / "model.safetensors")
    (output / "config.json").write_text(json.dumps(config, indent=2))


def _write_attention_picture(task, image_path: str | Path, out: Path) -> None:
    from attnzoo.train.attention_maps import last_attention_map, save_overlay
    from attnzoo.train.data.image_files import check_image, normalize_images, read_image_file

    info = task.data_info
    if "img_size" not in info:
        raise ValueError(f"--image needs an image task; the checkpoint's task is {type(task).__name__}")
    image = read_image_file(image_path)
    check_image(image_path, image, info["in_chans"], info["img_size"])
    x = normalize_images(image[None], info["mean"], info["std"])
    save_overlay(out, x[0], last_attention_map(task.model, x)[0], info["mean"], info["std"])


def export_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="attnzoo export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--ckpt_path", required=True, help="Lightning checkpoint written by attnzoo fit")
    p.add_argument("--output", required=True, help="folder to write (created; existing files are replaced)")
    p.add_argument("--tag", default="export", help="pretrained tag recorded in config.json (default: export)")
    p.add_argument("--image", help="also write attention.png for this image file")
    args = p.parse_args(list(argv))
    out = export_checkpoint(args.ckpt_path, args.output, args.tag, args.image)
    arch = json.loads((out / "config.json").read_text())["architecture"]
    print(f"exported {arch} to {out}/ (load: timm.create_model('local-dir:{out}', pretrained=True))")
