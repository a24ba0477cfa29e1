"""Reading and writing single image files as uint8 tensors (C, H, W), with errors that name the file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_MODES", "check_image", "normalize_images", "read_image_file", "write_image_file"]

IMAGE_MODES = {"L": 1, "RGB": 3}  # PIL mode -> channels; other modes are refused, never converted silently


def read_image_file(path: str | Path) -> Tensor:
    """An 8-bit grayscale (``L``) or RGB image file -> uint8 (C, H, W) with C = 1 or 3."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL raises SyntaxError for some broken headers
        raise ValueError(f"cannot read image file {path}: {exc}") from exc
    if mode not in IMAGE_MODES:
        raise ValueError(
            f"image file {path} has mode {mode!r}; accepted modes: {list(IMAGE_MODES)} (8-bit grayscale or RGB), "
            "convert it first"
        )
    return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()


def check_image(path: str | Path, image: Tensor, in_chans: int, img_size: Sequence[int]) -> None:
    """The model takes (in_chans, *img_size) images; a file that is not so is refused (not resized or cast)."""
    want = (in_chans, *img_size)
    if tuple(image.shape) != want:
        raise ValueError(
            f"image file {path} is {tuple(image.shape)} (channels, height, width), the data is {want}; "
            "resize or convert it first"
        )


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (..., C, H, W) -> float (..., C, H, W): pixels scaled to [0, 1], then (x - mean) / std per channel."""
    mean, std = (torch.tensor(v, device=images.device)[:, None, None] for v in (mean, std))
    return (images.float() / 255 - mean) / std


def write_image_file(path: str | Path, image: Tensor) -> None:
    """uint8 (C, H, W) with C = 1 or 3 -> an image file (format from the suffix, e.g. ``.png``)."""
    from PIL import Image

    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be uint8 (C, H, W) with C in (1, 3), got {image.dtype} {tuple(image.shape)}")
    arr = image.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
