"""`eval --analyze`: a hand-made case with known TP / FP / FN / confusions / crowd, the outputs,
and the CLI on a small model (the matrix sums to the ground-truth and detection counts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from freeanchor.data.records import ImageRecord
from freeanchor.eval.analysis import analyze, table, top_confusions
from freeanchor.eval.analysis_plots import GAP, MIN_SIDE, run_analysis, side_by_side
from freeanchor.eval.coco import COCOEvaluator

CATS = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]  # ids with gaps: labels 0, 1


def _gt() -> dict:
    def ann(i, image, cat, box, crowd=0):
        return {"id": i, "image_id": image, "category_id": cat, "bbox": box,
                "area": box[2] * box[3], "iscrowd": crowd}  # fmt: skip

    return {
        "images": [
            {"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3, 4)
        ],  # fmt: skip
        "categories": CATS,
        "annotations": [
            ann(1, 1, 3, [0, 0, 10, 10]),  # found
            ann(2, 1, 3, [50, 50, 10, 10]),  # detected as b: a confusion
            ann(3, 1, 7, [20, 20, 10, 10]),  # only a poorly placed b (IoU 0.25): missed
            ann(4, 2, 7, [0, 0, 50, 50], crowd=1),  # a crowd b: ignored
            ann(5, 2, 3, [60, 60, 20, 20]),  # found, plus a duplicate
            ann(6, 4, 7, [10, 10, 30, 30]),  # missed, no detection at all
        ],
    }


# (image, label, xyxy, score); labels index CATS
DETS = [
    (1, 0, [0, 0, 10, 10], 0.9),  # TP a
    (1, 1, [50, 50, 60, 60], 0.8),  # true a, predicted b
    (1, 0, [80, 80, 90, 90], 0.7),  # nothing there: background FP
    (1, 0, [0, 0, 10, 10], 0.1),  # below the score threshold: not counted
    (1, 1, [26, 20, 36, 30], 0.6),  # IoU 0.25 with gt 3: background FP (and gt 3 missed)
    (2, 1, [5, 5, 15, 15], 0.7),  # inside the crowd box: ignored
    (2, 0, [60, 60, 80, 80], 0.5),  # TP a
    (2, 0, [60, 60, 80, 80], 0.45),  # duplicate: background FP
]
EXPECTED = [[2, 1, 0],  # a: 2 found, 1 taken for b, none missed outright
            [0, 0, 2],  # b: 2 missed
            [2, 1, 0]]  # background: 2 FP of a, 1 of b  # fmt: skip


def _results(dets=DETS) -> list[dict]:
    ids = [c["id"] for c in CATS]
    return [{"image_id": i, "category_id": ids[lab], "bbox": [x1, y1, x2 - x1, y2 - y1],
             "score": s} for i, lab, (x1, y1, x2, y2), s in dets]  # fmt: skip


def test_confusion_matrix_and_per_class_counts_by_hand():
    res = analyze(_gt(), _results(), [3, 7], ["a", "b"], score_thr=0.3, iou=0.5)
    assert res.confusion.tolist() == EXPECTED
    # Row sums are the non-crowd gt counts, column sums the counted detections.
    assert res.confusion[:2].sum(1).tolist() == [3, 2]
    counted = [d for d in DETS if d[3] >= 0.3 and d[2] != [5, 5, 15, 15]]
    assert res.confusion[:, :2].sum(0).tolist() == [
        sum(d[1] == 0 for d in counted), sum(d[1] == 1 for d in counted)]  # fmt: skip
    a, b = res.per_class
    assert (a["gts"], a["tp"], a["fp"], a["fn"]) == (3, 2, 2, 1)
    assert (b["gts"], b["tp"], b["fp"], b["fn"]) == (2, 0, 2, 2)  # the b taken for a is an FP
    assert a["recall"] == pytest.approx(2 / 3) and a["precision"] == pytest.approx(0.5)
    assert b["recall"] == 0.0 and b["precision"] == 0.0
    by_id = {im["image_id"]: im for im in res.images}
    assert [by_id[i]["fn"] for i in (1, 2, 3, 4)] == [2, 0, 0, 1]
    assert sorted(by_id[1]["missed"]) == [2, 3] and by_id[4]["missed"] == [6]
    assert res.worst == [1, 4]
    assert top_confusions(res) == [("a", "b", 1)]
    assert "a" in table(res).splitlines()[3]


def test_recall_matches_a_hand_count_at_other_thresholds():
    # score >= 0.75: only the first two detections count; a: 1 of 3 found, b: none.
    res = analyze(_gt(), _results(), [3, 7], ["a", "b"], score_thr=0.75)
    assert [r["recall"] for r in res.per_class] == pytest.approx([1 / 3, 0.0])
    assert res.confusion.tolist() == [[1, 1, 1], [0, 0, 2], [0, 0, 0]]
    # IoU 0.2: the poorly placed b now finds gt 3.
    res = analyze(_gt(), _results(), [3, 7], ["a", "b"], score_thr=0.3, iou=0.2)
    assert res.per_class[1]["tp"] == 1 and res.confusion[1, 1] == 1


def test_no_detections_and_no_ground_truth():
    res = analyze(_gt(), [], [3, 7], ["a", "b"])
    assert res.confusion.tolist() == [[0, 0, 3], [0, 0, 2], [0, 0, 0]]
    assert res.per_class[0]["precision"] == -1.0  # undefined, not 0
    empty = {**_gt(), "annotations": []}
    res = analyze(empty, _results(), [3, 7], ["a", "b"])
    assert res.confusion[2].tolist() == [4, 3, 0] and res.worst == []  # no crowd box now


def test_run_analysis_writes_every_output(tmp_path):
    for i in (1, 2, 3, 4):
        Image.fromarray(np.full((100, 100, 3), 90 + 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    evaluator = COCOEvaluator(_gt(), "faster", [3, 7])
    detections = [{"image_id": i, "boxes": torch.tensor([d[2] for d in DETS if d[0] == i],
                                                        dtype=torch.float32).reshape(-1, 4),
                   "scores": torch.tensor([d[3] for d in DETS if d[0] == i]),
                   "labels": torch.tensor([d[1] for d in DETS if d[0] == i], dtype=torch.long)}
                  for i in (1, 2, 3, 4)]  # fmt: skip
    metrics = evaluator.evaluate(detections)
    records = [ImageRecord(i, f"{i}.png", tmp_path / f"{i}.png", 100, 100, torch.zeros(0, 4),
                           torch.zeros(0, dtype=torch.long)) for i in (1, 2, 3, 4)]  # fmt: skip
    out = tmp_path / "analysis"
    res = run_analysis(evaluator, records, metrics, out, score_thr=0.3, worst=8)
    assert res.confusion.tolist() == EXPECTED
    saved = json.loads((out / "confusion_matrix.json").read_text())
    assert saved["matrix"] == EXPECTED and saved["labels"] == ["a", "b", "background"]
    doc = json.loads((out / "analysis.json").read_text())
    assert [im["image_id"] for im in doc["worst_images"]] == [1, 4]
    assert doc["sizes"] == {k: metrics[k] for k in ("APs", "APm", "APl")}
    assert doc["per_class"][0]["AP"] == metrics["per_class"]["a"]
    assert (out / "per_class.txt").is_file()
    assert Image.open(out / "confusion_matrix.png").size[0] > 100
    pics = sorted((out / "worst").iterdir())
    assert [p.name for p in pics] == ["00_1.png", "01_4.png"]
    k = MIN_SIDE // 100  # small images are drawn enlarged
    assert Image.open(pics[0]).size == (2 * 100 * k + GAP, 100 * k)


def test_side_by_side_marks_missed_and_false_positives():
    image = torch.full((3, 400, 500), 128, dtype=torch.uint8)
    gts = [{"id": 1, "category_id": 3, "bbox": [50, 50, 100, 100]}]
    dets = [{"id": 9, "category_id": 7, "bbox": [300, 50, 100, 100], "score": 0.5}]
    pic = side_by_side(image, gts, dets, {1}, {9}, {3: 0, 7: 1}, ["a", "b"])
    assert pic.shape == (3, 400, 1000 + GAP)
    left, right = pic[:, :, :500], pic[:, :, 500 + GAP :]
    assert not torch.equal(left, image) and not torch.equal(right, image)
    assert torch.equal(left[:, :, 250:], image[:, :, 250:])  # gt box on the left half only
    assert torch.equal(right[:, :, :250], image[:, :, :250])  # detection on the right only
    assert (pic[:, :, 500 : 500 + GAP] == 255).all()


def test_eval_cli_analyze(tmp_path, capsys):
    from freeanchor.cli import main
    from freeanchor.config import preset
    from freeanchor.models.detector import FreeAnchor
    from freeanchor.models.weights import save_model

    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 4):
        arr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 128, "height": 96})
        for k in range(2):
            box = [10 + 40 * k, 10, 30, 40]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + k, "bbox": box,
                         "area": 1200, "iscrowd": 0})  # fmt: skip
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    cfg = preset("freeanchor_r18_fpn_1x", num_classes=2)
    cfg.classes, cfg.input_scale, cfg.score_thr = ["red", "blue"], (128, 96), 0.0
    cfg.fpn_channels = cfg.feat_channels = 32
    torch.manual_seed(0)
    weights = save_model(FreeAnchor(cfg), tmp_path / "m.safetensors", extra={"cat_ids": [1, 2]})
    out = tmp_path / "out"
    code = main(["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(tmp_path),
                 "--device", "cpu", "--workers", "0", "--out", str(out), "--analyze",
                 "--analyze-score-thr", "0", "--analyze-worst", "2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    where = out / "analysis"
    for name in ("confusion_matrix.png", "confusion_matrix.json", "analysis.json",
                 "per_class.txt"):  # fmt: skip
        assert (where / name).is_file(), name
    cm = np.array(json.loads((where / "confusion_matrix.json").read_text())["matrix"])
    results = json.loads((out / "results.json").read_text())
    assert cm[:2].sum(1).tolist() == [3, 3]  # every gt box once per row
    per_cat = [sum(r["category_id"] == c for r in results) for c in (1, 2)]
    assert cm[:, :2].sum(0).tolist() == per_cat  # every detection once per column
    assert len(list((where / "worst").iterdir())) == 2
    args = ["eval", "--weights", str(weights), "--ann", str(ann), "--images", str(tmp_path),
            "--analyze"]  # fmt: skip
    assert main([*args, "--analyze-worst", "-1"]) == 2
    assert main([*args, "--analyze-score-thr", "1.5"]) == 2
    assert "--analyze-score-thr must be in [0, 1]" in capsys.readouterr().err
