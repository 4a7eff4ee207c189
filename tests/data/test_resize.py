"""The resize: bit for bit OpenCV's INTER_LINEAR, with and without OpenCV; the golden input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from freeanchor.config import ModelConfig
from freeanchor.data.io import read_image
from freeanchor.data.resize import resize, resize_linear_exact
from freeanchor.data.transforms import pad_batch, resize_keep_ratio
from freeanchor.inference import preprocess
from tests.conftest import COCO128, GOLDEN, need

cv2 = pytest.importorskip("cv2", reason="OpenCV is the reference these tests compare with")
PHOTO = COCO128 / "images" / "000000000009.jpg"


def _ref(img: np.ndarray, w: int, h: int) -> np.ndarray:
    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return out[..., None] if out.ndim == 2 else out


def _ours(img: np.ndarray, w: int, h: int) -> np.ndarray:
    chw = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()
    return resize_linear_exact(chw, (w, h)).permute(1, 2, 0).numpy()


def _cases() -> list[tuple[int, int, int, int]]:
    rnd = random.Random(0)
    cases = [(rnd.randint(1, 60), rnd.randint(1, 60), rnd.randint(1, 90), rnd.randint(1, 90))
             for _ in range(250)]  # fmt: skip
    cases += [  # (h, w, new_h, new_w)
        (480, 640, 800, 1067), (333, 500, 800, 1201), (480, 640, 320, 427),  # real scales
        (1, 1, 800, 800), (1, 1, 1, 5), (1, 7, 3, 1), (2, 200, 1, 133), (50, 1, 800, 16),
        (64, 64, 32, 32), (40, 90, 20, 45), (65, 64, 32, 32), (64, 66, 32, 33),  # 2x / not
        (17, 9, 17, 3), (9, 17, 3, 17), (3, 3, 300, 300), (301, 7, 2, 2),
    ]  # fmt: skip
    return cases


def test_torch_resize_equals_cv2_bitwise_on_random_sizes():
    rng = np.random.default_rng(0)
    bad = []
    for i, (h, w, nh, nw) in enumerate(_cases()):
        channels = 3 if i % 4 else 1
        img = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        if i % 3 == 0 and min(h, w) > 3:  # smooth images too (real photos are smooth)
            img = cv2.GaussianBlur(img, (0, 0), 1.5).reshape(h, w, channels)
        if not np.array_equal(_ours(img, nw, nh), _ref(img, nw, nh)):
            bad.append((h, w, nh, nw, channels))
    assert not bad, f"differs from cv2.resize for (h, w, new_h, new_w, c) = {bad[:10]}"


def test_torch_resize_equals_cv2_on_photos_at_detector_scales():
    paths = sorted(need(COCO128 / "images").glob("*.jpg"))[:6]
    for path in paths:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        for long_edge, short_edge in ((1333, 800), (512, 320), (1000, 600)):
            f = min(long_edge / max(h, w), short_edge / min(h, w))
            nw, nh = int(w * f + 0.5), int(h * f + 0.5)
            assert np.array_equal(_ours(img, nw, nh), _ref(img, nw, nh)), (path.name, nw, nh)


def test_resize_dispatch_and_identity():
    img = torch.randint(0, 256, (3, 11, 13), dtype=torch.uint8, generator=torch.Generator())
    assert resize(img, (13, 11)) is img  # same size: the image itself, as MMDetection
    assert torch.equal(resize(img, (29, 5)), resize_linear_exact(img, (29, 5)))
    with pytest.raises(ValueError, match=">= 1"):
        resize(img, (0, 5))


@pytest.mark.parametrize("impl", ["cv2", "torch"])
def test_golden_pipeline_img_bit_for_bit(impl, monkeypatch):
    """MMDetection's resized image (mmcv 2.1 / OpenCV 4.10) from the JPEG, exactly."""
    ref = torch.load(need(GOLDEN / "model" / "r50_reference.pt"), weights_only=True)
    if impl == "torch":  # the path taken when OpenCV is not installed
        monkeypatch.setattr("freeanchor.data.resize.cv2", None)
    image = read_image(need(PHOTO))
    resized, meta = resize_keep_ratio(image, (512, 320))
    assert meta.img_shape == tuple(ref["img_meta"]["img_shape"])
    assert meta.scale_factor == tuple(ref["img_meta"]["scale_factor"])
    assert torch.equal(resized.flip(0), ref["pipeline_img"])  # RGB -> BGR


def test_golden_network_input_bit_for_bit():
    """The normalised, padded tensor MMDetection fed the backbone, from the JPEG."""
    ref = torch.load(need(GOLDEN / "model" / "r50_reference.pt"), weights_only=True)
    cfg = ModelConfig(input_scale=(512, 320))
    x, meta = preprocess(read_image(need(PHOTO)), cfg)
    batch = pad_batch([x], cfg.size_divisor)
    assert batch.shape == ref["inputs"].shape
    assert torch.equal(batch, ref["inputs"])
