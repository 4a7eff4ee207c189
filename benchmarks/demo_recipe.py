"""The demo's recipe with changes: how the demo's model and schedule were chosen.

    python benchmarks/demo_recipe.py --out /tmp/r10_s2 --seed 2 --threads 1 \
        --set model.backbone=resnet18 [--num-train 1000] [--set train.milestones=6 ...]

One run of `freeanchor demo --seed N` (data generated with seed N, training seed N, the demo's
model and schedule) with `--num-train` images and each `--set section.field=value` applied on
top. Prints one JSON line: the changes, training seconds, iterations and (epoch, AP50, AP) of
every evaluation (COCO, 0-1). Two runs with `--threads 1` side by side use a 2-core machine
fully, for AP; time the chosen recipe alone with the demo itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from freeanchor import demo
from freeanchor.config import apply_override, validate
from freeanchor.data.synthetic import make_dataset
from freeanchor.engine.trainer import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-train", type=int, default=demo.NUM_TRAIN)
    p.add_argument("--set", action="append", default=[], help="section.field=value")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    data = make_dataset(out / "data", a.num_train, demo.NUM_VAL, demo.IMAGE_SIZE, a.seed,
                        demo.DIFFICULTY)  # fmt: skip
    cfg = demo.demo_config(data, out / "train", None, a.seed)
    cfg.train.log_every = 10**6  # the first and last iterations only
    for assignment in a.set:
        apply_override(cfg, assignment, check=False)
    validate(cfg)
    start = time.time()
    summary = train(cfg)
    seconds = time.time() - start
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").open()]
    evals = [(r["epoch"], round(r["AP50"], 3), round(r["AP"], 3)) for r in records
             if r.get("type") == "val"]  # fmt: skip
    print(json.dumps({"seed": a.seed, "num_train": a.num_train, "set": a.set,
                      "threads": a.threads, "train_seconds": round(seconds),
                      "iterations": summary["iterations"], "epoch_AP50_AP": evals}))  # fmt: skip


if __name__ == "__main__":
    main()
