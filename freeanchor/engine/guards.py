"""What keeps a run going past bad steps and bad files, and stops it when there are too many.

- A step whose loss or gradient is not finite changes no weight; it is logged ("skip" record)
  and counted. `train.max_bad_steps` skips in a row stop the run: TrainingDivergedError
  (exit 1) saying what to change and where the newest checkpoint is.
- Images the loader cannot read are reported and counted over all ranks; more than
  `data.max_bad_images` stop the run (DatasetError, exit 2).
- No state holding a NaN or an infinity is written: the file keeps its last finite version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freeanchor.checksum import first_non_finite, key_name
from freeanchor.engine.checkpoint import Position
from freeanchor.engine.logging import TrainLogger
from freeanchor.errors import DatasetError, TrainingDivergedError


class RunGuard:
    """Counts skipped steps and unreadable images in `Position`, and checks states to write."""

    def __init__(self, log: TrainLogger, max_bad_steps: int, max_bad_images: int, lr: float):
        self.log, self.lr = log, lr
        self.max_bad_steps, self.max_bad_images = max_bad_steps, max_bad_images

    def skipped_step(self, pos: Position, reason: str, values: dict[str, float],
                     newest_checkpoint: str) -> None:  # fmt: skip
        """Log the skip of step `pos.iteration + 1`; raise when too many came in a row."""
        pos.bad_steps += 1
        pos.skipped_steps += 1
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.log.log_skip(pos.iteration + 1, f"{reason} ({shown})" if shown else reason, values)
        if pos.bad_steps >= self.max_bad_steps:
            raise TrainingDivergedError(
                f"{pos.bad_steps} steps in a row skipped (last: {reason}) at iteration "
                f"{pos.iteration + 1}: training diverged. Lower --lr (now {self.lr:g}), use a "
                "longer warm-up (train.warmup_iters), check --weights and the data; newest "
                f"checkpoint: {newest_checkpoint}"
            )

    def unreadable(self, pos: Position, messages: list[str], n: int) -> None:
        """Count `n` unreadable images (all ranks), print this rank's `messages`."""
        if not n:
            return
        pos.skipped_images += n
        for message in messages:
            self.log.print(f"warning: skipped unreadable image: {message}")
        if pos.skipped_images > self.max_bad_images:
            last = messages[-1] if messages else "on another rank"
            raise DatasetError(
                f"{pos.skipped_images} unreadable training images (more than "
                f"data.max_bad_images={self.max_bad_images}); last: {last}"
            )

    def finite(self, state: dict[str, Any], path: Path, iteration: int) -> bool:
        """False (and a log line) if `state` holds a NaN or an infinity: then not written."""
        bad = first_non_finite(state)
        if bad is not None:
            self.log.print(f"warning: iteration {iteration}: {key_name(bad)} is not finite; "
                           f"{path} not written (it keeps its last finite version)")  # fmt: skip
        return bad is None
