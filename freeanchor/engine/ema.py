"""Model EMA: an exponential moving average of the weights, for evaluation and release.

YOLOX's form (also MMDetection's ExpMomentumEMA up to the offset of the ramp): after the n-th
good optimizer step (n = 1, 2, ...),

    d(n) = decay * (1 - exp(-n / ramp))         # ramp = 2000: early weights are forgotten fast
    ema  = d(n) * ema + (1 - d(n)) * weights    # every floating tensor, parameters and buffers

Integer buffers (BatchNorm's num_batches_tracked) are copied. Skipped (non-finite) steps do not
update it. The EMA's state (its weights and n) is saved in every checkpoint, so a resumed run
continues it exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

RAMP = 2000


class ModelEMA:
    """Holds `module`, an eval-mode copy of the model whose weights are the EMA."""

    def __init__(self, model: nn.Module, decay: float, ramp: int = RAMP) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.ramp = decay, ramp
        self.updates = 0

    def factor(self, n: int) -> float:
        """d(n), the weight of the old average at the n-th update."""
        return self.decay * (1.0 - math.exp(-n / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (after a good step)."""
        self.updates += 1
        d = self.factor(self.updates)
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = current[name].detach()
            if avg.is_floating_point():
                avg.mul_(d).add_(value, alpha=1.0 - d)
            else:
                avg.copy_(value)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start over from the model's weights (n = 0)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay, "ramp": self.ramp}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # decay and ramp come from the (possibly edited) config, like the lr schedule's shape
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
