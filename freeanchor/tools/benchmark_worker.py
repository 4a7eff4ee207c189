"""One model of `freeanchor benchmark` in its own process (so its peak memory is its own).

    python -m freeanchor.tools.benchmark_worker '{"role": "ours", "phase": "infer", ...}'

The parent (`freeanchor.tools.benchmark`) starts one worker per model and phase ("infer":
model-only and end-to-end calls; "train": training steps). The worker builds its model, warms
up, prints `{"ready": ...}`, then answers one command per stdin line with one JSON line on
stdout: "model" / "e2e" / "train" -> {"s": wall seconds of one call, "cpu_s": this process's
CPU seconds in it}; "peak" -> {"peak_mb": ...};
"quit". One call at a time, so the parent can interleave the models' repeats.

Peak memory: on a GPU, torch.cuda.max_memory_allocated; on the CPU, the process's peak
resident set (VmHWM) above its resident set after the imports, before the model is built: the
weights plus the largest working set of the phase.

Peer: torchvision's RetinaNet as its `retinanet_resnet50_fpn` builds it for a pretrained
backbone (FrozenBatchNorm2d, 3 trainable stages, P6/P7 from P5, 91 classes), with random weights
and a ResNet of our backbone's depth (ResNeXt-101 32x4d built from torchvision's ResNet class);
for a backbone torchvision's RetinaNet has no twin of, ResNet-50, and the mismatch is reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rss_mb(field: str = "VmRSS") -> float | None:
    """Resident MB now (VmRSS) or this process's high-water mark (VmHWM); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fake_targets(n: int, h: int, w: int, device: torch.device, classes: int):
    g = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for _ in range(n):
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand(8, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25])
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        labels.append(torch.randint(0, classes, (8,), generator=g).to(device))
    return boxes, labels


def _ours_onnx(a: dict, device: torch.device):
    """Ours as exported (`a["onnx"]`, made by the parent) on onnxruntime: no torch model."""
    from freeanchor.inference import Pipeline
    from freeanchor.predict import OnnxBackend

    backend = OnnxBackend(a["onnx"], a["device"], a.get("threads"))
    w, h = a["size"]
    cfg = dataclasses.replace(backend.cfg, input_scale=(max(w, h), min(w, h)))
    pipeline = Pipeline(cfg, backend.detect, batch_size=a["batch_size"])

    def forward(batch):
        return backend.session.run(None, {"images": batch.contiguous().numpy()})

    name = f"{a['model']} (onnxruntime)"
    return None, forward, lambda raw: list(pipeline.run(raw)), None, name, ""


def _ours(a: dict, device: torch.device, fmt: torch.memory_format):
    if a.get("onnx") and a["phase"] == "infer":
        return _ours_onnx(a, device)
    from freeanchor.inference import Pipeline
    from freeanchor.models.detector import build_model
    from freeanchor.models.postprocess import decode_outputs
    from freeanchor.models.weights import load_model

    model = load_model(a["weights"], device) if a["weights"] else build_model(a["model"])
    model = model.to(device, memory_format=fmt)
    if a["plain"] and hasattr(model.backbone, "fold_bn"):
        model.backbone.fold_bn = model.backbone.channels_last = False
    net = torch.compile(model) if a["compile"] else model
    w, h = a["size"]
    # The pipeline's scale = the benchmark size, so its resize keeps the images as they are.
    cfg = dataclasses.replace(model.cfg, input_scale=(max(w, h), min(w, h)))

    def detect(batch, metas, score_thr):
        cls_scores, bbox_preds = net(batch.to(device).contiguous(memory_format=fmt))
        return decode_outputs(
            cls_scores, bbox_preds, metas, model.anchor_generator, model.box_coder, cfg, score_thr
        )

    pipeline = Pipeline(cfg, detect, batch_size=a["batch_size"])

    def train_loss(batch, boxes, labels):
        return sum(model.loss(batch, boxes, labels).values())

    return model, net, lambda raw: list(pipeline.run(raw)), train_loss, a["model"], ""


def _torchvision(a: dict, device: torch.device, fmt: torch.memory_format):
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    from freeanchor.config import preset
    from freeanchor.models.backbone import RESNETS

    ours = preset(a["model"]).backbone
    depth = ours if ours in RESNETS else "resnet50"  # the same torchvision ResNet as ours
    note = "same depth" if depth == ours else f"depth mismatch: ours {ours}, peer {depth}"
    block, layers, groups, width = RESNETS[depth]
    body = resnet.ResNet(block, layers, groups=groups, width_per_group=width,
                         norm_layer=FrozenBatchNorm2d)  # fmt: skip
    backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))  # fmt: skip
    w, h = a["size"]
    # min/max size equal to the input: torchvision's internal transform then does not resize.
    tv = RetinaNet(backbone, num_classes=91, min_size=min(h, w), max_size=max(h, w),
                   detections_per_img=100)  # fmt: skip
    tv = tv.to(device, memory_format=fmt)

    def forward(batch):
        return tv.head(list(tv.backbone(batch).values()))

    def end_to_end(raw):
        return tv([im.to(device).float() / 255 for im in raw])

    def train_loss(batch, boxes, labels):
        targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(boxes, labels)]
        return sum(tv(list(batch), targets).values())

    return tv, forward, end_to_end, train_loss, f"torchvision_retinanet_{depth}", note


def _calls(a: dict, device: torch.device) -> tuple[dict[str, Callable[[], object]], dict]:
    """The timed calls of this worker's phase, and what the parent reports about the model."""
    from freeanchor.data.transforms import normalize, pad_batch

    fmt = torch.channels_last if a["channels_last"] else torch.contiguous_format
    build = _ours if a["role"] == "ours" else _torchvision
    model, forward, end_to_end, train_loss, name, note = build(a, device, fmt)
    w, h = a["size"]
    n = a["batch_size"]
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]
    batch = pad_batch([normalize(im) for im in raw]).to(device).contiguous(memory_format=fmt)
    autocast = (torch.autocast(device.type, dtype=DTYPES[a["dtype"]])
                if a["dtype"] != "fp32" else nullcontext())  # fmt: skip
    info = {"name": name, "peer_note": note}
    if a["phase"] == "infer":
        if model is not None:  # None: an onnxruntime session
            model.eval()

        def infer(fn: Callable[[], object]) -> Callable[[], object]:
            def call() -> object:
                with torch.inference_mode(), autocast:
                    return fn()

            return call

        return {"model": infer(lambda: forward(batch)), "e2e": infer(lambda: end_to_end(raw))}, info
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

    return {"train": step}, info


def main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    # Only protocol lines go to the real stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    device = torch.device(a["device"])
    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    # Both models' workers import the same modules before the baseline, so neither's peak
    # counts libraries (OpenCV, torchvision's detection code) that the other also loads.
    import torchvision.models.detection  # noqa: F401

    import freeanchor.inference  # noqa: F401
    import freeanchor.models.detector  # noqa: F401

    base = rss_mb()
    calls, info = _calls(a, device)
    for _ in range(a["warmup"]):
        for fn in calls.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out.write(json.dumps({"ready": info}) + "\n")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "peak":
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                hwm = rss_mb("VmHWM")
                peak = None if hwm is None or base is None else hwm - base
            out.write(json.dumps({"peak_mb": peak}) + "\n")
            continue
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        calls[cmd]()
        _sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out.write(json.dumps({"s": wall, "cpu_s": cpu}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
