"""The data of a training run: the training loader, and the validation loader and evaluator.

The training file decides the classes (written into `cfg.model`); the validation set is read
with those classes, and the evaluator maps labels back to the training file's category ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from freeanchor.config import Config
from freeanchor.data.datasets import load_dataset
from freeanchor.data.loader import build_eval_loader, build_train_loader
from freeanchor.engine.checkpoint import ignore_stop_signals
from freeanchor.engine.dist import DistInfo
from freeanchor.errors import DatasetError, OptionError


@dataclass
class RunData:
    loader: DataLoader
    cat_ids: list[int]  # label -> category id of the training file
    summary: str  # what was read, and what was skipped
    val_loader: DataLoader | None = None
    evaluator: Any = None  # COCOEvaluator on rank 0 when there is a validation set


def build_run_data(cfg: Config, info: DistInfo, pin_memory: bool) -> RunData:
    """Read the data sets of `cfg.data` and build the loaders of this rank."""
    dc, tc = cfg.data, cfg.train
    train = load_dataset(dc.train_ann, dc.train_images, min_size=dc.min_size,
                         allow_outside_root=dc.allow_outside_root)  # fmt: skip
    if not train.records:
        raise DatasetError(f"{dc.train_ann}: no usable training images")
    cat_ids = list(train.label_to_cat_id)
    cfg.model.num_classes, cfg.model.classes = len(cat_ids), train.class_names
    loader = build_train_loader(train.records, cfg.model, dc, tc.batch_size, tc.seed, info.rank,
                                info.world_size, pin_memory=pin_memory,
                                max_pixels=dc.max_image_pixels)  # fmt: skip
    if loader.num_workers and loader.worker_init_fn is None:
        loader.worker_init_fn = ignore_stop_signals
    data = RunData(loader, cat_ids, train.summary())
    if not (dc.val_ann or dc.val_images):
        return data
    if not (dc.val_ann and dc.val_images):
        raise OptionError("validation needs both --val-ann and --val-images")
    val = load_dataset(dc.val_ann, dc.val_images, split="val", train=False,
                       min_size=dc.min_size, classes=cfg.model.classes,
                       allow_outside_root=dc.allow_outside_root)  # fmt: skip
    data.val_loader = build_eval_loader(
        val.records, cfg.model, dc, tc.batch_size, info.rank, info.world_size,
        max_pixels=dc.max_image_pixels,
    )  # fmt: skip
    if info.is_main:  # only rank 0 scores the gathered detections
        from freeanchor.eval.coco import COCOEvaluator

        data.evaluator = COCOEvaluator(val, label_to_cat_id=cat_ids)
    return data
