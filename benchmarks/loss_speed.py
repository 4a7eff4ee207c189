"""FreeAnchor loss speed and peak memory: freeanchor's batched loss vs a per-image loss written
the way MMDetection's FreeAnchorRetinaHead computes it, measured in the same run.

Case (issue 2): CPU, float32, 2 images padded to 800x1216, 80 classes, ~20 gts per image,
forward + backward. Times are medians of runs interleaved in one process (ours, reference,
ours, ...), so a busy machine slows both alike; each implementation's peak memory is measured in
its own subprocess (peak RSS above the RSS with the inputs built).

    python benchmarks/loss_speed.py [--repeats 5] [--threads 2] [--gts 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.mmdet_style_loss import mmdet_style_loss  # noqa: E402
from freeanchor.models.anchors import AnchorGenerator  # noqa: E402
from freeanchor.models.loss import FreeAnchorLoss  # noqa: E402


def make_inputs(n: int = 2, h: int = 800, w: int = 1216, classes: int = 80, gts: int = 20):
    g = torch.Generator().manual_seed(0)
    sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    anchors = AnchorGenerator()(sizes)
    a = anchors.shape[0]
    logits = torch.randn(n, a, classes, generator=g) - 4.6
    deltas = torch.randn(n, a, 4, generator=g) * 0.5
    boxes, labels = [], []
    for _ in range(n):
        xy = torch.rand(gts, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 16 + torch.rand(gts, 2, generator=g) * 300
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1))
        labels.append(torch.randint(0, classes, (gts,), generator=g))
    return logits, deltas, anchors, boxes, labels


def rss_mb(field: str = "VmRSS") -> float:
    """Resident MB now (VmRSS) or at peak (VmHWM). VmHWM belongs to the address space, so
    unlike ru_maxrss it does not carry the parent's peak over fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_once(impl: str, inputs) -> tuple[float, list[float]]:
    logits, deltas, anchors, boxes, labels = inputs
    fn = FreeAnchorLoss(80, imgs_per_gpu=2) if impl == "freeanchor" else mmdet_style_loss
    x = logits.clone().requires_grad_()
    d = deltas.clone().requires_grad_()
    t0 = time.perf_counter()
    out = fn(x, d, anchors, boxes, labels)
    (out["positive_bag_loss"] + out["negative_bag_loss"]).backward()
    return time.perf_counter() - t0, [float(v.detach()) for v in out.values()]


def peak_memory(impl: str, gts: int) -> float:
    """Child process: MB of peak RSS above the RSS once the inputs exist."""
    inputs = make_inputs(gts=gts)
    base = rss_mb()
    run_once(impl, inputs)
    return rss_mb("VmHWM") - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gts", type=int, default=20)
    ap.add_argument("--child", choices=["freeanchor", "mmdet_style"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps({"peak_mb": peak_memory(args.child, args.gts)}))
        return
    inputs = make_inputs(gts=args.gts)
    impls = ("mmdet_style", "freeanchor")
    results = {impl: {"impl": impl, "times": []} for impl in impls}
    for i in range(args.repeats + 1):  # round 0 is warm-up
        for impl in impls:
            seconds, losses = run_once(impl, inputs)
            if i:
                results[impl]["times"].append(seconds)
            results[impl]["losses"] = losses
    for impl in impls:
        times = sorted(results[impl]["times"])
        results[impl]["median_s"] = times[len(times) // 2]
        cmd = [sys.executable, __file__, "--child", impl, "--threads", str(args.threads),
               "--gts", str(args.gts)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[impl]["peak_mb"] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    ref, ours = results["mmdet_style"], results["freeanchor"]
    print(f"torch {torch.__version__}, {args.threads} threads, 2 x 800x1216, 80 classes, "
          f"{args.gts} gts/image, forward+backward")  # fmt: skip
    print(f"{'impl':<14}{'median s':>10}{'peak MB':>10}  losses (pos, neg)")
    for r in (ref, ours):
        pos, neg = r["losses"]
        print(f"{r['impl']:<14}{r['median_s']:>10.3f}{r['peak_mb']:>10.0f}  {pos:.6f}, {neg:.6f}")
    speedup = ref["median_s"] / ours["median_s"]
    mem_ratio = ours["peak_mb"] / ref["peak_mb"]
    print(f"speed-up {speedup:.2f}x, peak memory ratio (ours / reference) {mem_ratio:.2f}")
    print(json.dumps({"speedup": round(speedup, 3), "peak_memory_ratio": round(mem_ratio, 3),
                      "ours": ours, "reference": ref}))  # fmt: skip


if __name__ == "__main__":
    main()
