"""Detections of one image: indexing and filtering, drawing, saving, a COCO-style JSON view.

    r = model.predict("a.jpg")[0]
    r[r.scores > 0.5], r[r.labels == 0], r[:3]     # Results with those detections
    len(r); box, score, label, name = r[0]         # one Detection
    for det in r: print(det.name, det.score, det.box)
    image = r.plot()                               # numpy uint8 [H, W, 3] RGB, boxes drawn

Imports no torch itself (`SCORE_THR` is read by the command-line parser); the tensors it holds
come from the model.
"""

from __future__ import annotations

import io
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from freeanchor.files import write_bytes

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

# The default score threshold of `model.predict` and `freeanchor predict` (one number for
# both): detections a person looks at or a program consumes. 0.3 is MMDetection's demo default
# (image_demo.py --pred-score-thr); at the model's own `score_thr` (0.05, MMDetection's test_cfg)
# a COCO model gives dozens of low-score false boxes per photo. That low threshold stays the
# default of `eval` and training's validation, where AP needs the low-score detections (it
# only rises as the threshold falls); pass `score_thr=` / `--score-thr` to change either.
SCORE_THR: float = 0.3

_SUFFIX_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}


class Detection(NamedTuple):
    """One detection: `box` [x1, y1, x2, y2] in original-image pixels, `score`, `label` (class
    index), `name` (class name)."""

    box: list[float]
    score: float
    label: int
    name: str


@dataclass
class Results:
    """Detections of one image, boxes in original-image pixels, best score first.

    Indexing works as on a numpy array: a slice, a boolean mask (`r[r.scores > 0.5]`), or
    indices (a list or tensor) give a `Results` with those detections (the image and path
    kept); an integer gives one `Detection`; iterating yields `Detection`s.

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

    def __getitem__(self, key: Any) -> Results | Detection:
        n = len(self)
        i = None
        if getattr(key, "ndim", 0) == 0 and not isinstance(key, bool):  # not [k] (a tensor's)
            try:
                i = operator.index(key)  # an int, a numpy integer, a 0-d integer tensor
            except TypeError:
                pass
        if i is not None:
            if not -n <= i < n:
                raise IndexError(f"detection {i} of {n}")
            i %= n
            return Detection(self.boxes[i].tolist(), float(self.scores[i]), int(self.labels[i]),
                             self.names[i])  # fmt: skip
        import torch

        if isinstance(key, slice):  # range, not a tensor: torch slices have no negative step
            keep = torch.tensor(range(n)[key], dtype=torch.long)
        else:
            key = torch.as_tensor(key, device="cpu")
            key = key.long() if key.numel() == 0 else key  # r[[]]: as_tensor says float
            keep = torch.arange(n)[key].reshape(-1)
        keep = keep.to(self.boxes.device)
        return Results(
            boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep],
            names=[self.names[j] for j in keep.tolist()], path=self.path,
            orig_shape=self.orig_shape, image=self.image,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Detection]:
        return (self[i] for i in range(len(self)))

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

    def plot(self, width: int = 2) -> np.ndarray:
        """The image with boxes and "name score" labels drawn: numpy uint8 RGB [H, W, 3]
        (ready for `PIL.Image.fromarray`, matplotlib's `imshow`; `[..., ::-1]` for OpenCV)."""
        return self._drawn(width).permute(1, 2, 0).numpy()

    def _drawn(self, width: int = 2) -> Tensor:
        """uint8 RGB [3, H, W], a new tensor (the source image is left as it is)."""
        from freeanchor.viz import class_color, draw_boxes

        image = self._source_image().cpu()
        if len(self) == 0:
            return image.clone()
        texts = [f"{n} {s:.2f}" for n, s in zip(self.names, self.scores.tolist())]
        colors = [class_color(int(label)) for label in self.labels.tolist()]
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

        array = self.plot()
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return write_bytes(path, buf.getvalue())

    def __repr__(self) -> str:
        where = self.path if self.path else "tensor"
        return f"Results({where}, {len(self)} detections, orig_shape={self.orig_shape})"
