"""Pictures and files of `freeanchor eval --analyze`: the confusion-matrix heat map, the worst
images (ground truth | detections side by side), and `run_analysis`, which writes them all.

Written to the analysis folder:
- `confusion_matrix.png` (colour: share of the row, i.e. of the true class; text: counts) and
  `confusion_matrix.json`;
- `analysis.json` (per-class table, AP by size, the worst images with their counts) and
  `per_class.txt`;
- `worst/NN_<image id>.png`: left the ground truth (missed boxes captioned "MISSED", crowd /
  difficult boxes grey), right the detections with score >= the threshold (false positives
  captioned "FP").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from freeanchor.errors import OptionError
from freeanchor.eval.analysis import Analysis, analyze, table, top_confusions
from freeanchor.files import atomic_path, write_json, write_text
from freeanchor.viz import IGNORED_COLOR, class_color, draw_boxes, save_image

GAP = 8  # white pixels between the two halves of a worst-image picture
MIN_SIDE = 384  # images whose long side is smaller are drawn enlarged by a whole factor


def plot_confusion(analysis: Analysis, path: str | Path) -> Path:
    """Heat map of the confusion matrix: rows true class, columns predicted; counts written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = analysis.confusion.astype(np.float64)
    labels = [*analysis.classes, "background"]
    n = len(labels)
    # Colour by the share of the row, so rare classes show as clearly as common ones.
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.42 * n + 2.0), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=100)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's row")
    font = max(4.0, min(10.0, 120.0 / n))
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted (background = missed)")
    ax.set_ylabel("ground truth (background = false positive)")
    ax.set_title(f"confusion at IoU {analysis.iou:g}, score >= {analysis.score_thr:g}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _xyxy(anns: Sequence[dict[str, Any]]) -> Tensor:
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def side_by_side(
    image: Tensor,
    gts: Sequence[dict[str, Any]],
    dets: Sequence[dict[str, Any]],
    missed: set[int],
    false_positives: set[int],
    label_of: dict[int, int],
    names: Sequence[str],
) -> Tensor:
    """uint8 RGB [3, H, W] -> [3, kH, 2kW + GAP]: ground truth left, detections right
    (k = 1, or the whole factor that brings a small image's long side to `MIN_SIDE`).

    Args:
        gts / dets: COCO annotations / detections of the image (with "id").
        missed / false_positives: their ids to caption as such.
        label_of: category id -> label (colour and name).
    """
    gt_text, gt_col = [], []
    for a in gts:
        lab = label_of.get(a["category_id"], 0)
        if a.get("iscrowd", 0):
            gt_text.append(f"{names[lab]} (ignored)")
            gt_col.append(IGNORED_COLOR)
        else:
            gt_text.append(f"MISSED {names[lab]}" if a["id"] in missed else names[lab])
            gt_col.append(class_color(lab))
    dt_text, dt_col = [], []
    for d in dets:
        lab = label_of.get(d["category_id"], 0)
        tag = "FP " if d["id"] in false_positives else ""
        dt_text.append(f"{tag}{names[lab]} {d['score']:.2f}")
        dt_col.append(class_color(lab))
    # Small images are enlarged (nearest neighbour, whole factor) so that captions are legible.
    k = max(1, MIN_SIDE // max(int(image.shape[1]), int(image.shape[2])))
    image = image.repeat_interleave(k, 1).repeat_interleave(k, 2) if k > 1 else image
    left = draw_boxes(image, _xyxy(gts) * k, gt_text, gt_col)
    right = draw_boxes(image, _xyxy(dets) * k, dt_text, dt_col)
    gap = torch.full((3, image.shape[1], GAP), 255, dtype=torch.uint8)
    return torch.cat([left, gap, right], dim=2)


def check_options(score_thr: float, worst: int) -> None:
    """Raises OptionError for a threshold outside [0, 1] or a negative image count."""
    if worst < 0:
        raise OptionError(f"--analyze-worst must be >= 0, got {worst}")
    if not 0.0 <= score_thr <= 1.0:
        raise OptionError(f"--analyze-score-thr must be in [0, 1], got {score_thr}")


def run_analysis(
    evaluator: Any,
    records: Sequence[Any],
    metrics: dict[str, Any],
    out: str | Path,
    score_thr: float = 0.3,
    iou: float = 0.5,
    worst: int = 8,
    max_pixels: int | None = None,
) -> Analysis:
    """Analyse the evaluator's last evaluation and write every output into `out`.

    Args:
        evaluator: a `COCOEvaluator` after `evaluate` (either backend).
        records: the dataset's records (image paths for the worst images).
    """
    from freeanchor.data.io import read_image

    check_options(score_thr, worst)
    ev = evaluator.coco_eval
    img_ids = {int(i) for i in ev.params.imgIds}
    dataset = evaluator.coco_gt.dataset
    gt = {
        "images": [im for im in dataset["images"] if int(im["id"]) in img_ids],
        "categories": dataset["categories"],
        "annotations": [a for a in dataset["annotations"] if int(a["image_id"]) in img_ids],
    }
    results = ev.cocoDt.dataset.get("annotations", [])
    result = analyze(
        gt, results, evaluator.label_to_cat_id, evaluator.class_names, metrics,
        ev.eval["precision"], list(ev.params.catIds), score_thr, iou, worst,
    )  # fmt: skip
    out = Path(out)
    write_json(out / "analysis.json", result.to_json(), indent=1)
    write_json(out / "confusion_matrix.json", result.to_json()["confusion_matrix"], indent=1)
    text = table(result)
    write_text(out / "per_class.txt", text + "\n")
    plot_confusion(result, out / "confusion_matrix.png")

    aware = result.matches
    label_of = {int(c): i for i, c in enumerate(evaluator.label_to_cat_id)}
    paths = {int(r.image_id): r.path for r in records}
    by_id = {im["image_id"]: im for im in result.images}
    for rank, image_id in enumerate(result.worst):
        image = read_image(paths[image_id], max_pixels)
        gts = [a for a in aware.gt.values() if a["image_id"] == image_id]
        dets = [{**d, "id": i} for i, d in aware.dt.items() if d["image_id"] == image_id]
        im = by_id[image_id]
        pic = side_by_side(image, gts, dets, set(im["missed"]), set(im["false_positives"]),
                           label_of, evaluator.class_names)  # fmt: skip
        save_image(pic, out / "worst" / f"{rank:02d}_{image_id}.png")

    print(text)
    for true, pred, k in top_confusions(result):
        print(f"confused: {k} x {true} detected as {pred}")
    print(f"wrote {out / 'confusion_matrix.png'}, {out / 'analysis.json'}, "
          f"{len(result.worst)} worst images in {out / 'worst'}")  # fmt: skip
    return result
