"""Shipped detectors: a whole detector's fp16 weights and its model card in the package (``attnzoo.zoo.pretrained``).

    det = load_detector("attnzoo_fcos_nat_mini.fmnist")   # offline, eval mode, float32
    det.pretrained_cfg["mean"], det.pretrained_cfg["label_names"]   # how to normalize; what the labels 0..K-1 are

A detector's card holds ``detector``: what ``create_detector`` needs to rebuild it (``arch``, the backbone's
``model_name`` and ``backbone_kwargs``, ``num_classes``, ``detector_kwargs``); its name is
``attnzoo_<arch>_<backbone>.<tag>`` (``attnzoo.train.publish`` names it), so it is never a timm tag.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from attnzoo.zoo.detection.factory import create_detector
from attnzoo.zoo.pretrained import card, shipped_names, weights_path
from attnzoo.zoo.weight_files import load_weights

__all__ = ["detector_weights_file", "load_detector", "shipped_detectors"]


def shipped_detectors() -> list[str]:
    """Names of the detectors in the package, sorted."""
    return [n for n in shipped_names() if "detector" in card(n)]


def detector_weights_file(weights: str | Path) -> Path:
    """A shipped detector's name -> its weights file; any other value is taken as a path."""
    if isinstance(weights, str) and weights in shipped_detectors():
        return weights_path(weights)
    return Path(weights)


def load_detector(name: str) -> nn.Module:
    """The shipped detector ``name`` (``shipped_detectors()``), rebuilt from its card, its weights loaded (as
    float32), in eval mode; ``pretrained_cfg`` holds the card's data fields (input size, mean/std, label names)."""
    if name not in shipped_detectors():
        raise ValueError(f"name={name!r} is not a shipped detector; shipped: {shipped_detectors() or 'none'}")
    c = card(name)
    build = c["detector"]
    detector = create_detector(build["arch"], build["model_name"], build["num_classes"],
                               backbone_kwargs=build["backbone_kwargs"], **build["detector_kwargs"])  # fmt: skip
    load_weights(detector, weights_path(name))
    detector.pretrained_cfg = dict(c["pretrained_cfg"])
    return detector.eval()
