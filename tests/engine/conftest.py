"""Tiny generated COCO datasets (coloured rectangles) and small configs for engine tests."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freeanchor.config import Config, preset

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared"
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}  # class = colour


def make_coco(root: Path, num_images: int = 8, size: tuple[int, int] = (128, 96), seed: int = 0):
    """Write `root/images/*.png` + `root/ann.json`: 1-3 filled rectangles per image.

    Returns (ann_path, image_dir).
    """
    rng = np.random.default_rng(seed)
    w, h = size
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    names = list(COLOURS)
    for i in range(num_images):
        arr = np.full((h, w, 3), 128, np.uint8)
        arr += rng.integers(0, 20, size=arr.shape, dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            label = int(rng.integers(0, len(names)))
            arr[y : y + bh, x : x + bw] = COLOURS[names[label]]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label + 1,
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})  # fmt: skip
        name = f"{i:04d}.png"
        Image.fromarray(arr).save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann, img_dir


def small_config(ann: Path, img_dir: Path, work_dir: Path, **train) -> Config:
    """resnet18 at 128x96 on the CPU, deterministic, no flip, no warmup surprises."""
    model = preset("freeanchor_r18_fpn_1x")
    model.input_scale = (128, 96)
    model.fpn_channels = model.feat_channels = 64  # 4x cheaper head, same code paths
    cfg = Config(model=model, work_dir=str(work_dir), device="cpu")
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(img_dir)
    cfg.data.workers = 0
    cfg.data.flip_prob = 0.0
    t = cfg.train
    t.batch_size, t.epochs, t.warmup_iters, t.log_every = 2, 1, 0, 1
    t.deterministic, t.scale_lr = True, False
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def cli_env() -> dict[str, str]:
    """Environment of a `python -m freeanchor` child: one thread, repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE",
           "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC"))}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PYTHON = sys.executable


@pytest.fixture
def tiny_coco(tmp_path):
    return make_coco(tmp_path / "data", num_images=8)
