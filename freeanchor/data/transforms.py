"""Preprocessing as MMDetection (spec 3.1, 4.4): keep-ratio resize, normalise, pad to 32.

This is data-pipeline code: the model never resizes. `freeanchor.inference` composes these
pieces into the test-time pipeline; training adds the random flip and the optional multi-scale
short side on top of the same pieces (the same resize: OpenCV's bytes, see `resize.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from freeanchor.data.resize import resize
from freeanchor.errors import ImageReadError

__all__ = [
    "MEAN", "STD", "ImageMeta", "rescale_size", "check_resizable", "resize", "normalize",
    "pad_batch", "padded_size", "resize_keep_ratio", "resize_boxes", "hflip",
]  # fmt: skip

MEAN = (123.675, 116.28, 103.53)  # RGB
STD = (58.395, 57.12, 57.375)


@dataclass
class ImageMeta:
    """Geometry of one image through the pipeline (all sizes (H, W))."""

    ori_shape: tuple[int, int]
    img_shape: tuple[int, int]  # after resize, before padding
    scale_factor: tuple[float, float]  # (w_scale, h_scale) = new / original
    flipped: bool = False


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """New (width, height) of a keep-ratio resize to fit `scale` = (long, short) edges.

    MMDetection's rule: factor = min(long / max(w, h), short / min(w, h)), then
    int(x * factor + 0.5) per side.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def check_resizable(width: int, height: int, scale: tuple[int, int], name: str = "image") -> None:
    """Raise `ImageReadError` if a keep-ratio resize to `scale` leaves a side of 0 pixels.

    E.g. a 20000 x 2 image at (1333, 800) would become 1333 x 0.
    """
    if width < 1 or height < 1:
        raise ImageReadError(f"{name}: {width}x{height} image has no pixels")
    new_w, new_h = rescale_size(width, height, scale)
    if new_w < 1 or new_h < 1:
        raise ImageReadError(
            f"{name}: {width}x{height} image: its short side rounds to 0 when resized to "
            f"{new_w}x{new_h} (scale {tuple(scale)}; aspect ratio too extreme)"
        )


def normalize(image: Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """uint8 RGB [3, H, W] -> float32 (x - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.float() - m) / s


def padded_size(height: int, width: int, size_divisor: int = 32) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `size_divisor`: the network input of one image."""
    return -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor


def pad_batch(
    images: Sequence[Tensor], size_divisor: int = 32, size: tuple[int, int] | None = None
) -> Tensor:
    """Zero-pad (bottom/right) [C, h_i, w_i] images into one [N, C, H, W] batch.

    H and W are the largest h_i, w_i rounded up to a multiple of `size_divisor`, or `size`.
    """
    if size is None:
        h = max(int(im.shape[-2]) for im in images)
        w = max(int(im.shape[-1]) for im in images)
        size = padded_size(h, w, size_divisor)
    h, w = size
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
    return batch


def resize_keep_ratio(
    image: Tensor, scale: tuple[int, int], name: str = "image"
) -> tuple[Tensor, ImageMeta]:
    """Keep-ratio resize of a uint8 [3, H, W] image, with the geometry needed to undo it.

    Raises:
        ImageReadError: the resize would leave a side of 0 pixels (names `name`).
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    check_resizable(w, h, scale, name)
    new_w, new_h = rescale_size(w, h, scale)
    meta = ImageMeta((h, w), (new_h, new_w), (new_w / w, new_h / h))
    return resize(image, (new_w, new_h)), meta


def resize_boxes(boxes: Tensor, size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale xyxy boxes from an image of `size` to `new_size` (both (width, height)) and clip.

    Per axis by w_scale = new_w / w and h_scale = new_h / h (float32), then clipped to the
    resized image, as MMDetection's Resize with clip_object_border=True.

    Args:
        boxes: [K, 4] float32 xyxy.

    Returns:
        [K, 4] float32 xyxy in the resized image.
    """
    (w, h), (new_w, new_h) = size, new_size
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    bb = TF.resize(bb, [new_h, new_w])
    return TF.clamp_bounding_boxes(bb).as_subclass(Tensor)


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal flip of a [C, H, W] image and [K, 4] xyxy boxes: x1' = W - x2, x2' = W - x1."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    return TF.horizontal_flip(image), TF.horizontal_flip(bb).as_subclass(Tensor)
