"""Backbones by timm name (zoo models registered first), with clear errors for unknown names."""

from __future__ import annotations

import difflib

from torch import nn

__all__ = ["create_backbone"]

_LOCAL_DIR = "local-dir:"


def create_backbone(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(model_name, pretrained=pretrained, **kwargs)`` after registering the zoo.

    ``model_name`` is a registered name with an optional pretrained tag (``attnzoo_vit_tiny.fmnist``) or
    ``local-dir:<folder>`` (an ``attnzoo export`` folder). An unknown name lists the closest registered ones.
    """
    import timm
    from timm.models import split_model_name_tag

    import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models with timm)

    if not model_name.startswith(_LOCAL_DIR):
        name, _tag = split_model_name_tag(model_name)
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "no close names"
            raise ValueError(
                f"model_name={model_name!r} is not a registered timm model ({hint}); "
                "`attnzoo models` lists the zoo, timm.list_models() everything"
            )
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
