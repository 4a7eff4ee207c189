"""Golden MMDetection fixtures shared by the model tests (loaded once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
GOLDEN = SHARED / "golden"
PHOTO = SHARED / "data" / "coco128" / "images" / "000000000009.jpg"


def golden_file(rel: str) -> Path:
    path = GOLDEN / rel
    if not path.is_file():
        pytest.skip(f"golden fixture not present: {path}")
    return path


@pytest.fixture(scope="session")
def golden_r50_reference() -> dict:
    """r50_reference.pt: inputs, raw head outputs and detections of MMDetection's R-50."""
    return torch.load(golden_file("model/r50_reference.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def golden_mmdet_r50_checkpoint(tmp_path_factory, golden_r50_reference) -> Path:
    """An MMDetection checkpoint rebuilt as the golden README's recipe says."""
    sd16 = torch.load(
        golden_file("model/r50_state_dict_fp16.pt"), map_location="cpu", weights_only=True
    )
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in sd16.items()}
    meta = golden_r50_reference["checkpoint_meta"]
    path = tmp_path_factory.mktemp("mmdet") / "freeanchor_r50_random_fp32.pth"
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    return path
