"""Where FreeAnchorLoss spends its time: torch.profiler over forward + backward on one of
benchmarks/loss_speed.py's cases, by step (the loss's record_function labels) and by op.

    python benchmarks/loss_profile.py [--case coco_2img] [--threads 1] [--repeats 3] [--flat]

Steps: A = P{a_j in A+} (predicted-box IoU, matched pairs), B = the bags (top-k IoU with the
anchors), D = the dense negative term (with the bag logits), C (the positive bag likelihood)
and E (normalising) are what the forward leaves; FocalSweepBackward scales the gradient.
Profiling adds overhead: compare the steps with each other, time with loss_speed.py. With
more than one thread the profiler misattributes the sweep's pool threads and inflates the
OpenMP steps, hence the default of 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loss_speed import CASES, make_inputs  # noqa: E402
from freeanchor.models.anchors import AnchorGenerator  # noqa: E402
from freeanchor.models.head import flatten_head_outputs  # noqa: E402
from freeanchor.models.loss import FreeAnchorLoss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="coco_2img", choices=CASES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flat", action="store_true", help="flatten the logits first (detector.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inp = make_inputs(args.case)
    anchors = AnchorGenerator()([tuple(t.shape[-2:]) for t in inp["cls_scores"]])
    loss = FreeAnchorLoss(inp["num_classes"], imgs_per_gpu=len(inp["gt_bboxes"]))

    def step() -> tuple[float, float]:
        cls = [t.clone().requires_grad_() for t in inp["cls_scores"]]
        box = [t.clone().requires_grad_() for t in inp["bbox_preds"]]
        t0 = time.perf_counter()
        if args.flat:
            cls, box = flatten_head_outputs(cls, box, inp["num_classes"])
        out = loss(cls, box, anchors, inp["gt_bboxes"], inp["gt_labels"])
        t1 = time.perf_counter()
        (out["positive_bag_loss"] + out["negative_bag_loss"]).backward()
        return t1 - t0, time.perf_counter() - t1

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = [step() for _ in range(args.repeats)]
    events = prof.key_averages()
    per = 1e3 / args.repeats
    fwd, bwd = (sum(t[i] for t in times) * per for i in (0, 1))
    print(f"{args.case}, {args.threads} threads, {args.repeats} profiled repeats (ms per step)")
    print(f"  forward {fwd:8.1f}\n  backward {bwd:7.1f}")
    for e in sorted(events, key=lambda e: e.key):
        if e.key.startswith("FreeAnchorLoss.") or e.key.endswith("Backward"):
            print(f"  {e.key:<34}{e.cpu_time_total / 1e3 * per / 1e3:8.1f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
