"""COCO box AP: detections in original-image pixels -> the 12 standard COCO numbers.

Two interchangeable backends: faster-coco-eval (default, C++) and pycocotools (the
reference). Results are converted as MMDetection's CocoMetric does: xyxy -> [x, y, w, h]
(w = x2 - x1 in float64 from the float32 values, no +1), category_id = the file's category id
of the label (ascending-id order, spec 3.1), score as a Python float. Evaluation uses the
standard parameters (maxDets 1, 10, 100); with at most 100 detections per image the AP values
equal MMDetection's, which reports AR at 100/300/1000 instead.

Every AP/AR here is COCO's own 0-1 fraction (-1: nothing to score), never percent; reports
print them with 3 decimals and a label (`freeanchor.eval.report`).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freeanchor.data.coco import read_coco_json
from freeanchor.data.records import DetectionData
from freeanchor.errors import DatasetError, MissingFileError, OptionError
from freeanchor.files import write_json

METRIC_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
BACKENDS = ("faster", "pycocotools")


def _as_numpy(x: Any, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def to_coco_results(
    detections: Sequence[dict[str, Any]], label_to_cat_id: Sequence[int]
) -> list[dict[str, Any]]:
    """Detections -> COCO results list.

    Args:
        detections: per image {image_id, boxes [n, 4] xyxy (original pixels), scores [n],
            labels [n] 0-based}; tensors or arrays.
        label_to_cat_id: category id of each label.

    Raises:
        ValueError: a label outside 0..len(label_to_cat_id)-1 or mismatched lengths.
    """
    out = []
    for det in detections:
        image_id = int(det["image_id"])
        # float32 values widened exactly to float64, as MMDetection's tolist() does
        boxes = _as_numpy(det["boxes"], np.float32).astype(np.float64).reshape(-1, 4)
        scores = _as_numpy(det["scores"], np.float32).reshape(-1)
        labels = _as_numpy(det["labels"], np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image id {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                f"{len(labels)} labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(label_to_cat_id)):
            raise ValueError(
                f"image id {image_id}: labels {labels.min()}..{labels.max()} outside "
                f"0..{len(label_to_cat_id) - 1}"
            )
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            x1, y1, x2, y2 = box
            out.append(
                {
                    "image_id": image_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                    "category_id": int(label_to_cat_id[label]),
                }
            )
    return out


def _load_gt_dict(ann: str | Path | dict[str, Any] | DetectionData) -> tuple[dict[str, Any], str]:
    if isinstance(ann, DetectionData):  # any format: its COCO file, or its records as one
        gt = ann.ground_truth()
        if isinstance(gt, dict):
            return gt, str(ann.source)
        ann = gt
    if isinstance(ann, dict):
        return copy.deepcopy(ann), "<annotations dict>"
    path = Path(ann)
    if not path.is_file():
        raise MissingFileError(f"{path}: annotation file not found")
    return read_coco_json(path), str(path)


class COCOEvaluator:
    """COCO box evaluation against one ground truth: a COCO file, a COCO dict, or any
    `DetectionData` (YOLO and VOC records converted in memory, so AP means the same).

    Attributes after `evaluate`: `coco_eval` (the backend's COCOeval object, with
    `.eval["precision"]` [T, R, K, A, M]) and `summary_text` (the backend's printed table).
    """

    def __init__(
        self,
        ann: str | Path | dict[str, Any] | DetectionData,
        backend: str = "faster",
        label_to_cat_id: Sequence[int] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise OptionError(f"unknown COCO eval backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend
        data, self.source = _load_gt_dict(ann)
        cats = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.cat_ids = sorted(cats)
        self.label_to_cat_id = list(label_to_cat_id) if label_to_cat_id else list(self.cat_ids)
        unknown = sorted(set(self.label_to_cat_id) - set(cats))
        if unknown:
            raise DatasetError(f"{self.source}: category ids {unknown} not in the annotation file")
        self.class_names = [cats[c] for c in self.label_to_cat_id]
        with contextlib.redirect_stdout(io.StringIO()):
            if backend == "faster":
                from faster_coco_eval import COCO

                self.coco_gt = COCO(data)
            else:
                from pycocotools.coco import COCO

                self.coco_gt = COCO()
                self.coco_gt.dataset = data
                self.coco_gt.createIndex()
        self.image_ids = set(self.coco_gt.getImgIds())
        self.coco_eval: Any = None
        self.summary_text = ""

    def to_coco_results(self, detections: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        results = to_coco_results(detections, self.label_to_cat_id)
        unknown = {r["image_id"] for r in results} - self.image_ids
        if unknown:
            raise ValueError(
                f"{self.source}: detections for unknown image ids {sorted(unknown)[:5]}"
            )
        return results

    def write_results_json(self, path: str | Path, detections: Sequence[dict[str, Any]]) -> Path:
        """Write the COCO results list as JSON (atomically)."""
        return write_json(path, self.to_coco_results(detections), indent=None)

    def _load_results(self, results: list[dict[str, Any]]) -> Any:
        if results or self.backend == "faster":
            return self.coco_gt.loadRes(results)
        # pycocotools' loadRes cannot take an empty list; build the empty result set directly.
        from pycocotools.coco import COCO

        dt = COCO()
        dt.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": copy.deepcopy(self.coco_gt.dataset["categories"]),
            "annotations": [],
        }
        dt.createIndex()
        return dt

    def evaluate(
        self, detections: Sequence[dict[str, Any]], img_ids: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """The 12 COCO numbers (floats in [0, 1], -1 where undefined) plus per-class AP.

        Args:
            detections: see `to_coco_results`.
            img_ids: evaluate on these images only (default: every image of the file).

        Returns:
            {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl: float,
             per_class: {class_name: AP}, per_class_ap50: {class_name: AP50}}.
        """
        results = self.to_coco_results(detections)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = self._load_results(results)
            if self.backend == "faster":
                from faster_coco_eval import COCOeval_faster

                ev = COCOeval_faster(self.coco_gt, coco_dt, "bbox", print_function=print)
            else:
                from pycocotools.cocoeval import COCOeval

                ev = COCOeval(self.coco_gt, coco_dt, "bbox")
            if img_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in img_ids)
            ev.params.catIds = list(self.label_to_cat_id)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.coco_eval = ev
        self.summary_text = "\n".join(
            line for line in buf.getvalue().splitlines() if "Average" in line
        )
        stats = np.asarray(ev.stats, dtype=np.float64)[: len(METRIC_NAMES)]
        metrics: dict[str, Any] = {k: float(v) for k, v in zip(METRIC_NAMES, stats)}
        metrics["per_class"], metrics["per_class_ap50"] = self._per_class(ev)
        return metrics

    def _per_class(self, ev: Any) -> tuple[dict[str, float], dict[str, float]]:
        """AP and AP50 per class (area all, maxDets 100), -1 for a class without ground truth."""
        precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
        column = {int(c): k for k, c in enumerate(ev.params.catIds)}  # K follows sorted ids
        ap, ap50 = {}, {}
        for cat_id, name in zip(self.label_to_cat_id, self.class_names):
            k = column[cat_id]
            for out, p in ((ap, precision[:, :, k, 0, -1]), (ap50, precision[0, :, k, 0, -1])):
                valid = p[p > -1]
                out[name] = float(valid.mean()) if valid.size else -1.0
        return ap, ap50
