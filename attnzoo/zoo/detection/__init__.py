"""Object detectors on any zoo backbone (design §2.7): torchvision's FCOS, RetinaNet and Faster R-CNN over a
feature pyramid, and a DETR-style detector built from the zoo's attention blocks.

    from attnzoo.zoo.detection import create_detector
    det = create_detector("fcos", "attnzoo_nat_mini", num_classes=10, backbone_kwargs=dict(in_chans=1))
    det.train(); losses = det(images, targets)   # images (B, C, H, W) normalized; targets [{boxes (N, 4), labels (N,)}]
    det.eval(); detections = det(images)          # [{boxes (D, 4), labels (D,), scores (D,)}] per image

Boxes are (x1, y1, x2, y2) in input-image pixels, in and out: images are never resized, only zero-padded at the
bottom and right to a size the backbone and the pyramid's strides take; labels are 0..K-1 for every detector.
Not imported by ``import attnzoo`` (torchvision's detection models load on first use).

Files: ``pyramid`` (backbone + FPN), ``transform`` (no-resize input transform, size rule), ``targets`` (target
checks), ``torchvision_detectors`` (anchors and the three builders), ``matcher`` (Hungarian matching),
``set_loss`` (DETR's loss), ``detr`` (the DETR model), ``factory`` (by name; losses in eval mode).
"""

from attnzoo.zoo.detection.detr import DETR
from attnzoo.zoo.detection.factory import DETECTORS, build_detector, create_detector, evaluation_losses
from attnzoo.zoo.detection.pyramid import FeaturePyramid
from attnzoo.zoo.detection.targets import check_targets
from attnzoo.zoo.detection.transform import DetectionTransform

__all__ = [
    "DETECTORS",
    "DETR",
    "DetectionTransform",
    "FeaturePyramid",
    "build_detector",
    "check_targets",
    "create_detector",
    "evaluation_losses",
]
