"""Integrity checks of saved tensors: a payload checksum and the first non-finite value.

`digest(obj)` is a BLAKE2b-256 over a nested structure of dicts, lists, tuples, tensors and
plain values (a state_dict, a whole training checkpoint): the structure and every leaf in
order (dict keys sorted), each tensor as its dtype, shape and raw bytes. Any changed byte
of any tensor, or any changed number in the structure, changes it. Saving writes it beside the
payload; every load recomputes and compares it (a mismatch: the file is corrupt).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

ALGORITHM = "blake2b-256"


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) in a fixed order: dict keys sorted by (type, str), sequences in order."""
    if isinstance(obj, dict):
        yield path, f"dict:{len(obj)}"
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            yield from _leaves(obj[key], f"{path}/{type(key).__name__}:{key}")
    elif isinstance(obj, (list, tuple)):
        yield path, f"{type(obj).__name__}:{len(obj)}"
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{path}/{i}")
    else:
        yield path, obj


def _raw(t: Tensor) -> memoryview:
    """The tensor's bytes (C order, CPU): (numel * element size,) uint8."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def digest(obj: Any) -> str:
    """The digest of `obj` as "blake2b-256:<hex>" (see the module docstring)."""
    h = hashlib.blake2b(digest_size=32)
    for path, leaf in _leaves(obj):
        if isinstance(leaf, Tensor):
            h.update(f"{path}|{leaf.dtype}|{list(leaf.shape)}|".encode())
            h.update(_raw(leaf))
        else:
            h.update(f"{path}|{type(leaf).__name__}|{leaf!r}|".encode())
    return f"{ALGORITHM}:{h.hexdigest()}"


def first_non_finite(obj: Any) -> str | None:
    """The path (e.g. "/str:head.retina_cls.weight") of the first floating-point tensor or
    float holding a NaN or an infinity, or None when every value is finite."""
    for path, leaf in _leaves(obj):
        if isinstance(leaf, Tensor):
            if leaf.is_floating_point() and leaf.numel() and not bool(torch.isfinite(leaf).all()):
                return path
        elif isinstance(leaf, float) and not math.isfinite(leaf):
            return path
    return None


def key_name(path: str) -> str:
    """A `_leaves` path as a user reads it: "/str:model/str:head.w" -> "model/head.w"."""
    return "/".join(part.split(":", 1)[-1] for part in path.strip("/").split("/"))
