"""`freeanchor predict`: COCO results JSON, unreadable images, drawn images, sources."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from freeanchor.cli import main
from freeanchor.config import ModelConfig
from freeanchor.data.synthetic import CLASSES, make_dataset
from freeanchor.models.detector import FreeAnchor
from freeanchor.models.weights import save_model
from freeanchor.predict import COCO_CAT_IDS, category_ids, expand_sources

CAT_IDS = [3, 8, 9, 20, 41]  # deliberately not 1..5: predictions must use the dataset's ids


def tiny_model(seed: int = 0) -> FreeAnchor:
    """A light random detector whose class scores are spread out (no near-ties)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        backbone="resnet18", num_classes=len(CLASSES), classes=list(CLASSES),
        fpn_channels=32, feat_channels=32, stacked_convs=1, input_scale=(96, 96),
        frozen_stages=0, norm_eval=False,
    )  # fmt: skip
    model = FreeAnchor(cfg)
    torch.nn.init.normal_(model.head.retina_cls.weight, std=0.3)
    model.extra = {"cat_ids": CAT_IDS}
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root / "data", num_train=1, num_val=5, image_size=96, seed=3)
    # Ground truth with our category ids, for COCO.loadRes.
    gt = json.loads(data.val_ann.read_text())
    remap = dict(zip(range(1, 6), CAT_IDS))
    for a in gt["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    for c in gt["categories"]:
        c["id"] = remap[c["id"]]
    gt_path = root / "gt.json"
    gt_path.write_text(json.dumps(gt))
    (data.val_images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    weights = save_model(tiny_model(), root / "tiny.safetensors")
    return root, data, gt_path, weights


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_corrupt_image_is_reported_and_others_predicted(setup, capsys, tmp_path):
    root, data, gt_path, weights = setup
    code, out, err = _run(
        capsys, "predict", "--weights", str(weights), str(data.val_images),
        "--out", str(tmp_path), "--score-thr", "0.05", "--batch-size", "2", "--ann", str(gt_path),
    )  # fmt: skip
    assert code == 0
    bad_lines = [line for line in err.splitlines() if "broken.png" in line]
    assert len(bad_lines) == 1 and "unreadable" in bad_lines[0]
    assert "1 of 6 images were unreadable" in out
    index = json.loads((tmp_path / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in index["images"]] == [
        f"val_{i:06d}.png" for i in range(5)
    ]
    assert [u["file_name"] for u in index["unreadable"]] == [str(data.val_images / "broken.png")]
    gt = json.loads(gt_path.read_text())
    assert {i["file_name"]: i["id"] for i in gt["images"]} == {
        Path(i["file_name"]).name: i["id"] for i in index["images"]
    }
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert preds and {p["image_id"] for p in preds} <= {i["id"] for i in gt["images"]}
    assert {p["category_id"] for p in preds} <= set(CAT_IDS)
    assert all(p["category_name"] == CLASSES[CAT_IDS.index(p["category_id"])] for p in preds)
    assert all(p["score"] > 0.05 for p in preds)
    per_image = {i["id"]: i["detections"] for i in index["images"]}
    assert sum(per_image.values()) == len(preds)
    # The file is a valid COCO results file for the matching ground truth.
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        res = coco.loadRes(str(tmp_path / "predictions.json"))
    assert len(res.getAnnIds()) == len(preds)
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.json", "predictions.json"]


def test_detections_match_the_python_api(setup, capsys, tmp_path):
    _, data, _, weights = setup
    image = data.val_images / "val_000002.png"
    code, _, _ = _run(capsys, "predict", "--weights", str(weights), str(image),
                      "--out", str(tmp_path), "--score-thr", "0.05")  # fmt: skip
    assert code == 0
    preds = json.loads((tmp_path / "predictions.json").read_text())
    (expected,) = tiny_model().predict([image], score_thr=0.05)
    assert len(preds) == len(expected) > 0
    assert all(p["image_id"] == 1 for p in preds)
    for p, box, score, label in zip(preds, expected.boxes, expected.scores, expected.labels):
        x1, y1, x2, y2 = box.tolist()
        np.testing.assert_allclose(p["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=0.006)
        assert p["score"] == pytest.approx(float(score), abs=6e-6)
        assert p["category_id"] == CAT_IDS[int(label)]


def test_save_draws_the_boxes_where_the_json_says(setup, capsys, tmp_path):
    _, data, _, weights = setup
    image = data.val_images / "val_000001.png"
    # A threshold that keeps the 3 best detections of this image.
    (all_dets,) = tiny_model().predict([image], score_thr=0.0)
    scores = all_dets.scores.tolist()
    thr = (scores[2] + scores[3]) / 2
    code, out, _ = _run(capsys, "predict", "--weights", str(weights), str(image),
                        "--out", str(tmp_path), "--score-thr", str(thr), "--save")  # fmt: skip
    assert code == 0
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert len(preds) == 3
    drawn = np.asarray(Image.open(tmp_path / "images" / "val_000001.png").convert("RGB"))
    plain = np.asarray(Image.open(image).convert("RGB"))
    assert drawn.shape == plain.shape
    changed = (drawn != plain).any(axis=-1)
    h, w = changed.shape

    def drawn_line(rows: slice | int, cols: slice | int) -> float:
        return float(changed[rows, cols].mean())

    for p in preds:
        x, y, bw, bh = p["bbox"]
        x1, y1, x2, y2 = (int(round(v)) for v in (x, y, x + bw, y + bh))
        # Each edge of the box is a drawn line (within a pixel of where the JSON puts it).
        near = [-1, 0, 1]
        assert max(drawn_line(slice(y1, y2), min(x1 + d, w - 1)) for d in near) > 0.9, p
        assert max(drawn_line(slice(y1, y2), min(x2 + d, w - 1)) for d in near) > 0.9, p
        assert max(drawn_line(min(y1 + d, h - 1), slice(x1, x2)) for d in near) > 0.9, p
        assert max(drawn_line(min(y2 + d, h - 1), slice(x1, x2)) for d in near) > 0.9, p
    # Far from every box (and its label above it) the image is untouched.
    near = np.zeros_like(changed)
    for p in preds:
        x, y, bw, bh = p["bbox"]
        near[max(int(y) - 16, 0) : int(y + bh) + 3, max(int(x) - 3, 0) : int(x + bw) + 40] = True
    if (~near).any():
        assert not changed[~near].any()


def test_sources_files_folders_globs(setup, tmp_path):
    _, data, _, _ = setup
    folder = data.val_images
    by_folder = expand_sources([str(folder)])
    assert [p.name for p in by_folder] == ["broken.png"] + [f"val_{i:06d}.png" for i in range(5)]
    by_glob = expand_sources([str(folder / "val_00000[13].png"), str(folder / "val_000001.png")])
    assert [p.name for p in by_glob] == ["val_000001.png", "val_000003.png"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        expand_sources([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        expand_sources([str(tmp_path / "missing.jpg")])


def test_cli_errors_are_one_line(setup, capsys, tmp_path):
    _, data, _, weights = setup
    code, _, err = _run(capsys, "predict", "--weights", str(weights), str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope" in err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"")
    code, _, err = _run(capsys, "predict", "--weights", str(weights), str(only_bad),
                        "--out", str(tmp_path / "o2"))  # fmt: skip
    assert code == 2 and "none of the 1 images could be read" in err


def test_category_id_fallbacks():
    cfg = ModelConfig(backbone="resnet18", num_classes=80)
    assert category_ids(cfg, {}) == list(COCO_CAT_IDS)
    assert len(COCO_CAT_IDS) == 80 and COCO_CAT_IDS[-1] == 90 and 12 not in COCO_CAT_IDS
    three = ModelConfig(backbone="resnet18", num_classes=3)
    assert category_ids(three, {}) == [1, 2, 3]
    assert category_ids(three, {"cat_ids": [5, 6, 9]}) == [5, 6, 9]


def test_hostile_images_are_skipped_one_line_each_and_the_rest_predicted(setup, tmp_path):
    """Bomb, extreme aspect, text named .jpg, FIFO, symlink loop: one line each, counted;
    1x1 and animated GIF predicted; an alias predicted once; same file names both drawn."""
    import os
    import subprocess
    import sys

    from tests.data.test_io import write_png_bomb

    _, data, _, weights = setup
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    good = Image.open(data.val_images / "val_000001.png")
    good.save(a / "same.png")
    Image.open(data.val_images / "val_000002.png").save(b / "same.png")  # same name, other image
    good.convert("RGB").save(a / "photo.jpg", quality=90)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(a / "dot.png")
    frames = [good.convert("RGB"), Image.new("RGB", good.size, (0, 0, 0))]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:], duration=40)
    write_png_bomb(a / "bomb.png")
    Image.new("L", (20000, 2)).save(a / "line.png")
    (a / "text.jpg").write_text("not a picture")
    os.mkfifo(a / "fifo.jpg")
    os.symlink("loop.jpg", a / "loop.jpg")
    os.symlink("same.png", a / "alias.png")
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "freeanchor", "predict", "--weights", str(weights), str(a), str(b),
         "--out", str(out), "--save", "--score-thr", "0.05", "--batch-size", "4"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reasons = {
        "bomb.png": "900,000,000 pixels, more than the limit",
        "line.png": "short side rounds to 0",
        "text.jpg": "not an image",
        "fifo.jpg": "FIFO",
        "loop.jpg": "symlink loop",
    }
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped")]
    assert len(lines) == len(reasons), proc.stderr
    for name, reason in reasons.items():
        (line,) = [ln for ln in lines if f"{a / name}:" in ln]
        assert reason in line
    assert "5 of 10 images were unreadable and skipped" in proc.stdout
    index = json.loads((out / "images.json").read_text())
    predicted = sorted(
        Path(i["file_name"]).relative_to(tmp_path).as_posix() for i in index["images"]
    )
    assert predicted == ["a/anim.gif", "a/dot.png", "a/photo.jpg", "a/same.png", "b/same.png"]
    assert sorted(u["file_name"] for u in index["unreadable"]) == sorted(
        str(a / n) for n in reasons
    )
    assert len({i["id"] for i in index["images"]}) == 5
    drawn = sorted(p.name for p in (out / "images").iterdir())
    assert len(drawn) == 5 and "same.png" in drawn and any(n.startswith("same_") for n in drawn)
    dot = next(i for i in index["images"] if i["file_name"].endswith("dot.png"))
    assert (dot["width"], dot["height"]) == (1, 1)


def test_imgsz_sets_the_resize_of_predict(setup, capsys, tmp_path):
    """`--imgsz 64` gives the detections of the model whose input_scale is (64, 64), not the
    checkpoint's (96, 96)."""
    import dataclasses

    _, data, _, weights = setup
    image = data.val_images / "val_000002.png"
    code, _, _ = _run(capsys, "predict", "--weights", str(weights), str(image), "--out",
                      str(tmp_path), "--score-thr", "0.05", "--imgsz", "64")  # fmt: skip
    assert code == 0
    preds = json.loads((tmp_path / "predictions.json").read_text())
    model = tiny_model()
    (at_96,) = model.predict([image], score_thr=0.05)
    model.cfg = dataclasses.replace(model.cfg, input_scale=(64, 64))
    (at_64,) = model.predict([image], score_thr=0.05)
    assert len(preds) == len(at_64) > 0
    assert [p["score"] for p in preds] == pytest.approx(at_64.scores.tolist(), abs=6e-6)
    assert [p["score"] for p in preds][:3] != pytest.approx(at_96.scores.tolist()[:3], abs=6e-6)
