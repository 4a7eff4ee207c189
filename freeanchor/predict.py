"""`freeanchor predict`: detections for files, folders and globs, as COCO results JSON.

    freeanchor predict --weights model.safetensors images/ extra/*.jpg --out preds --save
    freeanchor predict --onnx model.onnx images/ --out preds   # onnxruntime, no model code

Writes to --out:
- `predictions.json`: a COCO results list (`image_id`, `category_id`, `bbox` [x, y, w, h] in
  original-image pixels, `score`, plus `category_name`), loadable with `COCO.loadRes`. Category
  ids are the training dataset's (`cat_ids` saved with the checkpoint), else COCO's ids for an
  80-class COCO model, else label + 1.
- `images.json`: the index: `images` (id, file_name, width, height, detections), `categories`,
  and the `unreadable` files with the reason.
- with --save, `images/<name>`: each image with its boxes, class names and scores drawn (two
  sources with one file name get distinct names; nothing is overwritten).

Both backends run the one test-time pipeline (`freeanchor.inference`): MMDetection's
preprocessing, batches of one padded size only (an image's detections do not depend on its
batch), and the same post-processing. Images stream through: one batch of images and the compact
per-image index are held in memory, and detections are appended to the JSON file as they come
(written to a temporary file, renamed when complete). An unusable file (unreadable, not a
regular file, more than --max-pixels pixels, an aspect ratio too extreme to resize) is reported
on one line, counted, and skipped; all others are predicted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freeanchor.config import COCO_CLASSES, ModelConfig
from freeanchor.data.coco import read_coco_json
from freeanchor.data.io import DEFAULT_MAX_PIXELS
from freeanchor.data.transforms import ImageMeta
from freeanchor.engine.dist import resolve_device
from freeanchor.errors import CheckpointError, DatasetError, MissingFileError, OptionError
from freeanchor.files import JsonArrayWriter, write_json
from freeanchor.image_size import with_imgsz
from freeanchor.inference import Pipeline, Skipped, expand_sources

__all__ = ["COCO_CAT_IDS", "OnnxBackend", "TorchBackend", "category_ids", "expand_sources"]

# COCO's 80 category ids (1..90 with gaps), label i <-> COCO_CAT_IDS[i].
COCO_CAT_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
_SAVE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def category_ids(cfg: ModelConfig, extra: dict[str, Any]) -> list[int]:
    """Dataset category id of each label: saved `cat_ids`, else COCO's, else label + 1."""
    ids = extra.get("cat_ids") or extra.get("label_to_cat_id")
    if ids and len(ids) == cfg.num_classes:
        return [int(i) for i in ids]
    if cfg.num_classes == len(COCO_CLASSES) and list(cfg.class_names()) in (
        list(COCO_CLASSES),
        [f"class_{i}" for i in range(80)],
    ):
        return list(COCO_CAT_IDS)
    return list(range(1, cfg.num_classes + 1))


# ----------------------------------------------------------------------------- backends


class TorchBackend:
    """A checkpoint run with PyTorch: `FreeAnchor.detect` on the pipeline's batches."""

    fixed_size = None
    batch_limit = None

    def __init__(self, weights: str, device: str) -> None:
        from freeanchor.models.weights import load_model

        self.device = resolve_device(device)
        self.model = load_model(weights, self.device).eval()
        self.cfg, self.extra = self.model.cfg, dict(self.model.extra)

    @torch.inference_mode()
    def detect(
        self, batch: Tensor, metas: list[ImageMeta], score_thr: float | None
    ) -> list[dict[str, Tensor]]:
        return self.model.detect(batch.to(self.device), metas, rescale=True, score_thr=score_thr)


