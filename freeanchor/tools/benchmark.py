"""`freeanchor benchmark`: inference img/s (end to end and model only), train step time and
peak memory over several repeats; with `--compare torchvision`, the same for torchvision's
RetinaNet of the same depth (random weights, same input, batch, dtype, device) in the same run,
and the ratios.

    freeanchor benchmark --model freeanchor_r50_fpn_1x_coco --size 1216x800 --compare torchvision
    freeanchor benchmark --imgsz 1216,800 --compare torchvision --onnx   # ours on onnxruntime
    freeanchor benchmark --device cuda --dtype bf16 --batch-size 16 --train --compare torchvision

End to end = the test-time pipeline (`freeanchor.inference.Pipeline`) on uint8 images: resize
(a no-op: the images already have the benchmark size and the pipeline's scale is set to it) ->
normalise -> pad -> network -> decode + NMS -> rescale (the images start on the CPU, for both
models); torchvision's is its model called on the images (its own transform and
post-processing).

Each model runs in its own worker process per phase (`benchmark_worker.py`), so each peak
memory is that model's own; the repeats are interleaved (ours, peer, ours, peer, ...) so load
on a shared machine hits both alike. Every figure is the median over the repeats with its
min-max; a ratio is the median of the per-round ratios with their min-max, of wall time and of
each process's CPU time (on a machine shared with other jobs the CPU-time ratio moves less). A
spread (max - min over the median) above 10 % is warned about. Figures not measured print "—"
(null in JSON).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from freeanchor.errors import OptionError

SPREAD_WARN = 0.10  # spread above which a figure is flagged
# figure -> (title, phase, command, per image: figure = batch / seconds)
FIGURES = {
    "e2e_fps": ("e2e img/s", "infer", "e2e", True),
    "model_fps": ("model img/s", "infer", "model", True),
    "train_step_s": ("train s/step", "train", "train", False),
    "train_img_s": ("train img/s", "train", "train", True),
}


@dataclass
class Stat:
    median: float
    min: float
    max: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median."""
        return (self.max - self.min) / self.median if self.median else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "spread_pct": round(100 * self.spread, 1)}

    def text(self) -> str:
        return f"{self.median:.3g} ({self.min:.3g}-{self.max:.3g})"


def stat(values: list[float]) -> Stat:
    return Stat(statistics.median(values), min(values), max(values), len(values))


@dataclass
class ModelRun:
    name: str
    peer_note: str = ""
    seconds: dict[str, list[float]] = field(default_factory=dict)  # command -> per repeat
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)  # the process's CPU time
    peaks: dict[str, float | None] = field(default_factory=dict)  # phase -> MB


def _size(args) -> tuple[int, int]:
    """(W, H) of the benchmark's images, from --imgsz / --size (stored as "WxH")."""
    w, h = (int(v) for v in args.size.lower().split("x"))
    return w, h


