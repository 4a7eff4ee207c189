"""Decoding as MMDetection (OpenCV's IMREAD_COLOR), the Pillow fallback, and hostile files."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import freeanchor.data.io as io
from freeanchor.data.io import ImageReadError, image_size, pil_to_rgb, read_image
from freeanchor.errors import FreeAnchorError
from tests.conftest import COCO128

cv2 = io.cv2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A real 1-bit PNG of width x height zeros: ~110 kB on disk, 2.7 GB as RGB."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp, parts = zlib.compressobj(9), []
    for _ in range(height // 1000):
        parts.append(comp.compress(row * 1000))
    parts.append(comp.compress(row * (height % 1000)) + comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                     + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))  # fmt: skip
    return path


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fail the test if any pixel is decoded."""

    def refuse(*a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse)
    if cv2 is not None:
        monkeypatch.setattr(cv2, "imdecode", refuse)


def test_decompression_bomb_is_refused_from_the_header(tmp_path, no_decoding):
    bomb = write_png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 500_000
    with pytest.raises(ImageReadError, match=r"bomb.png: 30000x30000 = 900,000,000 pixels"):
        read_image(bomb)
    with pytest.raises(ImageReadError, match="more than the limit of 89,478,485"):
        image_size(bomb)


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 60), (10, 20, 30)).save(path)
    with pytest.raises(ImageReadError, match="6,000 pixels, more than the limit of 5,999"):
        read_image(path, max_pixels=5999)
    assert read_image(path, max_pixels=6000).shape == (3, 60, 100)
    assert read_image(path, max_pixels=None)[:, 0, 0].tolist() == [10, 20, 30]


def test_non_regular_files_are_never_opened(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    with pytest.raises(ImageReadError, match=r"pipe.jpg: a FIFO \(named pipe\), not a regular"):
        read_image(fifo)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image("/dev/null")
    with pytest.raises(ImageReadError, match="a folder"):
        read_image(tmp_path)
    assert opened == []


def test_bad_files_one_line_each(tmp_path):
    (tmp_path / "text.jpg").write_text("this is not a JPEG\n")
    (tmp_path / "empty.png").write_bytes(b"")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    cases = {
        "text.jpg": "not an image",
        "empty.png": "empty",
        "loop.jpg": "symlink loop",
        "absent.jpg": "not found",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(tmp_path / name)
        message = str(info.value)
        assert message.startswith(str(tmp_path / name)) and "\n" not in message
        assert isinstance(info.value, FreeAnchorError) and isinstance(info.value, ValueError)


def test_tiny_and_animated_images(tmp_path):
    Image.new("RGB", (1, 1), (7, 8, 9)).save(tmp_path / "one.png")
    assert read_image(tmp_path / "one.png").tolist() == [[[7]], [[8]], [[9]]]
    frames = [Image.new("RGB", (12, 10), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    out = read_image(tmp_path / "anim.gif")
    assert out.shape == (3, 10, 12)
    r, g, b = out[:, 5, 5].tolist()
    assert r > 150 and g < 50 and b < 50  # the first frame


def _mode_files(tmp: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (21, 34), dtype=np.uint8)
    img = Image.fromarray(rgb)
    img.convert("L").save(tmp / "grey.png")
    img.convert("L").save(tmp / "grey.jpg", quality=90)
    img.save(tmp / "colour.jpg", quality=90)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp / "rgba.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).save(tmp / "la.png")
    img.convert("P").save(tmp / "palette.png")
    img.convert("P").save(tmp / "palette_t.png", transparency=3)
    img.convert("1").save(tmp / "bits.png")
    Image.fromarray(rng.integers(0, 65536, (21, 34)).astype(np.uint16)).save(tmp / "grey16.png")
    for suffix in (".bmp", ".tif", ".webp"):
        img.save(tmp / f"colour{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp / "rotated.jpg", exif=exif.tobytes(), quality=90)
    return sorted(tmp.iterdir())


@pytest.mark.skipif(cv2 is None, reason="compares with OpenCV")
def test_decoding_equals_opencv_imread_color(tmp_path):
    for path in _mode_files(tmp_path):
        ref = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        ours = read_image(path).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, ref), path.name
        # the Pillow fallback gives the same bytes
        assert np.array_equal(pil_to_rgb(Image.open(path)), ref), path.name


@pytest.mark.skipif(cv2 is None, reason="compares with OpenCV")
def test_pillow_fallback_equals_opencv_on_coco128(monkeypatch):
    paths = sorted(COCO128.glob("images/*.jpg"))
    if not paths:
        pytest.skip(f"shared fixture not present: {COCO128}")
    with_cv2 = [read_image(p) for p in paths]
    monkeypatch.setattr(io, "cv2", None)
    monkeypatch.setattr(io, "_noted", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        without = [read_image(p) for p in paths]
    notes = [w for w in caught if "OpenCV" in str(w.message)]
    assert len(notes) == 1  # one note per process, not one per image
    same = sum(torch.equal(a, b) for a, b in zip(with_cv2, without))
    assert same == len(paths) == 128
