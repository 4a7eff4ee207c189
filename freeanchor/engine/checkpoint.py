"""Training checkpoints as plain data: tensors, numbers, strings, lists and dicts only.

A checkpoint is one dict (loadable with `torch.load(..., weights_only=True)`):

    {"format": "freeanchor-train", "version": 1,
     "model": state_dict, "optimizer": state_dict, "scheduler": dict, "scaler": dict | None,
     "epoch": int, "iter_in_epoch": int, "iteration": int,   # position of the NEXT batch
     "best_metric": float | None, "best_epoch": int | None,
     "rng": capture_rng_state(), "config": to_dict(Config)}

     "ema": ModelEMA.state_dict() | absent,                  # train.ema on
     "checksum": "blake2b-256:<hex>"}                        # of everything else

Files in the work dir: `last.pt` (newest, what --resume reads), `epoch_N.pt` (after epoch N,
1-based; `train.keep_checkpoints` = k keeps the newest k), `best.pt` (best validation AP so
far). Every write is atomic and durable (freeanchor/files.py), so a crash (even kill -9) leaves
either the old or the new file. Every load checks the checksum (a flipped byte anywhere is
refused, naming the file) and refuses a checkpoint holding a NaN or an infinity (a diverged
run's; the trainer never writes one, older or foreign files might).
"""

from __future__ import annotations

import dataclasses
import random
import re
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from freeanchor.checksum import digest, first_non_finite, key_name
from freeanchor.engine import dist
from freeanchor.errors import CheckpointError, MissingFileError
from freeanchor.files import atomic_file, atomic_link

FORMAT = "freeanchor-train"
VERSION = 2  # 2: with "checksum" (version 1 files, without one, still load)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, then rename over it.

    Through a Python file object: a full disk is then an OSError(ENOSPC) that files.py reports
    as one line, not torch's C++ "unexpected pos" error.
    """
    with atomic_file(path) as f:
        torch.save(obj, f)


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """`state` plus its "checksum" entry (the digest of everything else)."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return {**body, "checksum": digest(body)}


