"""Test-time augmentation (TTA): several resized and flipped passes, merged before one NMS.

    freeanchor eval --weights W --ann A.json --images DIR --tta            # official scales + flip
    freeanchor eval ... --tta --tta-scales 96,128,160 --no-tta-flip       # small images
    freeanchor predict --weights W photos/ --tta

Each pass is the test-time pipeline's own steps (`freeanchor.inference.preprocess`: MMDetection's
keep-ratio resize and normalisation, only with another `input_scale`; `pad_batch`; the model;
`postprocess` with the model's score threshold and `nms_pre`), flipped passes flip the resized
image (MMDetection's TestTimeAug order: Resize, then RandomFlip). Every pass keeps its pre-NMS
candidates (per level the `nms_pre` best pairs above the score threshold, decoded, clipped,
in original-image pixels; flipped ones mirrored back, x1' = W - x2). The union then gets one
class-aware NMS (per class, MMDetection's box shift per class) and the `max_per_img` best. This
is how the official FreeAnchor multi-scale test merges (zhangxiaosong18/FreeAnchor,
`modeling/detector/multi_scale_wrapper.py`: the per-scale head outputs become extra levels of
one `box_selector_test`: per level top-k, union, per-class NMS 0.5, 100 per image).

Scales: the official repository's `TEST.MULTI_SCLAES` ((min, max) = (480, 800), (640, 1067),
(800, 1333), (960, 1600), (1120, 1867), (1280, 2133); `maskrcnn_benchmark/config/defaults.py`)
are the default for models whose input scale is COCO's (1333, 800). The official test has no
flip; `flip` (default on, as MMDetection's TTA configs) adds each scale mirrored. A model with
another input scale gets the same set relative to its own: its scale times 0.6, 0.8, ..., 1.6.
One scale equal to the model's and no flip is plain inference, bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torchvision.ops import nms

from freeanchor.config import ModelConfig
from freeanchor.data.io import DEFAULT_MAX_PIXELS, read_image
from freeanchor.data.transforms import ImageMeta, pad_batch, rescale_size
from freeanchor.errors import ImageReadError, OptionError
from freeanchor.inference import Pipeline, Prediction, Skipped, load_image, preprocess, source_name
from freeanchor.models.postprocess import _shift_per_group, postprocess

Scale = tuple[int, int]  # (long, short), as ModelConfig.input_scale

# zhangxiaosong18/FreeAnchor TEST.MULTI_SCLAES, as (long, short) = (max_size, min_size).
OFFICIAL_SCALES: tuple[Scale, ...] = (
    (800, 480), (1067, 640), (1333, 800), (1600, 960), (1867, 1120), (2133, 1280),
)  # fmt: skip
COCO_INPUT_SCALE: Scale = (1333, 800)
OFFICIAL_FACTORS = tuple(short / 800 for _, short in OFFICIAL_SCALES)  # 0.6, 0.8, ..., 1.6


@dataclass(frozen=True)
class TTAConfig:
    """Which passes run: every scale, and with `flip` every scale mirrored too."""

    scales: tuple[Scale, ...]
    flip: bool = True

    def __post_init__(self) -> None:
        if not self.scales:
            raise OptionError("TTA needs at least one scale")
        for scale in self.scales:
            if len(scale) != 2 or min(scale) < 1:
                raise OptionError(f"TTA scale {scale}: want (long, short) sides >= 1")

    def passes(self) -> list[tuple[Scale, bool]]:
        """(scale, flipped) of every pass, scale by scale."""
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]


def default_scales(cfg: ModelConfig) -> tuple[Scale, ...]:
    """The official set for COCO-size models, else the same factors of the model's scale."""
    if tuple(cfg.input_scale) == COCO_INPUT_SCALE:
        return OFFICIAL_SCALES
    long, short = cfg.input_scale
    return tuple((round(long * f), round(short * f)) for f in OFFICIAL_FACTORS)


