"""Shared test helpers: where the shared fixtures live, and skipping when they are absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
COCO128 = SHARED / "data" / "coco128"
WEIGHTS = SHARED / "weights"

if str(ROOT) not in sys.path:  # benchmarks/ holds the independent reference loss
    sys.path.insert(0, str(ROOT))


def need(path: Path) -> Path:
    """Skip the calling test (with the reason) when a shared fixture is not present."""
    if not path.exists():
        pytest.skip(f"shared fixture not present: {path}")
    return path
