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
- with --save, `images/<name>`: each image with its boxes, class names and scores drawn.

Images stream through in batches: only one batch of images and the compact per-image index are
held in memory, and detections are appended to the JSON file as they come (written to a
temporary file, renamed when complete). An unreadable image is reported on one line, counted,
and skipped. With --onnx the exported graph runs on onnxruntime and the same preprocessing and
`postprocess` as PyTorch inference turn its outputs into detections.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freeanchor.config import COCO_CLASSES, ModelConfig
from freeanchor.data.coco import read_coco_json
from freeanchor.data.io import IMAGE_SUFFIXES, ImageReadError, read_image
from freeanchor.data.transforms import ImageMeta, normalize, preprocess, rescale_size, resize
from freeanchor.engine.dist import resolve_device
from freeanchor.files import JsonArrayWriter, write_json

# COCO's 80 category ids (1..90 with gaps), label i <-> COCO_CAT_IDS[i].
COCO_CAT_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
_SAVE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def expand_sources(sources: Sequence[str]) -> list[Path]:
    """Files, folders (their images, not recursive) and globs -> sorted unique image paths.

    A file named explicitly is kept whatever its suffix (it is reported if unreadable); folders
    and globs contribute files with an image suffix (`IMAGE_SUFFIXES`).

    Raises:
        FileNotFoundError: a source that is not a file, a folder or a glob matching something.
    """
    found: set[Path] = set()
    for src in sources:
        path = Path(src)
        if path.is_dir():
            hits = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            hits = [path]
        elif glob.has_magic(src):
            hits = [
                Path(p)
                for p in glob.glob(src, recursive=True)
                if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES
            ]
        else:
            raise FileNotFoundError(f"{src}: no such file or folder")
        if not hits:
            raise FileNotFoundError(f"{src}: no images (suffixes {', '.join(IMAGE_SUFFIXES)})")
        found.update(hits)
    return sorted(found)


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
    """A checkpoint run with PyTorch: `FreeAnchor.detect` on `preprocess`ed batches."""

    def __init__(self, weights: str, device: str) -> None:
        from freeanchor.models.weights import load_model

        self.device = resolve_device(device)
        self.model = load_model(weights, self.device).eval()
        self.cfg, self.extra = self.model.cfg, dict(self.model.extra)
        self.batch_limit = None

    @torch.inference_mode()
    def detect(self, images: list[Tensor], score_thr: float) -> list[dict[str, Tensor]]:
        cfg = self.cfg
        batch, metas = preprocess(images, cfg.input_scale, cfg.mean, cfg.std, cfg.size_divisor)
        dets = self.model.detect(batch.to(self.device), metas, rescale=True, score_thr=score_thr)
        return [{k: v.cpu() for k, v in d.items()} for d in dets]


class OnnxBackend:
    """An exported graph run with onnxruntime; preprocessing and `postprocess` as PyTorch's.

    A graph with a fixed input size gets each image resized as PyTorch would (or, if that does
    not fit, to fit) and padded to exactly that size; a fixed batch size is respected.
    """

    def __init__(self, path: str, device: str) -> None:
        import onnxruntime as ort

        from freeanchor.export import read_metadata
        from freeanchor.models.anchors import AnchorGenerator
        from freeanchor.models.box_coder import DeltaXYWHCoder

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: ONNX model not found")
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")  # onnxruntime knows if it has a GPU
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
            raise ValueError(f"{path}: cannot load ONNX model ({str(e).splitlines()[0]})") from None
        try:
            self.cfg, self.extra, self.kind = read_metadata(self.session)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        shape = self.session.get_inputs()[0].shape  # [N, 3, H, W]; str/None = dynamic
        self.batch_limit = shape[0] if isinstance(shape[0], int) else None
        self.fixed_hw = tuple(shape[2:]) if all(isinstance(v, int) for v in shape[2:]) else None
        cfg = self.cfg
        self.anchor_generator = AnchorGenerator(
            cfg.strides, cfg.ratios, cfg.octave_base_scale, cfg.scales_per_octave
        )
        self.coder = DeltaXYWHCoder(cfg.target_stds)
        self._anchors: dict[tuple, list[Tensor]] = {}

    def _preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[ImageMeta]]:
        cfg = self.cfg
        if self.fixed_hw is None:
            return preprocess(images, cfg.input_scale, cfg.mean, cfg.std, cfg.size_divisor)
        fh, fw = self.fixed_hw
        batch = torch.zeros((len(images), 3, fh, fw))
        metas = []
        for i, image in enumerate(images):
            h, w = image.shape[-2:]
            new_w, new_h = rescale_size(w, h, cfg.input_scale)
            if new_w > fw or new_h > fh:  # PyTorch's size does not fit the graph: fit inside
                f = min(fw / w, fh / h)
                new_w, new_h = min(int(w * f + 0.5), fw), min(int(h * f + 0.5), fh)
            batch[i, :, :new_h, :new_w] = normalize(
                resize(image, (new_w, new_h)), cfg.mean, cfg.std
            )
            metas.append(ImageMeta((h, w), (new_h, new_w), (new_w / w, new_h / h)))
        return batch, metas

    def detect(self, images: list[Tensor], score_thr: float) -> list[dict[str, Tensor]]:
        from freeanchor.models.postprocess import postprocess

        cfg = self.cfg
        batch, metas = self._preprocess(images)
        feeds = {"images": batch.numpy()}
        if self.kind == "nms":
            hw = [[float(m.img_shape[0]), float(m.img_shape[1])] for m in metas]
            feeds["img_hw"] = torch.tensor(hw).numpy()
            boxes, scores, labels, num = (
                torch.from_numpy(o) for o in self.session.run(None, feeds)
            )
            return [
                _nms_graph_result(boxes[i], scores[i], labels[i], int(num[i]), m, score_thr)
                for i, m in enumerate(metas)
            ]
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        levels = len(cfg.strides)
        cls_scores, bbox_preds = outs[:levels], outs[levels:]
        sizes = tuple(tuple(s.shape[-2:]) for s in cls_scores)
        if sizes not in self._anchors:
            self._anchors[sizes] = self.anchor_generator.grid_anchors(sizes)
        return postprocess(
            cls_scores, bbox_preds, self._anchors[sizes], metas, self.coder, rescale=True,
            score_thr=score_thr, nms_pre=cfg.nms_pre, nms_iou=cfg.nms_iou,
            max_per_img=cfg.max_per_img,
        )  # fmt: skip


