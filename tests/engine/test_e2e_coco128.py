"""End to end on real photos: MobileNetV2-FPN FreeAnchor from ImageNet weights learns COCO128.

To fit a few CPU minutes the run memorises a small, easy slice of coco128 (the images whose
only objects are large animals: bear, elephant, giraffe, zebra) at a small input scale, with
the 80-class model, and is scored on the same images. The untrained model (same ImageNet
backbone, fresh head) is scored by the same pipeline as the baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from freeanchor.config import Config, preset
from freeanchor.engine.evaluate import evaluate
from freeanchor.engine.trainer import Trainer

from .conftest import SHARED

COCO128 = SHARED / "data" / "coco128"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
ANIMALS = {"bear", "elephant", "giraffe", "zebra"}


def _animal_subset(out: Path) -> Path:
    data = json.loads((COCO128 / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    cats: dict[int, set[str]] = {}
    for a in data["annotations"]:
        cats.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    keep = {i for i, c in cats.items() if c <= ANIMALS}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out.write_text(json.dumps(data))  # all 80 categories stay: the 80-class model
    return out


@pytest.mark.slow
def test_mobilenet_freeanchor_learns_coco128_animals(tmp_path):
    for path in (COCO128 / "annotations.json", WEIGHTS):
        if not path.exists():
            pytest.skip(f"shared fixture not present: {path}")
    ann = _animal_subset(tmp_path / "animals.json")
    model = preset("freeanchor_mobilenetv2_fpn_1x")
    model.input_scale = (256, 160)
    model.fpn_channels = model.feat_channels = 128
    model.score_thr = 0.001  # the usual COCO-eval threshold: untrained scores (~0.01) count
    cfg = Config(model=model, work_dir=str(tmp_path / "work"), device="cpu")
    cfg.data.train_ann = cfg.data.val_ann = str(ann)
    cfg.data.train_images = cfg.data.val_images = str(COCO128 / "images")
    cfg.data.workers = 1
    t = cfg.train
    t.pretrained = str(WEIGHTS)
    t.batch_size, t.lr, t.scale_lr = 3, 0.005, False
    t.warmup_iters, t.milestones, t.max_iters, t.epochs = 50, (), 600, 1000
    t.eval_every, t.checkpoint_every, t.log_every = 0, 0, 50

    trainer = Trainer(cfg)
    start = time.perf_counter()
    untrained = evaluate(trainer.model, trainer.val_loader, trainer.evaluator, trainer.device)
    out = trainer.fit()
    trained = out["last_metrics"]
    print(f"\ncoco128 animals ({trained['images']} images): untrained AP50 "
          f"{untrained['AP50']:.4f} AP {untrained['AP']:.4f}; after {out['iterations']} "
          f"iterations AP50 {trained['AP50']:.4f} AP {trained['AP']:.4f}; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    assert trained["images"] == untrained["images"] >= 8
    assert out["skipped_steps"] == 0
    assert trained["AP50"] > untrained["AP50"] + 0.05
