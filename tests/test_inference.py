"""The test-time pipeline: inputs of every kind, batch independence, eval == predict, hostile
inputs, and the package without OpenCV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freeanchor.config import DataConfig, ModelConfig
from freeanchor.data.coco import ImageRecord
from freeanchor.data.loader import build_eval_loader
from freeanchor.errors import ImageReadError
from freeanchor.inference import (
    Pipeline,
    Prediction,
    Skipped,
    expand_sources,
    group_batches,
    load_image,
    preprocess,
)
from freeanchor.models.detector import FreeAnchor

ROOT = Path(__file__).resolve().parents[1]
SCALE = (160, 96)  # (long, short): portrait and landscape images get different padded sizes


def small_model(seed: int = 0) -> FreeAnchor:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", num_classes=4, classes=["a", "b", "c", "d"],
                      fpn_channels=32, feat_channels=32, stacked_convs=1, input_scale=SCALE,
                      frozen_stages=0, norm_eval=False, score_thr=0.05)  # fmt: skip
    model = FreeAnchor(cfg)
    torch.nn.init.normal_(model.head.retina_cls.weight, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> FreeAnchor:
    return small_model()


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (uint8 [h, w, 3]) with some structure to detect."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _same(a, b, atol: float = 1e-3) -> None:
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=atol)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- inputs


def test_every_input_kind_gives_the_file_detections(model, tmp_path):
    array = photo(150, 110, seed=1)
    path = tmp_path / "x.png"  # lossless: the file holds exactly `array`
    Image.fromarray(array).save(path)
    by_file, by_str, by_pil, by_rgb, by_bgr, by_tensor, by_grey_src = model.predict(
        [path, str(path), Image.open(path), array, np.ascontiguousarray(array[..., ::-1]),
         torch.from_numpy(array).permute(2, 0, 1).contiguous(), array[..., 0]],
        batch_size=3,
    )  # fmt: skip
    assert len(by_file) > 0 and by_file.path == str(path) and by_pil.path is None
    for other in (by_str, by_pil, by_rgb, by_tensor):
        _same(by_file, other)  # same input tensor; batch position moves floats by ~1e-5
    assert by_rgb.orig_shape == (110, 150) and by_rgb.image.shape == (3, 110, 150)
    # BGR arrays are read as RGB unless told: different detections; with bgr=True the same
    (flagged,) = model.predict(np.ascontiguousarray(array[..., ::-1]), bgr=True)
    _same(by_file, flagged)
    assert torch.equal(by_bgr.image, by_rgb.image.flip(0))
    # a grey [H, W] array is replicated to three channels, as a grey file is
    assert torch.equal(by_grey_src.image, torch.from_numpy(array[..., 0]).expand(3, -1, -1))


@pytest.mark.parametrize(
    "bad, what",
    [
        (42, "int"),
        ([[1, 2, 3]], "list"),
        (np.zeros((10, 10, 3), dtype=np.float32), "float32"),
        (np.zeros((10, 10, 4), dtype=np.uint8), r"\[10, 10, 4\]"),
        (torch.zeros(10, 10, 3, dtype=torch.uint8), r"\[10, 10, 3\]"),
        (torch.zeros(3, 10, 10), "torch.float32"),
    ],
)
def test_other_inputs_are_a_type_error_naming_the_accepted_ones(model, bad, what):
    with pytest.raises(TypeError, match=what) as info:
        model.predict([bad])
    assert "PIL.Image.Image" in str(info.value) and "numpy uint8" in str(info.value)


def test_folders_and_globs_expand_in_place(model, tmp_path):
    for i, (w, h) in enumerate([(120, 90), (90, 120), (100, 100)]):
        Image.fromarray(photo(w, h, seed=i)).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = model.predict(tmp_path)
    globbed = model.predict(str(tmp_path / "im*.png"))
    files = model.predict([tmp_path / f"im{i}.png" for i in range(3)])
    assert [r.path for r in folder] == [r.path for r in globbed] == [r.path for r in files]
    for a, b in zip(folder, files):
        _same(a, b)


# ----------------------------------------------------------------------------- batching


def test_group_batches():
    keys = ["L", "P", "L", None, "L", "P", None, "L"]
    assert group_batches(keys, 2) == [[0, 2], [4, 7], [1, 5], [3], [6]]
    assert group_batches(["a", "b", "c"], 1) == [[0], [1], [2]]


def test_batch_of_8_mixed_sizes_equals_batch_of_1(model):
    sizes = [(200, 120), (120, 200), (160, 160), (300, 100), (90, 150), (200, 120),
             (130, 210), (181, 97)]  # fmt: skip
    images = [photo(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]
    alone = [model.predict(im, batch_size=1)[0] for im in images]
    together = model.predict(images, batch_size=8)
    assert sum(len(r) for r in alone) > 0
    for a, b in zip(alone, together):
        _same(a, b)


def test_padding_for_a_neighbour_would_change_detections(model):
    """Why batches hold one padded size: padded to a landscape neighbour's size, a portrait
    image's detections change (so the batch test above can fail)."""
    x, meta = preprocess(torch.from_numpy(photo(120, 200, 3)).permute(2, 0, 1), model.cfg)
    own = torch.zeros(1, 3, 160, 96)
    big = torch.zeros(1, 3, 160, 160)
    own[0, :, : x.shape[1], : x.shape[2]] = x
    big[0, :, : x.shape[1], : x.shape[2]] = x
    (a,) = model.detect(own, [meta], score_thr=0.05)
    (b,) = model.detect(big, [meta], score_thr=0.05)
    differs = len(a["scores"]) != len(b["scores"]) or not torch.allclose(
        a["scores"], b["scores"], atol=1e-3
    )
    assert differs


