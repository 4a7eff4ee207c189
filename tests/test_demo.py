"""`freeanchor demo` end to end (a few iterations on a small generated dataset)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from freeanchor.demo import IMAGE_SIZE

pytestmark = pytest.mark.slow


def test_short_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "freeanchor", "demo", "--out", str(out), "--iters", "3",
           "--num-train", "16", "--num-val", "6"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert {"AP", "AP50", "seconds"} <= set(result)
    assert 0 <= result["AP50"] <= 1 and 0 <= result["AP"] <= result["AP50"]
    assert result["iterations"] == 3 and result["seconds"] > 0
    assert "AP50" in (out / "ap_table.txt").read_text()
    assert Image.open(out / "curves.png").size[0] > 100
    drawn = sorted((out / "detections").glob("*.png"))
    assert len(drawn) == 6
    assert Image.open(drawn[0]).size == (IMAGE_SIZE, IMAGE_SIZE)
    assert (out / "train" / "model_final.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["AP50"] == pytest.approx(result["AP50"], abs=1e-4)
    assert len(json.loads((out / "data" / "val" / "annotations.json").read_text())["images"]) == 6


def test_demo_rejects_bad_iters(capsys):
    from freeanchor.cli import main

    assert main(["demo", "--out", "unused", "--iters", "0"]) == 2
    assert "--iters" in capsys.readouterr().err
