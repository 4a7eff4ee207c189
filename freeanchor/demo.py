"""`freeanchor demo`: the whole pipeline offline, in minutes on a laptop CPU.

    freeanchor demo --out demo            # 1248 iterations; see the README for times
    freeanchor demo --out demo --iters 20 # a smoke run

1. Generates a synthetic COCO-format shapes dataset (`freeanchor.data.synthetic`) in OUT/data.
2. Trains a light FreeAnchor from scratch with the standard trainer (`freeanchor.engine`):
   ResNet-10 + a slim FPN/head (64 channels, 2 convs per tower) on 96x96 images, anchors
   one octave smaller than COCO's (the shapes are 15..58 px), bags of 15 anchors, BatchNorm
   trained (no ImageNet statistics to keep), AdamW with warmup and one lr step (SGD, the COCO
   recipe, needs far more iterations from scratch), AP on the held-out split after every
   epoch. Work dir: OUT/train.
3. Writes OUT/ap_table.txt, OUT/metrics.json, OUT/curves.png (loss per iteration, AP and
   AP50 per epoch) and OUT/detections/*.png (val images with their detections, drawn 6x).
The last line printed is one JSON object: AP, AP50, AP75 (COCO's 0-1 fractions, "ap_scale"),
iterations, seconds, train_seconds, train_cpu_seconds, threads, out.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from freeanchor.config import Config, DataConfig, ModelConfig, TrainConfig, preset
from freeanchor.data.synthetic import Difficulty
from freeanchor.errors import OptionError

# The schedule of the full demo, about 3.5 min on 2 idle CPU cores (measured 2026-12-07, see
# the README): 8 epochs of 1248 images = 1248 iterations, the last 156 at lr / 10. AP50 grows
# steadily with the iterations (seed 1: 0.64 after 1000, 0.80 after 1256) and jumps at the lr
# step (a later step beats an earlier one); 96 px images cost ~half of 128 px ones per step.
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 1248, 200, 96  # 1248 = 156 full batches of 8
BATCH_SIZE, EPOCHS, MILESTONES, LR = 8, 8, (7,), 1e-3
NUM_DRAWN, DRAWN_SIDE = 8, 512  # val images drawn, and their long side in the PNGs
DRAWN_SCORE_THR = 0.5  # at 0.3 the pictures fill with overlapping low-score captions
# Clutter stays (1-4 distractor strokes, textured backgrounds, up to 8 objects), but objects are
# 15-58 px, at most 30 % cut by the border or 25 % hidden, and stand out from what lies
# beneath, so a from-scratch model learns the shapes within the time budget.
DIFFICULTY = Difficulty(min_size=15, max_size=0.6, max_objects=8, distractors=(1, 4),
                        min_visible=0.7, max_hidden=0.25, min_contrast=110)  # fmt: skip


def demo_model_config() -> ModelConfig:
    """The light model: freeanchor_r18_fpn_1x on a ResNet-10, slimmed and resized for the demo."""
    cfg = preset("freeanchor_r18_fpn_1x", num_classes=5)
    # From scratch, ResNet-10 learned as fast per step as ResNet-18 at ~60 % of its step time
    # (seed 2, 1000 iterations: AP50 0.667 vs 0.669; 1 thread: 227 s vs 375 s).
    cfg.backbone = "resnet10"
    cfg.classes = None  # the trainer takes the names from the dataset
    cfg.fpn_channels = cfg.feat_channels = 64
    cfg.stacked_convs = 2
    cfg.octave_base_scale = 2.0  # smallest anchors 16 px at stride 8: objects start at 16 px
    # ~3k anchors per image instead of COCO's ~150k: a smaller bag per object keeps its
    # mean-max likelihood from being diluted by anchors that do not overlap the object.
    cfg.pre_anchor_topk = 15
    cfg.frozen_stages, cfg.norm_eval = 0, False  # from scratch: every layer and BN trains
    cfg.input_scale = (IMAGE_SIZE, IMAGE_SIZE)
    return cfg


def demo_config(data, work_dir: Path, iters: int | None, seed: int) -> Config:
    """Config of the demo run on the dataset paths `data` (from `make_dataset`)."""
    train = TrainConfig(
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        lr=LR,
        optimizer="adamw",
        weight_decay=0.05,
        scale_lr=False,  # lr is for this batch size; there is no multi-GPU recipe to follow
        warmup_iters=50,
        milestones=MILESTONES,
        eval_every=1,  # AP per epoch: the curves show the model learning
        checkpoint_every=0,
        seed=seed,
        log_every=25,
        max_iters=iters or 0,
    )
    if iters:
        train.warmup_iters = min(train.warmup_iters, max(1, iters // 2))
    d = DataConfig(
        train_ann=str(data.train_ann),
        train_images=str(data.train_images),
        val_ann=str(data.val_ann),
        val_images=str(data.val_images),
        # In the main process: on 2 cores a loader process takes CPU from torch's 2 threads,
        # which then wait for each other at every op (measured: 0.283 s per step with one
        # worker, 0.236 s with none; 8 images of 96 px load in a few ms).
        workers=0,
    )
    return Config(model=demo_model_config(), data=d, train=train, work_dir=str(work_dir),
                  device="cpu")  # fmt: skip


def busy_cores(interval: float = 0.5) -> float | None:
    """How many cores other work keeps busy now: /proc/stat sampled over `interval` seconds.

    Not the load average: that is a 1-minute mean, so a job that just ended still reads as
    load 1-2 and would cost the demo half its speed. None where /proc/stat is not there.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (busy1 - busy0) / max(total1 - total0, 1)


