"""Drawing boxes on images: one function for detections (`Results.plot`) and ground truth.

Colours are fixed per class (golden-ratio hue steps), so a class looks the same in every
picture; ignored ground truth (crowd, VOC difficult) is drawn grey.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from freeanchor.files import write_bytes

Color = tuple[int, int, int]
IGNORED_COLOR: Color = (150, 150, 150)


def class_color(label: int) -> Color:
    """A fixed, well-spread colour per class."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_boxes(
    image: Tensor,
    boxes: Tensor,
    labels_text: Sequence[str] | None = None,
    colors: Sequence[Color] | None = None,
    width: int = 2,
) -> Tensor:
    """A copy of `image` with `boxes` drawn (torchvision's `draw_bounding_boxes`).

    Args:
        image: uint8 RGB [3, H, W].
        boxes: [n, 4] xyxy in the image's pixels (parts outside the image are cut).
        labels_text: one caption per box, or None.
        colors: one RGB colour per box (default: all of class 0's colour).

    Returns:
        uint8 RGB [3, H, W].
    """
    from torchvision.utils import draw_bounding_boxes

    image = image.detach().cpu()
    if boxes.shape[0] == 0:
        return image.clone()
    colors = list(colors) if colors is not None else [class_color(0)] * int(boxes.shape[0])
    texts = list(labels_text) if labels_text is not None else None
    return draw_bounding_boxes(
        image, boxes.detach().cpu().float(), labels=texts, colors=colors, width=width
    )


def save_image(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 RGB [3, H, W] image as PNG (or as the suffix says), atomically."""
    from PIL import Image

    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buf, format=fmt)
    return write_bytes(path, buf.getvalue())
