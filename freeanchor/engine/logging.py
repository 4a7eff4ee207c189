"""What a training run reports: console progress, a JSONL metrics log, TensorBoard, a plot.

Only rank 0 reports; on other ranks a `TrainLogger(enabled=False)` does nothing.

- console: a tqdm bar per epoch (with ETA) when stdout is a terminal; otherwise one plain line
  every `log_every` iterations, so redirected logs stay readable;
- `work_dir/metrics.jsonl`: one JSON object per line, `"type"` is "train" (window means of the
  loss terms, lr, s/iter), "val" (AP numbers), "skip" (a step skipped for a non-finite loss)
  or "info";
- `work_dir/tb/`: TensorBoard scalars (train/<loss term>, train/lr, val/<metric>);
- `work_dir/curves.png`: loss terms against iteration and AP against epoch (`plot_curves`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from freeanchor.files import atomic_path, write_text


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
    """Console + JSONL + TensorBoard reporting of one run (a no-op when not enabled)."""

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
        self._t0 = time.perf_counter()
        self._iters_timed = 0
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

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop records of iterations after the checkpoint (they will be redone)."""
        if not self.enabled or not self.jsonl.is_file():
            return
        kept = [r for r in read_jsonl(self.jsonl) if int(r.get("iter", 0)) <= iteration]
        write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ events
    def start_epoch(self, epoch: int, epochs: int, iters: int, start: int = 0) -> None:
        """`epoch` is 0-based; `start` batches of it were already done (resume)."""
        self.epoch, self.epochs, self.epoch_iters = epoch, epochs, iters
        if not self.enabled:
            return
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=iters, initial=start, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True
            )

    def log_iter(self, iteration: int, iter_in_epoch: int, values: dict[str, float]) -> None:
        """After a finished step. `iteration` counts steps done in the run (1-based)."""
        if not self.enabled:
            return
        self._iters_timed += 1
        for k, v in values.items():
            self._window[k].append(float(v))
        if self._bar is not None:
            self._bar.update(1)
        if iteration % self.log_every and iter_in_epoch != self.epoch_iters:
            return
        sec_per_iter = (time.perf_counter() - self._t0) / self._iters_timed
        means = {k: sum(v) / len(v) for k, v in self._window.items()}
        self._window.clear()
        eta = sec_per_iter * (self.total_iters - iteration) if self.total_iters else math.nan
        record = {"type": "train", "epoch": self.epoch + 1, "iter": iteration, **means}
        record.update(sec_per_iter=sec_per_iter, eta_s=eta)
        self._record(record)
        tb = self._writer()
        if tb is not None:
            for k, v in means.items():
                tb.add_scalar(f"train/{k}", v, iteration)
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "lr")
        if self._bar is not None:
            self._bar.set_postfix_str(f"{terms} lr {means.get('lr', 0):.2e}")
        else:
            print(
                f"epoch {self.epoch + 1}/{self.epochs} [{iter_in_epoch}/{self.epoch_iters}] "
                f"iter {iteration}/{self.total_iters or '?'} {terms} "
                f"lr {means.get('lr', 0):.3e} {sec_per_iter:.3f}s/it eta {_fmt_eta(eta)}",
                flush=True,
            )

    def end_epoch(self) -> None:
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
        """Scalar evaluation metrics after 1-based `epoch`."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._record({"type": "val", "epoch": epoch, "iter": iteration, **scalars})
        tb = self._writer()
        if tb is not None:
            for k, v in scalars.items():
                tb.add_scalar(f"val/{k}", v, epoch)
        shown = " ".join(f"{k} {scalars[k]:.4f}" for k in ("AP", "AP50", "AP75") if k in scalars)
        self.print(f"epoch {epoch} evaluation: {shown}")

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


def plot_curves(jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Loss terms vs iteration (left) and AP vs epoch (right) from a metrics log."""
    records = read_jsonl(jsonl)
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    keys = [
        k for k in ("loss", "positive_bag_loss", "negative_bag_loss") if train and k in train[0]
    ]
    for key in keys:
        ax_loss.plot([r["iter"] for r in train], [r[key] for r in train], label=key)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss")
    if keys:
        ax_loss.legend()
    for key in ("AP", "AP50", "AP75"):
        pts = [(r["epoch"], r[key]) for r in val if key in r]
        if pts:
            ax_ap.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax_ap.set(xlabel="epoch", ylabel="AP", title="validation")
    if val:
        ax_ap.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(out_png)