class _Worker:
    """A `benchmark_worker` process: one model, one phase, one command at a time."""

    def __init__(self, role: str, phase: str, args) -> None:
        w, h = _size(args)
        spec = {"role": role, "phase": phase, "model": args.model, "weights": args.weights,
                "device": args.device, "batch_size": args.batch_size, "dtype": args.dtype,
                "size": [w, h], "warmup": args.warmup, "channels_last": args.channels_last,
                "compile": args.compile, "plain": getattr(args, "plain", False),
                "threads": getattr(args, "threads", None),
                "onnx": getattr(args, "onnx_path", None)}  # fmt: skip
        cmd = [sys.executable, "-m", "freeanchor.tools.benchmark_worker", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def _run_phase(phase: str, roles: list[str], runs: dict[str, ModelRun], args) -> None:
    workers = {role: _Worker(role, phase, args) for role in roles}  # built side by side
    try:
        for role, worker in workers.items():
            info = worker.read()["ready"]
            runs[role].name, runs[role].peer_note = info["name"], info["peer_note"]
        commands = sorted({c for _, p, c, _ in FIGURES.values() if p == phase})
        for _ in range(args.repeats):
            for cmd in commands:
                for role, worker in workers.items():  # interleaved: ours, peer, ours, ...
                    reply = worker.ask(cmd)
                    runs[role].seconds.setdefault(cmd, []).append(reply["s"])
                    runs[role].cpu_seconds.setdefault(cmd, []).append(reply["cpu_s"])
        for role, worker in workers.items():
            runs[role].peaks[phase] = worker.ask("peak")["peak_mb"]
    finally:
        for worker in workers.values():
            worker.close()


def _figures(run: ModelRun, batch: int) -> dict[str, Stat | None]:
    figs: dict[str, Stat | None] = {}
    for key, (_, _, cmd, per_image) in FIGURES.items():
        secs = run.seconds.get(cmd)
        figs[key] = None if not secs else stat([batch / s if per_image else s for s in secs])
    return figs


def _ratios(ours: ModelRun, peer: ModelRun) -> dict[str, Stat]:
    """Per-round ratios of ours to the peer's (paired by the interleaving), of wall time and
    of CPU time (`*_cpu`: less sensitive to other jobs on a loaded machine)."""
    pairs = {"e2e_speedup": "e2e", "model_speedup": "model", "train_step_ratio": "train"}
    out = {}
    for key, cmd in pairs.items():
        for suffix, ours_s, peer_s in (("", ours.seconds, peer.seconds),
                                       ("_cpu", ours.cpu_seconds, peer.cpu_seconds)):  # fmt: skip
            if cmd in ours_s and cmd in peer_s:
                a, b = ours_s[cmd], peer_s[cmd]
                # speed-ups: peer time / our time; the train ratio: our time / the peer's.
                out[key + suffix] = stat(
                    [o / p if key == "train_step_ratio" else p / o for o, p in zip(a, b)]
                )
    for key, phase in (("infer_peak_mem_ratio", "infer"), ("train_peak_mem_ratio", "train")):
        o, p = ours.peaks.get(phase), peer.peaks.get(phase)
        if o is not None and p:
            out[key] = Stat(o / p, o / p, o / p, 1)
    return out


def _cell(value: Stat | float | None) -> str:
    if value is None:
        return "—"
    return value.text() if isinstance(value, Stat) else f"{value:.0f}"


def run_benchmark(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    plain = getattr(args, "plain", False)
    if getattr(args, "onnx", False) and (args.dtype != "fp32" or args.compile or plain):
        raise OptionError("--onnx runs the exported fp32 graph: it takes no --dtype other than "
                          "fp32, no --compile and no --plain")  # fmt: skip
    roles = ["ours"] + (["torchvision"] if args.compare == "torchvision" else [])
    runs = {role: ModelRun(role) for role in roles}
    with tempfile.TemporaryDirectory() as tmp:
        if getattr(args, "onnx", False):
            args.onnx_path = _export_for_benchmark(args, Path(tmp) / "model.onnx")
        for phase in ["infer"] + (["train"] if args.train else []):
            _run_phase(phase, roles, runs, args)
    print(f"device {device} ({_device_name(device, args)}), torch {torch.__version__}, "
          f"{args.dtype}, batch {args.batch_size}, {args.size}, {args.repeats} interleaved "
          "repeats: median (min-max)")  # fmt: skip
    cols = [(k, v[0]) for k, v in FIGURES.items()] + [("infer", "infer peak MB"),
                                                      ("train", "train peak MB")]  # fmt: skip
    print(f"{'model':<34}" + "".join(f" {title:>23}" for _, title in cols))
    results, flagged = [], []
    for run in runs.values():
        figs = _figures(run, args.batch_size)
        cells = [figs.get(k) if k in figs else run.peaks.get(k) for k, _ in cols]
        print(f"{run.name:<34}" + "".join(f" {_cell(c):>23}" for c in cells))
        flagged += [f"{run.name} {k}" for k, s in figs.items() if s and s.spread > SPREAD_WARN]
        results.append({"name": run.name, "peer_note": run.peer_note or None,
                        **{k: s.as_dict() if s else None for k, s in figs.items()},
                        "cpu_s": {c: stat(v).as_dict() for c, v in run.cpu_seconds.items()},
                        "infer_peak_mb": run.peaks.get("infer"),
                        "train_peak_mb": run.peaks.get("train")})  # fmt: skip
    summary = {"device": _device_name(device, args), "torch": torch.__version__,
               "dtype": args.dtype, "batch_size": args.batch_size, "size": args.size,
               "repeats": args.repeats, "results": results}  # fmt: skip
    if len(runs) == 2:
        ours, peer = runs.values()
        print(f"peer: {peer.name} ({peer.peer_note})")
        ratios = _ratios(ours, peer)
        print("ratios (ours / peer; speed-ups = peer time / ours): "
              + ", ".join(f"{k} {s.text()}" for k, s in ratios.items()))  # fmt: skip
        flagged += [k for k, s in ratios.items() if s.spread > SPREAD_WARN]
        summary["ratios"] = {k: s.as_dict() for k, s in ratios.items()}
    if flagged:
        print(f"warning: spread above {SPREAD_WARN:.0%} (a loaded machine?): "
              f"{', '.join(flagged)}", file=sys.stderr)  # fmt: skip
    summary["warnings"] = flagged
    print(json.dumps(summary))
    return 0


def _export_for_benchmark(args, path: Path) -> str:
    """--onnx: our model exported once (raw outputs, fixed size) before any worker starts, so
    the export's memory is not in the measured worker's peak."""
    from freeanchor.export import export_onnx
    from freeanchor.models.detector import build_model
    from freeanchor.models.weights import load_model

    model = load_model(args.weights) if args.weights else build_model(args.model)
    w, h = _size(args)
    # a fixed-size graph takes one batch size: dynamic axes when the benchmark batches images
    report = export_onnx(model, path, size=(h, w), dynamic=args.batch_size > 1)
    print(f"exported to ONNX ({report.exporter}), onnxruntime within {report.max_abs_diff:.2g} "
          "of PyTorch", file=sys.stderr)  # fmt: skip
    return str(path)


def _device_name(device: torch.device, args) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = getattr(args, "threads", None) or torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {threads} threads"
