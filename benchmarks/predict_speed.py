"""Images per second of `freeanchor predict` on the CPU, end to end, over repeated runs.

    python benchmarks/predict_speed.py --repo . --weights r50.pth --images imgs/ --repeats 3

Each run is one `python -m freeanchor predict` process (`--repo` goes on PYTHONPATH, so two
checkouts can be compared with the same command); its wall time includes the interpreter start
and the model load. images/s = images / wall time. Prints the median and the min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True, help="checkout whose freeanchor to run")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True, help="a folder of images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args()
    n = sum(1 for f in Path(args.images).iterdir() if f.is_file())
    env = dict(os.environ, PYTHONPATH=str(Path(args.repo).resolve()))
    rates = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "freeanchor", "predict", "--weights", args.weights,
                   args.images, "--out", out, "--device", "cpu",
                   "--batch-size", str(args.batch_size)]  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=out)
            rates.append(n / (time.perf_counter() - t0))
    print(json.dumps({
        "repo": args.repo, "images": n, "batch_size": args.batch_size,
        "images_per_s": rates, "median": statistics.median(rates),
        "min": min(rates), "max": max(rates),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
