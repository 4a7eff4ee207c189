"""COCO box AP of a model: `evaluate` (used by training too) and the `freeanchor eval` command.

    freeanchor eval --weights work_dirs/run/model_final.safetensors \
        --ann data/annotations/instances_val2017.json --images data/val2017 --out eval/ --json
    torchrun --nproc-per-node 8 -m freeanchor eval ...   # each process scores a share

Each process detects on its share of the images (rank r: images r, r + W, ...); rank 0 gathers
everything and scores it. Inference runs in float32 with the model's test settings (spec 2.6),
through the test-time pipeline's steps (`freeanchor.inference`: MMDetection's preprocessing,
batches of one padded size, so `eval` and `predict` see identical inputs and detections).
Unusable images (unreadable, more than --max-pixels, a side that would round to 0) are counted,
reported and left out of the scored image set. Image files missing from --images (a wrong
folder, most often) stop the command before any work, with one line and exit code 2, as does a
run where no image is left to score: an AP over a silently shrunken image set misleads.
AP values are COCO's 0-1 fractions, labelled (see `freeanchor.eval.report`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from freeanchor.config import DataConfig
from freeanchor.data.io import DEFAULT_MAX_PIXELS
from freeanchor.engine import dist
from freeanchor.errors import DatasetError, OptionError
from freeanchor.files import write_text
from freeanchor.image_size import with_imgsz


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    evaluator: Any,
    device: torch.device | str,
    results_json: str | Path | None = None,
    detect: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Detect on every batch of `loader`, gather from all ranks, score with `evaluator`.

    Args:
        model: a `FreeAnchor` (not the DDP wrapper); its train/eval mode is restored after.
        loader: an eval loader (`build_eval_loader`) yielding `Batch`es.
        evaluator: a `COCOEvaluator` on rank 0 (may be None on the other ranks).
        results_json: also write the COCO results list there (rank 0).
        detect: a `Batch` -> per image detections, instead of `model.detect` on the batch
            (test-time augmentation: `TTADetector.batch_detector`).
        progress: draw a tqdm bar on stderr (images done, this rank's share).

    Returns:
        On every rank: the evaluator's metrics (AP, AP50, ..., per_class) plus
        "images" (scored) and "skipped_images" (unreadable).
    """
    was_training = model.training
    model.eval()
    detections: list[dict[str, Any]] = []
    image_ids: list[int] = []
    skipped: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader.dataset), desc="eval", unit="img", ncols=80, file=sys.stderr)
    try:
        for batch in loader:
            skipped += batch.skipped
            if bar is not None and len(batch) == 0:
                bar.update(len(batch.skipped))
            if len(batch) == 0:
                continue
            if detect is not None:
                outputs = detect(batch)
            else:
                outputs = model.detect(batch.images.to(device), batch.metas, rescale=True)
            for image_id, det in zip(batch.image_ids, outputs, strict=True):
                detections.append({"image_id": image_id,
                                   **{k: v.float().cpu() if k != "labels" else v.cpu()
                                      for k, v in det.items()}})  # fmt: skip
                image_ids.append(image_id)
            if bar is not None:
                bar.update(len(batch) + len(batch.skipped))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    gathered = dist.all_gather_object((detections, image_ids, skipped))
    metrics = None
    if dist.is_main_process():
        all_dets = [d for part in gathered for d in part[0]]
        all_ids = sorted({i for part in gathered for i in part[1]})
        all_skipped = [m for part in gathered for m in part[2]]
        metrics = evaluator.evaluate(all_dets, img_ids=all_ids)
        if results_json is not None:
            evaluator.write_results_json(results_json, all_dets)
        metrics.update(images=len(all_ids), skipped_images=len(all_skipped))
        for message in all_skipped:
            print(f"warning: skipped unreadable image: {message}", flush=True)
    return dist.broadcast_object(metrics)