def parse_scales(text: str, cfg: ModelConfig) -> tuple[Scale, ...]:
    """`--tta-scales`: comma-separated `SHORT` (long side in the model's ratio) or
    `SHORT:LONG` (maskrcnn-benchmark's MIN_SIZE:MAX_SIZE), e.g. "480:800,640:1067" or "96,128".

    Raises:
        OptionError: not of that form.
    """
    long, short = cfg.input_scale
    out = []
    for item in text.split(","):
        try:
            sides = [int(v) for v in item.strip().split(":")]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2) or min(sides) < 1:
            raise OptionError(f"--tta-scales: {item!r} is not SHORT or SHORT:LONG (integers >= 1)")
        out.append((sides[1], sides[0]) if len(sides) == 2 else (round(sides[0] * long / short),
                                                                  sides[0]))  # fmt: skip
    return tuple(out)


def tta_config(args, cfg: ModelConfig) -> TTAConfig | None:
    """The TTA of `--tta [--tta-scales ...] [--no-tta-flip]`, or None without `--tta`."""
    if not getattr(args, "tta", False):
        return None
    text = getattr(args, "tta_scales", None)
    scales = parse_scales(text, cfg) if text else default_scales(cfg)
    return TTAConfig(scales, flip=not getattr(args, "no_tta_flip", False))


