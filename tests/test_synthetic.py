"""The demo's synthetic dataset: deterministic bytes, valid COCO, tight boxes on real pixels."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from freeanchor.data.synthetic import CLASSES, make_dataset


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_dataset(root, num_train=12, num_val=6, image_size=(112, 96), seed=7)


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_same_seed_gives_identical_files(dataset, tmp_path):
    again = make_dataset(tmp_path / "again", num_train=12, num_val=6, image_size=(112, 96), seed=7)
    first, second = _digest(dataset.root), _digest(again.root)
    assert len(first) == 12 + 6 + 2
    assert first == second


def test_other_seed_and_splits_differ(dataset, tmp_path):
    other = make_dataset(tmp_path / "other", num_train=12, num_val=6, image_size=(112, 96), seed=8)
    a = (dataset.train_images / "train_000000.png").read_bytes()
    assert a != (other.train_images / "train_000000.png").read_bytes()
    assert a != (dataset.val_images / "val_000000.png").read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_valid_coco_with_tight_boxes_on_object_pixels(dataset, split):
    ann = dataset.train_ann if split == "train" else dataset.val_ann
    images_dir = dataset.train_images if split == "train" else dataset.val_images
    raw = json.loads(ann.read_text())
    coco = _coco(ann)
    assert len({im["id"] for im in raw["images"]}) == len(raw["images"])
    assert len({a["id"] for a in raw["annotations"]}) == len(raw["annotations"])
    assert [c["name"] for c in raw["categories"]] == list(CLASSES)
    assert raw["annotations"], "no objects at all"
    labels_seen = set()
    for img in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(images_dir / img["file_name"]).convert("RGB"))
        assert pixels.shape == (img["height"], img["width"], 3) == (96, 112, 3)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            mask = coco.annToMask(a).astype(bool)
            assert mask.shape == pixels.shape[:2]
            assert a["area"] == mask.sum() > 0
            # Tight: pycocotools' own box of the visible mask is the annotated box, i.e. every
            # edge of the box touches an object pixel.
            np.testing.assert_allclose(mask_utils.toBbox(mask_utils.encode(
                np.asfortranarray(mask.astype(np.uint8)))), a["bbox"])  # fmt: skip
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            # The mask lies on the drawn object: one flat colour plus mild noise, unlike the
            # pixels just around it.
            inside = pixels[mask].astype(float)
            assert inside.std(axis=0).max() < 20
            ring = np.zeros_like(mask)
            ring[max(y - 2, 0) : y + h + 2, max(x - 2, 0) : x + w + 2] = True
            outside = pixels[ring & ~mask].astype(float)
            if len(outside) > 20:
                assert np.abs(outside.mean(0) - inside.mean(0)).max() > 15 or (
                    outside.std(0).max() > 25
                )
            labels_seen.add(a["category_id"])
    assert len(labels_seen) >= 3  # several classes even in a handful of images


def test_sizes_span_small_to_large(tmp_path):
    data = make_dataset(tmp_path, num_train=40, num_val=1, image_size=160, seed=0)
    anns = json.loads(data.train_ann.read_text())["annotations"]
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in anns])
    assert sides.min() <= 20 and sides.max() >= 90
    edges = np.array([(x, y, 160 - x - w, 160 - y - h) for x, y, w, h in (a["bbox"] for a in anns)])
    touching = (edges == 0).any(axis=1)
    assert touching.any(), "no object cut by the border"


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        make_dataset(tmp_path, num_train=0, num_val=1)
    with pytest.raises(ValueError, match="too small"):
        make_dataset(tmp_path, num_train=1, num_val=1, image_size=20)
