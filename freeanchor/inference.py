"""The test-time pipeline: read -> resize -> normalise -> pad -> network -> decode + NMS -> rescale.

Everything that infers goes through here: `FreeAnchor.predict`, `freeanchor predict` (PyTorch and
onnxruntime), `freeanchor eval` (its dataset calls `preprocess`, its sampler `group_batches`),
the export check and `freeanchor benchmark`. The steps are MMDetection's test pipeline, bit for
bit from the file (`LoadImageFromFile` -> `Resize(keep_ratio=True)` -> BGR->RGB, mean/std, pad
to 32) when OpenCV is installed (see `data/io.py` and `data/resize.py`).

An image's detections never depend on its batch: images are batched only with images of the same
padded network input size, so each image's input is exactly what it would be alone. Unusable
inputs (unreadable, too many pixels, a side that would round to 0) become `Skipped` entries with
one line naming the input and the reason; the rest is predicted.

    pipeline = Pipeline(model.cfg, model.detect, batch_size=8)
    for out in pipeline.run(["a.jpg", "photos/", "more/*.png", pil_image, array]):
        print(out)
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from freeanchor.config import ModelConfig
from freeanchor.data.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    image_size,
    pil_to_rgb,
    read_image,
)
from freeanchor.data.transforms import (
    ImageMeta,
    check_resizable,
    normalize,
    pad_batch,
    padded_size,
    rescale_size,
    resize,
)
from freeanchor.errors import ImageReadError, MissingFileError

ImageInput = str | Path | Image.Image | np.ndarray | Tensor
# (batch [N, 3, H, W] normalised, metas, score_thr or None) -> per image boxes/scores/labels
DetectFn = Callable[[Tensor, list[ImageMeta], float | None], list[dict[str, Tensor]]]

ACCEPTED = (
    "a path (str or pathlib.Path: a file, a folder or a glob), a PIL.Image.Image, a numpy uint8 "
    "array [H, W, 3] or [H, W], or a uint8 torch.Tensor [3, H, W]"
)

__all__ = [
    "ACCEPTED", "DEFAULT_MAX_PIXELS", "ImageInput", "Pipeline", "Prediction", "Skipped",
    "expand_sources", "group_batches", "input_size", "load_image", "preprocess",
]  # fmt: skip


# ----------------------------------------------------------------------------- sources


def expand_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their images, not recursive) and globs -> sorted image paths, each once.

    A file named explicitly is kept whatever its suffix (it is reported if unreadable); folders
    and globs contribute entries with an image suffix. Two names of one file (symlinks, `a/../a`)
    count once, by resolved path (the name that is not a symlink is kept); a symlink loop is
    kept as named (it is reported when read).
    Nothing is opened here.

    Raises:
        MissingFileError: a source that is not a file, a folder or a glob matching something.
    """
    found: dict[str, Path] = {}
    for src in sources:
        path = Path(src)
        if path.is_dir():
            hits = [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif os.path.lexists(path) and not glob.has_magic(str(src)):
            hits = [path]
        elif glob.has_magic(str(src)):
            hits = [
                Path(p)
                for p in sorted(glob.glob(str(src), recursive=True))
                if Path(p).suffix.lower() in IMAGE_SUFFIXES and not Path(p).is_dir()
            ]
        else:
            raise MissingFileError(f"{src}: no such file or folder")
        if not hits:
            raise MissingFileError(f"{src}: no images (suffixes {', '.join(IMAGE_SUFFIXES)})")
        for p in hits:  # of two names of one file, the real one (not a symlink) is kept
            key = _identity(p)
            if key not in found or (found[key].is_symlink() and not p.is_symlink()):
                found[key] = p
    return sorted(found.values())


def _identity(path: Path) -> str:
    try:
        return str(path.resolve(strict=True))
    except (OSError, RuntimeError):  # missing target or a loop: keep it, reported on reading
        return str(path.absolute())


# ----------------------------------------------------------------------------- images


def source_name(source: ImageInput, index: int) -> str:
    """How messages name an input: its path, or its type and position."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"input {index} ({type(source).__module__.split('.')[0]}.{type(source).__name__})"


def _source_size(source: ImageInput, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) of an input without decoding it (header only for files).

    Raises:
        TypeError: not an accepted input (type, dtype or shape). ImageReadError: a bad file.
    """
    if isinstance(source, (str, Path)):
        return image_size(source, max_pixels)
    if isinstance(source, Image.Image):
        return source.size
    if isinstance(source, np.ndarray):
        if source.dtype == np.uint8 and (
            source.ndim == 2 or (source.ndim == 3 and source.shape[2] == 3)
        ):
            return int(source.shape[1]), int(source.shape[0])
        raise TypeError(
            f"numpy images must be uint8 [H, W, 3] (or [H, W] grey), got {source.dtype} "
            f"{list(source.shape)}; accepted inputs: {ACCEPTED}"
        )
    if isinstance(source, Tensor):
        if source.dim() == 3 and source.shape[0] == 3 and source.dtype == torch.uint8:
            return int(source.shape[2]), int(source.shape[1])
        raise TypeError(
            f"image tensors must be uint8 [3, H, W], got {source.dtype} {list(source.shape)}; "
            f"accepted inputs: {ACCEPTED}"
        )
    raise TypeError(f"image inputs must be {ACCEPTED}; got {type(source).__name__}")


def load_image(
    source: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, bgr: bool = False
) -> Tensor:
    """Any accepted input -> uint8 RGB [3, H, W] (files decoded as MMDetection does).

    Args:
        source: see `ACCEPTED`. Arrays and tensors are RGB unless `bgr`.
        max_pixels: limit for files (checked from the header before decoding).
        bgr: numpy arrays and tensors hold BGR (OpenCV's order), not RGB.

    Raises:
        TypeError: not an accepted input (type, dtype or shape; the message lists them).
        ImageReadError: a file that cannot be used.
    """
    if isinstance(source, (str, Path)):
        return read_image(source, max_pixels)
    _source_size(source, None)  # type, dtype and shape checks
    if isinstance(source, Image.Image):
        return torch.from_numpy(pil_to_rgb(source)).permute(2, 0, 1).contiguous()
    if isinstance(source, np.ndarray):
        if source.ndim == 2:
            source = source[..., None].repeat(3, axis=2)
        image = torch.from_numpy(np.ascontiguousarray(source)).permute(2, 0, 1)
    else:
        image = source.detach().cpu()
    return (image.flip(0) if bgr else image).contiguous()


def input_size(
    width: int, height: int, cfg: ModelConfig, fixed_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(H, W) of the padded network input of a width x height image (batching key)."""
    if fixed_size is not None:
        return tuple(fixed_size)
    new_w, new_h = rescale_size(width, height, cfg.input_scale)
    return padded_size(new_h, new_w, cfg.size_divisor)


def preprocess(
    image: Tensor,
    cfg: ModelConfig,
    name: str = "image",
    fixed_size: tuple[int, int] | None = None,
) -> tuple[Tensor, ImageMeta]:
    """uint8 RGB [3, H, W] -> (normalised float32 [3, h, w], not padded; its `ImageMeta`).

    Keep-ratio resize to `cfg.input_scale` (OpenCV's bytes), then (x - mean) / std. With
    `fixed_size` (H, W) (a fixed-size ONNX graph), an image whose resize would not fit is
    resized to fit inside instead.

    Raises:
        ImageReadError: the resize would leave a side of 0 pixels (names `name`).
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    check_resizable(w, h, cfg.input_scale, name)
    new_w, new_h = rescale_size(w, h, cfg.input_scale)
    if fixed_size is not None and (new_h > fixed_size[0] or new_w > fixed_size[1]):
        f = min(fixed_size[1] / w, fixed_size[0] / h)
        new_w, new_h = min(int(w * f + 0.5), fixed_size[1]), min(int(h * f + 0.5), fixed_size[0])
        if new_w < 1 or new_h < 1:
            raise ImageReadError(f"{name}: {w}x{h} image does not fit {fixed_size} (a side is 0)")
    meta = ImageMeta((h, w), (new_h, new_w), (new_w / w, new_h / h))
    return normalize(resize(image, (new_w, new_h)), cfg.mean, cfg.std), meta


def group_batches(keys: Sequence[Hashable | None], batch_size: int) -> list[list[int]]:
    """Indices grouped by key (the padded input size), in chunks of at most `batch_size`.

    Groups come in order of their first index, indices in input order; a None key (size not
    known) gets a batch of its own. With batch_size 1 this is the input order.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    return [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Prediction:
    """Detections of one input; boxes in original-image pixels."""

    index: int  # position in the inputs
    source: ImageInput
    name: str  # the path, or a description of an in-memory input
    image: Tensor  # uint8 RGB [3, H, W], the decoded input
    meta: ImageMeta
    boxes: Tensor  # [n, 4] xyxy float32
    scores: Tensor  # [n], descending
    labels: Tensor  # [n] int64


@dataclass
class Skipped:
    """An input that could not be used: `message` names it and says why."""

    index: int
    source: ImageInput
    message: str


class Pipeline:
    """The test-time pipeline around a detector (PyTorch model or exported graph).

    Args:
        cfg: the model's config (input_scale, mean/std, size_divisor, test settings).
        detect: runs the network and the post-processing on a padded batch (e.g.
            `FreeAnchor.detect`); gets (batch [N, 3, H, W], metas, score_thr).
        batch_size: images per network call (only images of one padded size share a call).
        max_pixels: refuse files with more pixels (from the header); None = no limit.
        bgr: numpy / tensor inputs are BGR.
        fixed_size: (H, W) every batch is padded to (a fixed-size graph), else per size.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        detect: DetectFn,
        batch_size: int = 1,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        bgr: bool = False,
        fixed_size: tuple[int, int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg, self.detect, self.batch_size = cfg, detect, batch_size
        self.max_pixels, self.bgr, self.fixed_size = max_pixels, bgr, fixed_size

    def _plan(self, sources: Sequence[ImageInput]) -> tuple[list, list[Skipped]]:
        keys, skipped = [], []
        for i, src in enumerate(sources):
            name = source_name(src, i)
            try:
                w, h = _source_size(src, self.max_pixels)
                check_resizable(w, h, self.cfg.input_scale, name)
                keys.append(input_size(w, h, self.cfg, self.fixed_size))
            except ImageReadError as e:
                skipped.append(Skipped(i, src, str(e)))
                keys.append(False)
        return keys, skipped

    def run(
        self, sources: Sequence[ImageInput], score_thr: float | None = None
    ) -> Iterator[Prediction | Skipped]:
        """Predict every input; yields `Skipped`s first, then `Prediction`s batch by batch.

        Raises:
            TypeError: an input of a type not accepted (the message lists the accepted ones).
        """
        sources = list(sources)
        keys, skipped = self._plan(sources)
        yield from skipped
        keep = [i for i, k in enumerate(keys) if k is not False]
        for batch in group_batches([keys[i] for i in keep], self.batch_size):
            yield from self._run_batch([keep[j] for j in batch], sources, score_thr)

    def _run_batch(
        self, indices: list[int], sources: list, score_thr: float | None
    ) -> Iterator[Prediction | Skipped]:
        items = []
        for i in indices:
            name = source_name(sources[i], i)
            try:
                image = load_image(sources[i], self.max_pixels, self.bgr)
                x, meta = preprocess(image, self.cfg, name, self.fixed_size)
            except ImageReadError as e:
                yield Skipped(i, sources[i], str(e))
                continue
            items.append((i, name, image, x, meta))
        # The header's size predicted the batch; regroup by the decoded size to be sure.
        shapes = [self.fixed_size or padded_size(*it[3].shape[-2:], self.cfg.size_divisor)
                  for it in items]  # fmt: skip
        for group in group_batches(shapes, self.batch_size):
            chosen = [items[j] for j in group]
            batch = pad_batch([it[3] for it in chosen], self.cfg.size_divisor, shapes[group[0]])
            dets = self.detect(batch, [it[4] for it in chosen], score_thr)
            for (i, name, image, _, meta), det in zip(chosen, dets, strict=True):
                yield Prediction(
                    i, sources[i], name, image, meta,
                    det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(),
                )  # fmt: skip
