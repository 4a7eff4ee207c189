"""COCO instances JSON + image folder -> in-memory training/eval records (spec 3.1).

Labels are the index of the category id in ascending id order, as MMDetection's `cat2label`.
Annotations are filtered as MMDetection's `CocoDataset.parse_data_info` does (ignore flag,
no overlap with the image, area <= 0, w < 1 or h < 1); crowd boxes never reach the records
(MMDetection puts them in an ignore set that FreeAnchor never reads). For training, images
without any annotation (crowd included) and images with min(w, h) < min_size are dropped, as
`filter_cfg=dict(filter_empty_gt=True, min_size=32)`. Every drop is counted by reason.

Malformed input is a `DatasetError` whose one-line message names the file, the record and the
problem. Image files are not opened here (too slow for 100k images): an unreadable file is a
counted skip when the loader reads it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Skip reasons, in the order MMDetection applies the checks (a record counts once, first hit).
ANN_REASONS = {
    "ann_ignore": "annotations flagged 'ignore'",
    "ann_outside_image": "boxes not overlapping the image",
    "ann_area_le_0": "annotations with area <= 0",
    "ann_w_or_h_lt_1": "boxes with w < 1 or h < 1",
    "ann_crowd": "crowd boxes",
}
IMG_REASONS = {
    "img_no_annotations": "images without annotations",
    "img_too_small": "images with min(w, h) < min_size",
}


class DatasetError(ValueError):
    """Malformed dataset input; the message names the file, the record and the problem."""


@dataclass
class ImageRecord:
    """One image and its usable (non-crowd, filtered) boxes."""

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    boxes: Tensor  # [K, 4] float32 xyxy in original-image pixels (not clipped)
    labels: Tensor  # [K] int64, 0-based contiguous labels


@dataclass
class CocoData:
    """Records plus the label mapping and the skip counts of one annotation file."""

    ann_file: Path
    train: bool
    records: list[ImageRecord]
    cat_ids: list[int]  # ascending; label i <-> cat_ids[i]
    class_names: list[str]
    label_to_cat_id: list[int]
    cat_id_to_label: dict[int, int]
    num_images: int  # in the file
    num_annotations: int  # in the file
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return sum(int(r.boxes.shape[0]) for r in self.records)

    def summary(self) -> str:
        """One line: what was read, what is used, and what was skipped and why."""
        use = "training" if self.train else "evaluation"
        line = (
            f"{self.ann_file}: {self.num_images} images, {self.num_annotations} annotations, "
            f"{len(self.cat_ids)} categories -> {len(self.records)} {use} images with "
            f"{self.num_boxes} boxes"
        )
        parts = [
            f"{self.skipped[k]} {text}"
            for k, text in {**IMG_REASONS, **ANN_REASONS}.items()
            if self.skipped.get(k)
        ]
        return line + ("; skipped: " + ", ".join(parts) if parts else "; nothing skipped")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_coco_json(path: Path) -> dict[str, Any]:
    """The JSON of a COCO annotation file, checked for the three top-level lists."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def _categories(path: Path, cats: list[Any]) -> tuple[list[int], list[str]]:
    names: dict[int, str] = {}
    for i, cat in enumerate(cats):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not _is_int(cid):
            raise DatasetError(f"{path}: categories[{i}]: 'id' must be an integer, got {cid!r}")
        if cid in names:
            raise DatasetError(f"{path}: category id {cid}: duplicate category id")
        names[cid] = str(cat.get("name", cid))
    if not names:
        raise DatasetError(f"{path}: 'categories' is empty")
    cat_ids = sorted(names)
    return cat_ids, [names[c] for c in cat_ids]


