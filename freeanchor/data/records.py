"""One format-neutral in-memory dataset: what every reader (COCO, YOLO, VOC) produces.

An `ImageRecord` is one image and its boxes as xyxy float32 in original-image pixels, with
0-based contiguous labels; a `DetectionData` is the records of one split plus the class names,
the label -> category id mapping and the counted skips. The rules every reader shares live
here, so they are applied alike whatever the file format:

- MMDetection's annotation filter (`CocoDataset.parse_data_info`), first hit counts: an
  ignore flag, no overlap with the image, area <= 0, w < 1 or h < 1 -> the box is dropped.
- Crowd boxes (COCO `iscrowd`) and difficult objects (VOC `difficult`) are never trained on
  (MMDetection puts both in an ignore set its FreeAnchor head does not read); they are kept
  as `ignore_boxes`, and become `iscrowd=1` ground truth when records are evaluated, so a
  detection on them is neither a hit nor a false positive.
- For training, images without any annotation and images with min(w, h) < min_size are
  dropped (`filter_cfg=dict(filter_empty_gt=True, min_size=32)`).
- Image paths taken from annotations stay under the image root (see `image_path`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freeanchor.errors import DatasetError

# Skip reasons, in the order the checks run (a box or image counts once, first hit).
ANN_REASONS = {
    "ann_ignore": "annotations flagged 'ignore'",
    "ann_outside_image": "boxes not overlapping the image",
    "ann_area_le_0": "annotations with area <= 0",
    "ann_w_or_h_lt_1": "boxes with w < 1 or h < 1",
    "ann_unknown_class": "objects of classes not in the class list",
}
IGNORE_REASONS = {  # kept as ignore_boxes: not trained on, not scored
    "ann_crowd": "crowd boxes",
    "ann_difficult": "difficult objects",
}
IMG_REASONS = {
    "img_unreadable": "images whose size could not be read",
    "img_no_annotations": "images without annotations",
    "img_too_small": "images with min(w, h) < min_size",
    "label_without_image": "label files without an image",
}
OUTSIDE_ROOT_HINT = "set data.allow_outside_root=true if that is intended"


def _empty_boxes() -> Tensor:
    return torch.zeros(0, 4, dtype=torch.float32)


def _empty_labels() -> Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass
class ImageRecord:
    """One image and its usable (filtered) boxes."""

    image_id: int
    file_name: str  # relative to the image root (posix), as written in a COCO file
    path: Path
    width: int
    height: int
    boxes: Tensor  # [K, 4] float32 xyxy in original-image pixels (not clipped)
    labels: Tensor  # [K] int64, 0-based contiguous labels
    ignore_boxes: Tensor = field(default_factory=_empty_boxes)  # [M, 4] crowd / difficult
    ignore_labels: Tensor = field(default_factory=_empty_labels)  # [M]


@dataclass
class DetectionData:
    """Records of one split plus the label mapping and the skip counts.

    Labels are the index of the category id in ascending id order (MMDetection's
    `cat2label`); YOLO and VOC classes get category ids 1..C in their list order.
    """

    source: Path  # the file or folder the user pointed at
    format: str  # "coco" | "yolo" | "voc"
    train: bool
    records: list[ImageRecord]
    class_names: list[str]
    label_to_cat_id: list[int]  # ascending
    image_root: Path  # records' file_name are relative to it
    num_images: int  # in the source
    num_annotations: int  # boxes / objects / label lines in the source
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # first case of each skip reason
    notes: list[str] = field(default_factory=list)  # how classes etc. were decided
    split: str = ""  # which split of a data.yaml / VOC folder ("" for a one-split source)

    @property
    def ann_file(self) -> Path:  # the name `CocoData` had
        return self.source

    @property
    def cat_ids(self) -> list[int]:
        return list(self.label_to_cat_id)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.label_to_cat_id)}

    @property
    def num_boxes(self) -> int:
        return sum(int(r.boxes.shape[0]) for r in self.records)

    def summary(self) -> str:
        """One line: what was read, what is used, and what was skipped and why."""
        use = "training" if self.train else "evaluation"
        where = f"{self.source} ({self.split})" if self.split else f"{self.source}"
        line = (
            f"{where}: {self.num_images} images, {self.num_annotations} annotations, "
            f"{len(self.label_to_cat_id)} categories -> {len(self.records)} {use} images with "
            f"{self.num_boxes} boxes"
        )
        skipped = [
            f"{self.skipped[k]} {text}"
            for k, text in {**IMG_REASONS, **ANN_REASONS}.items()
            if self.skipped.get(k)
        ]
        ignored = [f"{n} {t}" for k, t in IGNORE_REASONS.items() if (n := self.skipped.get(k))]
        line += "; skipped: " + ", ".join(skipped) if skipped else "; nothing skipped"
        if ignored:
            line += "; kept as ignored (not trained on, not scored): " + ", ".join(ignored)
        return line

    def to_coco(self) -> dict[str, Any]:
        """The records as a COCO instances dict (ignore boxes as `iscrowd: 1`, area = w * h)."""
        images, annotations = [], []
        for r in self.records:
            images.append(
                {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height}
            )
            for boxes, labels, crowd in (
                (r.boxes, r.labels, 0),
                (r.ignore_boxes, r.ignore_labels, 1),
            ):
                # float32 values widened exactly to float64, w = x2 - x1 as the evaluator does
                for (x1, y1, x2, y2), label in zip(boxes.double().tolist(), labels.tolist()):
                    w, h = x2 - x1, y2 - y1
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": r.image_id,
                            "category_id": self.label_to_cat_id[label],
                            "bbox": [x1, y1, w, h],
                            "area": w * h,
                            "iscrowd": crowd,
                        }
                    )
        categories = [{"id": c, "name": n} for c, n in zip(self.label_to_cat_id, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def ground_truth(self) -> Path | dict[str, Any]:
        """What the COCO evaluator scores against: a COCO source's own file (every crowd and
        filtered annotation as MMDetection scores them), else the records as a COCO dict."""
        return self.source if self.format == "coco" else self.to_coco()


CocoData = DetectionData  # the COCO-only name, kept for callers


def box_skip_reason(
    box: tuple[float, float, float, float],
    width: float,
    height: float,
    area: float | None = None,
    ignore: bool = False,
) -> str | None:
    """MMDetection's annotation filter for an xyxy box; None = usable.

    `area` is a COCO file's stored (segmentation) area; other formats use the box's w * h.
    """
    if ignore:
        return "ann_ignore"
    x1, y1, x2, y2 = box
    inter_w = max(0.0, min(x2, width) - max(x1, 0.0))
    inter_h = max(0.0, min(y2, height) - max(y1, 0.0))
    if inter_w * inter_h == 0:
        return "ann_outside_image"
    w, h = x2 - x1, y2 - y1
    if (w * h if area is None else area) <= 0:
        return "ann_area_le_0"
    if w < 1 or h < 1:
        return "ann_w_or_h_lt_1"
    return None


def image_skip_reason(
    has_annotations: bool, width: int, height: int, train: bool, min_size: int
) -> str | None:
    """MMDetection's training image filter; None = keep (evaluation keeps every image)."""
    if train and not has_annotations:
        return "img_no_annotations"
    if train and min(width, height) < min_size:
        return "img_too_small"
    return None


