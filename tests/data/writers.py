"""Test-side writers: one COCO dataset rewritten as YOLO (data.yaml + labels) and Pascal VOC.

Written independently of the readers, from each format's own documentation: YOLO lines are
`class cx cy w h` as fractions of the image size; VOC boxes are 1-based inclusive pixel
indices, so pixel edges (x1, y1, x2, y2) are written as (x1 + 1, y1 + 1, x2, y2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.sax.saxutils import escape


def _by_image(doc: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {img["id"]: [] for img in doc["images"]}
    for ann in doc["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


def write_yolo(splits: dict[str, tuple[Path, Path]], out: Path, digits: int = 12) -> Path:
    """{split: (COCO json, image folder)} -> out/images/<split>, out/labels/<split>, data.yaml."""
    names = None
    for split, (ann, image_dir) in splits.items():
        doc = json.loads(Path(ann).read_text())
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        index = {c["id"]: i for i, c in enumerate(cats)}
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        anns = _by_image(doc)
        for img in doc["images"]:
            shutil.copy(Path(image_dir) / img["file_name"], out / "images" / split)
            w, h = img["width"], img["height"]
            lines = []
            for a in anns[img["id"]]:
                x, y, bw, bh = a["bbox"]
                vals = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
                lines.append(" ".join([str(index[a["category_id"]])]
                                      + [format(v, f".{digits}g") for v in vals]))  # fmt: skip
            label = out / "labels" / split / (Path(img["file_name"]).stem + ".txt")
            label.write_text("".join(line + "\n" for line in lines))
    yaml_lines = ["path: .", *(f"{s}: images/{s}" for s in splits), "names:"]
    yaml_lines += [f"  {i}: {n}" for i, n in enumerate(names)]
    (out / "data.yaml").write_text("\n".join(yaml_lines) + "\n")
    return out / "data.yaml"


def voc_xml(filename: str, width: int, height: int, objects: list[tuple]) -> str:
    """objects: (name, x1, y1, x2, y2 in pixel edges, difficult)."""
    body = "".join(
        f"<object><name>{escape(n)}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin>"
        f"<xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2, d in objects
    )
    return (f"<annotation><folder>VOC</folder><filename>{escape(filename)}</filename><size>"
            f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{body}</annotation>\n")  # fmt: skip


def write_voc(splits: dict[str, tuple[Path, Path]], out: Path) -> Path:
    """{split: (COCO json, image folder)} -> a VOC folder with classes.txt and ImageSets."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split, (ann, image_dir) in splits.items():
        doc = json.loads(Path(ann).read_text())
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        name = {c["id"]: c["name"] for c in cats}
        (out / "classes.txt").write_text("".join(c["name"] + "\n" for c in cats))
        anns = _by_image(doc)
        ids = []
        for img in doc["images"]:
            shutil.copy(Path(image_dir) / img["file_name"], out / "JPEGImages")
            objects = [(name[a["category_id"]], a["bbox"][0], a["bbox"][1],
                        a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3],
                        a.get("iscrowd", 0)) for a in anns[img["id"]]]  # fmt: skip
            stem = Path(img["file_name"]).stem
            xml = voc_xml(img["file_name"], img["width"], img["height"], objects)
            (out / "Annotations" / f"{stem}.xml").write_text(xml)
            ids.append(stem)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return out
