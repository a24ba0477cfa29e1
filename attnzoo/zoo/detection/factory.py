"""Detectors by name on a timm ``features_only`` backbone, and their losses with the layers in eval mode."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from attnzoo.kernels.validate import check_int
from attnzoo.zoo.detection.detr import DETR
from attnzoo.zoo.detection.pyramid import FeaturePyramid
from attnzoo.zoo.detection.torchvision_detectors import build_faster_rcnn, build_fcos, build_retinanet

__all__ = ["DETECTORS", "build_detector", "create_detector", "evaluation_losses"]

# name -> (builder on a FeaturePyramid, its default extra FPN levels, torchvision's choice); DETR takes the body.
_PYRAMID_DETECTORS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "fcos": (build_fcos, "p6p7"),
    "retinanet": (build_retinanet, "p6p7"),
    "faster_rcnn": (build_faster_rcnn, "pool"),
}
DETECTORS: tuple[str, ...] = (*_PYRAMID_DETECTORS, "detr")

# Modules whose ``training`` flag chooses losses over detections (and has no other effect on their own computation).
_LOSS_SWITCHES = (GeneralizedRCNN, FCOS, RetinaNet, RegionProposalNetwork, RoIHeads, DETR)


def build_detector(
    arch: str, body: nn.Module, num_classes: int, fpn_channels: int = 64, extra_blocks: str | None = "default",
    **kwargs,
) -> nn.Module:  # fmt: skip
    """The ``arch`` detector (one of ``DETECTORS``) for ``num_classes`` classes on ``body``, a timm model created
    with ``features_only=True``.

    FCOS, RetinaNet and Faster R-CNN put a ``FeaturePyramid`` of ``fpn_channels`` channels on ``body``, with the
    ``extra_blocks`` levels ("default": torchvision's, "p6p7" for FCOS and RetinaNet, "pool" for Faster R-CNN;
    "pool", "p6p7" or None); ``kwargs`` go to the builder (``torchvision_detectors``) or to ``DETR``.
    Every detector takes normalized images and labels 0..K-1 and keeps boxes in input-image pixels.
    """
    check_int("num_classes", num_classes, 1)
    if arch == "detr":
        return DETR(body, num_classes, **kwargs)
    if arch not in _PYRAMID_DETECTORS:
        raise ValueError(f"detector={arch!r} is not a zoo detector; accepted values: {list(DETECTORS)}")
    builder, default_extra = _PYRAMID_DETECTORS[arch]
    extra = default_extra if extra_blocks == "default" else extra_blocks
    return builder(FeaturePyramid(body, fpn_channels, extra), num_classes, **kwargs)


def create_detector(
    arch: str, model_name: str, num_classes: int, pretrained: bool = False, backbone_kwargs: dict | None = None,
    **kwargs,
) -> nn.Module:  # fmt: skip
    """``build_detector(arch, timm.create_model(model_name, pretrained, features_only=True, **backbone_kwargs),
    num_classes, **kwargs)``; ``backbone_kwargs``: ``in_chans``, ``out_indices`` (levels, by index), ...

        det = create_detector("fcos", "attnzoo_nat_mini", 10, backbone_kwargs=dict(in_chans=1, out_indices=(1, 2)))
    """
    import timm

    import attnzoo.zoo  # noqa: F401  (registers the attnzoo_* models)

    body = timm.create_model(model_name, pretrained=pretrained, features_only=True, **(backbone_kwargs or {}))
    return build_detector(arch, body, num_classes, **kwargs)


def evaluation_losses(
    detector: nn.Module, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The training losses of ``detector`` on (images, targets) with its layers as they are (eval mode: no dropout,
    BatchNorm running statistics): torchvision's detectors (and DETR) return losses only in training mode, so only
    the flags that choose losses over detections are switched on for this call. For a validation loss."""
    switches = [m for m in detector.modules() if isinstance(m, _LOSS_SWITCHES)]
    modes = [m.training for m in switches]
    try:
        for m in switches:
            m.training = True
        return detector(images, targets)
    finally:
        for m, mode in zip(switches, modes, strict=True):
            m.training = mode