def make_record(
    image_id: int,
    file_name: str,
    path: Path,
    width: int,
    height: int,
    boxes: list[list[float]],
    labels: list[int],
    ignore_boxes: list[list[float]] | None = None,
    ignore_labels: list[int] | None = None,
) -> ImageRecord:
    """An `ImageRecord` from plain lists of xyxy boxes and labels."""
    ignore_boxes, ignore_labels = ignore_boxes or [], ignore_labels or []
    return ImageRecord(
        image_id,
        file_name,
        path,
        int(width),
        int(height),
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64).reshape(-1),
        torch.tensor(ignore_boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(ignore_labels, dtype=torch.int64).reshape(-1),
    )


def read_image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the image header only (EXIF orientation applied), or why not."""
    from PIL import Image

    from freeanchor.data.io import image_size

    if not path.is_file():
        return f"{path}: image file not found"
    try:
        return image_size(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{path}: cannot read the image header ({e})"


class ImageRoot:
    """The folder a dataset's image names are relative to, and the check that they stay in it.

    A name from an annotation file (an absolute path, `..` steps, or a symlink inside the
    folder that points out of it) must resolve to a file under the folder's real path, unless
    `allow_outside_root`. Otherwise a crafted annotation could make us open any file
    (`/etc/passwd`) and, through `data check --show` or errors, show its content or size.
    """

    def __init__(self, root: str | Path, allow_outside_root: bool = False) -> None:
        self.root = Path(root)
        self.allow_outside_root = allow_outside_root
        self._real_root = os.path.realpath(self.root)
        self._real_dirs: dict[str, str] = {}  # one realpath per folder, not per image

    def contains(self, path: Path) -> bool:
        """Whether `path` (symlinks resolved) lies under the root."""
        parent = str(path.parent)
        real_dir = self._real_dirs.get(parent)
        if real_dir is None:
            real_dir = self._real_dirs[parent] = os.path.realpath(parent)
        if path.is_symlink():
            real = os.path.realpath(path)
        else:  # normpath: a name ending in ".." must not count as inside
            real = os.path.normpath(os.path.join(real_dir, path.name))
        return os.path.commonpath([self._real_root, real]) == self._real_root

    def path(self, name: str, where: str) -> Path:
        """`root / name`, or a `DatasetError` naming `where` when it leaves the root."""
        return self.check(self.root / name, where, name)

    def check(self, path: Path, where: str, name: str | None = None) -> Path:
        """`path` itself, or a `DatasetError` naming `where` when it is outside the root."""
        if not self.allow_outside_root and not self.contains(path):
            name = str(path) if name is None else name
            kind = "an absolute path" if Path(name).is_absolute() else "a path"
            raise DatasetError(
                f"{where}: image file name {name!r} is {kind} outside the image folder "
                f"{self.root}; refused ({OUTSIDE_ROOT_HINT})"
            )
        return path

    def relative_name(self, path: Path) -> str:
        """`path` as a file name relative to the root (absolute when outside it)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
