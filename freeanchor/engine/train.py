"""`freeanchor train`: resolve the configuration, save it, run the trainer.

The configuration is built in this order, each step overriding the previous one:
1. `--config FILE` (a saved config.json); with `--resume` and no `--config`, the run's own
   WORK_DIR/config.json; otherwise the defaults;
2. `--model PRESET` replaces the model section (default preset: freeanchor_r50_fpn_1x_coco);
3. the flags (--train-ann, --epochs, --lr, ...);
4. every `--set section.field=value`, in order (e.g. --set model.input_scale=640,384).
The number of classes and their names always come from the training annotation file.
The resolved config is written to WORK_DIR/config.json.

    freeanchor train --model freeanchor_r50_fpn_1x_coco --pretrained torchvision \
        --train-ann coco/annotations/instances_train2017.json --train-images coco/train2017 \
        --val-ann coco/annotations/instances_val2017.json --val-images coco/val2017 \
        --work-dir work_dirs/r50
    torchrun --nproc-per-node 8 -m freeanchor train ...          # 8 GPUs x 2 images = 16
    freeanchor train --work-dir work_dirs/r50 --resume            # after a crash or a stop
    kill -USR1 <pid>                                              # checkpoint now
"""

from __future__ import annotations

import sys
from pathlib import Path

from freeanchor.config import Config, load_config, resolve_config, save_config
from freeanchor.engine import dist
from freeanchor.errors import MissingFileError, TrainingDivergedError

DEFAULT_WORK_DIR = "work_dirs/run"

# option -> the config field it sets
_FLAGS = {
    "--train-ann": "data.train_ann",
    "--train-images": "data.train_images",
    "--val-ann": "data.val_ann",
    "--val-images": "data.val_images",
    "--epochs": "train.epochs",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--amp": "train.amp",
    "--pretrained": "train.pretrained",
    "--work-dir": "work_dir",
    "--device": "device",
}


def build_config(args) -> Config:
    """The run's Config from the command line (see the module docstring for the order).

    Every value is checked where it is set; a bad one is a ConfigError / OptionError naming
    the option or the field (the CLI prints it as one line, exit code 2).
    """
    work_dir = getattr(args, "work_dir", None)
    own = Path(work_dir or DEFAULT_WORK_DIR) / "config.json"
    base = None
    if args.config:
        base = load_config(args.config)
    elif getattr(args, "resume", False) and own.is_file():
        base = load_config(own)
    flags = {
        option: (path, getattr(args, option[2:].replace("-", "_"), None))
        for option, path in _FLAGS.items()
    }
    return resolve_config(base, args.model, flags, args.set or [])


def save_resolved_config(cfg: Config) -> Path:
    path = Path(cfg.work_dir) / "config.json"
    save_config(cfg, path)
    return path


def run_train(args) -> int:
    """Entry point of `freeanchor train` (also under torchrun: one call per process).

    User mistakes (bad files, options, a work dir holding another run) propagate as
    FreeAnchorError, which the CLI prints as one line with exit code 2; a diverged run prints
    one line, exit code 1.
    """
    from freeanchor.engine.trainer import Trainer

    cfg = build_config(args)
    if args.resume and not (Path(cfg.work_dir) / "last.pt").is_file():
        raise MissingFileError(f"{Path(cfg.work_dir) / 'last.pt'}: nothing to resume from")
    try:
        trainer = Trainer(cfg, resume=args.resume, init_weights=args.weights)
        if trainer.info.is_main:
            save_resolved_config(cfg)  # after the trainer set the dataset's classes
        summary = trainer.fit()
    except TrainingDivergedError as e:
        print(f"freeanchor train: error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()
    if dist.dist_info().is_main:
        best = summary["best_AP"]
        print(
            f"done: {summary['iterations']} iterations"
            + (f" ({summary['skipped_steps']} skipped)" if summary["skipped_steps"] else "")
            + (
                f", best AP={best:.3f} (COCO, 0-1; epoch {summary['best_epoch']})"
                if best is not None
                else ""
            )
            + f"; weights: {Path(cfg.work_dir) / 'model_final.safetensors'}",
            flush=True,
        )
    return 0
