"""`freeanchor data check` on a dataset with known problems; anchor coverage; `data convert`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from freeanchor.cli import main
from freeanchor.config import preset
from freeanchor.data.coco import load_coco
from freeanchor.data.datasets import load_dataset
from freeanchor.data.records import make_record
from freeanchor.models.anchors import AnchorGenerator
from freeanchor.tools.anchor_coverage import anchor_coverage, best_anchor_iou
from freeanchor.viz import class_color

from .test_voc import make_voc
from .test_yolo import make_yolo

REPO = Path(__file__).resolve().parents[2]


def _ann(aid, image_id, cat, x1, y1, x2, y2):
    return {"id": aid, "image_id": image_id, "category_id": cat, "iscrowd": 0,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}  # fmt: skip


@pytest.fixture
def problems(tmp_path):
    """A COCO dataset with one of each problem the check must report."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "d"):
        arr = rng.integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"{name}.png")
    (images / "c.png").write_bytes((images / "a.png").read_bytes())  # duplicate image
    doc = {
        "images": [{"id": i + 1, "file_name": f"{n}.png", "width": 200, "height": 150}
                   for i, n in enumerate("abcd")],
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "unused"},
                       {"id": 3, "name": "other"}],
        "annotations": [
            _ann(1, 1, 1, 20, 20, 80, 90),
            _ann(2, 1, 1, 21, 20, 80, 90),  # duplicate box (IoU 0.98)
            _ann(3, 1, 1, 100, 100, 103, 103),  # tiny box
            _ann(4, 1, 1, 150, 100, 230, 140),  # reaches outside (x2 230 > 200)
            _ann(5, 3, 1, 10, 10, 60, 60),
            _ann(6, 4, 1, 300, 10, 320, 30),  # entirely outside: skipped by the reader
            _ann(7, 4, 3, 40, 40, 120, 140),
        ],  # b.png (id 2) has no annotations; class "unused" has no boxes
    }  # fmt: skip
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    return ann, images


def _check(capsys, *args):
    assert main(["data", "check", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_check_reports_each_known_problem(problems, capsys, tmp_path):
    ann, images = problems
    report = json.loads(_check(capsys, ann, "--images", images, "--json"))
    classes = {c["name"]: (c["boxes"], c["images"]) for c in report["classes"]}
    assert classes == {"thing": (5, 2), "unused": (0, 0), "other": (1, 1)}
    assert report["classes_without_boxes"] == ["unused"]
    assert report["images_without_labels"] == {"count": 1, "examples": ["b.png"]}
    assert report["duplicate_images"] == {"count": 1, "groups": [["a.png", "c.png"]]}
    dup = report["duplicate_boxes"]
    assert dup["count"] == 1 and dup["examples"][0]["file"] == "a.png"
    assert dup["examples"][0]["boxes"] == [1, 2]
    out = report["boxes_outside"]
    assert out["count"] == 1 and (out["examples"][0]["file"], out["examples"][0]["box"]) == (
        "a.png", 4)  # fmt: skip
    tiny = report["tiny_boxes"]
    assert tiny["count"] == 1 and tiny["examples"][0]["xyxy"] == [100, 100, 103, 103]
    assert report["skipped"] == {"ann_outside_image": 1}
    sizes = report["box_sizes"]
    assert sum(b["boxes"] for b in sizes["bins"]) == sum(sizes["coco"].values()) == 6
    assert sizes["bins"][0] == {"range": "0-8", "boxes": 1} and sizes["coco"]["small"] == 1
    assert report["anchor_coverage"]["boxes"] == 6
    # The text report says the same.
    text = _check(capsys, ann, "--images", images)
    for line in ("classes without boxes: unused", "images without labels: 1  e.g. b.png",
                 "duplicate images (same content): 1  e.g. a.png = c.png",
                 "duplicate boxes (same class, IoU >= 0.95): 1  e.g. a.png boxes [1, 2]",
                 "boxes reaching outside their image: 1  e.g. a.png box 4",
                 "tiny boxes (shorter side < 4 px): 1  e.g. a.png box 3",
                 "skipped (ann_outside_image): 1  e.g. annotation id 6",
                 "anchor coverage at input 1333x800"):  # fmt: skip
        assert line in text, line


def test_show_draws_problem_images_first(problems, capsys, tmp_path):
    ann, images = problems
    out = tmp_path / "check"
    text = _check(capsys, ann, "--images", images, "--show", 2, "--out", out)
    assert "2 drawn images" in text
    assert sorted(p.name for p in out.glob("*.png")) == ["000001_a.png", "000003_c.png"]
    assert json.loads((out / "report.json").read_text())["images"] == 4
    drawn = np.asarray(Image.open(out / "000003_c.png"))
    source = np.asarray(Image.open(images / "c.png"))
    assert drawn.shape == source.shape
    assert tuple(drawn[30, 10]) == class_color(0)  # left edge of the box (10, 10, 60, 60)
    assert (drawn[100:140, 100:140] == source[100:140, 100:140]).all()  # away from boxes


def test_best_anchor_iou_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    gen = AnchorGenerator()
    for h, w in ((320, 480), (96, 64), (800, 1344)):
        xy = torch.rand(300, 2, generator=g) * torch.tensor([w, h])
        wh = torch.exp(torch.rand(300, 2, generator=g) * math.log(600)) + 1
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h]))
        boxes = boxes[(boxes[:, 2:] > boxes[:, :2]).all(1)]
        grid = gen([(math.ceil(h / s), math.ceil(w / s)) for s in gen.strides])
        expected = box_iou(boxes, grid).max(dim=1).values
        torch.testing.assert_close(best_anchor_iou(boxes, (h, w), gen), expected)


