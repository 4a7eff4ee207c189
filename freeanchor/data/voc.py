"""Pascal VOC folder (`Annotations/*.xml`, `JPEGImages/`, `ImageSets/Main/*.txt`) -> records.

    data = load_voc("VOCdevkit/VOC2007", split="trainval")
    data = load_voc("VOCdevkit/VOC2007/ImageSets/Main/test.txt", train=False)

Which images: the ImageSets list of `split` (or the list file given); a folder without
`ImageSets/Main` uses every `Annotations/*.xml`. Each image is `JPEGImages/<filename>` from its
XML (`<id>.jpg` when that is missing or names no file), checked to stay in the image folder.

Geometry: VOC coordinates are 1-based pixel indices, both ends inclusive (the devkit's
convention, which labelImg and the devkit tools follow), so the box in pixel edges is
(xmin - 1, ymin - 1, xmax, ymax): `xmin=1, xmax=W` covers the whole image. Sizes come from
`<size>`, or from the image header where a tool wrote 0 or nothing.

Classes: the `classes` argument, else `classes.txt` beside `Annotations/` (one name per line),
else the 20 VOC classes in their usual order when every name is one of them, else the sorted
names found in all of `Annotations/` (so every split of a folder gets the same labels). Objects
of other classes are a counted skip, as MMDetection's XMLDataset drops them. `difficult`
objects are kept as ignored boxes, as MMDetection does: not trained on; scored as `iscrowd`
ground truth, so a detection on one is neither a hit nor a false positive.

XML is parsed by the standard library's expat with every DTD refused: no entity can be
declared, so no entity expansion (billion laughs) or external entity can happen.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from xml.parsers import expat

from freeanchor.data.records import (
    DetectionData,
    ImageRoot,
    box_skip_reason,
    image_skip_reason,
    make_record,
    read_image_size,
)
from freeanchor.errors import DatasetError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
MAX_XML_BYTES = 16 << 20  # a VOC annotation is a few KB


def parse_xml(path: Path) -> ET.Element:
    """Parse an XML file with expat, refusing any DOCTYPE (hence any entity declaration).

    Raises:
        DatasetError: unreadable, too large, malformed, or with a DTD.
    """
    try:
        if path.stat().st_size > MAX_XML_BYTES:
            raise DatasetError(f"{path}: larger than {MAX_XML_BYTES >> 20} MB, not an annotation")
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None

    def refuse(*_args: object) -> None:
        raise DatasetError(f"{path}: XML with a DTD or entity declarations is refused")

    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        message = expat.ErrorString(e.code)
        raise DatasetError(
            f"{path}: malformed XML at line {e.lineno} column {e.offset + 1}: {message}"
        ) from None
    return builder.close()


def _text(elem: ET.Element | None) -> str | None:
    return None if elem is None or elem.text is None else elem.text.strip()


def _number(text: str | None, where: str, tag: str) -> float:
    if text is None or text == "":
        raise DatasetError(f"{where}: missing <{tag}>")
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: <{tag}> {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: <{tag}> {text!r} is not finite")
    return value


def _size(xml: ET.Element, path: Path) -> tuple[int, int] | None:
    """(width, height) from <size>; None where a tool wrote 0 or no <size>."""
    size = xml.find("size")
    if size is None or _text(size.find("width")) in (None, "", "0"):
        return None
    dims = []
    for tag in ("width", "height"):
        v = _number(_text(size.find(tag)), f"{path} <size>", tag)
        if not (v > 0 and v.is_integer()):
            raise DatasetError(f"{path} <size>: <{tag}> must be a positive integer, got {v:g}")
        dims.append(int(v))
    return dims[0], dims[1]


def _objects(xml: ET.Element, path: Path) -> list[tuple[str, list[float], bool]]:
    """(name, xyxy box in pixel edges, difficult) of every <object>, validated."""
    out = []
    for k, obj in enumerate(xml.findall("object"), 1):
        where = f"{path} object {k}"
        name = _text(obj.find("name"))
        if not name:
            raise DatasetError(f"{where}: missing <name>")
        difficult = _text(obj.find("difficult")) or "0"
        if difficult not in ("0", "1"):
            raise DatasetError(f"{where}: <difficult> must be 0 or 1, got {difficult!r}")
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (
            _number(_text(box.find(t)), where, t) for t in ("xmin", "ymin", "xmax", "ymax")
        )
        for lo, hi, a, b in (("xmin", "xmax", xmin, xmax), ("ymin", "ymax", ymin, ymax)):
            if b < a:
                raise DatasetError(f"{where}: {hi} {b:g} < {lo} {a:g}")
        out.append((name, [xmin - 1, ymin - 1, xmax, ymax], difficult == "1"))
    return out


def _read_list(path: Path, annotations: ImageRoot) -> list[tuple[str, Path]]:
    """(image id, xml path) per line of an ImageSets list (first token; per-class lists too)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the image list ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.split():
            continue
        image_id = line.split()[0]
        xml = annotations.path(f"{image_id}.xml", f"{path} line {n}")
        if not xml.is_file():
            raise DatasetError(f"{path} line {n}: no annotation file {xml}")
        out.append((image_id, xml))
    return out


def voc_root(src: Path) -> Path | None:
    """The VOC folder (the one holding Annotations/) of a folder or an ImageSets list."""
    if src.is_dir():
        cands = [src.parent] if src.name == "Annotations" else [src]
    else:  # VOC/ImageSets/Main/x.txt, or a list beside Annotations/
        cands = list(src.parents[:3])
    return next((c for c in cands if (c / "Annotations").is_dir()), None)


