"""COCO instances JSON + image folder -> in-memory records (spec 3.1).

Labels are the index of the category id in ascending id order, as MMDetection's `cat2label`.
Annotations are filtered as MMDetection's `CocoDataset.parse_data_info` does (ignore flag,
no overlap with the image, area <= 0, w < 1 or h < 1); crowd boxes are never trained on and
are kept as the record's `ignore_boxes`. For training, images without any annotation (crowd
included) and images with min(w, h) < min_size are dropped, as
`filter_cfg=dict(filter_empty_gt=True, min_size=32)`. Every drop is counted by reason; the
shared rules are in `freeanchor/data/records.py`.

Malformed input is a `DatasetError` whose one-line message names the file, the record and the
problem; so is a `file_name` that leads out of the image folder. Image files are not opened
here (too slow for 100k images): an unreadable file is a counted skip when the loader reads it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from freeanchor.data.records import (
    ANN_REASONS,
    IMG_REASONS,
    CocoData,
    DetectionData,
    ImageRecord,
    ImageRoot,
    box_skip_reason,
    image_skip_reason,
    make_record,
)
from freeanchor.errors import DatasetError

__all__ = [
    "ANN_REASONS",
    "IMG_REASONS",
    "CocoData",
    "DatasetError",
    "ImageRecord",
    "load_coco",
    "read_coco_json",
]


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


def load_coco(
    ann_file: str | Path,
    image_dir: str | Path,
    train: bool,
    min_size: int = 32,
    allow_outside_root: bool = False,
) -> DetectionData:
    """Read a COCO instances file into records (see the module docstring for the rules).

    Args:
        ann_file: the instances JSON.
        image_dir: folder the images' `file_name`s are relative to.
        train: apply the training image filter (no annotations, min(w, h) < min_size).
        min_size: smallest allowed image side for training.
        allow_outside_root: accept `file_name`s that lead out of `image_dir`.

    Raises:
        DatasetError: unreadable or malformed annotation file, missing image folder, or a
            `file_name` outside the image folder.
    """
    path, image_dir = Path(ann_file), Path(image_dir)
    data = read_coco_json(path)
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found (for {path})")
    root = ImageRoot(image_dir, allow_outside_root)
    cat_ids, class_names = _categories(path, data["categories"])
    cat_id_to_label = {c: i for i, c in enumerate(cat_ids)}
    images = _images(path, data["images"])

    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    seen_ann: set[int] = set()
    has_ann: set[int] = set()
    # image id -> (boxes, labels, crowd boxes, crowd labels)
    per_image: dict[int, tuple[list, list, list, list]] = {iid: ([], [], [], []) for iid in images}
    for i, ann in enumerate(data["annotations"]):
        bbox = _check_annotation(path, i, ann, images, cat_id_to_label)
        if ann["id"] in seen_ann:
            raise DatasetError(f"{path}: annotation id {ann['id']}: duplicate annotation id")
        seen_ann.add(ann["id"])
        iid = ann["image_id"]
        has_ann.add(iid)
        img = images[iid]
        x, y, w, h = bbox
        box = [x, y, x + w, y + h]
        # MMDetection reads the stored (segmentation) area; w*h when a file has none.
        reason = box_skip_reason(
            box, img["width"], img["height"], ann.get("area", w * h), bool(ann.get("ignore", False))
        )
        if reason is not None:
            skipped[reason] += 1
            examples.setdefault(reason, f"annotation id {ann['id']}")
            continue
        crowd = bool(ann.get("iscrowd", 0))
        if crowd:
            skipped["ann_crowd"] += 1
        per_image[iid][2 * crowd].append(box)
        per_image[iid][2 * crowd + 1].append(cat_id_to_label[ann["category_id"]])

    records = []
    for iid, img in images.items():  # file order, as MMDetection
        width, height = int(img["width"]), int(img["height"])
        reason = image_skip_reason(iid in has_ann, width, height, train, min_size)
        if reason is not None:
            skipped[reason] += 1
            continue
        file_name = img["file_name"]
        image_path = root.path(file_name, f"{path}: image id {iid}")
        records.append(make_record(iid, file_name, image_path, width, height, *per_image[iid]))
    return DetectionData(
        source=path,
        format="coco",
        train=train,
        records=records,
        class_names=class_names,
        label_to_cat_id=list(cat_ids),
        image_root=image_dir,
        num_images=len(images),
        num_annotations=len(data["annotations"]),
        skipped=dict(skipped),
        examples=examples,
    )