def verify_checksum(obj: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError if `obj` has a "checksum" that its content does not match."""
    stored = obj.get("checksum")
    if stored is None:
        return  # written before checksums (version 1), or not ours
    actual = digest({k: v for k, v in obj.items() if k != "checksum"})
    if stored != actual:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt (stored "
                              f"{str(stored)[-12:]}, content {actual[-12:]})")  # fmt: skip


def refuse_non_finite(obj: Any, path: str | Path) -> None:
    """Raise CheckpointError if any float of `obj` is NaN or infinite (a diverged run's)."""
    bad = first_non_finite(obj)
    if bad is not None:
        raise CheckpointError(
            f"{path}: {key_name(bad)} holds NaN or infinite values (written by a diverged "
            "run); use an earlier checkpoint or start anew"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint onto the CPU (weights_only: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, foreign pickled objects
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a freeanchor training checkpoint")
    missing = [
        k for k in ("model", "optimizer", "scheduler", "epoch", "iteration") if k not in ckpt
    ]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    verify_checksum(ckpt, path)
    refuse_non_finite(ckpt, path)
    return ckpt


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain types."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state (CUDA states are restored when the device count matches)."""
    version, mt_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt_state.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- run state


@dataclasses.dataclass
class Position:
    """Where a run stands: the next batch is batch `iter_in_epoch` of 0-based `epoch`."""

    epoch: int = 0
    iter_in_epoch: int = 0
    iteration: int = 0  # batches consumed in the whole run
    best_metric: float | None = None  # best validation AP so far
    best_epoch: float | None = None
    bad_steps: int = 0  # consecutive skipped steps
    skipped_steps: int = 0
    skipped_images: int = 0


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    pos: Position,
    config: dict[str, Any],
    extra: dict[str, Any],
    ema: Any = None,
) -> dict[str, Any]:
    """Everything a resumed run needs, as plain data (see the module docstring)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        **dataclasses.asdict(pos),
        "rng": capture_rng_state(),
        "config": config,
        "extra": extra,
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def restore_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    ema: Any = None,
) -> Position:
    """Load `path` into the given objects, restore the RNGs; returns the saved position.

    `ema` (a ModelEMA) takes the checkpoint's EMA, or restarts from the restored weights
    when the checkpoint has none (EMA switched on for the rest of a run).
    """
    ckpt = load_checkpoint(path)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not fit the configured model ({first})") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if isinstance(ckpt.get("ema"), dict):
            ema.load_state_dict(ckpt["ema"])
        else:
            ema.reset(model)
    restore_rng_state(ckpt["rng"])
    names = [f.name for f in dataclasses.fields(Position)]
    return Position(**{k: ckpt[k] for k in names if k in ckpt})


def load_matching_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise from any checkpoint `load_model` reads; tensors whose name or shape does not
    match (e.g. the classifier for another class count) keep their fresh values.

    Returns the names of the tensors that kept their values.
    """
    from freeanchor.models.weights import load_model

    state = load_model(path).state_dict()
    refuse_non_finite(state, path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


# ----------------------------------------------------------------------------- bookkeeping


_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointManager:
    """Writes last.pt / epoch_N.pt / best.pt in `work_dir` (call on rank 0 only).

    `keep`: how many epoch_N.pt files to keep (the newest by N; 0: all). last.pt and best.pt
    are always kept.
    """

    def __init__(self, work_dir: str | Path, keep: int = 0) -> None:
        self.work_dir = Path(work_dir)
        self.keep = keep

    @property
    def last(self) -> Path:
        return self.work_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.work_dir / "best.pt"

    def epoch_path(self, epoch: int) -> Path:
        return self.work_dir / f"epoch_{epoch}.pt"

    def save(
        self, state: dict[str, Any], epoch_done: int | None = None, is_best: bool = False
    ) -> Path:
        """Write `state` as last.pt; also as epoch_<epoch_done>.pt and/or best.pt.

        The extra files are hard links to this last.pt (serialising once is the slow part, and
        a copy costs as much disk again: 143 MB and 0.4 s for the demo's ResNet-18 state, every
        epoch it improves), copies where links fail.
        The caller checks that `state` is finite (`first_non_finite`) before.
        """
        state = with_checksum({"format": FORMAT, "version": VERSION, **state})
        atomic_save(state, self.last)
        if epoch_done is not None:
            atomic_link(self.last, self.epoch_path(epoch_done))
            self.prune()
        if is_best:
            atomic_link(self.last, self.best)
        return self.last

    def epoch_files(self) -> list[Path]:
        """The epoch_N.pt files in the work dir, oldest (smallest N) first."""
        found = [(int(m.group(1)), p) for p in self.work_dir.glob("epoch_*.pt")
                 if (m := _EPOCH_FILE.match(p.name))]  # fmt: skip
        return [p for _, p in sorted(found)]

    def prune(self) -> list[Path]:
        """Delete all but the newest `keep` epoch files (none when keep is 0)."""
        if not self.keep:
            return []
        old = self.epoch_files()[: -self.keep]
        for p in old:
            p.unlink(missing_ok=True)
        return old


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers leave SIGINT/SIGTERM to the main process.

    A Ctrl-C or a scheduler's SIGTERM reaches the whole process group; workers that died of
    it would make the main process fail on its next batch instead of checkpointing first.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class CheckpointSignals:
    """Signal handlers of a training run (installed only in the main thread).

    SIGUSR1 asks for a checkpoint at the next iteration boundary (`save`); SIGTERM and SIGINT
    ask for a checkpoint and a clean stop (`stop` = the signal number). A second SIGINT
    interrupts at once, for a run stuck outside the loop.
    """

    def __init__(self) -> None:
        self.save = False
        self.stop: int | None = None
        self._previous: dict[int, Any] = {}

    def _on_save(self, signum: int, frame: Any) -> None:
        self.save = True

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = signum

    def __enter__(self) -> CheckpointSignals:
        if threading.current_thread() is threading.main_thread():
            handlers = [(signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop)]
            if hasattr(signal, "SIGUSR1"):  # not on Windows
                handlers.append((signal.SIGUSR1, self._on_save))
            for signum, handler in handlers:
                self._previous[signum] = signal.signal(signum, handler)
        return self

    def poll(self, device: torch.device) -> tuple[bool, int | None]:
        """(save now, stop signal) at an iteration boundary; a signal seen by any rank counts
        for all of them (a collective call: every rank must poll at the same point)."""
        save, stop = self.save, self.stop
        self.save = False
        s, t = dist.sum_over_ranks([float(save), float(stop or 0)], device)
        return s > 0, stop or (int(t) if t else None)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
