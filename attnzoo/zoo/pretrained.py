"""The checkpoints shipped inside the package: fp16 safetensors with a model card, in ``attnzoo/zoo/weights/``.

    timm.create_model("attnzoo_nat_mini.fmnist", pretrained=True)   # offline: the file is in the package
    timm.create_model("attnzoo_nat_mini", pretrained=True)          # the same: its default tag
    card("attnzoo_nat_mini.fmnist")  # recipe, data, metrics, sha256, the pretrained cfg, the task's data_info

A shipped checkpoint is two files named after the model and tag: ``<model>.<tag>.safetensors`` (the weights,
float16) and ``<model>.<tag>.json`` (its card). ``attnzoo.train.publish`` writes both from a recipe in
``configs/``. Every family builds its cfg table with ``default_cfgs_with_shipped``, which files each shipped
checkpoint of its models as a tag (the default one where it keeps the model's classes and input size): the
model's cfg with timm's ``file`` pointed at the weights and the data's fields (classes, input size, mean/std,
label names) from the card (``shipped_cfg``).
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from timm.models import generate_default_cfgs

__all__ = [
    "CARD_KEYS",
    "WEIGHTS_DIR",
    "card",
    "card_path",
    "default_cfgs_with_shipped",
    "sha256_of",
    "shipped_cfg",
    "shipped_data_info",
    "shipped_names",
    "weights_path",
]  # fmt: skip

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# What every card holds (attnzoo.train.publish writes them; tests check them).
CARD_KEYS: tuple[str, ...] = (
    "name", "task", "recipe", "overrides", "data", "metrics", "params", "dtype", "sha256", "training",
    "pretrained_cfg", "data_info",
)  # fmt: skip

# Card fields copied into the timm pretrained cfg (the rest of the cfg is the family's).
_CFG_FIELDS: tuple[str, ...] = ("num_classes", "input_size", "mean", "std", "crop_pct", "label_names")


def weights_path(name: str, root: Path | None = None) -> Path:
    """``<root>/<model>.<tag>.safetensors`` for ``name`` = ``"<model>.<tag>"`` (root: ``WEIGHTS_DIR``)."""
    return (root or WEIGHTS_DIR) / f"{_checked_name(name)}.safetensors"


def card_path(name: str, root: Path | None = None) -> Path:
    """``<root>/<model>.<tag>.json`` for ``name`` = ``"<model>.<tag>"`` (root: ``WEIGHTS_DIR``)."""
    return (root or WEIGHTS_DIR) / f"{_checked_name(name)}.json"


def shipped_names() -> list[str]:
    """``"<model>.<tag>"`` of every checkpoint in the package (a card with its weights file), sorted."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json") if p.with_suffix(".safetensors").is_file())


@cache
def _read_card(name: str) -> dict[str, Any]:
    path = card_path(name)
    if not path.is_file():
        have = ", ".join(shipped_names()) or "none"
        raise FileNotFoundError(f"no shipped checkpoint {name!r} (no {path}); shipped: {have}")
    return json.loads(path.read_text())


def card(name: str) -> dict[str, Any]:
    """The model card of the shipped checkpoint ``name`` = ``"<model>.<tag>"`` (a fresh copy)."""
    return json.loads(json.dumps(_read_card(name)))


def shipped_cfg(name: str) -> dict[str, Any]:
    """Pretrained-cfg fields for a cfg table entry ``"<model>.<tag>"``: ``file`` (the weights in the package),
    the data's fields from the card, and ``notes`` naming the recipe and metrics."""
    c = _read_card(name)
    cfg = {k: _tupled(c["pretrained_cfg"][k]) for k in _CFG_FIELDS if k in c["pretrained_cfg"]}
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in c["metrics"].items())
    return {**cfg, "file": str(weights_path(name)), "license": "apache-2.0",
            "notes": (f"trained by attnzoo from {c['recipe']} on {c['data']}: {metrics}",)}  # fmt: skip


def shipped_data_info(file: str | Path) -> dict[str, Any] | None:
    """The card's ``data_info`` (e.g. an LM's vocabulary) when ``file`` is a shipped weights file, else None."""
    path = Path(file)
    if path.parent != WEIGHTS_DIR or path.suffix != ".safetensors" or not card_path(path.stem).is_file():
        return None
    return card(path.stem)["data_info"]


def default_cfgs_with_shipped(cfgs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """timm's ``generate_default_cfgs`` of a family's cfg table (``"<model>.<tag>"`` -> cfg) with its models' shipped
    checkpoints added as tags; a shipped cfg is the model's first cfg updated by ``shipped_cfg`` (its notes kept, the
    checkpoint's appended).

    A shipped tag becomes its model's default tag when it keeps what ``create_model(model)`` builds (the same
    ``num_classes`` and ``input_size`` as the model's first cfg: timm takes those defaults from the default tag even
    without ``pretrained``); otherwise the model's own first tag stays the default and the checkpoint is named
    explicitly (``attnzoo_seqenc_tiny.waves``)."""
    base: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, cfg in cfgs.items():
        base.setdefault(key.split(".", 1)[0], (key.split(".", 1)[1], cfg))
    shipped, keep_default = {}, []
    for name in shipped_names():
        model = name.split(".", 1)[0]
        if model not in base or "detector" in _read_card(name):  # detectors load with their own loader
            continue
        own_tag, own = base[model]
        extra = shipped_cfg(name)
        shipped[name] = {**own, **extra, "notes": (*own.get("notes", ()), *extra["notes"])}
        if any(shipped[name].get(k) != own.get(k) for k in ("num_classes", "input_size")):
            keep_default.append((model, own_tag))
    out = generate_default_cfgs({**cfgs, **shipped})  # timm: the first tag with weights becomes the default
    for model, own_tag in keep_default:
        out[model].tags.remove(own_tag)
        out[model].tags.appendleft(own_tag)
    return out


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checked_name(name: str) -> str:
    model, sep, tag = name.partition(".")
    if not (model.startswith("attnzoo_") and sep and tag and "/" not in name):
        raise ValueError(f"name={name!r}: expected '<model>.<tag>' (attnzoo_ model), like 'attnzoo_nat_mini.fmnist'")
    return name


def _tupled(value: Any) -> Any:
    # JSON has lists; timm's cfgs use tuples (input_size, mean, std, label_names).
    return tuple(value) if isinstance(value, list) else value
