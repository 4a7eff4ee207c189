"""One dataset written as COCO, YOLO and VOC: the same records, the same AP, the same training.

The synthetic COCO file stores each object's mask area as `area`; YOLO and VOC can only carry
boxes, so their ground truth has area = w * h. The area decides only COCO's small / medium /
large split, so the size-split numbers (APs, APm, APl, ARs, ARm, ARl) are compared between
YOLO, VOC and the records converted to COCO, and every other number across all formats.
"""

from __future__ import annotations

import pytest
import torch

from freeanchor.config import Config, preset
from freeanchor.data.datasets import detect_format, load_dataset
from freeanchor.data.synthetic import Difficulty, make_dataset
from freeanchor.engine.trainer import train
from freeanchor.errors import DatasetError
from freeanchor.eval.coco import COCOEvaluator

from .writers import write_voc, write_yolo

AREA_FREE = ("AP", "AP50", "AP75", "AR1", "AR10", "AR100", "per_class", "per_class_ap50")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    p = make_dataset(root / "coco", num_train=6, num_val=5, image_size=(96, 64), seed=5,
                     difficulty=Difficulty(min_size=10, max_objects=4))  # fmt: skip
    splits = {"train": (p.train_ann, p.train_images), "val": (p.val_ann, p.val_images)}
    return {
        "coco": {s: (ann, img) for s, (ann, img) in splits.items()},
        "yolo": {s: (write_yolo(splits, root / "yolo"), root / "yolo" / "images" / s)
                 for s in splits},
        "voc": {s: (write_voc(splits, root / "voc"), root / "voc" / "JPEGImages") for s in splits},
    }  # fmt: skip


def _load(three, fmt, split, train):
    src, images = three[fmt][split]
    return load_dataset(src, images if fmt == "coco" else None, split=split, train=train)


def test_formats_are_detected(three):
    assert detect_format(three["coco"]["val"][0])[0] == "coco"
    assert detect_format(three["yolo"]["val"][0].parent)[0] == "yolo"  # the folder of data.yaml
    assert detect_format(three["yolo"]["val"][0].parent / "labels" / "val")[0] == "yolo"
    assert detect_format(three["voc"]["val"][0])[0] == "voc"
    assert detect_format(three["voc"]["val"][0] / "ImageSets" / "Main" / "val.txt")[0] == "voc"
    with pytest.raises(DatasetError, match="not a dataset we can read"):
        detect_format(three["voc"]["val"][0] / "JPEGImages")
    with pytest.raises(DatasetError, match="needs its image folder"):
        load_dataset(three["coco"]["val"][0])


@pytest.mark.parametrize("split, train", [("train", True), ("val", False)])
def test_same_records(three, split, train):
    coco, yolo, voc = (_load(three, f, split, train) for f in ("coco", "yolo", "voc"))
    assert coco.class_names == yolo.class_names == voc.class_names
    assert coco.label_to_cat_id == yolo.label_to_cat_id == voc.label_to_cat_id == [1, 2, 3, 4, 5]
    assert len(coco.records) == len(yolo.records) == len(voc.records) > 0
    assert coco.num_boxes == yolo.num_boxes == voc.num_boxes > 0
    for c, y, v in zip(coco.records, yolo.records, voc.records):
        assert (c.image_id, c.file_name, c.width, c.height) == (
            y.image_id, y.file_name, y.width, y.height) == (
            v.image_id, v.file_name, v.width, v.height)  # fmt: skip
        assert c.path.read_bytes() == y.path.read_bytes() == v.path.read_bytes()
        assert torch.equal(c.labels, y.labels) and torch.equal(c.labels, v.labels)
        assert torch.equal(c.boxes, v.boxes)  # VOC: integer pixel indices, exact
        # YOLO: fractions written with 12 digits; the pixels come back to ~1e-11
        torch.testing.assert_close(c.boxes, y.boxes, rtol=0, atol=1e-6)


def _detections(data, seed=0):
    """Noisy copies of most gt boxes plus false positives, with scores (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    dets = []
    for r in data.records:
        keep = torch.rand(len(r.boxes), generator=g) < 0.8
        boxes = r.boxes[keep] + torch.randn(int(keep.sum()), 4, generator=g) * 2
        labels = r.labels[keep].clone()
        labels[torch.rand(len(labels), generator=g) < 0.15] = 0  # some wrong classes
        fp = torch.rand(3, 2, generator=g) * torch.tensor([r.width, r.height]) * 0.7
        fp = torch.cat([fp, fp + 8 + torch.rand(3, 2, generator=g) * 20], dim=1)
        dets.append({
            "image_id": r.image_id,
            "boxes": torch.cat([boxes, fp]),
            "scores": torch.rand(len(boxes) + 3, generator=g),
            "labels": torch.cat([labels, torch.randint(0, 5, (3,), generator=g)]),
        })  # fmt: skip
    return dets


def test_same_ap_on_the_same_detections(three):
    data = {f: _load(three, f, "val", False) for f in ("coco", "yolo", "voc")}
    dets = _detections(data["coco"])
    metrics = {f: COCOEvaluator(d).evaluate(dets) for f, d in data.items()}
    metrics["records"] = COCOEvaluator(data["coco"].to_coco()).evaluate(dets)
    assert 0.05 < metrics["coco"]["AP"] < 0.95  # neither trivial nor perfect
    for key in AREA_FREE:
        assert metrics["coco"][key] == metrics["yolo"][key] == metrics["voc"][key], key
    assert metrics["yolo"] == metrics["voc"] == metrics["records"]


def _tiny_config(three, fmt, work_dir):
    model = preset("freeanchor_r18_fpn_1x")
    model.input_scale = (96, 64)
    model.fpn_channels = model.feat_channels = 32
    model.score_thr = 0.0  # 3 iterations score every anchor low: keep them, so AP is not 0
    cfg = Config(model=model, work_dir=str(work_dir), device="cpu")
    (cfg.data.train_ann, cfg.data.train_images), (cfg.data.val_ann, cfg.data.val_images) = (
        [str(p) for p in three[fmt][s]] for s in ("train", "val"))  # fmt: skip
    cfg.data.workers, cfg.data.flip_prob, cfg.data.min_size = 0, 0.0, 16
    t = cfg.train
    t.batch_size, t.epochs, t.max_iters, t.warmup_iters, t.lr = 2, 1, 3, 0, 0.02
    t.deterministic, t.scale_lr, t.checkpoint_every, t.log_every = True, False, 0, 1
    return cfg


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared CPU small ops are far faster without the pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_gives_the_same_numbers_in_every_format(three, tmp_path, one_thread):
    runs = {f: train(_tiny_config(three, f, tmp_path / f)) for f in ("coco", "yolo", "voc")}
    losses = {f: r["losses"] for f, r in runs.items()}
    assert len(losses["coco"]) == 3 and losses["coco"] == losses["yolo"] == losses["voc"]
    ap = {f: {k: r["last_metrics"][k] for k in AREA_FREE} for f, r in runs.items()}
    assert ap["coco"] == ap["yolo"] == ap["voc"] and ap["coco"]["AR100"] > 0
    assert runs["voc"]["last_metrics"] == runs["yolo"]["last_metrics"]
