"""`freeanchor data check` and `freeanchor data convert`: look at a dataset before training.

    freeanchor data check data.yaml --split val [--model PRESET] [--set model.ratios=0.25,0.5,1,2,4]
    freeanchor data check VOCdevkit/VOC2007 --split trainval --show 16 --out check/ [--json]
    freeanchor data convert data.yaml --split val --out val.json   # COCO instances JSON

The check reads the dataset as evaluation does (no image dropped) and reports: boxes and
images per class (and classes without boxes), a box size histogram (COCO's small / medium /
large and finer bins), images without labels, duplicate images (same bytes) and duplicate
boxes (same class, IoU >= 0.95), boxes reaching outside their image, tiny boxes, what the
reader skipped, and the anchor coverage of the chosen model (`anchor_coverage.py`).
`--show N` draws the gt boxes of N images (those with problems first) as PNGs under --out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

from freeanchor.config import ModelConfig
from freeanchor.data.records import IGNORE_REASONS, DetectionData
from freeanchor.errors import OptionError
from freeanchor.files import write_json, write_text
from freeanchor.tools.anchor_coverage import anchor_coverage

SIZE_EDGES = (0, 8, 16, 32, 64, 96, 128, 256, 512, math.inf)  # sqrt(w * h), original pixels
TINY_PX = 4.0  # shorter side below this: hardly learnable at any common input size
DUPLICATE_IOU = 0.95
OUTSIDE_TOLERANCE_PX = 0.5  # YOLO fractions round; half a pixel past the edge is not an error
EXAMPLES = 5


def _file_hash(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def check_dataset(
    data: DetectionData, model: ModelConfig | None = None, hash_images: bool = True
) -> dict[str, Any]:
    """The report of `freeanchor data check` as plain data (see the module docstring)."""
    names = data.class_names
    boxes_per, images_per, ignored_per = [0] * len(names), [0] * len(names), [0] * len(names)
    sizes, no_labels, dup_boxes, outside, tiny = [], [], [], [], []
    problem_ids: dict[int, list[str]] = defaultdict(list)
    for r in data.records:
        for label in r.labels.tolist():
            boxes_per[label] += 1
        for label in set(r.labels.tolist()):
            images_per[label] += 1
        for label in r.ignore_labels.tolist():
            ignored_per[label] += 1
        if r.boxes.shape[0] == 0 and r.ignore_boxes.shape[0] == 0:
            no_labels.append(r.file_name)
        wh = r.boxes[:, 2:] - r.boxes[:, :2]
        sizes += wh.prod(dim=1).clamp(min=0).sqrt().tolist()
        t = OUTSIDE_TOLERANCE_PX
        for k, (x1, y1, x2, y2) in enumerate(r.boxes.tolist()):
            box = {
                "file": r.file_name,
                "box": k + 1,
                "xyxy": [round(v, 2) for v in (x1, y1, x2, y2)],
                "class": names[int(r.labels[k])],
            }
            if x1 < -t or y1 < -t or x2 > r.width + t or y2 > r.height + t:
                outside.append({**box, "image_size": [r.width, r.height]})
                problem_ids[r.image_id].append("box outside")
            if min(x2 - x1, y2 - y1) < TINY_PX:
                tiny.append(box)
                problem_ids[r.image_id].append("tiny box")
        if r.boxes.shape[0] > 1:
            iou = box_iou(r.boxes, r.boxes).triu(diagonal=1)
            same = r.labels[:, None] == r.labels[None, :]
            for i, j in ((iou >= DUPLICATE_IOU) & same).nonzero().tolist():
                dup_boxes.append(
                    {
                        "file": r.file_name,
                        "boxes": [i + 1, j + 1],
                        "class": names[int(r.labels[i])],
                        "iou": round(float(iou[i, j]), 3),
                    }
                )
                problem_ids[r.image_id].append("duplicate box")

    dup_images, missing = [], []
    if hash_images:
        by_hash: dict[str, list[Any]] = defaultdict(list)
        for r in data.records:
            h = _file_hash(r.path)
            if h is None:
                missing.append(r.file_name)
            else:
                by_hash[h].append(r)
        for group in by_hash.values():
            if len(group) > 1:
                dup_images.append([r.file_name for r in group])
                for r in group[1:]:
                    problem_ids[r.image_id].append("duplicate image")

    size_t = torch.tensor(sizes)
    bins = []
    for lo, hi in zip(SIZE_EDGES[:-1], SIZE_EDGES[1:]):
        bins.append(
            {
                "range": f"{lo:g}+" if math.isinf(hi) else f"{lo:g}-{hi:g}",
                "boxes": int(((size_t >= lo) & (size_t < hi)).sum()),
            }
        )
    return {
        "source": str(data.source),
        "format": data.format,
        "split": data.split,
        "summary": data.summary(),
        "notes": list(data.notes),
        "images": len(data.records),
        "boxes": data.num_boxes,
        "ignored_boxes": sum(ignored_per),
        "classes": [
            {
                "label": i,
                "name": n,
                "category_id": data.label_to_cat_id[i],
                "boxes": boxes_per[i],
                "images": images_per[i],
                "ignored": ignored_per[i],
            }
            for i, n in enumerate(names)
        ],
        "classes_without_boxes": [n for n, c in zip(names, boxes_per) if c == 0],
        "box_sizes": {
            "coco": {
                "small": int((size_t < 32).sum()),
                "medium": int(((size_t >= 32) & (size_t < 96)).sum()),
                "large": int((size_t >= 96).sum()),
            },
            "bins": bins,
        },
        "images_without_labels": {"count": len(no_labels), "examples": no_labels[:EXAMPLES]},
        "duplicate_images": {"count": sum(len(g) - 1 for g in dup_images), "groups": dup_images},
        "missing_images": {"count": len(missing), "examples": missing[:EXAMPLES]},
        "duplicate_boxes": {"count": len(dup_boxes), "examples": dup_boxes[:EXAMPLES]},
        "boxes_outside": {"count": len(outside), "examples": outside[:EXAMPLES]},
        "tiny_boxes": {"count": len(tiny), "threshold_px": TINY_PX, "examples": tiny[:EXAMPLES]},
        "skipped": dict(data.skipped),
        "skipped_examples": dict(data.examples),
        "anchor_coverage": anchor_coverage(data.records, model) if model is not None else None,
        "problem_image_ids": {str(k): sorted(set(v)) for k, v in problem_ids.items()},
    }


def _bar(n: int, total: int, width: int = 30) -> str:
    return "#" * (round(width * n / total) if total else 0)


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [report["summary"], *(f"  note: {n}" for n in report["notes"]), ""]
    lines.append(f"{'label':>5}  {'class':<20} {'boxes':>7} {'images':>7} {'ignored':>7}")
    for c in report["classes"]:
        lines.append(
            f"{c['label']:>5}  {c['name'][:20]:<20} {c['boxes']:>7} {c['images']:>7} "
            f"{c['ignored']:>7}"
        )
    if report["classes_without_boxes"]:
        lines.append(f"classes without boxes: {', '.join(report['classes_without_boxes'])}")
    total = max(report["boxes"], 1)
    coco = report["box_sizes"]["coco"]
    lines += [
        "",
        "box sizes, sqrt(w*h) in original pixels: "
        + "  ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in coco.items()),
    ]
    for b in report["box_sizes"]["bins"]:
        lines.append(f"  {b['range']:>8} px {b['boxes']:>7}  {_bar(b['boxes'], total)}")
    lines.append("")
    for key, text in (
        ("images_without_labels", "images without labels"),
        ("missing_images", "image files missing or unreadable"),
        ("duplicate_boxes", f"duplicate boxes (same class, IoU >= {DUPLICATE_IOU})"),
        ("boxes_outside", "boxes reaching outside their image"),
        ("tiny_boxes", f"tiny boxes (shorter side < {TINY_PX:g} px)"),
    ):
        item = report[key]
        examples = "; ".join(e if isinstance(e, str) else _example(e) for e in item["examples"])
        lines.append(f"{text}: {item['count']}" + (f"  e.g. {examples}" if examples else ""))
    groups = report["duplicate_images"]["groups"]
    lines.append(
        f"duplicate images (same content): {report['duplicate_images']['count']}"
        + ("  e.g. " + "; ".join(" = ".join(g) for g in groups[:EXAMPLES]) if groups else "")
    )
    for reason, count in report["skipped"].items():
        example = report["skipped_examples"].get(reason)
        kind = "kept as ignored" if reason in IGNORE_REASONS else "skipped"
        lines.append(f"{kind} ({reason}): {count}" + (f"  e.g. {example}" if example else ""))
    cov = report["anchor_coverage"]
    if cov is not None:
        a = cov["anchors"]
        lines += [
            "",
            f"anchor coverage at input {a['input_scale'][0]}x{a['input_scale'][1]} "
            f"(anchors {a['sizes_px'][0]:.0f}-{a['sizes_px'][1]:.0f} px, ratios "
            f"{a['ratios']}): {cov['under']} of {cov['boxes']} boxes "
            f"({100 * cov['share_under']:.1f}%) have a best anchor IoU < {cov['threshold']}"
            f", mean best IoU {cov['mean_best_iou']:.3f}",
        ]
        for key in ("by_size", "by_aspect"):
            lines.append(
                "  "
                + "  ".join(
                    f"{c['bin']}: {100 * c['share_under']:.0f}% of {c['boxes']}"
                    for c in cov[key]
                    if c["boxes"]
                )
            )
        if cov["hint"]:
            lines.append(f"  hint: {cov['hint']}")
        else:
            lines.append(
                "  every box has a good anchor"
                if not cov["under"]
                else "  too few badly covered boxes of one size and aspect for a hint"
            )
    return "\n".join(lines)


def _example(e: dict[str, Any]) -> str:
    where = f"{e['file']} box {e['box']}" if "box" in e else f"{e['file']} boxes {e['boxes']}"
    return f"{where} {e.get('class', '')} {e.get('xyxy', '')}".strip()


def draw_samples(data: DetectionData, report: dict[str, Any], n: int, out: Path) -> list[Path]:
    """PNGs of `n` images with their gt boxes (images with problems first) under `out`."""
    from freeanchor.data.io import ImageReadError, read_image
    from freeanchor.viz import IGNORED_COLOR, class_color, draw_boxes, save_image

    problems = report["problem_image_ids"]
    order = sorted(data.records, key=lambda r: str(r.image_id) not in problems)
    written = []
    for r in order[:n]:
        try:
            image = read_image(r.path)
        except ImageReadError as e:
            print(f"warning: not drawn: {e}")
            continue
        boxes = torch.cat([r.boxes, r.ignore_boxes])
        texts = [data.class_names[k] for k in r.labels.tolist()]
        texts += [f"{data.class_names[k]} (ignored)" for k in r.ignore_labels.tolist()]
        colors = [class_color(k) for k in r.labels.tolist()]
        colors += [IGNORED_COLOR] * int(r.ignore_boxes.shape[0])
        drawn = draw_boxes(image, boxes, texts, colors)
        written.append(save_image(drawn, out / f"{r.image_id:06d}_{Path(r.file_name).stem}.png"))
    return written


def run_data(args) -> int:
    """Entry point of `freeanchor data check|convert` (see --help)."""
    from freeanchor.data.datasets import load_dataset

    data = load_dataset(
        args.src,
        args.images,
        split=args.split,
        train=False,
        allow_outside_root=args.allow_outside_root,
    )
    if args.action == "convert":
        return _convert(data, Path(args.out), args.force)
    if args.show and not args.out:
        raise OptionError("--show needs --out DIR (where the drawn images go)")
    report = check_dataset(data, _model_config(args), hash_images=not args.no_hash)
    out = Path(args.out) if args.out else None
    text = format_report(report)
    if out is not None:
        write_json(out / "report.json", report)
        write_text(out / "report.txt", text + "\n")
        drawn = draw_samples(data, report, args.show, out) if args.show else []
        text += f"\nwrote {out / 'report.txt'}, {out / 'report.json'}" + (
            f" and {len(drawn)} drawn images" if drawn else ""
        )
    print(json.dumps(report) if args.json else text)
    return 0


def _model_config(args) -> ModelConfig:
    from freeanchor.config import Config, apply_override, preset

    cfg = Config(model=preset(args.model))
    for assignment in args.set:
        if not assignment.startswith("model."):
            raise OptionError(f"--set {assignment}: data check only uses model.* fields")
        apply_override(cfg, assignment)
    return cfg.model


def _convert(data: DetectionData, out: Path, force: bool) -> int:
    if out.suffix.lower() != ".json":
        raise OptionError(f"--out {out}: the COCO file name must end in .json")
    if out.exists() and (out.resolve() == data.source.resolve() or not force):
        raise OptionError(
            f"--out {out}: exists; refusing to overwrite it"
            + ("" if out.resolve() == data.source.resolve() else " without --force")
        )
    doc = data.to_coco()
    doc["info"] = {
        "description": f"converted by freeanchor from {data.source}",
        "format": data.format,
        "split": data.split,
    }
    write_json(out, doc, indent=None)
    crowd = sum(a["iscrowd"] for a in doc["annotations"])
    print(data.summary())
    print(
        f"wrote {out}: {len(doc['images'])} images, {len(doc['annotations']) - crowd} boxes"
        f" + {crowd} ignored (iscrowd=1), {len(doc['categories'])} categories; its file names"
        f" are relative to {data.image_root} (give that as the image folder)"
    )
    return 0
