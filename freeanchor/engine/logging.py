"""What a training run reports: console progress, a JSONL metrics log, TensorBoard, a plot.

Only rank 0 reports; on other ranks a `TrainLogger(enabled=False)` does nothing.

- console: a tqdm bar per epoch (with ETA) when stdout is a terminal; otherwise one plain line
  every `log_every` iterations, so redirected logs stay readable;
- `work_dir/metrics.jsonl`: one JSON object per line, `"type"` is "train" (window means of the
  loss terms, lr, s/iter), "val" (AP numbers), "skip" (a step skipped for a non-finite loss)
  or "info";
- `work_dir/tb/`: TensorBoard scalars (train/<loss term>, train/lr, val/<metric>);
- `work_dir/curves.png`: loss terms against iteration and AP against epoch (engine/curves.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from freeanchor.files import write_text


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics log (a torn last line from a killed run is ignored)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class TrainLogger:
    """Console + JSONL + TensorBoard reporting of one run (a no-op when not enabled).

    Rate and ETA count training time only: the clock of an epoch starts in `start_epoch`, so
    evaluation and checkpointing between epochs are not in s/iter. They are measured apart
    (`end_epoch` -> next `start_epoch`) and added per epoch still to come in the overall ETA.
    """

    def __init__(
        self,
        work_dir: str | Path,
        enabled: bool = True,
        total_iters: int = 0,
        log_every: int = 20,
        tensorboard: bool = True,
        tty: bool | None = None,
    ) -> None:
        self.enabled = enabled
        self.work_dir = Path(work_dir)
        self.jsonl = self.work_dir / "metrics.jsonl"
        self.total_iters = total_iters
        self.log_every = max(1, log_every)
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._tb = None
        self._want_tb = tensorboard
        self._bar = None
        self._window: dict[str, list[float]] = defaultdict(list)
        self._train_s = 0.0  # seconds spent in training steps (data loading included)
        self._iters_timed = 0
        self._tick: float | None = None  # end of the last step; None between epochs
        self._between_s = 0.0  # evaluation + checkpoint time between epochs
        self._epochs_between = 0
        self._epoch_end: float | None = None
        self.epoch, self.epochs, self.epoch_iters = 0, 0, 0
        if enabled:
            self.work_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ plumbing
    def _writer(self):
        if self._tb is None and self._want_tb:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._tb = SummaryWriter(str(self.work_dir / "tb"))
        return self._tb

    def _record(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def print(self, message: str) -> None:
        """A line on the console that does not break a progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """A warning: on the console (always) and in the log as an "info" record."""
        if not self.enabled:
            return
        self._record({"type": "info", "iter": 0, "message": f"warning: {message}"})
        self.print(f"warning: {message}")

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop records of iterations after the checkpoint (they will be redone)."""
        if not self.enabled or not self.jsonl.is_file():
            return
        kept = [r for r in read_jsonl(self.jsonl) if int(r.get("iter", 0)) <= iteration]
        write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))

    def _etas(self, iteration: int) -> tuple[float, float, float]:
        """(s/iter of training, training ETA, overall ETA) after `iteration` steps."""
        sec_per_iter = self._train_s / max(1, self._iters_timed)
        if not self.total_iters:
            return sec_per_iter, math.nan, math.nan
        eta = sec_per_iter * max(0, self.total_iters - iteration)
        overall = eta
        if self.epoch_iters:
            # end-of-epoch work still to come: this epoch's and every later one's
            epochs_left = math.ceil(self.total_iters / self.epoch_iters) - self.epoch
            per_epoch = self._between_s / self._epochs_between if self._epochs_between else 0.0
            overall += per_epoch * max(0, epochs_left)
        return sec_per_iter, eta, overall

    # ------------------------------------------------------------------ events
    def start_epoch(self, epoch: int, epochs: int, iters: int, start: int = 0) -> None:
        """`epoch` is 0-based; `start` batches of it were already done (resume)."""
        self.epoch, self.epochs, self.epoch_iters = epoch, epochs, iters
        now = time.perf_counter()
        if self._epoch_end is not None:
            self._between_s += now - self._epoch_end
            self._epochs_between += 1
            self._epoch_end = None
        self._tick = now
        if not self.enabled:
            return
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=iters,
                initial=start,
                desc=f"ep {epoch + 1}/{epochs}",
                ncols=BAR_COLUMNS,
                mininterval=0,  # a step takes far longer than a redraw: show every one
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
            )

    def log_iter(self, iteration: int, iter_in_epoch: int, values: dict[str, float]) -> None:
        """After a finished step. `iteration` counts steps done in the run (1-based).

        The console bar moves every step; a record (JSONL, TensorBoard, a plain line off a
        terminal) is written at the first step, every `log_every`, at the end of each epoch
        and at the last step, so even a 2-iteration run has a loss to plot.
        """
        now = time.perf_counter()
        if self._tick is not None:
            self._train_s += now - self._tick
            self._iters_timed += 1
        self._tick = now
        if not self.enabled:
            return
        for k, v in values.items():
            self._window[k].append(float(v))
        sec_per_iter, eta, overall = self._etas(iteration)
        if self._bar is not None:
            loss = self._window.get("loss", [math.nan])
            self._bar.set_postfix_str(
                _bar_text(sum(loss) / len(loss), values.get("lr", 0.0), sec_per_iter, overall),
                refresh=False,
            )
            self._bar.update(1)
        due = (
            iteration == 1
            or iteration % self.log_every == 0
            or iter_in_epoch == self.epoch_iters
            or iteration == self.total_iters
        )
        if not due:
            return
        means = {k: sum(v) / len(v) for k, v in self._window.items()}
        self._window.clear()
        record = {"type": "train", "epoch": self.epoch + 1, "iter": iteration, **means}
        record.update(sec_per_iter=sec_per_iter, eta_s=eta, eta_all_s=overall)
        self._record(record)
        tb = self._writer()
        if tb is not None:
            for k, v in means.items():
                tb.add_scalar(f"train/{k}", v, iteration)
        if self._bar is None:
            print(
                f"ep {self.epoch + 1}/{self.epochs} it {iteration}/{self.total_iters or '?'} "
                + _bar_text(
                    means.get("loss", math.nan), means.get("lr", 0.0), sec_per_iter, overall, eta
                ),  # fmt: skip
                flush=True,
            )

    def end_epoch(self) -> None:
        self._tick = None
        self._epoch_end = time.perf_counter()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log_skip(self, iteration: int, reason: str, values: dict[str, float]) -> None:
        """A step that was not taken (non-finite loss): always reported, never silent."""
        if not self.enabled:
            return
        self._record({"type": "skip", "epoch": self.epoch + 1, "iter": iteration,
                      "reason": reason, **{k: float(v) for k, v in values.items()}})  # fmt: skip
        self.print(f"warning: iteration {iteration}: {reason}; step skipped")

    def log_eval(self, epoch: int, iteration: int, metrics: dict[str, float]) -> None:
        """Scalar evaluation metrics after 1-based `epoch` (COCO's 0-1 fractions)."""
        if not self.enabled:
            return
        from freeanchor.eval.report import SCALE_NOTE, ap_fields

        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._record({"type": "val", "epoch": epoch, "iter": iteration, **scalars})
        tb = self._writer()
        if tb is not None:
            for k, v in scalars.items():
                tb.add_scalar(f"val/{k}", v, epoch)
        self.print(f"epoch {epoch} evaluation: {ap_fields(scalars)} {SCALE_NOTE}")

    def log_info(self, iteration: int, message: str, **fields: Any) -> None:
        if not self.enabled:
            return
        self._record({"type": "info", "iter": iteration, "message": message, **fields})
        self.print(message)

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


BAR_COLUMNS = 80  # console lines and the tty bar fit a default terminal


def _bar_text(loss: float, lr: float, sec_per_iter: float, overall: float,
              eta: float | None = None) -> str:  # fmt: skip
    """ "loss 1.234 lr 1.0e-03 0.25s/it eta 4:05" (training left) "all 4:40" (with eval)."""
    text = f"loss {loss:.3f} lr {lr:.1e} {sec_per_iter:.2f}s/it"
    if eta is not None:
        return f"{text} eta {_fmt_eta(eta)} all {_fmt_eta(overall)}"
    return f"{text} eta {_fmt_eta(overall)}"
