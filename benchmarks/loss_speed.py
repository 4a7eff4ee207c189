"""FreeAnchor loss speed and peak memory: freeanchor vs MMDetection 3.3's own loss.

    python benchmarks/loss_speed.py [--cases coco_2img 1333x800_50gt 2x1333x800_100gt]
        [--repeats 5] [--threads 2] [--peer auto|mmdet|stand-in] [--peer-python PY]

The peer is MMDetection 3.3's `FreeAnchorRetinaHead.loss_by_feat`, run by the peer harness
(`../shared/peer/`, or --peer-harness / $PEER_HARNESS) in its own venv: --peer-python, else
$PEER_PYTHON, else $PEER_DIR/mmdet-venv/bin/python, else /tmp/mmdet-peer/mmdet-venv/bin/python.
Without that venv the peer is the stand-in benchmarks/mmdet_style_loss.py, which is 1.6-1.8x
SLOWER than the real MMDetection loss (so ratios against it overstate our speed-up); the
output says which peer was used.

Every implementation runs in its own process on the same inputs (CPU, float32, forward +
backward): its first run gives its peak memory (peak RSS above the RSS with the inputs
loaded), then the timed runs are interleaved (ours, ours flattened, peer, ours, ...), one at a
time, so a busy machine slows all alike. Reported: median and min-max of the repeats, the
ratio of medians with the min-max of the per-round ratios, peak memory, and the losses and
gradients compared with the peer's. The last line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("loss_worker.py")
STRIDES = (8, 16, 32, 64, 128)
# name: (padded (h, w), real (h, w) of each image, gts of each image, classes)
CASES = {
    "coco_2img": ((800, 1216), [(800, 1199), (771, 1216)], [21, 7], 80),
    "1333x800_50gt": ((800, 1344), [(800, 1333)], [50], 80),
    "2x1333x800_100gt": ((800, 1344), [(800, 1333), (750, 1333)], [100, 100], 80),
    "tiny": ((256, 320), [(256, 320)], [4], 5),  # for the test of this script
}
OURS = ("freeanchor", "freeanchor-flat")


def make_inputs(case: str, seed: int = 0) -> dict:
    """Seeded loss inputs in the peer harness's format: logits around the RetinaNet prior
    (-4.6 +- 1), raised for the gt class near each gt centre on the level that fits its size;
    deltas N(0, 0.5^2); gts of log-uniform size (12 px to 0.9 x the short side) and aspect
    (1/3 to 3), half of them from 4 frequent classes."""
    (ph, pw), real, n_gts, classes = CASES[case]
    g = torch.Generator().manual_seed(seed)
    sizes = [(-(-ph // s), -(-pw // s)) for s in STRIDES]
    cls = [torch.randn(len(real), 9, classes, h, w, generator=g) - 4.6 for h, w in sizes]
    boxes, labels = [], []
    for i, ((h, w), k) in enumerate(zip(real, n_gts)):
        side = torch.empty(k).uniform_(math.log(12), math.log(0.9 * min(h, w)), generator=g).exp()
        ratio = torch.empty(k).uniform_(math.log(1 / 3), math.log(3), generator=g).exp()
        bw, bh = (side * ratio.sqrt()).clamp(max=w - 1), (side / ratio.sqrt()).clamp(max=h - 1)
        cx = bw / 2 + torch.rand(k, generator=g) * (w - bw)
        cy = bh / 2 + torch.rand(k, generator=g) * (h - bh)
        boxes.append(torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1))
        lab = torch.randint(0, classes, (k,), generator=g)
        frequent = torch.randperm(classes, generator=g)[:4]
        pick = torch.rand(k, generator=g) < 0.5
        lab[pick] = frequent[torch.randint(0, len(frequent), (int(pick.sum()),), generator=g)]
        labels.append(lab)
        for (fh, fw), s, level in zip(sizes, STRIDES, cls):
            for (x1, y1, x2, y2), c in zip(boxes[-1].tolist(), lab.tolist()):
                gx = (
                    max(0, math.ceil((3 * x1 + x2) / 4 / s)),
                    min(fw - 1, int((x1 + 3 * x2) / 4 / s)),
                )
                gy = (
                    max(0, math.ceil((3 * y1 + y2) / 4 / s)),
                    min(fh - 1, int((y1 + 3 * y2) / 4 / s)),
                )
                if gx[1] >= gx[0] and gy[1] >= gy[0]:
                    fit = math.exp(-abs(math.log2(max((x2 - x1) * (y2 - y1), 1) ** 0.5 / (4 * s))))
                    region = level[i, :, c, gy[0] : gy[1] + 1, gx[0] : gx[1] + 1]
                    region += torch.rand(region.shape, generator=g) * 6 * fit
    return {
        "cls_scores": [x.reshape(len(real), 9 * classes, *x.shape[-2:]) for x in cls],
        "bbox_preds": [0.5 * torch.randn(len(real), 36, h, w, generator=g) for h, w in sizes],
        "gt_bboxes": boxes,
        "gt_labels": labels,
        "img_shapes": [(ph, pw)] * len(real),
        "num_classes": classes,
    }


def find_peer(args) -> tuple[str, str | None, str | None]:
    """("mmdet", python, harness) when the real peer can run, else ("stand-in", None, None)."""
    harness = (
        args.peer_harness or os.environ.get("PEER_HARNESS") or str(ROOT.parent / "shared/peer")
    )
    candidates = [args.peer_python, os.environ.get("PEER_PYTHON")]
    if os.environ.get("PEER_DIR"):
        candidates.append(os.path.join(os.environ["PEER_DIR"], "mmdet-venv/bin/python"))
    candidates.append("/tmp/mmdet-peer/mmdet-venv/bin/python")
    python = next((p for p in candidates if p and os.access(p, os.X_OK)), None)
    real = python and Path(harness, "mmdet_loss.py").is_file()
    if args.peer == "mmdet" and not real:
        sys.exit(f"loss_speed: no MMDetection peer (python {python}, harness {harness})")
    if args.peer == "stand-in" or not real:
        return "stand-in", None, None
    return "mmdet", python, harness


class Worker:
    def __init__(self, impl: str, inputs: Path, threads: int, python=None, harness=None):
        cmd = [python or sys.executable, str(WORKER), impl, str(inputs), "--threads", str(threads)]
        if harness:
            cmd += ["--harness", harness]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.impl = impl
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        self.ask("")  # its "ready" line

    def ask(self, command: str) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        while line := self.proc.stdout.readline():
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.impl} worker died (exit {self.proc.wait()})")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def compare(ours: dict, peer: dict) -> dict:
    """Loss differences (relative) and gradient differences (max |diff| / max |peer|)."""
    out = {}
    for name, v in peer["losses"].items():
        out[name] = abs(ours["losses"][name] - v) / max(abs(v), 1e-12)
    for key in ("grad_cls_scores", "grad_bbox_preds"):
        pairs = list(zip(ours[key], peer[key]))
        scale = max(float(b.abs().max()) for _, b in pairs)
        out[key] = max(float((a - b).abs().max()) for a, b in pairs) / max(scale, 1e-30)
        # the golden tests' tolerance: |a - b| <= 1e-4 |b| + 1e-5 max|b|
        out[key + "_ok"] = all(bool(((a - b).abs() <= 1e-4 * b.abs() + 1e-5 * scale).all())
                               for a, b in pairs)  # fmt: skip
    out["losses_ok"] = all(out[n] <= 1e-5 for n in peer["losses"])
    return out


def spread(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread": (max(times) - min(times)) / med, "times_s": times}  # fmt: skip


def bench_case(case: str, args, peer: str, python, harness, tmp: Path) -> dict:
    path = tmp / f"{case}.pt"
    torch.save(make_inputs(case), path)
    impls = [*OURS, peer]
    workers = {
        i: Worker(i, path, args.threads, *(python, harness) if i == "mmdet" else ()) for i in impls
    }
    try:
        peaks = {i: workers[i].ask("first")["peak_mb"] for i in impls}
        times = {i: [] for i in impls}
        for _ in range(args.repeats):
            for i in impls:
                times[i].append(workers[i].ask("time")["seconds"])
        saved = {}
        for i in impls:
            workers[i].ask(f"save {tmp / (i + '.pt')}")
            saved[i] = torch.load(tmp / f"{i}.pt", weights_only=True)
    finally:
        for w in workers.values():
            w.close()
    res = {"gts": CASES[case][2], "image": CASES[case][0], "classes": CASES[case][3]}
    for i in (peer, *OURS):
        res[i] = {**spread(times[i]), "peak_mb": peaks[i], "losses": saved[i]["losses"]}
        if i != peer:
            rounds = [p / o for p, o in zip(times[peer], times[i])]
            res[i]["speedup"] = res[peer]["median_s"] / res[i]["median_s"]
            res[i]["speedup_rounds"] = [min(rounds), max(rounds)]
            res[i]["peak_ratio"] = peaks[i] / peaks[peer]
            res[i]["vs_peer"] = compare(saved[i], saved[peer])
    return res


PEER_NAMES = {
    "mmdet": "MMDetection 3.3 FreeAnchorRetinaHead.loss_by_feat (the real peer, {python})",
    "stand-in": "STAND-IN benchmarks/mmdet_style_loss.py, not MMDetection: it is 1.6-1.8x "
    "slower than MMDetection's real loss, so ratios against it overstate our speed-up",
}


def report(results: dict, peer: str, python, args) -> None:
    peer_name = PEER_NAMES[peer].format(python=python)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} cores ({_cpu()}), torch {torch.__version__}"
    print(f"FreeAnchor loss forward + backward, CPU float32, {args.threads} threads, ", end="")
    print(f"{args.repeats} interleaved repeats\npeer: {peer_name}\nmachine: {machine}; {when}")
    rows = []
    for case, r in results.items():
        (h, w), n = r["image"], len(r["gts"])
        print(f"\n{case}: {n} x {h}x{w} (padded), {r['classes']} classes, gts {r['gts']}")
        print(f"  {'impl':<17}{'median s':>9}{'min-max s':>14}{'peak MB':>9}  speed-up  losses")
        for i in (peer, *OURS):
            x = r[i]
            up = f"{x['speedup']:.2f}x" if "speedup" in x else "-"
            warn = "  (spread > 10 %)" if x["spread"] > 0.1 else ""
            span = f"{x['min_s']:.3f}-{x['max_s']:.3f}"
            losses = ", ".join(f"{v:.6f}" for v in x["losses"].values())
            cols = f"{x['median_s']:>9.3f}{span:>14}{x['peak_mb']:>9.0f}  {up:>8}"
            print(f"  {i:<17}{cols}  {losses}{warn}")
        for i in OURS:
            v, (lo, hi) = r[i]["vs_peer"], r[i]["speedup_rounds"]
            ok = v["losses_ok"] and v["grad_cls_scores_ok"] and v["grad_bbox_preds_ok"]
            print(f"  {i} vs peer: per-round speed-up {lo:.2f}-{hi:.2f}x, peak memory "
                  f"{r[i]['peak_ratio']:.2f}x; losses rel diff {v['positive_bag_loss']:.1e} / "
                  f"{v['negative_bag_loss']:.1e}, gradients max|diff|/max|peer| "
                  f"{v['grad_cls_scores']:.1e} (cls) {v['grad_bbox_preds']:.1e} (box): "
                  f"{'within' if ok else 'OUTSIDE'} the golden tolerances")  # fmt: skip
        o, p, f = r["freeanchor"], r[peer], r["freeanchor-flat"]
        rows.append(
            f"| {case} | {o['median_s']:.3f} ({o['min_s']:.3f}-{o['max_s']:.3f}) "
            f"| {f['median_s']:.3f} ({f['min_s']:.3f}-{f['max_s']:.3f}) "
            f"| {p['median_s']:.3f} ({p['min_s']:.3f}-{p['max_s']:.3f}) "
            f"| **{o['speedup']:.2f}x** ({o['speedup_rounds'][0]:.2f}-{o['speedup_rounds'][1]:.2f})"
            f" / {f['speedup']:.2f}x"
            f" | {o['peak_mb']:.0f} / {f['peak_mb']:.0f} / {p['peak_mb']:.0f} |"
        )
    print("\n--- for benchmarks/RESULTS.md ---")
    print(f"`python benchmarks/loss_speed.py --repeats {args.repeats} --threads {args.threads}`")
    print(f"({machine}; {when}; peer: {peer_name}; {args.threads} threads)\n")
    print("| case | freeanchor s (min-max) | flattened first s | peer s (min-max) "
          "| speed-up (per-round) / flattened | peak MB ours / flattened / peer |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("--- end ---")


def _cpu() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=[c for c in CASES if c != "tiny"], choices=CASES)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", choices=["auto", "mmdet", "stand-in"], default="auto")
    ap.add_argument("--peer-python", help="python of the MMDetection venv")
    ap.add_argument("--peer-harness", help="folder of the peer harness (mmdet_loss.py)")
    args = ap.parse_args()
    peer, python, harness = find_peer(args)
    with tempfile.TemporaryDirectory(prefix="loss_speed_") as tmp:
        results = {c: bench_case(c, args, peer, python, harness, Path(tmp)) for c in args.cases}
    report(results, peer, python, args)
    print(json.dumps({"peer": peer, "peer_python": python, "threads": args.threads,
                      "repeats": args.repeats, "cases": results}))  # fmt: skip


if __name__ == "__main__":
    main()
