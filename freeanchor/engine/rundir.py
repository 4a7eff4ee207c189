"""One run per work dir: a lock held while training, and no silent mixing of two runs.

A work dir that already holds a run (config.json, last.pt or metrics.jsonl) is refused unless
the run is resumed (`--resume`). We refuse rather than pick a new numbered folder
(Ultralytics' run2, run3, ...): a user who reruns a command into the folder they named would
otherwise find the results somewhere they did not say, and a resumed run must find its own
folder; a one-line error naming the remedy keeps every output where the user asked.

The lock is `WORK_DIR/.lock`, created with O_CREAT | O_EXCL (atomic on local and NFSv3+ file
systems) and holding {"pid", "host"}; a second concurrent run is refused naming the owner. A
lock whose process is gone (same host, no such pid, e.g. after kill -9) is taken over with a
warning. The lock is removed when the run ends. Under torchrun only rank 0 takes it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from freeanchor.engine import dist
from freeanchor.errors import RunDirError
from freeanchor.files import remove_stale_temp_files

LOCK_NAME = ".lock"
RUN_FILES = ("config.json", "last.pt", "metrics.jsonl")


def check_work_dir(work_dir: Path, resume: bool) -> None:
    """Refuse a work dir that is a file, or that holds a run when this run is a new one."""
    if work_dir.exists() and not work_dir.is_dir():
        raise RunDirError(f"--work-dir {work_dir}: is a file, not a folder")
    if resume:
        return
    found = [name for name in RUN_FILES if (work_dir / name).exists()]
    if found:
        raise RunDirError(
            f"--work-dir {work_dir} already holds a run ({', '.join(found)}): continue it "
            "with --resume, or give a new --work-dir"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: assume it runs
    return True


class RunLock:
    """`WORK_DIR/.lock` held by this process (see the module docstring)."""

    def __init__(self, work_dir: str | Path) -> None:
        self.path = Path(work_dir) / LOCK_NAME
        self.held = False

    def acquire(self, warn: Callable[[str], None] = print) -> None:
        """Take the lock, or raise RunDirError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):  # a stale lock is removed, then created again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._owner()
                if not self._stale(owner, me["host"]):
                    who = f"pid {owner.get('pid')} on {owner.get('host')}"
                    raise RunDirError(
                        f"{self.path.parent}: another run ({who}) is training in this work "
                        f"dir; wait for it, or use another --work-dir (if that run is gone, "
                        f"delete {self.path})"
                    ) from None
                warn(f"warning: {self.path}: taking over the lock of pid {owner.get('pid')}, "
                     "which no longer runs")  # fmt: skip
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirError(f"{self.path}: cannot take the lock (others keep taking it)")

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}  # being written this instant, or garbage: see _stale

    @staticmethod
    def _stale(owner: dict, host: str) -> bool:
        pid = owner.get("pid")
        if not isinstance(pid, int) or owner.get("host") != host:
            return False  # another machine's run (shared file system), or unreadable
        return pid != os.getpid() and not _pid_alive(pid)

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def claim_work_dir(lock: RunLock, resume: bool, is_main: bool) -> None:
    """Rank 0 checks the work dir, takes its lock and removes stale temp files (a killed
    writer's: no writer of ours is left once we hold the lock); every rank gets the verdict,
    so all of them raise the same RunDirError or none does (a collective call)."""
    problem = None
    if is_main:
        work_dir = lock.path.parent
        try:
            check_work_dir(work_dir, resume)
            lock.acquire()
            removed = remove_stale_temp_files(work_dir)
            if removed:
                print(f"removed {len(removed)} stale temporary file(s) in {work_dir}")
        except RunDirError as e:
            problem = str(e)
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise RunDirError(problem)
