"""ONNX export of the detector, checked against PyTorch with onnxruntime.

Two graphs:

- raw (default): input `images` [N, 3, H, W] (normalised, padded to 32); outputs the per-level
  head maps `cls_score_p3..p7` [N, 9*C, H_l, W_l] (logits) and `bbox_pred_p3..p7`
  [N, 36, H_l, W_l] (deltas), exactly `FreeAnchor.forward`. Decoding and NMS run outside the
  graph in `freeanchor.models.postprocess`, the same code as PyTorch inference
  (`freeanchor predict --onnx`).
- with NMS (`with_nms=True`): inputs `images`, `img_hw` [N, 2] (float, (H, W) of each
  resized image before padding, to clip boxes as PyTorch does) and `rescale` [N, 2] (float,
  x and y multipliers to original-image pixels: 1 / scale factor, or ones); outputs `boxes`
  [N, max_per_img, 4] xyxy, `scores` [N, max_per_img] and `labels` [N, max_per_img] (int64),
  padded with score 0 and label -1, and `num_dets` [N]. The graph *is*
  `freeanchor.models.postprocess.postprocess_padded` (per-level top `nms_pre`, decode + clip,
  rescale, score threshold, class-aware NMS, best `max_per_img`): one implementation.

The ModelConfig (class names, input_scale, mean/std, strides, ...) and the checkpoint's extra
metadata (`cat_ids`) go into the ONNX `metadata_props`, so deployment needs only the .onnx
file, preprocessing and `postprocess`.

    freeanchor export --weights demo/model.safetensors --out model.onnx --dynamic
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from freeanchor.config import ModelConfig, to_dict
from freeanchor.errors import CheckpointError, OptionError
from freeanchor.models.detector import FreeAnchor
from freeanchor.models.postprocess import level_scores, postprocess_padded

META_CONFIG = "freeanchor.config"
META_EXTRA = "freeanchor.extra"
META_KIND = "freeanchor.outputs"  # "raw" | "nms"
TOLERANCE = 1e-4  # raw maps and scores, onnxruntime vs PyTorch
BOX_TOLERANCE = 1e-2  # px, boxes of the with-NMS graph (decoded: up to ~1000 px in float32)


@dataclass
class ExportReport:
    path: Path
    exporter: str  # "dynamo" or "torchscript" (torch.onnx.export(dynamo=False))
    max_abs_diff: float  # onnxruntime vs PyTorch on the test image
    input_size: tuple[int, int]  # (H, W) of the example input
    dynamo_error: str | None = None  # why the dynamo exporter was not used


def level_names(strides: tuple[int, ...]) -> list[str]:
    """p3, p4, ... from the strides 8, 16, ..."""
    return [f"p{int(s).bit_length() - 1}" for s in strides]


def raw_output_names(cfg: ModelConfig) -> list[str]:
    names = level_names(cfg.strides)
    return [f"cls_score_{n}" for n in names] + [f"bbox_pred_{n}" for n in names]


class RawGraph(nn.Module):
    """`FreeAnchor.forward` with its two lists flattened into one output tuple."""

    def __init__(self, model: FreeAnchor) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        cls_scores, bbox_preds = self.model(images)
        return (*cls_scores, *bbox_preds)


class NMSGraph(nn.Module):
    """Network + `postprocess_padded` (decoding, threshold, class-aware NMS), fixed shapes."""

    def __init__(
        self, model: FreeAnchor, score_thr: float, nms_iou: float, nms_pre: int, max_per_img: int
    ) -> None:
        super().__init__()
        self.model = model
        self.score_thr, self.nms_iou = float(score_thr), float(nms_iou)
        self.nms_pre, self.max_per_img = int(nms_pre), int(max_per_img)

    def forward(
        self, images: Tensor, img_hw: Tensor, rescale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cls_scores, bbox_preds = self.model(images)
        sizes = [(s.shape[-2], s.shape[-1]) for s in cls_scores]
        anchors = self.model.anchor_generator.grid_anchors(sizes, images.device)
        scores = [level_scores(s) for s in cls_scores]
        # sym_min keeps k symbolic under the dynamo exporter (dynamic sizes); the TorchScript
        # tracer fixes it at the example input's value.
        topk = [
            torch.sym_min(self.nms_pre, p.shape[1]) if self.nms_pre > 0 else p.shape[1]
            for p in scores
        ]
        return postprocess_padded(
            scores, bbox_preds, anchors, img_hw, rescale, self.model.box_coder, topk,
            self.score_thr, self.nms_iou, self.max_per_img,
        )  # fmt: skip


# ----------------------------------------------------------------------------- export


def default_size(cfg: ModelConfig) -> tuple[int, int]:
    """(H, W) of the example input: the largest landscape image of `input_scale`, padded."""
    d = cfg.size_divisor
    long_edge, short_edge = max(cfg.input_scale), min(cfg.input_scale)
    return -(-short_edge // d) * d, -(-long_edge // d) * d


def sample_input(cfg: ModelConfig, size: tuple[int, int], batch: int = 1) -> Tensor:
    """A deterministic synthetic image (shapes on clutter), normalised: [batch, 3, H, W]."""
    from freeanchor.data.synthetic import render_image
    from freeanchor.data.transforms import normalize

    images = []
    for i in range(batch):
        array, _ = render_image(np.random.default_rng([1234, i]), size[1], size[0])
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        images.append(normalize(image, cfg.mean, cfg.std))
    return torch.stack(images)


def _export(
    graph: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    names: tuple[list[str], list[str]],
    dynamic: bool,
    opset: int | None,
    exporter: str,
) -> tuple[str, str | None]:
    """torch.onnx.export: the dynamo exporter first (unless `exporter` says otherwise), then
    the TorchScript one. Returns (exporter used, why dynamo was not used)."""
    inputs, outputs = names
    dynamo_error = None
    if exporter in ("auto", "dynamo"):
        batch, height, width = (torch.export.Dim(n) for n in ("batch", "height", "width"))
        shapes = [{0: batch, 2: height, 3: width}] + [{0: batch}] * (len(args) - 1)
        chatter = io.StringIO()  # the dynamo exporter prints its progress to stdout
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    graph, args, str(path), dynamo=True, input_names=inputs,
                    output_names=outputs, dynamic_shapes=tuple(shapes) if dynamic else None,
                    opset_version=opset, verbose=False,
                )  # fmt: skip
            return "dynamo", None
        except Exception as e:  # noqa: BLE001 - any exporter failure: try the other one
            if exporter == "dynamo":
                raise
            lines = str(e).strip().splitlines()
            dynamo_error = f"{type(e).__name__}: {lines[0] if lines else ''}"
    axes: dict[str, dict[int, str]] = {}
    if dynamic:
        axes = {name: {0: "batch"} for name in inputs[1:] + outputs}
        axes[inputs[0]] = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
            dynamic_axes=axes or None, opset_version=opset or 17,
        )  # fmt: skip
    return "torchscript", dynamo_error


def _add_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def read_metadata(session) -> tuple[ModelConfig, dict, str]:
    """(ModelConfig, extra metadata, "raw" | "nms") from an onnxruntime session of our export."""
    from freeanchor.config import from_dict

    props = session.get_modelmeta().custom_metadata_map
    if META_CONFIG not in props:
        raise CheckpointError(
            "ONNX model has no freeanchor config in its metadata (export it with freeanchor export)"
        )
    cfg = from_dict(ModelConfig, json.loads(props[META_CONFIG]), "ONNX metadata config")
    return cfg, json.loads(props.get(META_EXTRA, "{}")), props.get(META_KIND, "raw")


def _check_raw(session, graph: RawGraph, x: Tensor) -> float:
    with torch.no_grad():
        expected = graph(x)
    got = session.run(None, {"images": x.numpy()})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))


def _check_nms(session, graph: NMSGraph, x: Tensor) -> float:
    """Largest difference between the graph's detections and `postprocess` (PyTorch).

    Scores are compared sorted (near-equal scores may swap order). Every ONNX detection must
    have a PyTorch twin of the same class and score whose box is within `BOX_TOLERANCE` px,
    except at the `max_per_img` cut-off, where equal scores may keep different boxes. A missing
    twin or a different count gives inf.
    """
    from freeanchor.data.transforms import ImageMeta

    model = graph.model
    h, w = x.shape[-2:]
    img_hw = torch.tensor([[float(h), float(w)]] * x.shape[0])
    feeds = {"images": x.numpy(), "img_hw": img_hw.numpy(),
             "rescale": torch.ones(x.shape[0], 2).numpy()}  # fmt: skip
    boxes, scores, labels, num = session.run(None, feeds)
    with torch.no_grad():
        metas = [ImageMeta((h, w), (h, w), (1.0, 1.0))] * x.shape[0]
        dets = model.detect(x, metas, rescale=False, score_thr=graph.score_thr)
    worst = 0.0
    for i, det in enumerate(dets):
        n = int(num[i])
        ref_scores, ref_boxes = det["scores"].numpy(), det["boxes"].numpy()
        ref_labels = det["labels"].numpy()
        if n != len(ref_scores):
            return float("inf")
        if n == 0:
            continue
        worst = max(worst, float(np.abs(np.sort(scores[i, :n]) - np.sort(ref_scores)).max()))
        for box, score, label in zip(boxes[i, :n], scores[i, :n], labels[i, :n]):
            twin = (ref_labels == label) & (np.abs(ref_scores - score) <= TOLERANCE)
            gap = float(np.abs(ref_boxes[twin] - box).max(axis=1).min()) if twin.any() else np.inf
            at_cutoff = n == graph.max_per_img and score <= ref_scores.min() + TOLERANCE
            if gap > BOX_TOLERANCE and not at_cutoff:
                return float("inf")
    return worst


def export_onnx(
    model: FreeAnchor,
    path: str | Path,
    with_nms: bool = False,
    dynamic: bool = False,
    size: tuple[int, int] | None = None,
    score_thr: float | None = None,
    opset: int | None = None,
    exporter: str = "auto",
) -> ExportReport:
    """Export `model` to ONNX at `path` (atomically) and check it with onnxruntime.

    Args:
        with_nms: decoding + threshold + NMS in the graph (see the module docstring).
        dynamic: dynamic batch, height and width (else fixed to the example input).
        size: (H, W) of the example input (multiples of 32; default from `input_scale`).
        score_thr: the with-NMS graph's threshold (default `model.cfg.score_thr`).
        exporter: "auto" (dynamo, falling back to TorchScript), "dynamo" or "torchscript".

    Raises:
        RuntimeError: onnxruntime's outputs differ from PyTorch's by more than 1e-4.
    """
    import onnxruntime as ort

    if exporter not in ("auto", "dynamo", "torchscript"):
        raise OptionError(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    cfg = model.cfg
    path = Path(path)
    size = tuple(size) if size else default_size(cfg)
    if any(v <= 0 or v % cfg.size_divisor for v in size):
        raise OptionError(f"export size {size}: height and width must be positive multiples "
                         f"of {cfg.size_divisor}")  # fmt: skip
    was_training = model.training
    model.eval()
    x = sample_input(cfg, size)
    if with_nms:
        graph: nn.Module = NMSGraph(
            model, cfg.score_thr if score_thr is None else score_thr,
            cfg.nms_iou, cfg.nms_pre, cfg.max_per_img,
        ).eval()  # fmt: skip
        hw = torch.tensor([[float(size[0]), float(size[1])]])
        args: tuple[Tensor, ...] = (x, hw, torch.ones(1, 2))
        inputs = ["images", "img_hw", "rescale"]
        outputs = ["boxes", "scores", "labels", "num_dets"]
    else:
        graph, args = RawGraph(model).eval(), (x,)
        inputs, outputs = ["images"], raw_output_names(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    tmp = tmpdir / path.name
    try:
        used, dynamo_error = _export(graph, args, tmp, (inputs, outputs), dynamic, opset, exporter)
        cfg_json = dict(to_dict(cfg))
        if with_nms:
            cfg_json["score_thr"] = graph.score_thr
        _add_metadata(
            tmp,
            {
                META_CONFIG: json.dumps(cfg_json),
                META_EXTRA: json.dumps(getattr(model, "extra", {}) or {}),
                META_KIND: "nms" if with_nms else "raw",
            },
        )
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        check = _check_nms if with_nms else _check_raw
        diff = check(session, graph, x)
        if not diff <= TOLERANCE:
            raise RuntimeError(
                f"{path}: onnxruntime differs from PyTorch by {diff:.3g} (> {TOLERANCE}) on the "
                f"test image; the export is not kept"
            )
        os.replace(tmp, path)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
        model.train(was_training)
    return ExportReport(path, used, diff, size, dynamo_error)


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise OptionError(f"--size {text!r}: expected HxW, e.g. 800x1344") from None
    return h, w


def run_export(args) -> int:
    """`freeanchor export --weights W --out model.onnx [--with-nms] [--dynamic] [--imgsz L,S]`."""
    from freeanchor.image_size import with_imgsz
    from freeanchor.models.weights import load_model

    model = load_model(args.weights)
    # --imgsz: the input_scale saved in the graph's metadata and the example input's bound
    model.cfg = with_imgsz(model.cfg, getattr(args, "imgsz", None))
    report = export_onnx(
        model,
        args.out,
        with_nms=args.with_nms,
        dynamic=args.dynamic,
        size=_parse_size(args.size),
        score_thr=getattr(args, "score_thr", None),
        opset=getattr(args, "opset", None),
        exporter=getattr(args, "exporter", None) or "auto",
    )
    if report.dynamo_error:
        print(f"dynamo exporter failed ({report.dynamo_error}); used the TorchScript exporter")
    what = "network + decoding + NMS" if args.with_nms else "backbone + FPN + head (raw maps)"
    h, w = report.input_size
    print(
        f"wrote {report.path} ({what}, {report.exporter} exporter, "
        f"{'dynamic' if args.dynamic else f'fixed {h}x{w}'} input, "
        f"{report.path.stat().st_size / 1e6:.1f} MB)"
    )
    print(f"onnxruntime vs PyTorch on a {h}x{w} test image: max abs diff {report.max_abs_diff:.3g}")
    return 0
