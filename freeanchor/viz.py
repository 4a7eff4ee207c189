"""Drawing boxes on images: one function for detections (`Results.plot`) and ground truth.

Colours are fixed per class (golden-ratio hue steps), so a class looks the same in every
picture; ignored ground truth (crowd, VOC difficult) is drawn grey. Captions sit on a filled
box of their class colour, in black or white (whichever reads better on it), with a font and
line width that grow with the image, so they stay legible on photos and on thumbnails alike.
Tiny images can be drawn upscaled (`min_long_side`): 8 px text on a 96 px image is unreadable.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from freeanchor.files import write_bytes

Color = tuple[int, int, int]
IGNORED_COLOR: Color = (150, 150, 150)
MIN_FONT_PX = 10  # below this the default font's glyphs stop being legible
FONT_SHARE = 0.03  # caption height as a share of the image's long side (~15 px at 512)


def class_color(label: int) -> Color:
    """A fixed, well-spread colour per class."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def text_color(background: Color) -> Color:
    """Black on light backgrounds, white on dark ones (ITU-R 601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def upscale(image: Tensor, min_long_side: int) -> tuple[Tensor, float]:
    """`image` enlarged (nearest neighbour: pixels stay sharp) so that its long side is at
    least `min_long_side`; returns it and the factor (1.0: unchanged).

    Args:
        image: uint8 [3, H, W].
    """
    long_side = max(int(image.shape[-1]), int(image.shape[-2]))
    if not min_long_side or long_side >= min_long_side:
        return image, 1.0
    factor = math.ceil(min_long_side / long_side)  # an integer factor: every pixel alike
    big = torch.nn.functional.interpolate(image[None].float(), scale_factor=factor,
                                          mode="nearest")  # fmt: skip
    return big[0].to(torch.uint8), float(factor)


def caption_spot(
    box: Sequence[float],
    w: float,
    h: float,
    placed: Sequence[tuple[float, float, float, float]],
    width: int,
    height: int,
) -> tuple[float, float, float, float]:
    """Where a w x h caption of `box` (xyxy) goes: (x1, y1, x2, y2) inside the image.

    Tried in order: above the box's top-left corner, just inside its top edge, below its
    bottom edge, just inside it; the first spot that covers none of the `placed` captions
    (better scores, placed before) wins, else the least covered one. Without this, boxes that
    share a top edge (a shape detected as two classes) hid each other's captions.
    """
    x1, y1, _, y2 = box
    x = min(max(0.0, x1), max(0.0, width - w))
    fits = [y for y in (y1 - h, y1, y2, y2 - h) if 0 <= y <= height - h]
    best: tuple[float, tuple[float, float, float, float]] | None = None
    for y in fits or [max(0.0, min(y1, height - h))]:
        rect = (x, y, x + w, y + h)
        covered = sum(_overlap(rect, other) for other in placed)
        if covered == 0:
            return rect
        if best is None or covered < best[0]:
            best = (covered, rect)
    return best[1]


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two xyxy rectangles."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def draw_boxes(
    image: Tensor,
    boxes: Tensor,
    labels_text: Sequence[str] | None = None,
    colors: Sequence[Color] | None = None,
    width: int | None = None,
    min_long_side: int = 0,
) -> Tensor:
    """A copy of `image` with `boxes` and their captions drawn.

    Args:
        image: uint8 RGB [3, H, W].
        boxes: [n, 4] xyxy in the image's pixels (parts outside the image are cut).
        labels_text: one caption per box, or None.
        colors: one RGB colour per box (default: all of class 0's colour).
        width: box line width in px of the drawn image (default: its long side / 320, >= 1).
        min_long_side: draw on the image enlarged to at least this long side (0: as is).

    Returns:
        uint8 RGB [3, H', W']: H, W times the `upscale` factor (1 unless `min_long_side`).
    """
    from PIL import Image, ImageDraw, ImageFont

    image, factor = upscale(image.detach().cpu(), min_long_side)
    if boxes.shape[0] == 0:
        return image.clone()
    height, width_px = int(image.shape[1]), int(image.shape[2])
    long_side = max(height, width_px)
    line = width if width is not None else max(1, round(long_side / 320))
    colors = list(colors) if colors is not None else [class_color(0)] * int(boxes.shape[0])
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy().copy())
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(MIN_FONT_PX, round(FONT_SHARE * long_side)))
    scaled = (boxes.detach().cpu().double() * factor).tolist()
    # last to first, boxes then captions: where they overlap, the first box (the best score)
    # and its caption are on top, and every caption is above every box line
    for (x1, y1, x2, y2), color in reversed(list(zip(scaled, colors, strict=True))):
        draw.rectangle((x1, y1, x2, y2), outline=tuple(color), width=line)
    captions = list(zip(scaled, colors, labels_text or [], strict=False))
    placed: list[tuple[float, float, float, float]] = []  # caption rectangles, best score first
    sizes = []
    for box, _, text in captions:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, (bottom - top) // 5)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        placed.append(caption_spot(box, w, h, placed, width_px, height))
        sizes.append((left, top, pad))
    for (_, color, text), (x, y, x2, y2), (left, top, pad) in reversed(
        list(zip(captions, placed, sizes, strict=True))
    ):
        draw.rectangle((x, y, x2 - 1, y2 - 1), fill=tuple(color))
        draw.text((x + pad - left, y + pad - top), text, fill=text_color(tuple(color)), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def save_image(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 RGB [3, H, W] image as PNG (or as the suffix says), atomically."""
    from PIL import Image

    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buf, format=fmt)
    return write_bytes(path, buf.getvalue())
