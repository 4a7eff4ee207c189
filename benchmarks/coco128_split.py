"""A held-out split of coco128 for `freeanchor compare` (issue 11): train96.json / val32.json.

    python benchmarks/coco128_split.py ../shared/data/coco128/annotations.json OUT_DIR

Every 4th image (sorted by id) is held out: 96 training and 32 validation images, all 80
categories kept in both files (so label ids agree), each annotation in the file of its image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from freeanchor.files import write_json


def split(ann_file: Path, out_dir: Path, every: int = 4) -> tuple[Path, Path]:
    """Write OUT_DIR/train{n}.json and OUT_DIR/val{m}.json; return their paths."""
    coco = json.loads(ann_file.read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    held = {im["id"] for i, im in enumerate(images) if i % every == every - 1}
    paths = []
    for name, keep in (("train", lambda i: i not in held), ("val", lambda i: i in held)):
        anns = [a for a in coco["annotations"] if keep(a["image_id"])]
        part = dict(coco, images=[im for im in images if keep(im["id"])], annotations=anns)
        path = out_dir / f"{name}{len(part['images'])}.json"
        write_json(path, part)
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    train, val = split(Path(sys.argv[1]), Path(sys.argv[2]))
    print(train, val)
