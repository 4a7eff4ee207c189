"""benchmarks/loss_speed.py runs and prints valid JSON (no timing is checked: speed belongs in
the benchmark's own output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_loss_speed_benchmark_runs_and_prints_json():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "loss_speed.py"), "--cases", "tiny",
           "--repeats", "1", "--peer", "stand-in", "--threads", "1"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    assert "STAND-IN" in out.stdout and "--- for benchmarks/RESULTS.md ---" in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["peer"] == "stand-in"
    case = result["cases"]["tiny"]
    for impl in ("freeanchor", "freeanchor-flat", "stand-in"):
        assert len(case[impl]["times_s"]) == 1 and case[impl]["peak_mb"] >= 0
    for impl in ("freeanchor", "freeanchor-flat"):  # same inputs, same numbers as the peer
        vs = case[impl]["vs_peer"]
        assert vs["losses_ok"] and vs["grad_cls_scores_ok"] and vs["grad_bbox_preds_ok"]
