"""User detection data in COCO's layout: a folder of images and an ``instances`` json file with ``images``
(``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``image_id``, ``category_id``, ``bbox`` = [x, y,
width, height] in pixels, optional ``iscrowd``) and ``categories`` (``id``, ``name``).

Labels are the categories' positions in id order (0..K-1). Crowd annotations (``iscrowd`` = 1) are left out and
boxes are clipped to their image, as torchvision's COCO reference does; a box with no width or height, or none
left after clipping, an unknown image or category, or a missing file is an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from attnzoo.train.data.image_files import read_image_file

__all__ = ["CocoImages", "CocoRecord", "read_coco"]


@dataclass(frozen=True)
class CocoRecord:
    """One image: its file, its (height, width) from the json, boxes float (N, 4) (x1, y1, x2, y2), labels (N,)."""

    path: Path
    size: tuple[int, int]
    boxes: Tensor
    labels: Tensor


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"COCO annotations file {path} is not valid JSON: {exc}") from exc
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"COCO annotations file {path} lacks {missing} (an instances file has images, annotations "
                         "and categories)")  # fmt: skip
    return data


def _box(ann: dict, size: tuple[int, int], where: str) -> list[float]:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2) clipped to the image (height, width)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    if not (w > 0 and h > 0):
        raise ValueError(f"{where} has bbox {ann['bbox']}: width and height must be > 0 (COCO bbox = [x, y, w, h])")
    box = [min(max(x, 0.0), size[1]), min(max(y, 0.0), size[0]), min(x + w, size[1]), min(y + h, size[0])]
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{where} has bbox {ann['bbox']}, outside its {size[0]}x{size[1]} (height x width) image")
    return box


def read_coco(images_dir: str | Path, annotations: str | Path) -> tuple[list[CocoRecord], list[str]]:
    """Read one split: (a record per image, in the json's order, images without annotations included; the
    category names in id order)."""
    images_dir, annotations = Path(images_dir), Path(annotations)
    data = _load(annotations)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    images = {im["id"]: im for im in data["images"]}
    boxes: dict[int, list] = {i: [] for i in images}
    for ann in data["annotations"]:
        where = f"annotation {ann.get('id', '?')} in {annotations}"
        if ann["image_id"] not in images:
            raise ValueError(f"{where} refers to image_id {ann['image_id']}, which is not in its images")
        if ann["category_id"] not in label_of:
            raise ValueError(f"{where} has category_id {ann['category_id']}; the categories' ids: {sorted(label_of)}")
        if ann.get("iscrowd", 0):
            continue
        image = images[ann["image_id"]]
        box = _box(ann, (image["height"], image["width"]), where)
        boxes[ann["image_id"]].append((box, label_of[ann["category_id"]]))
    records = []
    for image_id, image in images.items():
        path = images_dir / image["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"image {image['file_name']!r} (id {image_id}) of {annotations} is not in {images_dir}"
            )
        found = boxes[image_id]
        records.append(CocoRecord(
            path, (int(image["height"]), int(image["width"])),
            torch.tensor([b for b, _ in found], dtype=torch.float32).reshape(-1, 4),
            torch.tensor([lab for _, lab in found], dtype=torch.int64),
        ))  # fmt: skip
    return records, [c["name"] for c in categories]


class CocoImages(Dataset):
    """The images of ``read_coco`` records, read on access: item i = (uint8 (C, H, W), {"boxes", "labels"}).
    An image file whose size differs from its json entry, or without ``in_chans`` channels, is an error."""

    def __init__(self, records: list[CocoRecord], in_chans: int) -> None:
        self.records, self.in_chans = records, in_chans

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        record = self.records[i]
        image = read_image_file(record.path)
        if image.shape[0] != self.in_chans or tuple(image.shape[1:]) != record.size:
            raise ValueError(
                f"image file {record.path} is {tuple(image.shape)} (channels, height, width); its annotations say "
                f"{record.size[0]}x{record.size[1]} and the data has {self.in_chans} channel(s)"
            )
        return image, {"boxes": record.boxes, "labels": record.labels}