def _layout(src: Path, split: str, allow: bool) -> tuple[Path, list[tuple[str, Path]], str]:
    """(VOC root, [(image id, xml)], what chose them)."""
    root = voc_root(src)
    if root is None:
        raise DatasetError(f"{src}: not a Pascal VOC folder or list (no Annotations/ folder)")
    annotations = ImageRoot(root / "Annotations", allow)
    if src.is_file():
        return root, _read_list(src, annotations), f"image list {src}"
    main = root / "ImageSets" / "Main"
    lists = sorted(p.name for p in main.glob("*.txt")) if main.is_dir() else []
    if not lists:
        xmls = sorted((root / "Annotations").glob("*.xml"))
        return root, [(p.stem, p) for p in xmls], "every Annotations/*.xml (no ImageSets/Main)"
    if f"{split}.txt" not in lists:
        found = ", ".join(n for n in lists if "_" not in n) or ", ".join(lists[:5])
        raise DatasetError(
            f"{main}: no {split}.txt for split {split!r} (found {found}); name the list file"
        )
    return root, _read_list(main / f"{split}.txt", annotations), f"image list {main / split}.txt"


def _class_names(
    root: Path, parsed: Sequence[list[tuple[str, list[float], bool]]], classes: Sequence[str] | None
) -> tuple[list[str], str]:
    if classes:
        return list(classes), "classes given by the caller"
    listed = root / "classes.txt"
    if listed.is_file():
        names = [n.strip() for n in listed.read_text(encoding="utf-8").splitlines() if n.strip()]
        if len(set(names)) != len(names) or not names:
            raise DatasetError(f"{listed}: empty or with a duplicate class name")
        return names, f"classes from {listed}"
    found = {name for objects in parsed for name, _, _ in objects}
    if found and found <= set(VOC_CLASSES):
        return list(VOC_CLASSES), "the 20 Pascal VOC classes"
    for xml in (root / "Annotations").glob("*.xml"):  # every split of the folder alike
        found |= {_text(o.find("name")) or "" for o in parse_xml(xml).findall("object")}
    found.discard("")
    if not found:
        raise DatasetError(f"{root}: no objects and no classes.txt: the classes are unknown")
    return sorted(found), f"classes: the sorted object names of {root / 'Annotations'}"


def load_voc(
    src: str | Path,
    split: str = "train",
    images: str | Path | None = None,
    classes: Sequence[str] | None = None,
    train: bool = True,
    min_size: int = 32,
    allow_outside_root: bool = False,
) -> DetectionData:
    """Read a VOC folder (its `split` list) or one ImageSets list file into records.

    Args:
        images: the image folder (default: `JPEGImages/` of the VOC folder).
        classes: the class names (default: see the module docstring).
        train / min_size: MMDetection's training image filter.
        allow_outside_root: accept image file names (and list ids) leading out of the folder.

    Raises:
        DatasetError: a malformed list or XML (naming the file and the line or object), or
            an image path outside the image folder.
    """
    src = Path(src)
    root, items, chosen = _layout(src, split, allow_outside_root)
    image_root = ImageRoot(Path(images) if images else root / "JPEGImages", allow_outside_root)
    if not image_root.root.is_dir():
        raise DatasetError(f"{image_root.root}: image folder not found (for {src})")
    xmls = [parse_xml(xml) for _, xml in items]
    for xml, (_, path) in zip(xmls, items):
        if xml.tag != "annotation":
            raise DatasetError(f"{path}: root element is <{xml.tag}>, expected <annotation>")
    parsed = [_objects(xml, path) for xml, (_, path) in zip(xmls, items)]
    names, class_note = _class_names(root, parsed, classes)
    label_of = {n: i for i, n in enumerate(names)}

    skipped: Counter[str] = Counter()
    examples: dict[str, str] = {}
    records = []
    for image_id, ((stem, path), xml, objects) in enumerate(zip(items, xmls, parsed), 1):
        filename = _text(xml.find("filename"))
        image = image_root.path(filename or f"{stem}.jpg", str(path))
        if not image.is_file() and (image_root.root / f"{stem}.jpg").is_file():
            image = image_root.root / f"{stem}.jpg"
        size = _size(xml, path) or read_image_size(image)
        if isinstance(size, str):
            skipped["img_unreadable"] += 1
            examples.setdefault("img_unreadable", f"{path}: {size}")
            continue
        width, height = size
        lists: tuple[list, list, list, list] = ([], [], [], [])
        for k, (name, box, difficult) in enumerate(objects, 1):
            reason = "ann_unknown_class" if name not in label_of else None
            reason = reason or box_skip_reason(box, width, height)
            if reason is not None:
                skipped[reason] += 1
                examples.setdefault(reason, f"{path} object {k} ({name})")
                continue
            if difficult:
                skipped["ann_difficult"] += 1
            lists[2 * difficult].append(box)
            lists[2 * difficult + 1].append(label_of[name])
        known = any(name in label_of for name, _, _ in objects)
        reason = image_skip_reason(known, width, height, train, min_size)
        if reason is not None:
            skipped[reason] += 1
            continue
        file_name = image_root.relative_name(image)
        records.append(make_record(image_id, file_name, image, width, height, *lists))
    return DetectionData(
        source=src,
        format="voc",
        train=train,
        records=records,
        class_names=names,
        label_to_cat_id=list(range(1, len(names) + 1)),
        image_root=image_root.root,
        num_images=len(items),
        num_annotations=sum(len(o) for o in parsed),
        skipped=dict(skipped),
        examples=examples,
        notes=[f"images: {chosen}", class_note],
        split=split if src.is_dir() else "",
    )
