"""Eval-mode backbone levers (BN folded into the convs, channels_last) against the plain path,
by input size: where `backbone.LEVERS_MIN_PIXELS` comes from.

    python benchmarks/eval_levers.py [--threads 2] [--backbones resnet18,resnet50]

Random weights, eval mode, inference_mode, one process; per size and path the median of 6-12
calls, two rounds alternating the paths, the faster round kept. Prints plain time / levers
time per size (> 1: the levers pay).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from freeanchor.models import backbone
from freeanchor.models.backbone import ResNetBackbone

SIZES = ((8, 96), (1, 224), (1, 320), (1, 512))  # (batch, side)


def median_seconds(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backbones", default="resnet18,resnet50")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    backbone.LEVERS_MIN_PIXELS = 0  # the levers at every size, to measure them
    for name in a.backbones.split(","):
        model = ResNetBackbone(name, frozen_stages=0, norm_eval=False).eval()
        for batch, side in SIZES:
            x = torch.randn(batch, 3, side, side)
            calls = 12 if side <= 320 else 6
            best = {}
            with torch.inference_mode():
                for _ in range(2):
                    for levers in (True, False):
                        model.fold_bn = model.channels_last = levers
                        t = median_seconds(lambda: model(x), calls)  # noqa: B023
                        best[levers] = min(best.get(levers, t), t)
            print(f"{name} {batch} x {side} x {side}: levers {best[True] * 1e3:.1f} ms, plain "
                  f"{best[False] * 1e3:.1f} ms, plain / levers {best[False] / best[True]:.2f}x",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
