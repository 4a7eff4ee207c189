"""COCOEvaluator against pycocotools run directly, backend parity, hand-computed AP, reports."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from freeanchor.eval.coco import METRIC_NAMES, COCOEvaluator, to_coco_results
from freeanchor.eval.report import per_class_table, plot_pr_curve, pr_curves, write_summary

COCO128 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco128"


def generated_gt(seed: int = 0) -> dict:
    """Images with small / medium / large boxes of 4 non-contiguous categories, some crowd."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"cat{c}"} for c in (2, 5, 9, 11)]
    images, anns = [], []
    for iid in range(1, 31):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        images.append({"id": iid, "file_name": f"{iid}.jpg", "width": w, "height": h})
        for _ in range(int(rng.integers(0, 7))):
            side = float(rng.choice([12.0, 50.0, 150.0])) * rng.uniform(0.7, 1.3)
            bw, bh = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1))
            anns.append({
                "id": len(anns) + 1, "image_id": iid, "category_id": int(rng.choice([2, 5, 9])),
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": int(rng.random() < 0.05),
            })  # fmt: skip
    return {"images": images, "annotations": anns, "categories": cats}


def perturbed_detections(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered GT, some wrong labels, misses and false positives, as the evaluator's input."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    per_image: dict[int, list] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, 4) * [w, h, w, h]
        label = cat_ids.index(a["category_id"])
        if rng.random() < 0.1:
            label = int(rng.integers(len(cat_ids)))
        per_image[a["image_id"]].append(([x + j[0], y + j[1], x + w + j[2], y + h + j[3]],
                                         rng.random(), label))  # fmt: skip
    for img in gt["images"]:
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x, y = rng.uniform(0, img["width"] - 20), rng.uniform(0, img["height"] - 20)
            s = rng.uniform(5, 100)
            per_image[img["id"]].append(([x, y, x + s, y + s], rng.random() * 0.5,
                                         int(rng.integers(len(cat_ids)))))  # fmt: skip
    return [
        {
            "image_id": iid,
            "boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
            "labels": torch.tensor([d[2] for d in dets], dtype=torch.int64),
        }
        for iid, dets in per_image.items()
        if dets
    ]


def pycocotools_direct(gt: dict, detections: list[dict]) -> np.ndarray:
    """The reference: our own conversion to xywh + pycocotools COCOeval, default params."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    results = []
    for det in detections:
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                     det["labels"].tolist()):  # fmt: skip
            x1, y1, x2, y2 = box
            results.append({"image_id": det["image_id"], "category_id": cat_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def numbers(metrics: dict) -> np.ndarray:
    return np.array([metrics[k] for k in METRIC_NAMES])


def check_against_reference(gt, detections, ann):
    ref = pycocotools_direct(gt, detections)
    assert ref[0] > 0.1 and (ref >= 0).all()  # a non-trivial case
    got = {b: numbers(COCOEvaluator(ann, backend=b).evaluate(detections)) for b in
           ("faster", "pycocotools")}  # fmt: skip
    np.testing.assert_array_equal(got["pycocotools"], ref)  # same library: exact
    np.testing.assert_allclose(got["faster"], ref, rtol=0, atol=1e-12)


def test_generated_dataset_matches_pycocotools(tmp_path):
    gt = generated_gt()
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    check_against_reference(gt, perturbed_detections(gt), ann)
    check_against_reference(gt, perturbed_detections(gt), gt)  # dict input too


def test_coco128_matches_pycocotools():
    ann = COCO128 / "annotations.json"
    if not ann.is_file():
        pytest.skip(f"coco128 not present: {ann}")
    gt = json.loads(ann.read_text())
    check_against_reference(gt, perturbed_detections(gt, seed=1), ann)


def test_hand_computed_ap(tmp_path):
    # One class, 2 GT; detections: TP 0.9, FP 0.8, TP 0.7 (exact boxes, so every IoU threshold
    # agrees). Interpolated precision: 1 for recall <= 0.5 (51 points), 2/3 above (50 points).
    gt = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 400, "height": 400}],
        "categories": [{"id": 4, "name": "thing"}, {"id": 6, "name": "absent"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 100, 100],
             "area": 10000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [200, 200, 100, 100],
             "area": 10000, "iscrowd": 0},
        ],
    }  # fmt: skip
    det = {
        "image_id": 1,
        "boxes": torch.tensor([[10, 10, 110, 110], [300, 0, 399, 99], [200, 200, 300, 300.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([0, 0, 0]),
    }
    expected_ap = (51 * 1.0 + 50 * (2 / 3)) / 101
    for backend in ("faster", "pycocotools"):
        ev = COCOEvaluator(gt, backend=backend)
        m = ev.evaluate([det])
        for k in ("AP", "AP50", "AP75", "APl"):
            assert m[k] == pytest.approx(expected_ap, abs=1e-12)
        assert m["APs"] == -1 and m["APm"] == -1  # no GT of those sizes
        assert m["AR1"] == 0.5 and m["AR10"] == 1.0 and m["AR100"] == 1.0
        assert m["per_class"] == {"thing": pytest.approx(expected_ap), "absent": -1.0}
        curve = pr_curves(ev.coco_eval.eval["precision"])["IoU=0.50"]
        np.testing.assert_allclose(curve, [1.0] * 51 + [2 / 3] * 50)
        text = per_class_table(m["per_class"], m["per_class_ap50"], sort="name")
        lines = text.splitlines()  # caption, header, rule, rows
        assert "(COCO, 0-1)" in lines[0]
        assert len({len(line) for line in lines[1:]}) == 1  # fixed width
        assert lines[3].split() == ["1", "absent", "-", "-"]
        ap_text = f"{expected_ap:.3f}"  # COCO's 0-1 fraction, 3 decimals
        assert lines[4].split() == ["0", "thing", ap_text, ap_text]


def test_zero_detections(tmp_path):
    gt = generated_gt()
    for backend in ("faster", "pycocotools"):
        m = COCOEvaluator(gt, backend=backend).evaluate([])
        assert set(numbers(m)) <= {0.0, -1.0} and m["AP"] == 0.0 and m["AR100"] == 0.0
        assert all(v in (0.0, -1.0) for v in m["per_class"].values())
        m2 = COCOEvaluator(gt, backend=backend).evaluate(
            [
                {
                    "image_id": 1,
                    "boxes": torch.zeros(0, 4),
                    "scores": torch.zeros(0),
                    "labels": torch.zeros(0, dtype=torch.int64),
                }
            ]  # fmt: skip
        )
        assert numbers(m2).tolist() == numbers(m).tolist()


def test_results_format_and_json(tmp_path):
    det = {
        "image_id": 3,
        "boxes": torch.tensor([[1.5, 2.0, 11.25, 22.0], [0.1, 0.2, 0.3, 0.4]]),
        "scores": torch.tensor([0.75, 0.1]),
        "labels": torch.tensor([2, 0]),
    }
    results = to_coco_results([det], [2, 5, 9, 11])
    assert results[0] == {"image_id": 3, "bbox": [1.5, 2.0, 9.75, 20.0], "score": 0.75,
                          "category_id": 9}  # fmt: skip
    assert type(results[0]["score"]) is float and type(results[0]["category_id"]) is int
    x1, y1, x2, y2 = (float(np.float32(v)) for v in (0.1, 0.2, 0.3, 0.4))
    assert results[1]["bbox"] == [x1, y1, x2 - x1, y2 - y1] and results[1]["category_id"] == 2
    ev = COCOEvaluator(generated_gt())
    path = ev.write_results_json(tmp_path / "out" / "results.json", [det])
    assert json.loads(path.read_text()) == results
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left
    with pytest.raises(ValueError, match="unknown image ids"):
        ev.to_coco_results([{**det, "image_id": 999}])
    with pytest.raises(ValueError, match="image id 3: labels"):
        to_coco_results([{**det, "labels": torch.tensor([4, 0])}], [2, 5, 9, 11])
    with pytest.raises(ValueError, match="unknown COCO eval backend"):
        COCOEvaluator(generated_gt(), backend="nope")


def test_bad_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        COCOEvaluator(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  1,,\n]}')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 2 column"):
        COCOEvaluator(bad)


def test_reports(tmp_path):
    gt = generated_gt()
    ev = COCOEvaluator(gt)
    m = ev.evaluate(perturbed_detections(gt))
    png = plot_pr_curve(ev.coco_eval, tmp_path / "plots" / "pr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(png).size == (600, 500)
    curves = pr_curves(ev.coco_eval.eval["precision"])
    assert np.nanmean(curves["IoU=0.50"]) == pytest.approx(m["AP50"], abs=1e-12)
    assert np.nanmean(curves["IoU=0.50:0.95"]) == pytest.approx(m["AP"], abs=1e-12)
    table = per_class_table(m["per_class"])
    assert [line.split()[1] for line in table.splitlines()[3:]] == ["cat2", "cat5", "cat9", "cat11"]
    assert table.splitlines()[-1].split() == ["3", "cat11", "-"]  # no GT of category 11
    out = write_summary(tmp_path / "summary.json", m, weights="w.safetensors", bad=math.nan)
    data = json.loads(out.read_text())
    assert data["AP"] == m["AP"] and data["weights"] == "w.safetensors" and data["bad"] is None
    assert data["ap_scale"] == "fraction"
    assert data["per_class"]["cat11"] == -1.0