def choose_threads(requested: int | None) -> tuple[int, str]:
    """Intra-op threads for the demo and why: all cores on an idle machine, one on a busy one.

    On a machine whose cores are taken by other work, torch's OpenMP threads wait for each
    other at every op: measured on 2 cores at load 10, a demo training step took 3.7 CPU-s
    and 10.7 s with 2 threads against 0.41 CPU-s and 1.8 s with 1.
    """
    cores = os.cpu_count() or 1
    if requested:
        return requested, "--threads"
    busy = busy_cores()
    if busy is None:  # no /proc/stat: the load average, which lags by a minute
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy >= cores / 2:
        return 1, f"the machine is busy: {busy:.1f} of {cores} cores in use by other work"
    return cores, f"{busy:.1f} of {cores} cores in use by other work"


def _draw_detections(weights: Path, images: list[Path], out_dir: Path) -> list[Path]:
    """Detections drawn on the val images, enlarged to DRAWN_SIDE px so captions are legible."""
    from freeanchor.data.io import read_image
    from freeanchor.models.weights import load_model
    from freeanchor.viz import class_color, draw_boxes, save_image

    model = load_model(weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for r in model.predict(images, score_thr=DRAWN_SCORE_THR):
        texts = [f"{n} {s:.2f}" for n, s in zip(r.names, r.scores.tolist(), strict=True)]
        colors = [class_color(k) for k in r.labels.tolist()]
        drawn = draw_boxes(read_image(r.path), r.boxes, texts, colors, min_long_side=DRAWN_SIDE)
        written.append(save_image(drawn, out_dir / Path(r.path).name))
    return written


def _ap_table(metrics: dict[str, Any]) -> str:
    from freeanchor.eval.report import metrics_line, per_class_table

    lines = [metrics_line(metrics)]
    if metrics.get("per_class"):
        lines.append(per_class_table(metrics["per_class"], metrics.get("per_class_ap50")))
    return "\n".join(lines)


def _check_out(out: Path) -> None:
    """Refuse an OUT that is a file or holds an earlier demo's run (runs never mix)."""
    from freeanchor.engine.rundir import RUN_FILES

    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out}: is a file, not a folder")
    found = [name for name in RUN_FILES if (out / "train" / name).exists()]
    if found:
        raise OptionError(
            f"--out {out} holds an earlier demo run ({out / 'train' / found[0]}): "
            "give another --out, or delete that folder"
        )


def run_demo(args) -> int:
    """Generate, train, evaluate, draw; print the figures and a final JSON line."""
    from freeanchor.data.synthetic import make_dataset
    from freeanchor.engine.curves import plot_curves
    from freeanchor.engine.trainer import train
    from freeanchor.eval.report import AP_SCALE, SCALE_NOTE, ap_fields, write_summary
    from freeanchor.files import write_text

    start = time.time()
    out = Path(args.out)
    iters = getattr(args, "iters", None)
    if iters is not None and iters < 1:
        raise OptionError(f"--iters must be >= 1, got {iters}")
    _check_out(out)
    seed = getattr(args, "seed", 0)
    threads, why = choose_threads(getattr(args, "threads", None))
    num_train = getattr(args, "num_train", None) or NUM_TRAIN
    num_val = getattr(args, "num_val", None) or NUM_VAL
    print(f"[1/3] generating {num_train} + {num_val} synthetic images in {out / 'data'}",
          flush=True)  # fmt: skip
    data = make_dataset(out / "data", num_train, num_val, IMAGE_SIZE, seed, DIFFICULTY)
    gen_seconds = time.time() - start

    cfg = demo_config(data, out / "train", iters, seed)
    what = f"{iters} iterations" if iters else f"{EPOCHS} epochs"
    import torch

    torch.set_num_threads(threads)
    print(f"[2/3] training {cfg.model.backbone} FreeAnchor from scratch for {what} on "
          f"{threads} CPU thread(s) ({why})", flush=True)  # fmt: skip
    t, cpu = time.time(), time.process_time()
    summary = train(cfg)
    train_seconds, train_cpu = time.time() - t, time.process_time() - cpu

    print("[3/3] evaluating and drawing", flush=True)
    metrics = summary["last_metrics"]
    if metrics is None:
        raise RuntimeError("the trainer returned no validation metrics")
    table = _ap_table(metrics)
    write_text(out / "ap_table.txt", table + "\n")
    work = Path(summary["work_dir"])
    curves = plot_curves(work / "metrics.jsonl", out / "curves.png")
    val_images = sorted(data.val_images.iterdir())[:NUM_DRAWN]
    drawn = _draw_detections(work / "model_final.safetensors", val_images, out / "detections")
    seconds = time.time() - start
    result = {
        "AP": float(metrics["AP"]),  # COCO's 0-1 fractions, full precision (as metrics.json)
        "AP50": float(metrics["AP50"]),
        "AP75": float(metrics["AP75"]),
        "ap_scale": AP_SCALE,
        "iterations": summary["iterations"],
        "seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu, 1),  # this process; loader workers not counted
        "threads": threads,
        "data_seconds": round(gen_seconds, 1),
        "out": str(out),
    }
    write_summary(out / "metrics.json", metrics, **result)

    print(table)
    print(f"weights:    {work / 'model_final.safetensors'}")
    print(f"AP table:   {out / 'ap_table.txt'}")
    print(f"curves:     {curves if curves else '(no log)'}")
    print(f"detections: {out / 'detections'} ({len(drawn)} images)")
    print(
        f"{ap_fields(result, ('AP50', 'AP'))} {SCALE_NOTE} after {result['iterations']} "
        f"iterations; {seconds:.0f} s in all ({train_seconds:.0f} s training)"
    )
    print(json.dumps(result), flush=True)
    return 0
