"""Weights files: read a state dict from any of the files the zoo and its training write, and load one into a
module strictly (every key and shape must match, or the error lists what differs)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["load_weights", "read_state_dict"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A backbone state dict from an export folder, a ``.safetensors`` file, a Lightning ``.ckpt`` (the task's
    ``model.`` entries) or a ``.pth``/``.bin`` state dict (optionally under ``state_dict``)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"weights folder {path} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".ckpt":  # a Lightning checkpoint of a task: the backbone is its ``model`` attribute
        return {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    return state.get("state_dict", state)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` (see ``read_state_dict``) into ``model``; every key and shape must match."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state
                and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or reshaped:
        problems = [f"{len(items)} {what} {_head(items)}" for what, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
                    if items]  # fmt: skip
        raise ValueError(
            f"weights {path} do not fit the model {type(model).__name__}: {'; '.join(problems)}; "
            "they come from another architecture or configuration"
        )
    model.load_state_dict(state)


def _head(items: list[str], n: int = 8) -> str:
    return "[" + ", ".join(items[:n]) + (", ..." if len(items) > n else "") + "]"