def _images(path: Path, images: list[Any]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(images):
        iid = img.get("id") if isinstance(img, dict) else None
        if not _is_int(iid):
            raise DatasetError(f"{path}: images[{i}]: 'id' must be an integer, got {iid!r}")
        where = f"{path}: image id {iid}"
        if iid in out:
            raise DatasetError(f"{where}: duplicate image id")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DatasetError(f"{where}: missing or empty 'file_name'")
        for key in ("width", "height"):
            v = img.get(key)
            if v is None:
                raise DatasetError(f"{where}: missing {key!r}")
            if not (_is_number(v) and v > 0 and float(v).is_integer()):
                raise DatasetError(f"{where}: {key!r} must be a positive integer, got {v!r}")
        out[iid] = img
    return out


def _check_annotation(path: Path, i: int, ann: Any, images: dict, cats: dict) -> list[float]:
    """Validate one annotation record; returns its bbox [x, y, w, h]."""
    aid = ann.get("id") if isinstance(ann, dict) else None
    if not _is_int(aid):
        raise DatasetError(f"{path}: annotations[{i}]: 'id' must be an integer, got {aid!r}")
    where = f"{path}: annotation id {aid}"
    for key, known in (("image_id", images), ("category_id", cats)):
        if not _is_int(ann.get(key)) or ann[key] not in known:
            raise DatasetError(f"{where}: unknown {key} {ann.get(key)!r}")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise DatasetError(f"{where}: 'bbox' must be a list of 4 finite numbers, got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise DatasetError(f"{where}: negative bbox width/height in {bbox!r}")
    if "area" in ann and not _is_number(ann["area"]):
        raise DatasetError(f"{where}: 'area' must be a finite number, got {ann['area']!r}")
    return [float(v) for v in bbox]


def _skip_reason(ann: dict[str, Any], bbox: list[float], img: dict[str, Any]) -> str | None:
    """MMDetection's annotation filter; None = usable box."""
    if ann.get("ignore", False):
        return "ann_ignore"
    x, y, w, h = bbox
    inter_w = max(0.0, min(x + w, img["width"]) - max(x, 0.0))
    inter_h = max(0.0, min(y + h, img["height"]) - max(y, 0.0))
    if inter_w * inter_h == 0:
        return "ann_outside_image"
    # MMDetection reads the stored (segmentation) area; fall back to w*h when a file has none.
    if ann.get("area", w * h) <= 0:
        return "ann_area_le_0"
    if w < 1 or h < 1:
        return "ann_w_or_h_lt_1"
    if ann.get("iscrowd", 0):
        return "ann_crowd"
    return None


def load_coco(
    ann_file: str | Path,
    image_dir: str | Path,
    train: bool,
    min_size: int = 32,
) -> CocoData:
    """Read a COCO instances file into records (see the module docstring for the rules).

    Args:
        ann_file: the instances JSON.
        image_dir: folder the images' `file_name`s are relative to.
        train: apply the training image filter (no annotations, min(w, h) < min_size).
        min_size: smallest allowed image side for training.

    Raises:
        DatasetError: unreadable or malformed annotation file, or missing image folder.
    """
    path, image_dir = Path(ann_file), Path(image_dir)
    data = read_coco_json(path)
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found (for {path})")
    cat_ids, class_names = _categories(path, data["categories"])
    cat_id_to_label = {c: i for i, c in enumerate(cat_ids)}
    images = _images(path, data["images"])

    skipped: Counter[str] = Counter()
    seen_ann: set[int] = set()
    has_ann: set[int] = set()
    per_image: dict[int, tuple[list[list[float]], list[int]]] = {iid: ([], []) for iid in images}
    for i, ann in enumerate(data["annotations"]):
        bbox = _check_annotation(path, i, ann, images, cat_id_to_label)
        if ann["id"] in seen_ann:
            raise DatasetError(f"{path}: annotation id {ann['id']}: duplicate annotation id")
        seen_ann.add(ann["id"])
        iid = ann["image_id"]
        has_ann.add(iid)
        reason = _skip_reason(ann, bbox, images[iid])
        if reason is not None:
            skipped[reason] += 1
            continue
        x, y, w, h = bbox
        per_image[iid][0].append([x, y, x + w, y + h])
        per_image[iid][1].append(cat_id_to_label[ann["category_id"]])

    records = []
    for iid, img in images.items():  # file order, as MMDetection
        width, height = int(img["width"]), int(img["height"])
        if train and iid not in has_ann:
            skipped["img_no_annotations"] += 1
            continue
        if train and min(width, height) < min_size:
            skipped["img_too_small"] += 1
            continue
        boxes, labels = per_image[iid]
        records.append(
            ImageRecord(
                image_id=iid,
                file_name=img["file_name"],
                path=image_dir / img["file_name"],
                width=width,
                height=height,
                boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                labels=torch.tensor(labels, dtype=torch.int64),
            )
        )
    return CocoData(
        ann_file=path,
        train=train,
        records=records,
        cat_ids=cat_ids,
        class_names=class_names,
        label_to_cat_id=list(cat_ids),
        cat_id_to_label=cat_id_to_label,
        num_images=len(images),
        num_annotations=len(data["annotations"]),
        skipped=dict(skipped),
    )