def mirror(boxes: Tensor, width: float) -> Tensor:
    """[n, 4] xyxy boxes of a horizontally flipped image -> the unflipped image's:
    x1' = W - x2, x2' = W - x1 (MMDetection's `bbox_flip`)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def merge(candidates: Sequence[dict[str, Tensor]], nms_iou: float, max_per_img: int):
    """The union of several passes' candidates -> one class-aware NMS -> the best `max_per_img`.

    The same NMS step as plain post-processing (boxes shifted apart per class, as mmcv's
    `batched_nms`), with a stable sort: one pass's candidates come sorted, so they keep their
    order, ties included, and a single pass gives plain inference's detections bit for bit.
    Shifted boxes of two classes never overlap, so NMS runs class by class on the shifted boxes
    (the same decisions as one NMS over all of them, in sum(n_c^2) instead of n^2 time: the
    union of 12 passes holds tens of thousands of boxes).

    Args:
        candidates: per pass {"boxes" [n, 4] (original pixels), "scores" [n], "labels" [n]}.

    Returns:
        {"boxes" [m, 4], "scores" [m] (descending), "labels" [m]}, m <= max_per_img.
    """
    boxes = torch.cat([c["boxes"] for c in candidates])
    scores = torch.cat([c["scores"] for c in candidates])
    labels = torch.cat([c["labels"] for c in candidates])
    if not len(scores):
        return {"boxes": boxes, "scores": scores, "labels": labels}
    order = scores.argsort(descending=True, stable=True)
    shifted, ranked, classes = _shift_per_group(boxes, labels)[order], scores[order], labels[order]
    kept = []
    for c in torch.unique(classes).tolist():
        (pos,) = torch.where(classes == c)
        kept.append(pos[nms(shifted[pos], ranked[pos], nms_iou)])
    # Positions in the sorted union: ascending is one NMS's output order (score, ties as sorted).
    keep = order[torch.cat(kept).sort().values[:max_per_img]]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


class TTADetector:
    """TTA around a `FreeAnchor`: `tta(image)` -> merged detections of one image.

    Args:
        model: a `FreeAnchor` (put in eval mode here).
        config: the passes (`TTAConfig`).
        cfg: the model config to use (default `model.cfg`; e.g. with `--imgsz` applied).
    """

    def __init__(
        self, model: torch.nn.Module, config: TTAConfig, cfg: ModelConfig | None = None
    ) -> None:
        self.model, self.config, self.cfg = model.eval(), config, cfg or model.cfg
        self.device = next(model.parameters()).device
        self._cfgs = {s: replace(self.cfg, input_scale=s) for s in config.scales}

    @torch.inference_mode()
    def candidates(
        self, image: Tensor, scale: Scale, flips: Sequence[bool], score_thr: float | None = None,
        name: str = "image",
    ) -> list[dict[str, Tensor]]:  # fmt: skip
        """Pre-NMS candidates of `image` at one scale, one dict per entry of `flips`.

        Args:
            image: uint8 RGB [3, H, W].
            flips: which passes of this scale (they share one forward call).

        Returns:
            per pass {"boxes" [n, 4] xyxy in original-image pixels (flipped ones mirrored back),
            "scores" [n] (descending), "labels" [n]}.

        Raises:
            ImageReadError: this scale would leave a side of 0 pixels (names `name`).
        """
        cfg = self._cfgs.get(scale) or replace(self.cfg, input_scale=scale)
        x, meta = preprocess(image, cfg, name)  # [3, h, w] normalised, not padded
        inputs = [x.flip(-1) if f else x for f in flips]  # flip before padding: pad stays right
        metas = [replace(meta, flipped=f) for f in flips]
        batch = pad_batch(inputs, cfg.size_divisor).to(self.device)
        cls_scores, bbox_preds = self.model(batch)
        anchors = self.model.anchors([tuple(s.shape[-2:]) for s in cls_scores], self.device)
        # No NMS (nms_iou None): every candidate, in plain post-processing's order; NMS and
        # max_per_img come after the merge.
        dets = postprocess(
            cls_scores, bbox_preds, anchors, metas, self.model.box_coder, rescale=True,
            score_thr=self.cfg.score_thr if score_thr is None else score_thr,
            nms_pre=self.cfg.nms_pre, nms_iou=None, max_per_img=sys.maxsize,
        )  # fmt: skip
        width = float(image.shape[-1])
        for det, m in zip(dets, metas, strict=True):
            if m.flipped:
                det["boxes"] = mirror(det["boxes"], width)
        return dets

    def __call__(
        self, image: Tensor, score_thr: float | None = None, name: str = "image"
    ) -> dict[str, Tensor]:
        """Detections of one uint8 RGB [3, H, W] image: every pass, merged (see `merge`)."""
        flips = (False, True) if self.config.flip else (False,)
        cands = [c for s in self.config.scales
                 for c in self.candidates(image, s, flips, score_thr, name)]  # fmt: skip
        out = merge(cands, self.cfg.nms_iou, self.cfg.max_per_img)
        return {k: v.cpu() for k, v in out.items()}

    def batch_detector(
        self, records: Sequence, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> Callable[[object], list[dict[str, Tensor]]]:
        """For `engine.evaluate`'s `detect`: a loader `Batch` -> per image TTA detections
        (each image read again from its record: TTA resizes the original, not the batch)."""
        by_id = {r.image_id: r for r in records}

        def detect(batch) -> list[dict[str, Tensor]]:
            out = []
            for image_id in batch.image_ids:
                rec = by_id[image_id]
                out.append(self(read_image(rec.path, max_pixels), name=str(rec.path)))
            return out

        return detect


class TTAPipeline(Pipeline):
    """The test-time pipeline (sources, decoding, skips, order) with TTA as its per-image step.

    Images run one at a time (the passes of an image have different sizes); an image that a
    scale cannot resize (a side would be 0 pixels) is `Skipped` with one line.
    """

    def __init__(
        self,
        tta: TTADetector,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        bgr: bool = False,
    ) -> None:
        model = tta.model

        def plain(batch: Tensor, metas: list[ImageMeta], thr: float | None):
            return model.detect(batch.to(tta.device), metas, rescale=True, score_thr=thr)

        super().__init__(tta.cfg, plain, 1, max_pixels, bgr)
        self.tta = tta

    def _run_batch(
        self, indices: list[int], sources: list, score_thr: float | None
    ) -> Iterator[Prediction | Skipped]:
        for i in indices:
            name = source_name(sources[i], i)
            try:
                image = load_image(sources[i], self.max_pixels, self.bgr)
                det = self.tta(image, score_thr, name)
            except ImageReadError as e:
                yield Skipped(i, sources[i], str(e))
                continue
            h, w = int(image.shape[1]), int(image.shape[2])
            new_w, new_h = rescale_size(w, h, self.cfg.input_scale)  # the plain pass's geometry
            meta = ImageMeta((h, w), (new_h, new_w), (new_w / w, new_h / h))
            yield Prediction(i, sources[i], name, image, meta,
                             det["boxes"], det["scores"], det["labels"])  # fmt: skip
