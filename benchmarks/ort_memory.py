"""onnxruntime session options against time and peak memory, model only (RESULTS.md, 2026-12-07).

    python benchmarks/ort_memory.py export MODEL.onnx [--imgsz 1216,800]   # R-50, random weights
    python benchmarks/ort_memory.py run MODEL.onnx SETTING                 # one process a setting

SETTING: default, noarena (enable_cpu_mem_arena=False), nopattern (enable_mem_pattern=False),
noprepack (session.disable_prepacking), noprepack_noarena. Prints the median of 5 calls (after
one warm-up) and the peak RSS above the RSS after importing torch (as benchmark_worker).
"""

from __future__ import annotations

import argparse
import statistics
import time


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no /proc/self/status")


def export(path: str, imgsz: str) -> None:
    import torch

    from freeanchor.export import export_onnx
    from freeanchor.models.detector import build_model

    long, short = (int(v) for v in imgsz.split(","))
    torch.manual_seed(0)
    report = export_onnx(build_model("freeanchor_r50_fpn_1x_coco"), path, size=(short, long))
    print(report.exporter, report.max_abs_diff)


def run(path: str, setting: str, threads: int) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch  # noqa: F401 - in the baseline, as in benchmark_worker

    base = rss_mb("VmRSS")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if "noarena" in setting:
        opts.enable_cpu_mem_arena = False
    if setting == "nopattern":
        opts.enable_mem_pattern = False
    if "noprepack" in setting:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        session.run(None, {session.get_inputs()[0].name: x})
        times.append(time.perf_counter() - start)
    print(f"{setting}: median {statistics.median(times[1:]):.3f} s, "
          f"peak {rss_mb('VmHWM') - base:.0f} MB")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["export", "run"])
    p.add_argument("path")
    p.add_argument("setting", nargs="?", default="default")
    p.add_argument("--imgsz", default="1216,800")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.action == "export":
        export(a.path, a.imgsz)
    else:
        run(a.path, a.setting, a.threads)


if __name__ == "__main__":
    main()
