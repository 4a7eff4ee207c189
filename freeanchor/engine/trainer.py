"""The training loop: MMDetection's FreeAnchor 1x recipe (spec 3.2) on one or many processes.

    result = train(cfg)                 # or Trainer(cfg, resume=True).fit()

Per iteration: set the lr (warmup + steps) -> forward + FreeAnchor loss (AMP optional) ->
skip the step if the loss is not finite -> backward -> clip the gradient norm at 35 -> skip
the step if the gradient is not finite (fp16: the GradScaler's overflow) -> SGD -> EMA.
Skipped steps, unreadable images and non-finite weights: engine/guards.py.
Per epoch: evaluate every `eval_every` epochs (best.pt keeps the best AP) and checkpoint.
With `train.ema` the EMA weights (engine/ema.py) are the ones evaluated and released.
Launch with torchrun for DDP (see freeanchor/engine/dist.py); rank 0 logs and writes files,
and holds the work dir's lock (engine/rundir.py: one run per work dir).

Exact resume: a checkpoint holds the position of the next batch (epoch, batch in epoch),
the optimizer, schedule, scaler and RNG states; the data of sample i in epoch e depends only
on (seed, e, i) and the sampler can start mid-epoch, so a resumed run on the CPU with
`train.deterministic` ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import random
import signal
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freeanchor.config import Config, to_dict
from freeanchor.data.loader import Batch, stop_workers
from freeanchor.engine import dist
from freeanchor.engine.checkpoint import (
    CheckpointManager,
    CheckpointSignals,
    Position,
    load_matching_weights,
    restore_training_state,
    training_state,
)
from freeanchor.engine.curves import plot_curves
from freeanchor.engine.ema import ModelEMA
from freeanchor.engine.evaluate import evaluate
from freeanchor.engine.guards import RunGuard
from freeanchor.engine.logging import TrainLogger
from freeanchor.engine.optim import build_optimizer, build_scheduler, scaled_lr, schedule_warnings
from freeanchor.engine.run_data import build_run_data
from freeanchor.engine.rundir import RunLock, claim_work_dir
from freeanchor.errors import ConfigError, OptionError
from freeanchor.models.backbone import load_pretrained_backbone
from freeanchor.models.detector import FreeAnchor

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_VALIDATION = (
    "no validation set (--val-ann and --val-images): no evaluation, no AP and no best.pt "
    "(only last.pt and model_final.safetensors); give both to evaluate during training"
)


class Trainer:
    """Builds data, model and optimizer from a `Config`; `fit()` runs the loop."""

    def __init__(self, cfg: Config, resume: bool = False, init_weights: str | None = None):
        self.cfg, tc = cfg, cfg.train
        if tc.amp not in AMP_DTYPES:
            raise ConfigError(f"train.amp must be one of {list(AMP_DTYPES)}, got {tc.amp!r}")
        if not (cfg.data.train_ann and cfg.data.train_images):
            raise OptionError("no training data: give --train-ann and --train-images")
        # Process-wide switches; fit() puts them back (tests run many trainers in one process).
        self._global_flags = (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled(),
                              torch.backends.cudnn.benchmark)  # fmt: skip
        self.device = dist.resolve_device(cfg.device, dist.dist_info().local_rank)
        self.info = dist.init_distributed(self.device.type)
        self.work_dir = Path(cfg.work_dir)
        self.lock = RunLock(self.work_dir)
        claim_work_dir(self.lock, resume, self.info.is_main)
        # Released when fit() ends, or when the trainer is collected / the interpreter exits.
        self._release = weakref.finalize(self, self.lock.release)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        try:
            self._build(cfg, resume, init_weights)
        except BaseException:
            self._restore_flags()
            raise

    def _build(self, cfg: Config, resume: bool, init_weights: str | None) -> None:
        tc = cfg.train
        self.ckpt = CheckpointManager(self.work_dir, keep=tc.keep_checkpoints)
        self.pos = Position()
        self.losses: list[float] = []  # per iteration of this process's run (NaN = skipped)
        self.last_metrics: dict[str, Any] | None = None
        self._saved_at = self._evaluated_at = -1  # iteration of the last save / evaluation

        data = build_run_data(cfg, self.info, pin_memory=self.device.type == "cuda")
        self.loader, self.val_loader, self.evaluator = data.loader, data.val_loader, data.evaluator
        self.cat_ids = data.cat_ids
        world = self.info.world_size
        self.sampler = self.loader.batch_sampler
        self.iters_per_epoch = self.sampler.num_batches()
        self.total_iters = tc.epochs * self.iters_per_epoch
        if tc.max_iters:
            self.total_iters = min(self.total_iters, tc.max_iters)

        # Model, optimizer, schedule. Every rank seeds alike: identical initial weights.
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        model = FreeAnchor(cfg.model, normalize=tc.normalize, imgs_per_gpu=tc.imgs_per_gpu)
        kept_fresh: list[str] = []
        if not resume and tc.pretrained:
            load_pretrained_backbone(model.backbone, tc.pretrained)
        if not resume and init_weights:
            kept_fresh = load_matching_weights(model, init_weights)
        memory_format = torch.channels_last if tc.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.base_lr = scaled_lr(tc, world)
        self.optimizer = build_optimizer(self.model, tc, self.base_lr)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.amp == "fp16")
        self.ema = ModelEMA(self.model, tc.ema_decay, tc.ema_ramp) if tc.ema else None
        if resume:
            self.pos = restore_training_state(self.ckpt.last, self.model, self.optimizer,
                                              self.scheduler, self.scaler, self.ema)  # fmt: skip
            if self.pos.iter_in_epoch >= self.iters_per_epoch:  # the data shrank meanwhile
                self.pos.epoch, self.pos.iter_in_epoch = self.pos.epoch + 1, 0
        self.loss_forward = dist.loss_module(self.model, self.info, self.device)

        self.log = TrainLogger(self.work_dir, self.info.is_main, self.total_iters, tc.log_every)
        self.guard = RunGuard(self.log, tc.max_bad_steps, cfg.data.max_bad_images, tc.lr)
        self.log.truncate_after(self.pos.iteration)  # records past the checkpoint are redone
        self.log.log_info(self.pos.iteration, data.summary)
        self.log.log_info(
            self.pos.iteration,
            f"{cfg.model.backbone}, {cfg.model.num_classes} classes, device {self.device}, "
            f"{world} process(es) x {tc.batch_size} images, lr {self.base_lr:g}, "
            f"{self.iters_per_epoch} iterations/epoch"
            + (f"; resumed at iteration {self.pos.iteration}" if resume else ""),
        )
        for message in schedule_warnings(tc, self.total_iters, self.iters_per_epoch):
            self.log.warn(message)
        if self.val_loader is None:
            self.log.warn(NO_VALIDATION)
        if kept_fresh:
            self.log.log_info(0, f"{init_weights}: {len(kept_fresh)} tensors do not fit and "
                                 f"keep their initial values, e.g. {kept_fresh[:3]}")  # fmt: skip

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to `train.epochs` (or `train.max_iters`); returns a summary dict."""
        tc, pos = self.cfg.train, self.pos
        with CheckpointSignals() as signals:
            try:
                while pos.epoch < tc.epochs and not self._reached_max_iters():
                    self.sampler.set_epoch(pos.epoch, start_batch=pos.iter_in_epoch)
                    self.log.start_epoch(pos.epoch, tc.epochs, self.iters_per_epoch,
                                         pos.iter_in_epoch)  # fmt: skip
                    self.model.train()
                    for batch in self.loader:
                        self.scheduler.step(pos.iteration, pos.epoch)
                        self._train_step(batch)
                        pos.iter_in_epoch += 1
                        pos.iteration += 1
                        save, stop = signals.poll(self.device)
                        every = tc.checkpoint_iters
                        if stop or save or (every and pos.iteration % every == 0):
                            self._save()
                        if stop:
                            self._stop(stop)
                        if self._reached_max_iters():
                            break
                    self.log.end_epoch()
                    if pos.iter_in_epoch >= self.iters_per_epoch:
                        pos.epoch, pos.iter_in_epoch = pos.epoch + 1, 0
                        self._end_of_epoch()
                    _, stop = signals.poll(self.device)  # e.g. SIGTERM during evaluation
                    if stop:
                        self._save()
                        self._stop(stop)
                return self._finish()
            finally:
                for loader in (self.loader, self.val_loader):
                    if loader is not None:
                        stop_workers(loader)
                self.log.close()
                self._restore_flags()

    def _train_step(self, batch: Batch) -> None:
        """One SGD step on this batch, or a reported skip."""
        tc, world = self.cfg.train, self.info.world_size
        n_gt = sum(int(b.shape[0]) for b in batch.gt_boxes)
        gts_all, empty_any, unreadable = dist.sum_over_ranks(
            [n_gt, len(batch) == 0, len(batch.skipped)], self.device
        )
        self.guard.unreadable(self.pos, batch.skipped, int(unreadable))
        if empty_any:  # every image of some rank's batch was unreadable: nobody steps
            return self._skip_step("no readable image in the batch", {})
        batch = batch.to(self.device, non_blocking=True)
        images = batch.images
        if tc.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # "global": normalise by the gt count of the whole global batch, and undo DDP's 1/W
        # gradient averaging, so gradients equal those of one process holding that batch.
        num_gts = gts_all if tc.normalize == "global" and world > 1 else None
        amp_dtype = AMP_DTYPES[tc.amp]
        with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = self.loss_forward(images, batch.gt_boxes, batch.gt_labels, num_gts)
        if num_gts is not None:
            losses = {k: v * world for k, v in losses.items()}
        loss = sum(losses.values())
        # Mean over ranks of each term: what one process with the global batch would report.
        sums = dist.sum_over_ranks(list(losses.values()), self.device)
        values = {k: v / world for k, v in zip(losses, sums, strict=True)}
        values["loss"] = sum(values.values())
        if not math.isfinite(values["loss"]):  # the same verdict on every rank
            return self._skip_step("non-finite loss", values)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or math.inf))
        if not math.isfinite(grad_norm):  # DDP averaged the gradients: the same on every rank
            if not self.scaler.is_enabled():
                return self._skip_step("non-finite gradient", values)
            self.scaler.step(self.optimizer)  # sees the inf/NaN and does not step ...
            self.scaler.update()  # ... and lowers the loss scale
            scale = self.scaler.get_scale()
            return self._skip_step(f"non-finite fp16 gradient (loss scale now {scale:g})", values)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.pos.bad_steps = 0
        self.losses.append(values["loss"])
        values.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm)
        self.log.log_iter(self.pos.iteration + 1, self.pos.iter_in_epoch + 1, values)

    def _skip_step(self, reason: str, values: dict[str, float]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(math.nan)
        saved = f"{self.ckpt.last} (iteration {self._saved_at})" if self._saved_at >= 0 \
            else "none written by this process"  # fmt: skip
        self.guard.skipped_step(self.pos, reason, values, saved)

    def _end_of_epoch(self) -> None:
        """Evaluate when due, then checkpoint (last.pt, epoch_N.pt, best.pt)."""
        tc, done = self.cfg.train, self.pos.epoch
        last = done == tc.epochs
        is_best = False
        if self.val_loader is not None and (last or (tc.eval_every and done % tc.eval_every == 0)):
            is_best = self._evaluate(done)
        if last or is_best or (tc.checkpoint_every and done % tc.checkpoint_every == 0):
            self._save(epoch_done=done, is_best=is_best)

    def _finish(self) -> dict[str, Any]:
        """Final evaluation and checkpoint (unless the epoch end just did them), weights."""
        pos = self.pos
        is_best = False
        if self.val_loader is not None and self._evaluated_at != pos.iteration:
            is_best = self._evaluate(round(pos.iteration / self.iters_per_epoch, 3))
        if self._saved_at != pos.iteration or is_best:
            self._save(is_best=is_best)
        if self.info.is_main:
            from freeanchor.models.weights import save_model

            final = self.work_dir / "model_final.safetensors"
            if self.guard.finite(self.eval_model.state_dict(), final, pos.iteration):
                save_model(self.eval_model, final, self._extra())
            plot_curves(self.log.jsonl, self.work_dir / "curves.png")
        dist.barrier()
        return {
            "iterations": pos.iteration,
            "epochs_done": pos.epoch,
            "losses": list(self.losses),
            "best_AP": pos.best_metric,
            "best_epoch": pos.best_epoch,
            "last_metrics": self.last_metrics,
            "skipped_steps": pos.skipped_steps,
            "skipped_images": pos.skipped_images,
            "work_dir": str(self.work_dir),
        }

    # ------------------------------------------------------------------ pieces
    def _evaluate(self, epoch_done: float) -> bool:
        """Validation AP after `epoch_done` epochs; True if it is the best so far."""
        metrics = evaluate(self.eval_model, self.val_loader, self.evaluator, self.device)
        self.last_metrics, self._evaluated_at = metrics, self.pos.iteration
        self.log.log_eval(epoch_done, self.pos.iteration, metrics)
        ap = float(metrics["AP"])
        if self.pos.best_metric is None or ap > self.pos.best_metric:
            self.pos.best_metric, self.pos.best_epoch = ap, epoch_done
            return True
        return False

    @property
    def eval_model(self) -> FreeAnchor:
        """The weights that are evaluated and released: the EMA's when train.ema is on."""
        return self.ema.module if self.ema is not None else self.model

    def _save(self, epoch_done: int | None = None, is_best: bool = False) -> None:
        if self.info.is_main:
            state = training_state(self.model, self.optimizer, self.scheduler, self.scaler,
                                   self.pos, to_dict(self.cfg), self._extra(),
                                   self.ema)  # fmt: skip
            if not self.guard.finite(state, self.ckpt.last, self.pos.iteration):
                return
            self.ckpt.save(state, epoch_done=epoch_done, is_best=is_best)
        self._saved_at = self.pos.iteration

    def _stop(self, signum: int) -> None:
        self.log.print(f"signal {signum}: checkpoint written to {self.ckpt.last}; stopping")
        dist.barrier()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _restore_flags(self) -> None:
        """Put back the process-wide switches and release the work dir (end of the run)."""
        deterministic, warn_only, benchmark = self._global_flags
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        self._release()

    def _reached_max_iters(self) -> bool:
        return bool(self.cfg.train.max_iters) and self.pos.iteration >= self.cfg.train.max_iters

    def _extra(self) -> dict[str, Any]:
        return {"cat_ids": list(self.cat_ids)}


def train(cfg: Config, resume: bool = False, init_weights: str | None = None) -> dict[str, Any]:
    """Build a `Trainer` for `cfg` and run it (see the module docstring)."""
    return Trainer(cfg, resume=resume, init_weights=init_weights).fit()