def _nms_graph_result(
    boxes: Tensor, scores: Tensor, labels: Tensor, num: int, meta: ImageMeta, score_thr: float
) -> dict[str, Tensor]:
    """The first `num` rows of a with-NMS graph's output, thresholded and rescaled."""
    keep = scores[:num] > score_thr
    inv = torch.tensor([1 / meta.scale_factor[0], 1 / meta.scale_factor[1]] * 2)
    return {
        "boxes": boxes[:num][keep] * inv,
        "scores": scores[:num][keep],
        "labels": labels[:num][keep].long(),
    }


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
        raise ValueError(f"{ann}: images need an id and a file_name ({e!r})") from None
    return out


def _batches(
    paths: list[Path], size: int, bad: list[dict[str, str]], log
) -> Iterator[list[tuple[int, Path, Tensor]]]:
    """Batches of (index, path, image) with unreadable files reported, recorded and left out."""
    for start in range(0, len(paths), size):
        batch = []
        for i, path in enumerate(paths[start : start + size], start):
            try:
                batch.append((i, path, read_image(path)))
            except ImageReadError as e:
                bad.append({"file_name": str(path), "error": str(e)})
                log(f"skipped unreadable image {e}")
        yield batch


def run_predict(args) -> int:
    """`freeanchor predict`: see the module docstring."""
    from tqdm import tqdm

    from freeanchor.results import Results

    paths = expand_sources(args.sources)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    backend = (
        OnnxBackend(args.onnx, args.device)
        if args.onnx
        else TorchBackend(args.weights, args.device)
    )
    cfg = backend.cfg
    names, cat_ids = cfg.class_names(), category_ids(cfg, backend.extra)
    gt_ids = _gt_image_ids(args.ann) if getattr(args, "ann", None) else None
    next_id = max(gt_ids.values(), default=0) + 1 if gt_ids else 1
    batch_size = min(args.batch_size, backend.batch_limit or args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vis_dir = out / "images"

    index: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    saved_names: set[str] = set()
    unmatched = 0
    writer = JsonArrayWriter(out / "predictions.json")
    bar = tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr, mininterval=1.0)
    try:
        for batch in _batches(paths, batch_size, bad, lambda m: tqdm.write(m, file=sys.stderr)):
            bar.update(min(batch_size, len(paths) - bar.n))
            if not batch:
                continue
            dets = backend.detect([image for _, _, image in batch], args.score_thr)
            for (_, path, image), det in zip(batch, dets):
                image_id = None
                if gt_ids is not None:
                    image_id = gt_ids.get(str(path)) or gt_ids.get(path.name)
                    unmatched += image_id is None
                if image_id is None:
                    image_id, next_id = next_id, next_id + 1
                boxes, scores = det["boxes"].tolist(), det["scores"].tolist()
                labels = det["labels"].tolist()
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
                h, w = image.shape[-2:]
                index.append(
                    {
                        "id": image_id,
                        "file_name": str(path),
                        "width": int(w),
                        "height": int(h),
                        "detections": len(scores),
                    }  # fmt: skip
                )
                if args.save:
                    result = Results(
                        det["boxes"], det["scores"], det["labels"], [names[i] for i in labels],
                        str(path), (int(h), int(w)), image,
                    )  # fmt: skip
                    result.save(vis_dir / _save_name(path, image_id, saved_names))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()

    categories = [{"id": c, "name": n} for c, n in zip(cat_ids, names)]
    index_doc = {"images": index, "categories": categories, "unreadable": bad}
    write_json(out / "images.json", index_doc, indent=1)
    if not index:
        raise ValueError(f"none of the {len(paths)} images could be read (reasons above)")
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


def _save_name(path: Path, image_id: int, used: set[str]) -> str:
    """File name for the drawn image: the source's (lossless suffix kept), unique in --out."""
    suffix = path.suffix.lower() if path.suffix.lower() in _SAVE_SUFFIXES else ".png"
    name = f"{path.stem}{suffix}"
    if name in used:
        name = f"{path.stem}_{image_id}{suffix}"
    used.add(name)
    return name