def test_eval_and_predict_feed_identical_tensors(model, tmp_path, monkeypatch):
    sizes = [(150, 100), (100, 150), (150, 100), (120, 80)]
    records = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(photo(w, h, seed=20 + i)).save(path, quality=85)
        records.append(ImageRecord(i + 1, path.name, path, w, h, torch.zeros(0, 4),
                                   torch.zeros(0, dtype=torch.int64)))  # fmt: skip
    seen: dict[str, dict[int, torch.Tensor]] = {"eval": {}, "predict": {}}
    where = "eval"
    real_detect = model.detect

    def spy(batch, metas, rescale=True, score_thr=None):
        for x, key in zip(batch, current_ids):
            seen[where][key] = x.clone()
        return real_detect(batch, metas, rescale=rescale, score_thr=score_thr)

    monkeypatch.setattr(model, "detect", spy)
    loader = build_eval_loader(records, model.cfg, DataConfig(workers=0), batch_size=2)
    batches = []
    for batch in loader:
        current_ids = batch.image_ids
        batches.append(current_ids)
        model.detect(batch.images, batch.metas)
    assert batches == [[1, 3], [4], [2]]  # by padded size: 1, 3, 4 are 96 x 160, 2 is 160 x 96
    where = "predict"
    pipe = Pipeline(model.cfg, lambda b, m, t: model.detect(b, m, score_thr=t), batch_size=2)
    for rec in records:
        current_ids = [rec.image_id]
        (out,) = pipe.run([rec.path])
        assert isinstance(out, Prediction)
    assert seen["eval"].keys() == seen["predict"].keys() == {1, 2, 3, 4}
    for key in seen["eval"]:
        assert torch.equal(seen["eval"][key], seen["predict"][key]), key


# ----------------------------------------------------------------------------- hostile inputs


def test_tiny_and_extreme_images(model, tmp_path):
    Image.new("RGB", (1, 1), (120, 30, 200)).save(tmp_path / "dot.png")
    Image.new("RGB", (20000, 2), (9, 9, 9)).save(tmp_path / "line.png")
    (dot,) = model.predict(tmp_path / "dot.png")
    assert dot.orig_shape == (1, 1)
    assert (dot.boxes[:, 2:] <= 1 + 1e-4).all()  # boxes in the 1 x 1 image
    with pytest.raises(ImageReadError, match=r"line.png: 20000x2 image: its short side rounds"):
        model.predict(tmp_path / "line.png")
    with pytest.warns(UserWarning, match="line.png"):
        kept = model.predict([tmp_path / "line.png", tmp_path / "dot.png"], skip_unreadable=True)
    assert [r.path for r in kept] == [str(tmp_path / "dot.png")]


def test_pipeline_reports_each_bad_input_and_predicts_the_rest(model, tmp_path):
    Image.fromarray(photo(100, 80, 1)).save(tmp_path / "good.png")
    (tmp_path / "text.jpg").write_text("hello")
    outs = list(
        Pipeline(model.cfg, model.detect, batch_size=4).run(
            [tmp_path / "text.jpg", tmp_path / "good.png", np.zeros((4, 5, 3), np.uint8)]
        )
    )
    skipped = [o for o in outs if isinstance(o, Skipped)]
    done = sorted(o.index for o in outs if isinstance(o, Prediction))
    assert [s.index for s in skipped] == [0] and "text.jpg: not an image" in skipped[0].message
    assert done == [1, 2]


def test_sources_each_file_once_and_symlink_loops_kept(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "real.png")
    os.symlink("real.png", tmp_path / "alias.png")
    os.symlink("loop.png", tmp_path / "loop.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    os.symlink("..", sub / "up")  # a folder loop: globs must not run away
    found = expand_sources([str(tmp_path), str(tmp_path / "real.png"), str(tmp_path / "**/*.png")])
    names = sorted(p.name for p in found)
    assert names.count("real.png") + names.count("alias.png") == 1  # one file, once
    assert "loop.png" in names  # kept, reported when read
    with pytest.raises(ImageReadError, match="symlink loop"):
        load_image(tmp_path / "loop.png")


# ----------------------------------------------------------------------------- without OpenCV

NO_CV2 = r"""
import sys, json, warnings
sys.modules["cv2"] = None  # `import cv2` now fails: the package must still work
import torch
from tests.test_inference import small_model
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    results = small_model().predict(sys.argv[1:], batch_size=2)
notes = [str(w.message) for w in caught if "OpenCV" in str(w.message)]
print(json.dumps({"notes": notes, "results": [
    {"boxes": r.boxes.tolist(), "scores": r.scores.tolist(), "labels": r.labels.tolist()}
    for r in results]}))
"""


def test_without_opencv_same_detections_and_one_note(model, tmp_path):
    paths = []
    for i, (w, h) in enumerate([(150, 100), (100, 150), (333, 500)]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(photo(w, h, 30 + i)).save(paths[-1], quality=90)
    proc = subprocess.run(
        [sys.executable, "-c", NO_CV2, *map(str, paths)], capture_output=True, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["notes"]) == 1 and "Pillow" in out["notes"][0]
    for ref, got in zip(model.predict(paths, batch_size=2), out["results"], strict=True):
        assert ref.labels.tolist() == got["labels"]
        torch.testing.assert_close(ref.boxes, torch.tensor(got["boxes"]).reshape(-1, 4))
