"""Error analysis of an evaluation: confusion matrix, per-class precision / recall / AP, AP by
object size, the images with the most missed objects (`freeanchor eval --analyze`).

    freeanchor eval --weights W --ann A.json --images DIR --analyze --analyze-out analysis/

Matching is faster-coco-eval's (`faster_coco_eval.extra.ExtraEval`: COCOeval's greedy
one-to-one matching by descending score, at one IoU threshold, all areas, every detection with
score >= the score threshold): class-agnostic for the confusion matrix (a detection may match a
ground-truth box of another class: a confusion), class-aware for per-class precision and recall
(what AP50 counts). The counting is ours, from its matches: faster-coco-eval's own
`PreviewResults.compute_confusion_matrix` counts a detection matched to a crowd (ignored) box as
a true positive and an unmatched crowd box as a miss, and puts background detections in the
detected class's row; COCO ignores both, and so do we. Crowd boxes (and VOC `difficult` ones)
are neither ground truth to find nor false positives when detected.

The confusion matrix is [C + 1, C + 1]: rows are ground truth (classes, then background:
detections matching nothing), columns predictions (classes, then background: missed boxes).
Row c sums to class c's ground-truth count, column c to class c's detections.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SIZE_NAMES = ("small", "medium", "large")  # COCO's area ranges 1..3 of eval["precision"]


@dataclass
class Matches:
    """One matching of detections to ground truth (ids are the COCO annotation ids)."""

    gt: dict[int, dict[str, Any]]  # ann id -> annotation (image_id, category_id, bbox, iscrowd)
    dt: dict[int, dict[str, Any]]  # ann id -> detection (image_id, category_id, bbox, score)
    dt_to_gt: dict[int, int]  # matched pairs


@dataclass
class Analysis:
    """Everything `--analyze` reports; `to_json` is its JSON form."""

    classes: list[str]
    iou: float
    score_thr: float
    confusion: np.ndarray  # [C + 1, C + 1] int64, rows gt, columns predicted, last background
    per_class: list[dict[str, Any]]  # name, gts, dets, tp, fp, fn, precision, recall, AP...
    sizes: dict[str, float]  # APs, APm, APl (COCO's stats)
    images: list[dict[str, Any]]  # per image: image_id, gts, tp, fp, fn, missed/fp ann ids
    worst: list[int] = field(default_factory=list)  # image ids, most missed objects first
    matches: Matches | None = None  # the class-aware matching (for drawing), not in JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "iou": self.iou, "score_thr": self.score_thr, "classes": self.classes,
            "confusion_matrix": {
                "labels": [*self.classes, "background"],
                "rows": "ground truth (last: background = unmatched detections)",
                "columns": "predicted (last: background = missed ground truth)",
                "matrix": self.confusion.tolist(),
            },
            "per_class": self.per_class, "sizes": self.sizes,
            "worst_images": [im for i in self.worst for im in self.images if im["image_id"] == i],
        }  # fmt: skip


def match(
    gt: dict[str, Any],
    results: Sequence[dict[str, Any]],
    score_thr: float,
    iou: float = 0.5,
    class_aware: bool = True,
) -> Matches:
    """Match `results` (COCO results list) to `gt` (COCO dict) with faster-coco-eval.

    Args:
        score_thr: detections with score >= this take part.
        class_aware: match within a class only (else any class: confusions).
    """
    from faster_coco_eval import COCO
    from faster_coco_eval.extra.extra import ExtraEval

    results = [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(copy.deepcopy(gt))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = ExtraEval(coco_gt, coco_dt, "bbox", min_score=score_thr, iou_tresh=iou,
                       useCats=class_aware)  # fmt: skip
    pairs = {}
    for key in ev.eval["matched"]:
        dt_id, gt_id = (int(v) for v in key.split("_", 1))
        pairs[dt_id] = gt_id
    dts = {i: a for i, a in ev.cocoDt.anns.items() if a["score"] >= score_thr}
    return Matches(dict(ev.cocoGt.anns), dts, pairs)


def count(m: Matches, cat_ids: Sequence[int]) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
    """Confusion counts and per-image outcomes of one matching.

    Args:
        cat_ids: category id of each label (the matrix's class order).

    Returns:
        matrix [C + 1, C + 1] (see the module docstring; with a class-aware matching it is
        diagonal plus the background row and column), and per image id {gts, tp, fp, fn,
        missed: [gt ann ids], false_positives: [dt ann ids]}.
    """
    label = {int(c): i for i, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    cm = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    images: dict[int, dict[str, Any]] = {}

    def image(i: int) -> dict[str, Any]:
        return images.setdefault(
            int(i), {"gts": 0, "tp": 0, "fp": 0, "fn": 0, "missed": [], "false_positives": []}
        )

    matched_gt = set()
    for dt_id, det in m.dt.items():
        if det["category_id"] not in label:
            continue
        im, gt_id = image(det["image_id"]), m.dt_to_gt.get(dt_id)
        if gt_id is None:
            cm[bg, label[det["category_id"]]] += 1
            im["fp"] += 1
            im["false_positives"].append(dt_id)
        elif not m.gt[gt_id].get("iscrowd", 0):  # on a crowd box: ignored, as COCO does
            cm[label[m.gt[gt_id]["category_id"]], label[det["category_id"]]] += 1
            matched_gt.add(gt_id)
            same = m.gt[gt_id]["category_id"] == det["category_id"]
            im["tp" if same else "fp"] += 1
    for gt_id, ann in m.gt.items():
        if ann.get("iscrowd", 0) or ann["category_id"] not in label:
            continue
        im = image(ann["image_id"])
        im["gts"] += 1
        if gt_id not in matched_gt:
            cm[label[ann["category_id"]], bg] += 1
            im["fn"] += 1
            im["missed"].append(gt_id)
    return cm, images


def _size_ap(precision: np.ndarray | None, column: int | None) -> dict[str, float]:
    """AP (IoU .50:.95) of one class per COCO area range; -1 where undefined."""
    out = {}
    for a, name in enumerate(SIZE_NAMES, start=1):
        if precision is None or column is None:
            out[f"AP_{name}"] = -1.0
            continue
        p = precision[:, :, column, a, -1]
        out[f"AP_{name}"] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return out


def analyze(
    gt: dict[str, Any],
    results: Sequence[dict[str, Any]],
    cat_ids: Sequence[int],
    class_names: Sequence[str],
    metrics: dict[str, Any] | None = None,
    precision: np.ndarray | None = None,
    precision_cat_ids: Sequence[int] | None = None,
    score_thr: float = 0.3,
    iou: float = 0.5,
    worst: int = 8,
) -> Analysis:
    """The whole analysis of detections `results` against `gt`.

    Args:
        gt: COCO ground truth dict (only the images to analyse).
        results: COCO results list (image_id, category_id, bbox [x, y, w, h], score).
        cat_ids, class_names: per label, the category id and name.
        metrics: the evaluator's metrics (AP per class, APs/APm/APl), if evaluated.
        precision: the evaluator's `eval["precision"]` [T, R, K, A, M] for AP by size per
            class, with `precision_cat_ids` its K order.
        worst: how many images with the most missed objects to list.
    """
    metrics = metrics or {}
    confusion, _ = count(match(gt, results, score_thr, iou, class_aware=False), cat_ids)
    _, images = count(aware := match(gt, results, score_thr, iou, class_aware=True), cat_ids)
    for img in gt.get("images", []):
        images.setdefault(int(img["id"]), {"gts": 0, "tp": 0, "fp": 0, "fn": 0, "missed": [],
                                           "false_positives": []})  # fmt: skip
    columns = {int(c): k for k, c in enumerate(precision_cat_ids or [])}
    per_class = []
    for c, name in zip(cat_ids, class_names):
        gts = sum(1 for a in aware.gt.values()
                  if a["category_id"] == c and not a.get("iscrowd", 0))  # fmt: skip
        dets = [i for i, d in aware.dt.items() if d["category_id"] == c]
        hits = [i for i in dets if i in aware.dt_to_gt
                and not aware.gt[aware.dt_to_gt[i]].get("iscrowd", 0)]  # fmt: skip
        ignored = sum(1 for i in dets if i in aware.dt_to_gt) - len(hits)
        tp, fp = len(hits), len(dets) - len(hits) - ignored
        per_class.append({
            "class": name, "gts": gts, "dets": tp + fp, "tp": tp, "fp": fp, "fn": gts - tp,
            "precision": tp / (tp + fp) if tp + fp else -1.0,
            "recall": tp / gts if gts else -1.0,
            "AP": metrics.get("per_class", {}).get(name, -1.0),
            "AP50": metrics.get("per_class_ap50", {}).get(name, -1.0),
            **_size_ap(None if precision is None else np.asarray(precision), columns.get(int(c))),
        })  # fmt: skip
    rows = [{"image_id": i, **v} for i, v in sorted(images.items())]
    ranked = sorted((r for r in rows if r["fn"] > 0), key=lambda r: (-r["fn"], -r["gts"],
                                                                       r["image_id"]))  # fmt: skip
    sizes = {k: float(metrics[k]) for k in ("APs", "APm", "APl") if k in metrics}
    return Analysis(list(class_names), iou, score_thr, confusion, per_class, sizes, rows,
                    [r["image_id"] for r in ranked[:worst]], aware)  # fmt: skip


def table(analysis: Analysis) -> str:
    """Fixed-width per-class table (precision / recall at the score threshold and IoU)."""

    def pct(v: float) -> str:
        return f"{100 * v:6.1f}" if v >= 0 else f"{'-':>6}"

    width = max([len("class")] + [len(r["class"]) for r in analysis.per_class])
    head = f"{'class':<{width}}  " + " ".join(f"{h:>5}" for h in ("gts", "dets", "TP", "FP", "FN"))
    head += "  " + " ".join(f"{h:>6}" for h in ("P", "R", "AP", "AP50", "APs", "APm", "APl"))
    lines = [
        f"at IoU {analysis.iou:g}, score >= {analysis.score_thr:g} (P, R); AP from COCO eval",
        head, "-" * len(head),
    ]  # fmt: skip
    for r in analysis.per_class:
        lines.append(
            f"{r['class']:<{width}}  {r['gts']:>5} {r['dets']:>5} {r['tp']:>5} {r['fp']:>5} "
            f"{r['fn']:>5}  {pct(r['precision'])} {pct(r['recall'])} {pct(r['AP'])} "
            f"{pct(r['AP50'])} {pct(r['AP_small'])} {pct(r['AP_medium'])} {pct(r['AP_large'])}"
        )
    if analysis.sizes:
        lines.append("all sizes: " + "  ".join(f"{k} {pct(v).strip()}"
                                               for k, v in analysis.sizes.items()))  # fmt: skip
    return "\n".join(lines)


def top_confusions(analysis: Analysis, n: int = 5) -> list[tuple[str, str, int]]:
    """The n largest off-diagonal cells between classes: (true class, predicted, count)."""
    cm, c = analysis.confusion, len(analysis.classes)
    cells = [(int(cm[i, j]), i, j) for i in range(c) for j in range(c) if i != j and cm[i, j]]
    cells.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(analysis.classes[i], analysis.classes[j], k) for k, i, j in cells[:n]]