class OnnxBackend:
    """An exported graph run with onnxruntime, between the pipeline's pre- and post-processing.

    A graph with a fixed input size gets each image resized as PyTorch would (or, if that does
    not fit, to fit) and padded to exactly that size; a fixed batch size is respected.
    """

    def __init__(self, path: str, device: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        from freeanchor.export import read_metadata
        from freeanchor.models.anchors import AnchorGenerator
        from freeanchor.models.box_coder import DeltaXYWHCoder

        if not Path(path).is_file():
            raise MissingFileError(f"{path}: ONNX model not found")
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")  # onnxruntime knows if it has a GPU
        options = ort.SessionOptions()
        if threads:  # else onnxruntime's default: one thread per physical core
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
            first = str(e).splitlines()[0]
            raise CheckpointError(f"{path}: cannot load ONNX model ({first})") from None
        try:
            self.cfg, self.extra, self.kind = read_metadata(self.session)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        inputs = [i.name for i in self.session.get_inputs()]
        if self.kind == "nms" and "rescale" not in inputs:
            raise CheckpointError(
                f"{path}: a with-NMS graph of an older freeanchor (inputs {inputs}); export it "
                "again with `freeanchor export --with-nms`"
            )
        shape = self.session.get_inputs()[0].shape  # [N, 3, H, W]; str/None = dynamic
        self.batch_limit = shape[0] if isinstance(shape[0], int) else None
        self.fixed_size = tuple(shape[2:]) if all(isinstance(v, int) for v in shape[2:]) else None
        cfg = self.cfg
        self.anchor_generator = AnchorGenerator(
            cfg.strides, cfg.ratios, cfg.octave_base_scale, cfg.scales_per_octave
        )
        self.coder = DeltaXYWHCoder(cfg.target_stds)

    def detect(
        self, batch: Tensor, metas: list[ImageMeta], score_thr: float | None
    ) -> list[dict[str, Tensor]]:
        from freeanchor.models.postprocess import decode_outputs, rescale_factors

        feeds = {"images": batch.numpy()}
        if self.kind == "nms":
            hw = [[float(m.img_shape[0]), float(m.img_shape[1])] for m in metas]
            feeds["img_hw"] = torch.tensor(hw).numpy()
            feeds["rescale"] = rescale_factors(metas, True).numpy()
            boxes, scores, labels, num = (
                torch.from_numpy(o) for o in self.session.run(None, feeds)
            )
            thr = self.cfg.score_thr if score_thr is None else score_thr
            out = []
            for i, n in enumerate(num.tolist()):
                keep = scores[i, :n] > thr
                out.append({"boxes": boxes[i, :n][keep], "scores": scores[i, :n][keep],
                            "labels": labels[i, :n][keep].long()})  # fmt: skip
            return out
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        levels = len(self.cfg.strides)
        return decode_outputs(
            outs[:levels], outs[levels:], metas, self.anchor_generator, self.coder, self.cfg,
            score_thr=score_thr,
        )  # fmt: skip


# ----------------------------------------------------------------------------- output


def _gt_image_ids(ann: str) -> dict[str, int]:
    """file_name (and its base name) -> image id, from a COCO annotation file."""
    images = read_coco_json(Path(ann))["images"]  # errors name the file and the problem
    out: dict[str, int] = {}
    try:
        for im in images:
            out[str(im["file_name"])] = int(im["id"])
            out.setdefault(Path(str(im["file_name"])).name, int(im["id"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{ann}: images need an id and a file_name ({e!r})") from None
    return out


def _image_ids(paths: Sequence[Path], gt_ids: dict[str, int] | None) -> tuple[list[int], int]:
    """An id per source: the annotation file's (full path, else an unused base name), else
    new ids above its largest (or 1, 2, ... by position). Returns (ids, number unmatched)."""
    if gt_ids is None:
        return [i + 1 for i in range(len(paths))], 0
    next_id, used, ids, unmatched = max(gt_ids.values(), default=0) + 1, set(), [], 0
    for path in paths:
        image_id = gt_ids.get(str(path))
        if image_id is None or image_id in used:
            image_id = gt_ids.get(path.name)
        if image_id is None or image_id in used:  # two sources with one name: one gets it
            image_id, next_id, unmatched = next_id, next_id + 1, unmatched + 1
        used.add(image_id)
        ids.append(image_id)
    return ids, unmatched


def _save_name(path: Path, image_id: int, used: set[str]) -> str:
    """File name for the drawn image: the source's (lossless suffix kept), unique in --out."""
    suffix = path.suffix.lower() if path.suffix.lower() in _SAVE_SUFFIXES else ".png"
    name, n = f"{path.stem}{suffix}", 0
    while name in used:
        n += 1
        tail = f"_{image_id}" if n == 1 else f"_{image_id}_{n}"
        name = f"{path.stem}{tail}{suffix}"
    used.add(name)
    return name


def run_predict(args) -> int:
    """`freeanchor predict`: see the module docstring."""
    from tqdm import tqdm

    from freeanchor.results import Results

    paths = expand_sources(args.sources)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise OptionError(f"--out {args.out}: is a file, not a folder")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {args.batch_size}")
    max_pixels = getattr(args, "max_pixels", DEFAULT_MAX_PIXELS)
    if max_pixels is not None and max_pixels < 0:
        raise OptionError(f"--max-pixels must be >= 0 (0 = no limit), got {max_pixels}")
    backend = (
        OnnxBackend(args.onnx, args.device)
        if args.onnx
        else TorchBackend(args.weights, args.device)
    )
    cfg = with_imgsz(backend.cfg, getattr(args, "imgsz", None))  # the resize only
    names, cat_ids = cfg.class_names(), category_ids(cfg, backend.extra)
    gt_ids = _gt_image_ids(args.ann) if getattr(args, "ann", None) else None
    image_ids, unmatched = _image_ids(paths, gt_ids)
    batch_size = min(args.batch_size, backend.batch_limit or args.batch_size)
    pipeline = Pipeline(cfg, backend.detect, batch_size, max_pixels or None,
                        fixed_size=backend.fixed_size)  # fmt: skip
    if getattr(args, "tta", False):
        from freeanchor.tta import TTADetector, TTAPipeline, tta_config

        if args.onnx:
            raise OptionError("--tta runs the PyTorch model: use --weights, not --onnx")
        tta = TTADetector(backend.model, tta_config(args, cfg), cfg)
        pipeline = TTAPipeline(tta, max_pixels or None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vis_dir = out / "images"

    index: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    saved_names: set[str] = set()
    writer = JsonArrayWriter(out / "predictions.json")
    bar = tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr, mininterval=1.0)
    try:
        for result in pipeline.run(paths, args.score_thr):
            bar.update(1)
            path = paths[result.index]
            if isinstance(result, Skipped):
                bad.append({"file_name": str(path), "error": result.message})
                tqdm.write(f"skipped unreadable image {result.message}", file=sys.stderr)
                continue
            image_id = image_ids[result.index]
            boxes, scores = result.boxes.tolist(), result.scores.tolist()
            labels = result.labels.tolist()
            for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
                writer.write(
                    {
                        "image_id": image_id,
                        "category_id": cat_ids[label],
                        "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)],
                        "score": round(score, 5),
                        "category_name": names[label],
                    }
                )
            h, w = result.meta.ori_shape
            index.append({"id": image_id, "file_name": str(path), "width": int(w),
                          "height": int(h), "detections": len(scores),
                          "_order": result.index})  # fmt: skip
            if args.save:
                drawn = Results(
                    result.boxes, result.scores, result.labels, [names[i] for i in labels],
                    str(path), (int(h), int(w)), result.image,
                )  # fmt: skip
                drawn.save(vis_dir / _save_name(path, image_id, saved_names))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()

    index.sort(key=lambda im: im.pop("_order"))
    bad.sort(key=lambda b: b["file_name"])
    categories = [{"id": c, "name": n} for c, n in zip(cat_ids, names)]
    index_doc = {"images": index, "categories": categories, "unreadable": bad}
    write_json(out / "images.json", index_doc, indent=1)
    if not index:
        raise DatasetError(f"none of the {len(paths)} images could be read (reasons above)")
    print(
        f"predicted {len(index)} images: {writer.count} detections with score > {args.score_thr}"
        f" -> {out / 'predictions.json'} (index: {out / 'images.json'})"
        + (f"; drawn images in {vis_dir}" if args.save else "")
    )
    if unmatched:
        print(f"{unmatched} images are not in {args.ann}: they got new ids above its largest")
    if bad:
        print(f"{len(bad)} of {len(paths)} images were unreadable and skipped (listed above)")
    return 0
