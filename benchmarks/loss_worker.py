"""One FreeAnchor loss implementation in its own process, driven by benchmarks/loss_speed.py.

    python loss_worker.py IMPL INPUTS.pt --threads N [--harness DIR]

IMPL: "freeanchor" (per-level maps straight in), "freeanchor-flat" (flattened first, as
`FreeAnchorDetector.loss` does), "mmdet" (MMDetection 3.3's `FreeAnchorRetinaHead.loss_by_feat`
through the peer harness in DIR; run with the peer venv's python) or "stand-in"
(benchmarks/mmdet_style_loss.py). Reads commands on stdin, answers one JSON line each:
"first" (the first forward + backward: peak RSS above the RSS with the inputs loaded),
"time" (one timed forward + backward), "save PATH" (losses and gradients), "quit".
INPUTS.pt is in the harness's format (cls_scores / bbox_preds per level, gt_bboxes, gt_labels,
num_classes). Gradient tensors are created before the clock starts, as the harness does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(field: str = "VmRSS") -> float:
    """Resident MB now (VmRSS) or at peak (VmHWM) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def leaves(inputs: dict) -> tuple[list, list]:
    cls = [t.detach().clone().requires_grad_() for t in inputs["cls_scores"]]
    box = [t.detach().clone().requires_grad_() for t in inputs["bbox_preds"]]
    return cls, box


def make_runner(impl: str, inputs: dict, harness: str | None):
    """A function () -> (losses dict, cls leaves, box leaves, seconds)."""
    if impl == "mmdet":
        sys.path.insert(0, harness)
        from mmdet_loss import build_head, make_gt_and_metas, run_once

        head, _ = build_head(inputs["num_classes"])
        gts, metas = make_gt_and_metas(inputs, inputs["cls_scores"][0].device)

        def run():
            losses, _, cls, box, seconds = run_once(head, inputs, gts, metas)
            return losses, cls, box, seconds

        return run
    sys.path.insert(0, str(ROOT))
    from benchmarks.mmdet_style_loss import mmdet_style_loss
    from freeanchor.models.anchors import AnchorGenerator
    from freeanchor.models.head import flatten_head_outputs
    from freeanchor.models.loss import FreeAnchorLoss

    c = inputs["num_classes"]
    # The detector caches the per-level anchors and concatenates them every step.
    levels = AnchorGenerator().grid_anchors([tuple(t.shape[-2:]) for t in inputs["cls_scores"]])
    loss = FreeAnchorLoss(c, imgs_per_gpu=len(inputs["gt_bboxes"]))
    boxes, labels = inputs["gt_bboxes"], inputs["gt_labels"]

    def run():
        cls, box = leaves(inputs)
        t0 = time.perf_counter()
        anchors = torch.cat(levels)
        if impl == "freeanchor":
            out = loss(cls, box, anchors, boxes, labels)
        else:
            logits, deltas = flatten_head_outputs(cls, box, c)
            fn = loss if impl == "freeanchor-flat" else mmdet_style_loss
            out = fn(logits, deltas, anchors, boxes, labels)
        (out["positive_bag_loss"] + out["negative_bag_loss"]).backward()
        return out, cls, box, time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("impl", choices=["freeanchor", "freeanchor-flat", "mmdet", "stand-in"])
    ap.add_argument("inputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--harness", help="folder of the peer harness (mmdet_loss.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs, map_location="cpu", weights_only=True)
    run = make_runner(args.impl, inputs, args.harness)
    base = rss_mb()
    print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "first":
            losses, *_, seconds = run()
            reply = {"peak_mb": rss_mb("VmHWM") - base, "seconds": seconds}
        elif cmd == "time":
            reply = {"seconds": run()[-1]}
        elif cmd == "save":
            losses, cls, box, _ = run()
            result = {
                "losses": {k: float(v.detach()) for k, v in losses.items()},
                "grad_cls_scores": [t.grad for t in cls],
                "grad_bbox_preds": [t.grad for t in box],
            }
            torch.save(result, arg)
            reply = {"saved": arg, "losses": result["losses"]}
        else:
            break
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
