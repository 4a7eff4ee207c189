"""A small, deterministic, COCO-format shapes dataset for the offline demo and tests.

Each image is a textured, cluttered background (gradient, low-frequency colour noise, stripes,
and distractor strokes that are *not* objects: lines, open arcs, squiggles, thin ellipses, dots)
with 1..`Difficulty.max_objects` shapes of five classes drawn on top. A shape's class is its
geometry, never its colour (colours are random per object); sizes run log-uniformly from ~12 px
to most of the image; later shapes may overlap earlier ones and shapes may be cut by the
border. The box of an object is the tight box of its *visible* pixels (after occlusion and
clipping), and the visible mask is stored as a COCO RLE `segmentation`, so
`pycocotools.mask.toBbox` re-derives each box.

Everything comes from one `numpy.random.Generator` per image, seeded from (seed, split, index):
the same arguments give byte-identical PNGs and JSON. Drawing is Pillow + numpy only.

    from freeanchor.data.synthetic import make_dataset
    paths = make_dataset("demo_data", num_train=1500, num_val=200, image_size=160, seed=0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from freeanchor.files import write_json

CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "cross", "ring")
CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 4, 5)
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticPaths:
    """Where `make_dataset` wrote each split (COCO instances JSON + folder of PNGs)."""

    root: Path
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


@dataclass(frozen=True)
class Difficulty:
    """Knobs of how hard the images are (the defaults are the harder end)."""

    min_size: float = 12.0  # px, smallest nominal object extent
    max_size: float = 0.8  # largest extent, as a fraction of the shorter image side
    log_sizes: float = 1.0  # share of sizes drawn log-uniformly (many small); the rest uniformly
    max_objects: int = 6  # objects per image: 1..max_objects
    distractors: tuple[int, int] = (3, 10)  # clutter strokes per image: lo..hi
    min_visible: float = 0.45  # least fraction of an object inside the image
    max_hidden: float = 0.5  # most of an object that later objects may cover
    min_contrast: float = 90.0  # RGB distance of an object's colour from what lies beneath


@dataclass
class _Object:
    label: int  # index into CLASSES
    patch: np.ndarray  # bool [h, w] full (unclipped) shape mask
    x0: int  # top-left of the patch in image coordinates (may be negative)
    y0: int
    color: np.ndarray  # float [3]


# ----------------------------------------------------------------------------- shapes


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_patch(label: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """Mask of one shape whose nominal extent is `size` px, centred in its own square patch."""
    half = size / 2
    side = int(math.ceil(size * 1.5)) + 4  # rotated rectangles reach size * sqrt(2) / 2 * ...
    c = side / 2
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    angle = float(rng.uniform(0, 2 * math.pi))
    if CLASSES[label] == "circle":
        r = half
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif CLASSES[label] == "rectangle":
        aspect = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        w, h = size * min(1.0, aspect), size * min(1.0, 1 / aspect)
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        draw.polygon([tuple(p) for p in _rotate(pts, angle) + c], fill=255)
    elif CLASSES[label] == "triangle":
        angles = angle + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
        angles += rng.uniform(-0.25, 0.25, size=3)
        pts = np.stack([np.cos(angles), np.sin(angles)], axis=1) * half
        draw.polygon([tuple(p) for p in pts + c], fill=255)
    elif CLASSES[label] == "cross":
        t = half * float(rng.uniform(0.28, 0.42))  # half arm thickness
        pts = np.array(
            [[-t, -half], [t, -half], [t, -t], [half, -t], [half, t], [t, t],
             [t, half], [-t, half], [-t, t], [-half, t], [-half, -t], [-t, -t]]
        )  # fmt: skip
        draw.polygon([tuple(p) for p in _rotate(pts, angle) + c], fill=255)
    else:  # ring
        r = half
        width = max(2, int(round(r * float(rng.uniform(0.3, 0.45)))))
        draw.ellipse([c - r, c - r, c + r, c + r], outline=255, width=width)
    return np.asarray(img) > 0


# ----------------------------------------------------------------------------- background


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Float [h, w, 3] in 0..255: gradient + low-frequency colour noise + optional stripes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(30, 225, size=(2, 3))
    img = c0 + t[..., None] * (c1 - c0)
    grid = rng.normal(0, 1, size=(5, 5, 3)).astype(np.float32)
    low = np.stack(
        [
            np.asarray(Image.fromarray(grid[..., k]).resize((w, h), Image.BILINEAR))
            for k in range(3)
        ],
        axis=-1,
    )
    img = img + 25 * low
    if rng.random() < 0.5:
        period = rng.uniform(4, 16)
        phi = rng.uniform(0, 2 * math.pi)
        stripes = np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * 2 * math.pi / period)
        img = img + rng.uniform(8, 22) * stripes[..., None]
    return img


def _distractors(img: Image.Image, rng: np.random.Generator, count: int) -> None:
    """Clutter that is not an object: strokes, open arcs, squiggles, thin ellipses, dot clusters."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        color = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 5))
        if kind == 0:  # straight line
            p = rng.uniform(-0.1, 1.1, size=4) * [w, h, w, h]
            draw.line([tuple(p[:2]), tuple(p[2:])], fill=color, width=int(rng.integers(1, 4)))
        elif kind == 1:  # open arc (at most ~200 degrees, so never a ring)
            r = rng.uniform(6, 0.4 * min(w, h))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            start = rng.uniform(0, 360)
            draw.arc(
                [cx - r, cy - r, cx + r, cy + r],
                start,
                start + rng.uniform(40, 200),
                fill=color,
                width=int(rng.integers(1, 4)),
            )
        elif kind == 2:  # squiggle: a random walk
            n = int(rng.integers(4, 10))
            steps = rng.normal(0, 0.08 * min(w, h), size=(n, 2))
            pts = np.cumsum(steps, axis=0) + rng.uniform(0, 1, size=2) * [w, h]
            draw.line([tuple(p) for p in pts], fill=color, width=int(rng.integers(1, 3)))
        elif kind == 3:  # thin ellipse, aspect >= 4 (never a circle)
            a = rng.uniform(8, 0.35 * min(w, h))
            b = a / rng.uniform(4, 8)
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            ell = Image.new("L", (w, h), 0)
            ImageDraw.Draw(ell).ellipse([cx - a, cy - b, cx + a, cy + b], fill=255)
            ell = ell.rotate(float(rng.uniform(0, 180)), center=(cx, cy))
            img.paste(Image.new("RGB", (w, h), color), mask=ell)
        else:  # cluster of small dots
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            for _ in range(int(rng.integers(3, 12))):
                x, y = cx + rng.normal(0, 8), cy + rng.normal(0, 8)
                r = rng.uniform(0.5, 2.0)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=color)


