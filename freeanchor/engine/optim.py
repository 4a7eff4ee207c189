"""SGD and the 1x learning-rate schedule of MMDetection's FreeAnchor configs (spec 3.2).

    lr(iter, epoch) = base_lr * warmup(iter) * lr_gamma ** (number of milestones <= epoch)
    warmup(i)       = warmup_ratio + (1 - warmup_ratio) * i / warmup_iters   for i < warmup_iters
                    = 1                                                      afterwards

`epoch` is 0-based, so milestones (8, 11) mean: epochs 1-8 at lr, 9-11 at lr/10, 12 at lr/100.

Linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD"): the configured lr is the
lr of a global batch of `base_batch_size` (16 = 8 GPUs x 2 images, as the seed models were
trained); a run with another global batch uses lr * global_batch / base_batch_size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from freeanchor.config import TrainConfig


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """The base lr of this run after the linear scaling rule (if `cfg.scale_lr`)."""
    if not cfg.scale_lr:
        return cfg.lr
    global_batch = cfg.batch_size * world_size
    return cfg.lr * global_batch / cfg.base_batch_size


def build_optimizer(model: nn.Module, cfg: TrainConfig, base_lr: float) -> torch.optim.Optimizer:
    """SGD (the recipe) or AdamW over every trainable parameter, one group.

    MMDetection's FreeAnchor configs have no paramwise settings: biases and norm affine
    parameters get the same lr and weight decay as the weights. Frozen parameters
    (requires_grad False: the stem and layer1, frozen BN) are not handed to the optimizer.
    AdamW is for training from scratch in few iterations (the offline demo), where SGD is slow
    to start; it is torch's fused implementation (one kernel over all parameters: on the CPU
    7.7 ms a step for the 11.9 M parameters of the demo's former ResNet-18 model, against
    40 ms for the per-parameter loop).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer != "sgd":
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    return torch.optim.SGD(params, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class WarmupMultiStepLR:
    """Per-iteration linear warmup times per-epoch step decay, set on the optimizer's groups.

    Stateless apart from the base lrs and the last position: `step(iteration, epoch)` computes
    the lr from scratch, so resuming only needs the position (kept in the state dict as well).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_iters: int,
        warmup_ratio: float,
        milestones: tuple[int, ...],
        gamma: float,
    ) -> None:
        self.optimizer = optimizer
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.milestones = tuple(sorted(milestones))
        self.gamma = gamma
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_iter = -1
        self.last_epoch = 0

    def factor(self, iteration: int, epoch: int) -> float:
        """Multiplier of the base lr at global iteration `iteration` (0-based) of `epoch`."""
        warmup = 1.0
        if iteration < self.warmup_iters:
            warmup = self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / self.warmup_iters
        decays = sum(1 for m in self.milestones if epoch >= m)
        return warmup * self.gamma**decays

    def step(self, iteration: int, epoch: int) -> None:
        """Set every group's lr for the iteration about to run."""
        f = self.factor(iteration, epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f
        self.last_iter, self.last_epoch = iteration, epoch

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lrs": list(self.base_lrs),
            "last_iter": self.last_iter,
            "last_epoch": self.last_epoch,
            "warmup_iters": self.warmup_iters,
            "warmup_ratio": self.warmup_ratio,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The schedule's shape comes from the (possibly edited) config; the base lrs and the
        # position come from the checkpoint so a resumed run continues where it stopped.
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.last_iter = int(state["last_iter"])
        self.last_epoch = int(state["last_epoch"])
        if self.last_iter >= 0:
            self.step(self.last_iter, self.last_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> WarmupMultiStepLR:
    return WarmupMultiStepLR(
        optimizer, cfg.warmup_iters, cfg.warmup_ratio, cfg.milestones, cfg.lr_gamma
    )


def schedule_warnings(tc: TrainConfig, total_iters: int, iters_per_epoch: int) -> list[str]:
    """What in the lr schedule does not fit a run of `total_iters` steps (one line each, with
    the fix): a warm-up too long for the run, milestones past its end or inside the warm-up.
    """
    out = []
    warmup = int(tc.warmup_iters)
    if total_iters and warmup > total_iters // 4:
        fix = f"use --set train.warmup_iters={total_iters // 10}, or train longer"
        if warmup >= total_iters:
            reached = tc.lr * (tc.warmup_ratio + (1 - tc.warmup_ratio) * total_iters / warmup)
            out.append(
                f"warm-up (train.warmup_iters={warmup}) is longer than this run's {total_iters} "
                f"iterations: the lr ends at {reached:.1e}, never reaching train.lr={tc.lr:g}; "
                + fix
            )
        else:
            out.append(
                f"warm-up (train.warmup_iters={warmup}) takes {100 * warmup / total_iters:.0f}% "
                f"of this run's {total_iters} iterations; " + fix
            )
    if total_iters and iters_per_epoch:
        run_epochs = total_iters / iters_per_epoch
        late = [m for m in tc.milestones if m >= run_epochs]
        if late:
            fit = ",".join(str(max(1, round(m * run_epochs / tc.epochs))) for m in tc.milestones)
            out.append(
                f"lr milestones (train.milestones) {list(late)} are at or past the end of this "
                f"run ({run_epochs:g} epochs): the lr never drops there; use "
                f"--set train.milestones={fit}, or train longer"
            )
        early = [m for m in tc.milestones if m * iters_per_epoch <= warmup]
        if early and warmup:
            out.append(
                f"lr milestones {early} fall inside the {warmup}-iteration warm-up: the lr "
                f"drops before it ever reaches train.lr; lower train.warmup_iters or move them"
            )
    return out
