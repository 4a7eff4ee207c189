"""Pick the reader from what the user points at; every reader gives the same `DetectionData`.

    data = load_dataset("coco/annotations/instances_val2017.json", "coco/val2017", train=False)
    data = load_dataset("datasets/shapes/data.yaml", split="val", train=False)     # YOLO
    data = load_dataset("datasets/shapes/labels/train")                            # YOLO
    data = load_dataset("VOCdevkit/VOC2007", split="trainval")                     # VOC
    data = load_dataset("VOCdevkit/VOC2007/ImageSets/Main/test.txt", train=False)  # VOC

| points at | format |
|---|---|
| a `.json` file | COCO instances (`images` = the folder its file names are relative to) |
| a `.yaml` / `.yml` file, or a folder holding `data.yaml` | YOLO data.yaml (Ultralytics) |
| a folder holding `Annotations/` (or that folder), or a `.txt` list under `ImageSets/` | VOC |
| any other folder (of `.txt` label files) | a YOLO labels folder |
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from freeanchor.data.coco import load_coco
from freeanchor.data.records import DetectionData
from freeanchor.data.voc import load_voc, voc_root
from freeanchor.data.yolo import load_yolo
from freeanchor.errors import DatasetError

FORMATS = ("coco", "yolo", "voc")
SPLITS = ("train", "val", "test", "trainval")


def detect_format(src: str | Path) -> tuple[str, Path]:
    """(format, the path to read) of a dataset source; see the module docstring.

    Raises:
        DatasetError: nothing there, or nothing we can read.
    """
    src = Path(src)
    suffix = src.suffix.lower()
    if suffix == ".json" and not src.is_dir():  # the reader says when it is missing
        return "coco", src
    if suffix in (".yaml", ".yml") and not src.is_dir():
        return "yolo", src
    if src.is_file():
        if suffix == ".txt" and voc_root(src) is not None:
            return "voc", src
    elif src.is_dir():
        for name in ("data.yaml", "data.yml"):
            if (src / name).is_file():
                return "yolo", src / name
        if voc_root(src) is not None:
            return "voc", src
        if src.name == "labels" or src.parent.name == "labels" or any(src.glob("*.txt")):
            return "yolo", src
    else:
        raise DatasetError(f"{src}: dataset not found")
    raise DatasetError(
        f"{src}: not a dataset we can read: expected a COCO .json, a YOLO data.yaml or labels "
        f"folder, or a Pascal VOC folder (with Annotations/) or ImageSets list"
    )


def load_dataset(
    src: str | Path,
    images: str | Path | None = None,
    *,
    split: str = "train",
    train: bool = True,
    min_size: int = 32,
    classes: Sequence[str] | None = None,
    allow_outside_root: bool = False,
) -> DetectionData:
    """Read a COCO, YOLO or VOC dataset into records, the format chosen from `src`.

    Args:
        src: see the module docstring.
        images: the image folder: required for COCO; for YOLO and VOC it replaces the
            folder the dataset implies (the YAML's split entry, `images/` beside `labels/`,
            `JPEGImages/`).
        split: which split of a data.yaml or a VOC folder (`ImageSets/Main/<split>.txt`);
            unused for a file that is one split.
        train: apply MMDetection's training image filter (and say "training" in the summary).
        min_size: smallest image side kept for training.
        classes: class names where the source has no list of its own (a VOC folder, a YOLO
            labels folder); pass the training set's to read its validation set alike.
        allow_outside_root: accept image paths leading out of the image folder (the
            `data.allow_outside_root` option).

    Raises:
        DatasetError: a missing or malformed dataset; the message names the file and the
            record (line, object, id).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    fmt, path = detect_format(src)
    if fmt == "coco":
        if images is None:
            raise DatasetError(f"{path}: a COCO file needs its image folder (images=...)")
        return load_coco(path, images, train, min_size, allow_outside_root)
    reader = load_yolo if fmt == "yolo" else load_voc
    return reader(path, split, images, classes, train, min_size, allow_outside_root)
