"""Atomic file writes: every file we produce appears whole or not at all.

Each writer fills a temporary file beside the target, fsyncs it, renames it over the target
(`os.replace` is atomic on one file system) and fsyncs the folder, so a crash, even `kill -9`
or a power loss, leaves either the old file or the new one, never half of one. Temporary
files are named `.<target name>.<12 hex digits>.tmp<target suffix>` (`stale_temp_files` finds
the ones a killed process left behind) and are created with mode 0666 minus the process umask,
like any file `open()` creates. A full disk is one line, `DiskFullError: no space left on
device: PATH`, and the temporary file is removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from freeanchor.errors import DiskFullError

# Ours (12 hex digits) and tempfile.mkstemp's (8 characters, used before this naming).
_TEMP_NAME = re.compile(r"^\..+\.([0-9a-f]{12}|[a-z0-9_]{8})\.tmp(\.[A-Za-z0-9]+)?$")


def temp_path_for(path: Path) -> Path:
    """A fresh temporary name beside `path` (the pattern in the module docstring)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")


def _create(path: Path) -> tuple[Path, int]:
    """Create a new temporary file beside `path` (O_EXCL, mode 0666 & ~umask): (name, fd)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = temp_path_for(path)
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: cannot create a temporary file beside it")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened: Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is done
    finally:
        os.close(fd)


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, also behind the exception a writer raised while cleaning up (torch's
    zip writer raises "unexpected pos" from its __exit__ on top of the OSError)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _commit(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data is on disk before the name points at it
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it is renamed to `path`.

    The temporary name keeps the target's suffix, so writers that pick a format from the
    name (matplotlib's savefig, PIL) write the right one. On an error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create(path)
    os.close(fd)
    try:
        yield tmp
        _commit(tmp, path)
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(f"no space left on device: {path}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary file object whose content replaces `path` on a clean exit.

    Prefer it to `atomic_path` for writers that take a file object (torch.save): their
    write errors then arrive as Python OSErrors (ENOSPC is recognised), not C++ ones.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_link(src: str | Path, dst: str | Path) -> Path:
    """Make `dst` hold what `src` holds now: a hard link where the file system has them (no
    bytes copied, no extra disk), else an atomic copy.

    Sharing the inode is safe because no writer here changes a file in place: rewriting `src`
    renames a new file over it, and `dst` keeps the old content.
    """
    src, dst = Path(src), Path(dst)
    tmp = temp_path_for(dst)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this file system (FAT, some network mounts)
        with atomic_file(dst) as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 24)
        return dst
    try:
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def stale_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files of our naming in `folder` (left by a killed writer)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file())


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete `stale_temp_files(folder)`; call only while no writer of ours uses the folder
    (the training run's lock is held). Returns what was removed."""
    removed = []
    for p in stale_temp_files(folder):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


class JsonArrayWriter:
    """Streams objects into a JSON array file that appears (renamed) only on `close()`.

    For outputs too large to hold in memory at once, e.g. detections over 10k images.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp, fd = _create(self.path)
        self.file = os.fdopen(fd, "w", encoding="utf-8")
        self.count = 0
        self._guard(self.file.write, "[")

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:
            self.abort()
            if is_disk_full(e):
                raise DiskFullError(f"no space left on device: {self.path}") from None
            raise

    def write(self, obj: dict[str, Any]) -> None:
        self._guard(self.file.write, ("\n" if self.count == 0 else ",\n") + json.dumps(obj))
        self.count += 1

    def close(self) -> None:
        def finish() -> None:
            self.file.write("\n]\n")
            self.file.close()
            _commit(self.tmp, self.path)

        self._guard(finish)

    def abort(self) -> None:
        """Drop what was written; the target is left as it was."""
        try:
            self.file.close()
        except OSError:
            pass  # closing flushes; on a full disk that fails too
        self.tmp.unlink(missing_ok=True)
