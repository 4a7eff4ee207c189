"""`freeanchor benchmark`: inference fps (end to end and model-only), train step time and
peak memory, each after warm-up over several repeats; with `--compare torchvision`, the same
for torchvision's RetinaNet R-50 FPN (random weights, same input, batch, dtype, device) in the
same run, and the ratios.

    freeanchor benchmark --model freeanchor_r50_fpn_1x_coco --size 1216x800 --compare torchvision
    freeanchor benchmark --device cuda --dtype bf16 --batch-size 16 --train --compare torchvision

End to end = the test-time pipeline (`freeanchor.inference.Pipeline`) on uint8 images: resize
(a no-op: the images already have the benchmark size and the pipeline's scale is set to it) ->
normalise -> pad -> network -> decode + NMS -> rescale (the images start on the CPU, for both
models). Peak memory: CUDA max_memory_allocated on a GPU; on the CPU the peak resident set of
the phase above its start (Linux VmHWM).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from freeanchor.data.transforms import normalize, pad_batch
from freeanchor.errors import OptionError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Measurement:
    name: str
    e2e_fps: float = 0.0
    model_fps: float = 0.0
    train_step_s: float = 0.0
    train_img_s: float = 0.0
    infer_peak_mb: float = 0.0
    train_peak_mb: float = 0.0
    extra: dict = field(default_factory=dict)


def _rss_mb(field: str = "VmRSS") -> float:
    """Resident MB now (VmRSS) or the high-water mark (VmHWM) of this process, Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS, so each phase gets its own peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _Peak:
    """Peak memory of a phase: CUDA allocator peak, or the CPU peak RSS above its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        _reset_peak_rss()
        self.base = _rss_mb()
        self.mb = 0.0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = max(0.0, _rss_mb("VmHWM") - self.base)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _fake_targets(n: int, h: int, w: int, device: torch.device, classes: int):
    g = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for _ in range(n):
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand(8, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25])
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        labels.append(torch.randint(0, classes, (8,), generator=g).to(device))
    return boxes, labels


def _measure(
    name: str,
    model: nn.Module,
    forward: Callable[[torch.Tensor], object],
    end_to_end: Callable[[list[torch.Tensor]], object],
    train_loss: Callable[[torch.Tensor, list, list], torch.Tensor] | None,
    args,
    device: torch.device,
) -> Measurement:
    w, h = (int(v) for v in args.size.lower().split("x"))
    n = args.batch_size
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[args.dtype])
        if args.dtype != "fp32"
        else nullcontext()
    )
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]
    batch = pad_batch([normalize(im) for im in raw]).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = batch.contiguous(memory_format=fmt)
    m = Measurement(name)
    model.eval()
    with torch.inference_mode(), autocast, _Peak(device) as peak:
        m.model_fps = n / _time(lambda: forward(batch), device, args.warmup, args.repeats)
        m.e2e_fps = n / _time(lambda: end_to_end(raw), device, args.warmup, args.repeats)
    m.infer_peak_mb = peak.mb
    if args.train and train_loss is not None:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        boxes, labels = _fake_targets(n, h, w, device, 80)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = train_loss(batch, boxes, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 35.0)
            opt.step()

        with _Peak(device) as peak:
            m.train_step_s = _time(step, device, max(1, args.warmup), max(3, args.repeats // 2))
        m.train_img_s = n / m.train_step_s
        m.train_peak_mb = peak.mb
    return m


def _ours(args, device: torch.device) -> Measurement:
    import dataclasses

    from freeanchor.inference import Pipeline
    from freeanchor.models.detector import build_model
    from freeanchor.models.postprocess import decode_outputs
    from freeanchor.models.weights import load_model

    model = load_model(args.weights, device) if args.weights else build_model(args.model)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if args.compile else model
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    w, h = (int(v) for v in args.size.lower().split("x"))
    # The pipeline's scale = the benchmark size, so its resize keeps the images as they are.
    cfg = dataclasses.replace(model.cfg, input_scale=(max(w, h), min(w, h)))

    def detect(batch, metas, score_thr):
        batch = batch.to(device).contiguous(memory_format=fmt)
        cls_scores, bbox_preds = forward(batch)
        return decode_outputs(
            cls_scores, bbox_preds, metas, model.anchor_generator, model.box_coder, cfg, score_thr
        )

    pipeline = Pipeline(cfg, detect, batch_size=args.batch_size)

    def end_to_end(raw: list[torch.Tensor]):
        return list(pipeline.run(raw))

    def train_loss(batch, boxes, labels):
        return sum(model.loss(batch, boxes, labels).values())

    return _measure(args.model, model, forward, end_to_end, train_loss, args, device)


def _torchvision(args, device: torch.device) -> Measurement:
    from torchvision.models.detection import retinanet_resnet50_fpn

    w, h = (int(v) for v in args.size.lower().split("x"))
    # min/max size equal to the input: torchvision's internal transform then does not resize.
    tv = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=min(h, w),
        max_size=max(h, w), detections_per_img=100,
    ).to(device)  # fmt: skip
    if args.channels_last:
        tv = tv.to(memory_format=torch.channels_last)

    def forward(batch):
        feats = list(tv.backbone(batch).values())
        return tv.head(feats)

    def end_to_end(raw):
        return tv([im.to(device).float() / 255 for im in raw])

    def train_loss(batch, boxes, labels):
        images = [im for im in batch]
        targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(boxes, labels)]
        return sum(tv(images, targets).values())

    return _measure("torchvision_retinanet_r50", tv, forward, end_to_end, train_loss, args, device)


def run_benchmark(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    results = [_ours(args, device)]
    if args.compare == "torchvision":
        results.append(_torchvision(args, device))
    cols = [
        ("e2e_fps", "e2e img/s"),
        ("model_fps", "model img/s"),
        ("train_step_s", "train s/step"),
        ("train_img_s", "train img/s"),
        ("infer_peak_mb", "infer peak MB"),
        ("train_peak_mb", "train peak MB"),
    ]
    print(f"device {device} ({_device_name(device)}), torch {torch.__version__}, "
          f"{args.dtype}, batch {args.batch_size}, {args.size}")  # fmt: skip
    print(f"{'model':<30}" + "".join(f"{title:>15}" for _, title in cols))
    for r in results:
        print(f"{r.name:<30}" + "".join(f"{getattr(r, key):>15.3f}" for key, _ in cols))
    summary = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "size": args.size,
        "results": [asdict(r) for r in results],
    }
    if len(results) == 2:
        ours, peer = results
        ratios = {
            "e2e_speedup": ours.e2e_fps / peer.e2e_fps,
            "model_speedup": ours.model_fps / peer.model_fps,
        }
        if args.train:
            ratios["train_step_ratio"] = ours.train_step_s / peer.train_step_s
            ratios["train_peak_mem_ratio"] = ours.train_peak_mb / max(peer.train_peak_mb, 1e-9)
        print(
            "ratios (ours / torchvision): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
        )
        summary["ratios"] = ratios
    print(json.dumps(summary))
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
