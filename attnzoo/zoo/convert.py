"""Checkpoint conversion into zoo models: timm ``vit_*`` -> ``attnzoo_vit_*``, one zoo attention -> another.

``convert_state_dict(state_dict, model)`` maps a foreign or zoo state dict onto ``model``'s layout:
family rules registered with ``register_converter`` rename / resample keys (the ViT rules resample ``pos_embed``
to the model's patch grid), then every model key is filled: from the checkpoint where names and shapes agree
(kept), else from the model's own initialisation (new: e.g. NA's ``rpb`` when switching ``attn=``). Checkpoint
keys the model lacks are dropped; a classifier of another size is replaced by the model's, an input conv with
other channels is adapted (timm's ``adapt_input_conv``); any other shape mismatch is an error. Everything is
listed in the returned ``ConversionReport``.

``checkpoint_filter_fn`` plugs this into timm's loader, e.g.
``timm.create_model("attnzoo_vit_small", pretrained=True, pretrained_cfg_overlay=dict(file="vit_small.pth"))``.
A family adds its rules from its own file: ``register_converter(HaloNet, halonet_rules)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import Tensor, nn

__all__ = [
    "ConversionReport",
    "checkpoint_filter_fn",
    "convert_state_dict",
    "load_converted",
    "register_converter",
    "vit_rules",
]

_logger = logging.getLogger(__name__)

# rules(state_dict, model) -> (state_dict in the model's key names, keys whose values were reshaped / resampled)
Rules = Callable[[dict[str, Tensor], nn.Module], tuple[dict[str, Tensor], list[str]]]
_CONVERTERS: dict[type, Rules] = {}


@dataclass(frozen=True)
class ConversionReport:
    """What ``convert_state_dict`` did, by model key (``dropped``: checkpoint keys)."""

    kept: tuple[str, ...]  # taken from the checkpoint (``adapted`` ones after reshaping)
    new: tuple[str, ...]  # not in the checkpoint (or a classifier of another size): the model's initial values
    dropped: tuple[str, ...]  # checkpoint keys the model does not use
    adapted: tuple[str, ...]  # kept, but resampled / channel-adapted to the model's shape

    def __str__(self) -> str:
        def listing(keys: tuple[str, ...]) -> str:
            return ", ".join(keys) if keys else "none"

        return (f"kept {len(self.kept)} keys; new (initialised): {listing(self.new)}; "
                f"dropped: {listing(self.dropped)}; adapted: {listing(self.adapted)}")


def register_converter(model_cls: type, rules: Rules) -> None:
    """Use ``rules`` for checkpoints loaded into ``model_cls`` (and its subclasses)."""
    if model_cls in _CONVERTERS:
        raise ValueError(f"a converter for {model_cls.__name__} is already registered")
    _CONVERTERS[model_cls] = rules


def _rules_for(model: nn.Module) -> Rules | None:
    return next((_CONVERTERS[c] for c in type(model).__mro__ if c in _CONVERTERS), None)


def _unwrap(checkpoint: Mapping) -> dict[str, Tensor]:
    """Training checkpoints keep the weights under ``state_dict`` or ``model``."""
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def _cfg_keys(model: nn.Module, field: str) -> set[str]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get(field) or ()
    names = (names,) if isinstance(names, str) else names
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def convert_state_dict(checkpoint: Mapping, model: nn.Module) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map ``checkpoint`` (a state dict, or a training checkpoint holding one) onto ``model``'s keys and shapes.

    Returns a complete state dict for ``model.load_state_dict(..., strict=True)`` and the report (module doc).
    Raises ``ValueError`` naming the key and both shapes when a weight cannot be mapped.
    """
    source = _unwrap(checkpoint)
    rules = _rules_for(model)
    source, adapted = rules(source, model) if rules is not None else (source, [])
    target = model.state_dict()
    classifier, first_conv = _cfg_keys(model, "classifier"), _cfg_keys(model, "first_conv")
    out: dict[str, Tensor] = {}
    dropped, adapted = [], list(adapted)
    for key, value in source.items():
        if key not in target:
            dropped.append(key)
        elif value.shape == target[key].shape:
            out[key] = value
        elif key in classifier:  # another label set: the model keeps its own head
            dropped.append(key)
        elif key in first_conv and value.dim() == 4 and value.shape[0] == target[key].shape[0]:
            out[key] = adapt_input_conv(target[key].shape[1], value, base_chans=value.shape[1])
            adapted.append(key)
        else:
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)} but the model's is "
                             f"{tuple(target[key].shape)}; no conversion rule maps one onto the other")
    new = [key for key in target if key not in out]
    out.update({key: target[key] for key in new})
    report = ConversionReport(tuple(k for k in target if k not in new), tuple(new), tuple(dropped), tuple(adapted))
    return out, report


def load_converted(model: nn.Module, checkpoint: Mapping) -> ConversionReport:
    """``convert_state_dict`` then a strict ``load_state_dict`` into ``model``; returns the report."""
    state_dict, report = convert_state_dict(checkpoint, model)
    model.load_state_dict(state_dict, strict=True)
    return report


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict[str, Tensor]:
    """timm's ``pretrained_filter_fn``: ``convert_state_dict``, logging the report when not all keys were kept."""
    out, report = convert_state_dict(state_dict, model)
    if report.new or report.dropped or report.adapted:
        _logger.warning("loading a checkpoint into %s: %s", type(model).__name__, report)
    return out


def vit_rules(state_dict: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """timm ViT (and zoo ViT) checkpoints already use the zoo ViT's key names; ``pos_embed`` of another patch grid
    is resampled (bicubic, timm's ``resample_abs_pos_embed``) to the model's grid."""
    pos = state_dict.get("pos_embed")
    want = model.pos_embed.shape
    if pos is None or pos.shape == want or pos.dim() != 3 or pos.shape[-1] != want[-1]:
        return state_dict, []
    prefix = model.num_prefix_tokens
    old = pos.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if side < 1 or side * side != old:
        raise ValueError(f"checkpoint pos_embed {tuple(pos.shape)} is not {prefix} prefix tokens + a square grid; "
                         f"cannot resample it to the model's {tuple(want)}")
    with torch.no_grad():
        resampled = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), [side, side], prefix)
    return {**state_dict, "pos_embed": resampled}, ["pos_embed"]
