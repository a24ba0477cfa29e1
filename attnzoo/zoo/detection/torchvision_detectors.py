"""torchvision's FCOS, RetinaNet and Faster R-CNN on a zoo ``FeaturePyramid``.

Anchors are sized from the pyramid's strides (one size tuple per level, as torchvision requires), and each model's
input transform is replaced by the no-resize ``DetectionTransform``. All three take and return labels 0..K-1.
``**kwargs`` are the torchvision constructor's own settings (``score_thresh``, ``nms_thresh``,
``detections_per_img``, ``box_batch_size_per_image``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from attnzoo.zoo.detection.pyramid import EXTRA_BLOCKS, FeaturePyramid
from attnzoo.zoo.detection.transform import DetectionTransform

__all__ = ["anchor_generator", "build_faster_rcnn", "build_fcos", "build_retinanet"]

_ROI_SIZE = 7  # RoI-align output side, torchvision's


def anchor_generator(
    strides: Sequence[int], scale: float, octaves: int = 1, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
) -> AnchorGenerator:
    """Per level of stride s: anchors of ``s * scale * 2**(i / octaves)`` pixels for i < ``octaves``, each with every
    aspect ratio. torchvision's defaults are scale 4 with 3 octaves (RetinaNet, strides 8-128: 32-813 px) and
    scale 8 with 1 octave (Faster R-CNN's FPN, strides 4-64: 32-512 px)."""
    if not scale > 0 or octaves < 1:
        raise ValueError(f"anchor scale={scale} must be > 0 and octaves={octaves} >= 1")
    sizes = tuple(tuple(s * scale * 2 ** (i / octaves) for i in range(octaves)) for s in strides)
    return AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(strides))


def _transform(pyramid: FeaturePyramid, num_classes: int, label_offset: int = 0) -> DetectionTransform:
    return DetectionTransform.for_backbone(pyramid.body, pyramid.strides, num_classes, label_offset)


def build_fcos(pyramid: FeaturePyramid, num_classes: int, **kwargs) -> FCOS:
    """FCOS (Tian et al., arXiv:1904.01355). Its "anchors" are the level's cells: one per cell, as large as the
    stride, so that FCOS assigns boxes of 4-8 strides to a level (any size to the last). The head's GroupNorm
    has 32 groups: ``pyramid.out_channels`` must be a multiple of 32."""
    if pyramid.out_channels % 32:
        raise ValueError(f"fpn_channels={pyramid.out_channels} must be a multiple of 32 for FCOS (GroupNorm(32) head)")
    model = FCOS(pyramid, num_classes, anchor_generator=anchor_generator(pyramid.strides, 1.0, 1, (1.0,)), **kwargs)
    model.transform = _transform(pyramid, num_classes)
    return model


def build_retinanet(
    pyramid: FeaturePyramid, num_classes: int, anchor_scale: float = 4.0, anchor_octaves: int = 3, **kwargs
) -> RetinaNet:
    """RetinaNet (Lin et al., arXiv:1708.02002) with ``anchor_generator(strides, anchor_scale, anchor_octaves)``."""
    anchors = anchor_generator(pyramid.strides, anchor_scale, anchor_octaves)
    model = RetinaNet(pyramid, num_classes, anchor_generator=anchors, **kwargs)
    model.transform = _transform(pyramid, num_classes)
    return model


def build_faster_rcnn(
    pyramid: FeaturePyramid, num_classes: int, anchor_scale: float = 8.0, representation_size: int = 256, **kwargs
) -> FasterRCNN:
    """Faster R-CNN with FPN (Ren et al., arXiv:1506.01497; Lin et al., arXiv:1612.03144): RPN anchors
    ``anchor_generator(strides, anchor_scale)``, RoI-align over the backbone's levels (not the extra ones, as
    torchvision), a two-layer box head of ``representation_size`` (torchvision: 1024)."""
    extra = {name for _, names in EXTRA_BLOCKS.values() for name in names}
    roi_pool = MultiScaleRoIAlign([n for n in pyramid.names if n not in extra], _ROI_SIZE, sampling_ratio=2)
    model = FasterRCNN(
        pyramid,
        rpn_anchor_generator=anchor_generator(pyramid.strides, anchor_scale),
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(pyramid.out_channels * _ROI_SIZE**2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),  # + the background
        **kwargs,
    )
    model.transform = _transform(pyramid, num_classes, label_offset=1)
    return model
