"""Ultralytics YOLO layout -> records: a data.yaml, or one labels folder.

    data = load_yolo("datasets/shapes/data.yaml", split="train")
    data = load_yolo("datasets/shapes/labels/val", train=False)    # names from classes.txt

data.yaml: `path` (the dataset root; relative to the YAML's folder, else to the working
directory; default the YAML's folder), `train` / `val` / `test` (a folder of images, a .txt
list of image paths, or a list of those, relative to `path`; in a list, `./x` is relative to
the list's folder) and `names` (a list, or a dict {0: name, ...}; `nc` is checked against it).
Each image `.../images/.../a.jpg` has its labels in `.../labels/.../a.txt`, one object per
line: `class cx cy w h` as fractions of the image size (a polygon `class x1 y1 x2 y2 ...`
gives its bounding box, as Ultralytics reads segment labels). A missing or empty label file is
an image without objects. Image sizes are read from the image headers (needed to turn the
fractions into pixels; EXIF orientation applied, as the loader decodes).

Class i is label i and category id i + 1. Every image path must stay under the dataset root
(symlinks resolved) unless `allow_outside_root`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from freeanchor.data.io import IMAGE_SUFFIXES
from freeanchor.data.records import (
    DetectionData,
    ImageRoot,
    box_skip_reason,
    image_skip_reason,
    make_record,
    read_image_size,
)
from freeanchor.errors import DatasetError

MAX_INFERRED_CLASSES = 1000  # without a class list, a larger class index is a broken file
COORDS = ("cx", "cy", "w", "h")


def read_data_yaml(path: Path) -> dict[str, Any]:
    """The mapping of a data.yaml (safe loader: plain data only)."""
    import yaml

    if not path.is_file():
        raise DatasetError(f"{path}: dataset YAML not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise DatasetError(f"{path}: malformed YAML{where}: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: unreadable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _names(data: dict[str, Any], path: Path) -> list[str]:
    names, nc = data.get("names"), data.get("nc")
    if isinstance(names, dict):
        if set(names) != set(range(len(names))):  # also refuses string keys
            raise DatasetError(
                f"{path}: 'names' keys must be 0..{len(names) - 1}, got "
                f"{sorted(map(str, names))[:5]}"
            )
        names = [names[i] for i in range(len(names))]
    if names is None and isinstance(nc, int) and nc > 0:
        names = [f"class_{i}" for i in range(nc)]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must be a non-empty list or dict, got {names!r}")
    names = [str(n) for n in names]
    if nc is not None and nc != len(names):
        raise DatasetError(f"{path}: nc {nc!r} but {len(names)} names")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: duplicate class names in 'names'")
    return names


def _dataset_root(data: dict[str, Any], path: Path) -> Path:
    value = data.get("path")
    if value in (None, ""):
        return path.parent
    root = Path(str(value)).expanduser()
    for cand in (root,) if root.is_absolute() else (path.parent / root, root):
        if cand.is_dir():
            return cand
    raise DatasetError(f"{path}: dataset root 'path: {value}' not found")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _split_images(value: Any, root: ImageRoot, path: Path, split: str) -> list[Path]:
    """Image paths of one split entry: folders and .txt lists, relative to the root."""
    entries = value if isinstance(value, list) else [value]
    images: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise DatasetError(f"{path}: {split!r} must be a path or a list of paths")
        target = root.path(entry, f"{path}: {split}")
        if target.is_dir():
            images += [root.check(p, f"{path}: {split}") for p in _list_images(target)]
        elif target.is_file() and target.suffix == ".txt":
            try:
                lines = target.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise DatasetError(f"{target}: not UTF-8 text ({e.reason})") from None
            for n, line in enumerate(lines, 1):
                name = line.strip()
                if name:
                    full = target.parent / name[2:] if name.startswith("./") else root.root / name
                    full = Path(os.path.normpath(full))  # what we open is what we check
                    images.append(root.check(full, f"{target} line {n}", name))
        else:
            raise DatasetError(f"{path}: {split}: {target} is not a folder or a .txt image list")
    return images


def label_path(image: Path) -> Path:
    """Ultralytics' pairing: the last `images` folder of the path becomes `labels`, .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_labels(text: str, path: Path, num_classes: int | None) -> list[tuple[int, list[float]]]:
    """(class, [x1, y1, x2, y2] as fractions) per object line of a label file."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path} line {n}"
        if not (len(tokens) == 5 or (len(tokens) >= 7 and len(tokens) % 2)):
            raise DatasetError(
                f"{where}: expected 5 numbers (class cx cy w h) or a polygon "
                f"(class x1 y1 x2 y2 x3 y3 ...), got {len(tokens)}"
            )
        values = []
        for tok in tokens:
            try:
                v = float(tok)
            except ValueError:
                raise DatasetError(f"{where}: {tok!r} is not a number") from None
            if not math.isfinite(v):
                raise DatasetError(f"{where}: {tok!r} is not finite")
            values.append(v)
        cls = values[0]
        if not cls.is_integer() or cls < 0:
            raise DatasetError(f"{where}: class {tokens[0]!r} is not a class index (0, 1, ...)")
        limit = num_classes if num_classes is not None else MAX_INFERRED_CLASSES
        if cls >= limit:
            known = f"{num_classes} names" if num_classes is not None else "no class list"
            raise DatasetError(f"{where}: class {int(cls)} not in 0..{limit - 1} ({known})")
        names = (
            COORDS
            if len(tokens) == 5
            else [f"{a}{i // 2 + 1}" for i, a in enumerate("xy" * (len(tokens) // 2))]
        )
        for name, v in zip(names, values[1:]):
            if not 0 <= v <= 1:
                raise DatasetError(
                    f"{where}: {name} {v:g} outside [0, 1] (YOLO coordinates "
                    f"are fractions of the image size)"
                )
        if len(tokens) == 5:
            cx, cy, w, h = values[1:]
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            xs, ys = values[1::2], values[2::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        out.append((int(cls), box))
    return out


def _read(image: Path, label: Path) -> tuple[tuple[int, int] | str, bytes | None]:
    """(image size or why not, label file bytes or None when there is no label file)."""
    try:
        return read_image_size(image), label.read_bytes() if label.is_file() else None
    except OSError as e:
        raise DatasetError(f"{label}: cannot read ({e.strerror})") from None


def _find_classes(labels_dir: Path) -> Path | None:
    return next(
        (
            d / "classes.txt"
            for d in (labels_dir, *list(labels_dir.parents)[:2])
            if (d / "classes.txt").is_file()
        ),
        None,
    )


def load_yolo(
    src: str | Path,
    split: str = "train",
    images: str | Path | None = None,
    classes: Sequence[str] | None = None,
    train: bool = True,
    min_size: int = 32,
    allow_outside_root: bool = False,
) -> DetectionData:
    """Read a YOLO data.yaml (its `split`) or a labels folder into records.

    Args:
        src: a data.yaml, or a labels folder (its images: the same path with `labels` ->
            `images`, or `images`).
        images: the split's image folder, instead of the YAML's entry or the paired folder.
        classes: class names for a labels folder (default: classes.txt in it or up to two
            folders above, else class_0..class_K from the largest class seen); ignored
            for a YAML, which names its classes.
        train / min_size: MMDetection's training image filter.

    Raises:
        DatasetError: a malformed YAML or label line (naming the file and the line), or an
            image path outside the dataset root.
    """
    src = Path(src)
    if src.is_file():
        root, pairs, names, label_dirs, notes = _from_yaml(src, split, images, allow_outside_root)
    else:
        root, pairs, names, label_dirs, notes = _from_folder(
            src, images, classes, allow_outside_root
        )

    workers = min(16, (os.cpu_count() or 1) + 4)  # header reads wait on the disk, not the CPU
    with ThreadPoolExecutor(workers) as pool:
        read = list(pool.map(lambda pair: _read(*pair), pairs))
    parsed = []
    for (_, label), (_, raw) in zip(pairs, read):
        try:
            text = "" if raw is None else raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        parsed.append(parse_labels(text, label, len(names) if names else None))
    if names is None:
        top = max((c for objects in parsed for c, _ in objects), default=-1)
        names = [f"class_{i}" for i in range(top + 1)]
        notes.append(f"no class list (classes.txt): {len(names)} classes from the labels")
    if not names:
        raise DatasetError(f"{src}: no class names and no objects: the classes are unknown")

    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    records = []
    for image_id, ((image, label), (size, _), objects) in enumerate(zip(pairs, read, parsed), 1):
        if isinstance(size, str):
            skipped["img_unreadable"] += 1
            examples.setdefault("img_unreadable", size)
            continue
        width, height = size
        boxes, labels = [], []
        for k, (cls, (x1, y1, x2, y2)) in enumerate(objects, 1):
            box = [x1 * width, y1 * height, x2 * width, y2 * height]
            reason = box_skip_reason(box, width, height)
            if reason is not None:
                skipped[reason] += 1
                examples.setdefault(reason, f"{label} object {k}")
                continue
            boxes.append(box)
            labels.append(cls)
        reason = image_skip_reason(bool(objects), width, height, train, min_size)
        if reason is not None:
            skipped[reason] += 1
            continue
        records.append(
            make_record(image_id, root.relative_name(image), image, width, height, boxes, labels)
        )
    used = {label for _, label in pairs}
    orphans = [
        p
        for d in label_dirs
        if d.is_dir()
        for p in d.rglob("*.txt")
        if p not in used and p.name != "classes.txt"
    ]
    if orphans:
        skipped["label_without_image"] = len(orphans)
        examples["label_without_image"] = str(orphans[0])
    no_file = sum(raw is None for size, raw in read if not isinstance(size, str))
    if no_file:
        notes.append(f"{no_file} images without a label file (images without objects)")
    return DetectionData(
        source=src,
        format="yolo",
        train=train,
        records=records,
        class_names=names,
        label_to_cat_id=list(range(1, len(names) + 1)),
        image_root=root.root,
        num_images=len(pairs),
        num_annotations=sum(len(o) for o in parsed),
        skipped=dict(skipped),
        examples=examples,
        notes=notes,
        split=split if src.is_file() and not images else "",
    )


_Pairs = list[tuple[Path, Path]]  # (image, label file)


def _label_dir(folder: Path) -> Path:
    return label_path(folder / "_").parent


def _from_yaml(
    src: Path, split: str, images: str | Path | None, allow: bool
) -> tuple[ImageRoot, _Pairs, list[str], set[Path], list[str]]:
    data = read_data_yaml(src)
    names = _names(data, src)
    if images:
        root = ImageRoot(images, allow)
        _require_folder(root.root, src)
        pairs = [(p, label_path(p)) for p in _list_images(root.root)]
        return root, pairs, names, {_label_dir(root.root)}, [f"images: {root.root}"]
    value = data.get(split)
    if value in (None, "", []):
        have = ", ".join(k for k in ("train", "val", "test") if data.get(k)) or "none"
        raise DatasetError(f"{src}: no {split!r} entry (has: {have})")
    root = ImageRoot(_dataset_root(data, src), allow)
    image_paths = _split_images(value, root, src, split)
    folders = [root.root / e for e in (value if isinstance(value, list) else [value])]
    if len(folders) == 1 and folders[0].is_dir():  # file names relative to the split folder
        root = ImageRoot(folders[0], True)  # already checked against the dataset root
    label_dirs = {_label_dir(f) for f in folders if f.is_dir()}
    return root, [(p, label_path(p)) for p in image_paths], names, label_dirs, []


def _from_folder(
    src: Path, images: str | Path | None, classes: Sequence[str] | None, allow: bool
) -> tuple[ImageRoot, _Pairs, list[str] | None, set[Path], list[str]]:
    if not src.is_dir():
        raise DatasetError(f"{src}: labels folder not found")
    root = ImageRoot(images or _paired_images(src), allow)
    _require_folder(root.root, src)
    pairs = [
        (root.check(p, str(root.root)), src / p.relative_to(root.root).with_suffix(".txt"))
        for p in _list_images(root.root)
    ]
    notes = []
    names = list(classes) if classes else None
    listed = _find_classes(src)
    if names is None and listed is not None:
        names = [n.strip() for n in listed.read_text(encoding="utf-8").splitlines() if n.strip()]
        if not names or len(set(names)) != len(names):
            raise DatasetError(f"{listed}: empty or with a duplicate class name")
        notes.append(f"classes from {listed}")
    return root, pairs, names, {src}, notes


def _require_folder(folder: Path, src: Path) -> None:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found (for {src})")


def _paired_images(labels_dir: Path) -> Path:
    """The image folder of a labels folder: its last `labels` component -> `images`."""
    parts = list(labels_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            return Path(*parts)
    raise DatasetError(
        f"{labels_dir}: no 'labels' in the path to pair an images folder with; "
        f"pass the images folder"
    )