# ----------------------------------------------------------------------------- one image


def _place(objects: list[_Object], owner: np.ndarray, obj: _Object, level: Difficulty) -> bool:
    """Draw `obj` into the owner map unless it hides too much of itself or of earlier objects."""
    h, w = owner.shape
    ph, pw = obj.patch.shape
    ys, xs = max(obj.y0, 0), max(obj.x0, 0)
    ye, xe = min(obj.y0 + ph, h), min(obj.x0 + pw, w)
    if ye <= ys or xe <= xs:
        return False
    inside = obj.patch[ys - obj.y0 : ye - obj.y0, xs - obj.x0 : xe - obj.x0]
    if inside.sum() < level.min_visible * obj.patch.sum() or inside.sum() < 40:
        return False  # mostly outside the image
    region = owner[ys:ye, xs:xe]
    covered = np.bincount(region[inside] + 1, minlength=len(objects) + 1)[1:]
    visible = np.bincount(owner[owner >= 0], minlength=len(objects))
    keep = visible - covered
    if np.any((covered > 0) & ((keep < (1 - level.max_hidden) * visible) | (keep < 40))):
        return False  # would hide more than half of an earlier object
    region[inside] = len(objects)
    objects.append(obj)
    return True


def render_image(
    rng: np.random.Generator, width: int, height: int, level: Difficulty = Difficulty()
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One synthetic image and its objects.

    Returns:
        image: uint8 [height, width, 3] RGB.
        objects: (label, visible mask bool [height, width]) per object, in drawing order.
    """
    bg = _background(height, width, rng)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    _distractors(canvas, rng, int(rng.integers(level.distractors[0], level.distractors[1] + 1)))
    base = np.asarray(canvas).astype(np.float64)

    owner = np.full((height, width), -1, dtype=np.int64)
    objects: list[_Object] = []
    lo, hi = math.log(level.min_size), math.log(level.max_size * min(width, height))
    for _ in range(int(rng.integers(1, level.max_objects + 1))):
        for _try in range(20):
            label = int(rng.integers(0, len(CLASSES)))
            if rng.random() < level.log_sizes:
                size = float(np.exp(rng.uniform(lo, hi)))
            else:
                size = float(rng.uniform(level.min_size, math.exp(hi)))
            patch = _shape_patch(label, size, rng)
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            x0, y0 = int(round(cx - patch.shape[1] / 2)), int(round(cy - patch.shape[0] / 2))
            obj = _Object(label, patch, x0, y0, np.zeros(3))
            if _place(objects, owner, obj, level):
                break

    out = base.copy()
    for k in range(len(objects)):
        mask = owner == k
        under = base[mask].mean(axis=0) if mask.any() else np.full(3, 128.0)
        # Any colour, as long as it stands out from what lies beneath it.
        for _try in range(30):
            color = rng.uniform(0, 255, size=3)
            if np.linalg.norm(color - under) > level.min_contrast:
                break
        shade = 1 + rng.uniform(-0.12, 0.12)  # a little per-object brightness variation
        out[mask] = np.clip(color * shade, 0, 255)
    out += rng.normal(0, rng.uniform(3, 9), size=out.shape)
    image = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return image, [(obj.label, owner == k) for k, obj in enumerate(objects)]


# ----------------------------------------------------------------------------- dataset


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_split(
    folder: Path, split: str, num: int, size: tuple[int, int], seed: int, level: Difficulty
) -> Path:
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    width, height = size
    images, annotations = [], []
    for i in range(num):
        rng = np.random.default_rng([seed, _SPLITS[split], i])
        image, objects = render_image(rng, width, height, level)
        name = f"{split}_{i:06d}.png"
        Image.fromarray(image).save(images_dir / name, format="PNG", compress_level=6)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for label, mask in objects:
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],  # pixel edges: tight around the mask
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _rle(mask),
                }
            )
    doc = {
        "info": {"description": f"freeanchor synthetic shapes, {split} split, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "supercategory": "shape"}
            for cid, name in zip(CATEGORY_IDS, CLASSES)
        ],
    }
    ann = folder / "annotations.json"
    write_json(ann, doc, indent=None)
    return ann


def make_dataset(
    out_dir: str | Path,
    num_train: int = 1500,
    num_val: int = 200,
    image_size: int | tuple[int, int] = 160,
    seed: int = 0,
    difficulty: Difficulty = Difficulty(),
) -> SyntheticPaths:
    """Write the train and val splits under `out_dir` (`train/`, `val/`, each with
    `annotations.json` and `images/*.png`) and return their paths.

    Args:
        image_size: side of the square images, or (width, height).
        seed: the whole dataset is a function of (seed, sizes, counts); splits never share
            an image (their generators are seeded apart).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(
            f"make_dataset: need at least one image per split ({num_train=}, {num_val=})"
        )
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(size) < 48:
        raise ValueError(f"make_dataset: image_size {size} too small (min 48 px)")
    root = Path(out_dir)
    train_ann = _write_split(root / "train", "train", num_train, size, seed, difficulty)
    val_ann = _write_split(root / "val", "val", num_val, size, seed, difficulty)
    return SyntheticPaths(
        root, train_ann, root / "train" / "images", val_ann, root / "val" / "images"
    )
