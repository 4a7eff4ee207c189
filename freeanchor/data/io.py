"""Image decoding as MMDetection's `LoadImageFromFile`: OpenCV's `imdecode(IMREAD_COLOR)`.

That means: EXIF orientation applied, grey replicated to three channels, alpha dropped (not
composited), 16-bit samples reduced to their high byte, the first frame of an animation. With
OpenCV absent, Pillow decodes with the same rules (identical bytes on all 128 coco128 photos; see
the README), and a one-time note says so.

Untrusted files are data: the file is checked before any pixel is decoded. A path that is not a
regular file (a FIFO, a device, a socket) is refused without being opened (opening a FIFO
blocks); the header is read first and an image of more than `max_pixels` pixels (default
Pillow's decompression-bomb limit) is refused, so a 30000 x 30000 PNG of a few hundred KB costs
a header read, not gigabytes.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from freeanchor.data.resize import cv2
from freeanchor.errors import ImageReadError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "ImageReadError", "read_image", "image_size"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3
# What OpenCV decodes as MMDetection does; anything else Pillow identifies is decoded by Pillow.
_CV2_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "JPEG2000"}
_PIL_LOCK = threading.Lock()
_noted = False

NO_OPENCV_NOTE = (
    "freeanchor: OpenCV (opencv-python-headless) is not installed; images are decoded with "
    "Pillow and resized with freeanchor's bit-exact copy of cv2.resize. Pillow decodes JPEG "
    "and PNG as OpenCV does (all 128 coco128 photos identical), but other libjpeg builds or "
    "truncated files may differ from MMDetection's input. `pip install opencv-python-headless` "
    "for the exact path."
)


def _note_no_opencv() -> None:
    global _noted
    if cv2 is None and not _noted:
        _noted = True
        warnings.warn(NO_OPENCV_NOTE, stacklevel=3)


def _open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file; never opens FIFOs, devices or sockets."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except OSError as e:
        reason = "symlink loop" if e.errno == errno.ELOOP else e.strerror
        raise ImageReadError(f"{path}: cannot read ({reason})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        if stat.S_ISFIFO(st.st_mode):
            kind = "a FIFO (named pipe), not a regular file"
        raise ImageReadError(f"{path}: {kind}")
    if st.st_size == 0:
        raise ImageReadError(f"{path}: empty (0-byte) image file")
    try:  # O_NONBLOCK: should the file have become a FIFO since the stat, opening won't hang
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageReadError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageReadError(f"{path}: not a regular file")
    return fd


def _open_pil(fp, path: Path) -> Image.Image:
    """Image.open (header only) without Pillow's own bomb check: we apply `max_pixels`."""
    with _PIL_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Image.open(fp)
        except UnidentifiedImageError:
            raise ImageReadError(f"{path}: not an image (unrecognised file format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"{path}: cannot read the image header ({e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: OpenCV ignores it too
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_pixels(path: Path, w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise ImageReadError(
            f"{path}: {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
            "(max_pixels; refused before decoding)"
        )


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A Pillow image (first frame) -> uint8 RGB [H, W, 3] with OpenCV's IMREAD_COLOR rules."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.uint16) >> 8  # OpenCV keeps the high byte
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return np.array(img.convert("RGB"), dtype=np.uint8)  # RGBA/LA/PA: alpha dropped


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W], as MMDetection decodes it.

    Args:
        path: the file.
        max_pixels: refuse images with more pixels than this (from the header, before
            decoding); None = no limit.

    Raises:
        ImageReadError: not a regular file, empty, too large, truncated or not an image; the
            message names the file and the reason.
    """
    path = Path(path)
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        img = _open_pil(f, path)
        w, h = img.size
        _check_pixels(path, w, h, max_pixels)
        fmt = img.format
        arr = None
        if cv2 is not None and fmt in _CV2_FORMATS:
            f.seek(0)
            data = np.frombuffer(f.read(), dtype=np.uint8)
            try:
                bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
            except cv2.error:
                bgr = None
            if bgr is not None:
                arr = bgr[..., ::-1]
        if arr is None:
            _note_no_opencv()
            try:
                f.seek(0)
                arr = pil_to_rgb(img)
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise ImageReadError(f"{path}: cannot decode image ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def image_size(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only; checks as `read_image`.

    Raises:
        ImageReadError: as `read_image`, for everything the header shows.
    """
    path = Path(path)
    with os.fdopen(_open_regular(path), "rb") as f:
        img = _open_pil(f, path)
        _check_pixels(path, *img.size, max_pixels)
        return _oriented_size(img)