def _records(box_wh, n=20, size=(1333, 800)):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        xy = torch.rand(2, generator=g) * torch.tensor([size[0] - box_wh[0], size[1] - box_wh[1]])
        box = [[*xy.tolist(), float(xy[0]) + box_wh[0], float(xy[1]) + box_wh[1]]]
        out.append(make_record(i + 1, f"{i}.jpg", Path(f"{i}.jpg"), *size, box, [0]))
    return out


def test_coverage_of_small_boxes_and_the_hint():
    cfg = preset("freeanchor_r50_fpn_1x_coco")
    small = anchor_coverage(_records((10, 10)), cfg)
    assert small["share_under"] == 1.0 and small["boxes"] == 20  # 10 px vs 32 px anchors
    assert "smaller than the smallest anchor (32 px" in small["hint"]
    assert "--set model.octave_base_scale=1.2" in small["hint"]
    cfg.octave_base_scale = 1.2
    fitted = anchor_coverage(_records((10, 10)), cfg)
    assert fitted["share_under"] < 0.8 and fitted["mean_best_iou"] > small["mean_best_iou"]
    good = anchor_coverage(_records((100, 100)), preset("freeanchor_r50_fpn_1x_coco"))
    assert good["share_under"] == 0.0 and good["hint"] == ""


def test_coverage_of_elongated_boxes_and_the_hint():
    cfg = preset("freeanchor_r50_fpn_1x_coco")
    long = anchor_coverage(_records((20, 240)), cfg)  # h/w 12
    assert long["share_under"] > 0.9 and "far from the anchor ratios" in long["hint"]
    assert "--set model.ratios=0.5,1,2,12" in long["hint"]


def test_check_with_set_changes_the_anchors(problems, capsys):
    ann, images = problems
    base = json.loads(_check(capsys, ann, "--images", images, "--json", "--no-hash"))
    moved = json.loads(_check(capsys, ann, "--images", images, "--json", "--no-hash",
                              "--set", "model.octave_base_scale=2"))  # fmt: skip
    assert base["anchor_coverage"]["anchors"]["sizes_px"][0] == 32
    assert moved["anchor_coverage"]["anchors"]["sizes_px"][0] == 16
    assert base["duplicate_images"]["count"] == 0  # --no-hash: not searched


def test_convert_yolo_to_coco_and_back(tmp_path, capsys):
    yaml = make_yolo(tmp_path / "ds")
    out = tmp_path / "train.json"
    assert main(["data", "convert", str(yaml), "--out", str(out)]) == 0
    root = tmp_path / "ds" / "images" / "train"
    assert f"relative to {root}" in capsys.readouterr().out
    yolo = load_dataset(yaml, train=False)
    coco = load_coco(out, root, train=False)
    assert coco.class_names == yolo.class_names and coco.cat_ids == yolo.cat_ids
    for a, b in zip(yolo.records, coco.records):
        assert (a.image_id, a.path, a.width, a.height) == (b.image_id, b.path, b.width, b.height)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    # never over an existing file without --force, never over the source
    assert main(["data", "convert", str(yaml), "--out", str(out)]) == 2
    assert "without --force" in capsys.readouterr().err
    assert main(["data", "convert", str(yaml), "--out", str(out), "--force"]) == 0
    assert main(["data", "convert", str(out), "--images", str(root), "--out", str(out),
                 "--force"]) == 2  # fmt: skip


def test_convert_voc_keeps_difficult_as_crowd(tmp_path, capsys):
    make_voc(tmp_path / "voc")
    out = tmp_path / "voc.json"
    assert main(["data", "convert", str(tmp_path / "voc"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert sorted(a["iscrowd"] for a in doc["annotations"]) == [0, 0, 1]
    assert "2 boxes + 1 ignored (iscrowd=1)" in capsys.readouterr().out


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "freeanchor", "data", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_exit_codes(problems, tmp_path, capsys):
    ann, images = problems
    ok = _run("check", ann, "--images", images, "--json", "--no-hash")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["images"] == 4
    bad = _run("check", tmp_path / "nothing_here")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("nothing_here: dataset not found")
    for args, needle in (
        (("check", ann), "needs its image folder"),
        (("check", ann, "--images", images, "--show", "2"), "--show needs --out"),
        (("check", ann, "--images", images, "--set", "train.lr=1"), "only uses model.*"),
        (("convert", ann, "--images", images, "--out", tmp_path / "x.txt"), "must end in .json"),
        (("check", ann, "--images", images, "--split", "bogus"), "unknown split 'bogus'"),
    ):
        assert main(["data", *map(str, args)]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