def run_eval(args) -> int:
    """`freeanchor eval`: print the 12 COCO numbers and the per-class table; see --help."""
    from freeanchor.data.datasets import load_dataset
    from freeanchor.data.loader import build_eval_loader
    from freeanchor.eval.coco import COCOEvaluator
    from freeanchor.eval.report import (
        metrics_line,
        per_class_table,
        plot_pr_curve,
        summary_dict,
        write_summary,
    )
    from freeanchor.models.weights import load_model
    from freeanchor.tta import TTADetector, tta_config

    info = dist.dist_info()
    device = dist.resolve_device(args.device, info.local_rank)
    info = dist.init_distributed(device.type)
    try:
        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise OptionError(f"--out {args.out}: is a file, not a folder")
        model = load_model(args.weights, device)
        model.cfg = with_imgsz(model.cfg, getattr(args, "imgsz", None))  # --imgsz: the resize
        outside = getattr(args, "allow_outside_root", False)
        data = load_dataset(args.ann, args.images, split="val", train=False,
                            classes=model.cfg.classes, allow_outside_root=outside)  # fmt: skip
        cat_ids = list(getattr(model, "extra", {}).get("cat_ids") or data.cat_ids)
        if len(cat_ids) != model.cfg.num_classes:
            raise DatasetError(
                f"{args.weights}: the model has {model.cfg.num_classes} classes but {args.ann} "
                f"has {len(cat_ids)} categories"
            )
        check_images_present(data, args.images)
        evaluator = COCOEvaluator(data, args.backend, cat_ids) if info.is_main else None
        max_pixels = getattr(args, "max_pixels", DEFAULT_MAX_PIXELS)
        if max_pixels is not None and max_pixels < 0:
            raise OptionError(f"--max-pixels must be >= 0 (0 = no limit), got {max_pixels}")
        if args.batch_size < 1:
            raise OptionError(f"--batch-size must be >= 1, got {args.batch_size}")
        if getattr(args, "analyze", False):  # before the evaluation, not after it
            from freeanchor.eval.analysis_plots import check_options

            check_options(args.analyze_score_thr, args.analyze_worst)
        loader = build_eval_loader(
            data.records, model.cfg, DataConfig(workers=args.workers), args.batch_size,
            info.rank, info.world_size, max_pixels=max_pixels or None,
        )  # fmt: skip
        out = Path(args.out) if args.out else None
        detect, tta = None, tta_config(args, model.cfg)
        if tta is not None:  # each image is read again: every pass resizes the original
            tta_model = TTADetector(model, tta)
            detect = tta_model.batch_detector(data.records, max_pixels or None)
        results = out / "results.json" if out else None
        progress = info.is_main and sys.stderr.isatty()  # a bar in a log file is noise
        metrics = evaluate(model, loader, evaluator, device, results, detect=detect,
                           progress=progress)  # fmt: skip
        if not info.is_main:
            return 0
        if not metrics["images"]:
            raise DatasetError(
                f"{args.ann}: none of its {len(data.records)} images could be read from "
                f"{args.images} ({metrics['skipped_images']} unreadable): nothing to score"
            )
        print(data.summary())
        print(evaluator.summary_text)
        print(metrics_line(metrics))
        table = per_class_table(metrics["per_class"], metrics.get("per_class_ap50"))
        print(table)
        if out is not None:
            write_text(out / "per_class.txt", table + "\n")
            write_summary(out / "metrics.json", metrics, weights=str(args.weights),
                          ann_file=str(args.ann))  # fmt: skip
            plot_pr_curve(evaluator.coco_eval, out / "pr_curve.png")
            print(f"wrote {out / 'results.json'}, {out / 'metrics.json'}, {out / 'pr_curve.png'}")
        if getattr(args, "analyze", False):
            from freeanchor.eval.analysis_plots import run_analysis

            where = args.analyze_out or (out / "analysis" if out else Path("eval_analysis"))
            run_analysis(evaluator, data.records, metrics, where, args.analyze_score_thr,
                         worst=args.analyze_worst, max_pixels=max_pixels or None)  # fmt: skip
        if args.json:
            print(json.dumps(summary_dict(metrics)))  # the last line: one JSON object
        return 0
    finally:
        dist.cleanup()


def check_images_present(data: Any, images: str | Path | None) -> None:
    """One `DatasetError` line when the annotations name no image, or images that are not
    under `images` (count, first missing path, the folder): a wrong --images, most often."""
    where = data.source
    if not data.records:
        raise DatasetError(
            f"{where}: no image to evaluate ({data.num_images} images in the file, none usable)"
        )
    missing = [r.path for r in data.records if not r.path.exists()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(data.records)} images of {where} are missing, e.g. "
            f"{missing[0]}; is --images {images} the folder their file names are relative to?"
        )
