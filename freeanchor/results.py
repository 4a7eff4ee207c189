"""Detections of one image, with drawing, saving and a COCO-style JSON view."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from freeanchor.files import write_bytes

_SUFFIX_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}


@dataclass
class Results:
    """Detections of one image, boxes in original-image pixels.

    Attributes:
        boxes: [n, 4] xyxy float32.
        scores: [n] float32, descending.
        labels: [n] int64 class indices.
        names: class name of each detection (n strings).
        path: the image file, or None for an image given as a tensor.
        orig_shape: (H, W) of the original image.
        image: the uint8 RGB [3, H, W] image when it was given as a tensor (else read from
            `path` when drawing).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    path: str | None
    orig_shape: tuple[int, int]
    image: Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to_json(self) -> list[dict[str, Any]]:
        """One dict per detection: bbox [x, y, w, h] (COCO), score, label, name."""
        out = []
        for box, score, label, name in zip(
            self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), self.names
        ):
            x1, y1, x2, y2 = box
            out.append(
                {"bbox": [x1, y1, x2 - x1, y2 - y1], "score": score, "label": label, "name": name}
            )
        return out

    def _source_image(self) -> Tensor:
        if self.image is not None:
            return self.image
        if self.path is None:
            raise ValueError("Results.plot: no image (neither a tensor nor a path) to draw on")
        from freeanchor.data.io import read_image

        return read_image(self.path)

    def plot(self, width: int = 2) -> Tensor:
        """The image with boxes and "name score" labels drawn: uint8 RGB [3, H, W]."""
        from freeanchor.viz import draw_boxes

        image = self._source_image().cpu()
        if len(self) == 0:
            return image.clone()
        texts = [f"{n} {s:.2f}" for n, s in zip(self.names, self.scores.tolist())]
        colors = [_color(int(label)) for label in self.labels.tolist()]
        return draw_boxes(image, self.boxes, texts, colors, width)

    def save(self, path: str | Path) -> Path:
        """Write `plot()` to an image file (format from the suffix), atomically.

        A folder (existing, or a path ending in "/") gets `<image stem>.jpg` inside it.
        """
        is_folder = str(path).endswith(("/", os.sep)) or Path(path).is_dir()
        path = Path(path)
        if is_folder:
            stem = Path(self.path).stem if self.path else "image"
            path = path / f"{stem}.jpg"
        fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"{path}: unsupported image suffix; use one of {sorted(_SUFFIX_FORMAT)}"
            )
        from PIL import Image

        array = self.plot().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return write_bytes(path, buf.getvalue())

    def __repr__(self) -> str:
        where = self.path if self.path else "tensor"
        return f"Results({where}, {len(self)} detections, orig_shape={self.orig_shape})"


def _color(label: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)
