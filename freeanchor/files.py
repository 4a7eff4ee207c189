"""Atomic file writes: every file we produce appears whole or not at all.

Each writer fills a temporary file beside the target and renames it over the target
(`os.replace` is atomic on one file system), so a crash, even `kill -9`, leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it is renamed to `path`.

    The temporary name keeps the target's suffix, so writers that pick a format from the
    name (matplotlib's savefig, PIL) write the right one. On an error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


class JsonArrayWriter:
    """Streams objects into a JSON array file that appears (renamed) only on `close()`.

    For outputs too large to hold in memory at once, e.g. detections over 10k images.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "w", encoding="utf-8")
        self.file.write("[")
        self.count = 0

    def write(self, obj: dict[str, Any]) -> None:
        self.file.write(("\n" if self.count == 0 else ",\n") + json.dumps(obj))
        self.count += 1

    def close(self) -> None:
        self.file.write("\n]\n")
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop what was written; the target is left as it was."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)
