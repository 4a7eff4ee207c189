"""`freeanchor demo` end to end (a few iterations on a small generated dataset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from freeanchor.demo import IMAGE_SIZE, choose_threads

pytestmark = pytest.mark.slow


def test_short_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "freeanchor", "demo", "--out", str(out), "--iters", "3",
           "--num-train", "16", "--num-val", "6", "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"AP", "AP50", "seconds", "train_cpu_seconds"} <= set(result)
    assert result["ap_scale"] == "fraction" and result["threads"] == 1
    assert 0 <= result["AP50"] <= 1 and 0 <= result["AP"] <= result["AP50"]
    # one scale, labelled: the summary line and the per-epoch evaluations
    assert lines[-2].startswith(f"AP50={result['AP50']:.3f} AP={result['AP']:.3f} (COCO, 0-1)")
    assert any(line.startswith("epoch 1 evaluation: AP=") for line in lines)
    assert any(line.startswith("ep 1/8 it 1/3 loss ") for line in lines)  # iteration 1 logged
    assert result["iterations"] == 3 and result["seconds"] > 0
    assert "per-class AP (COCO, 0-1)" in (out / "ap_table.txt").read_text()
    assert Image.open(out / "curves.png").size[0] > 100
    drawn = sorted((out / "detections").glob("*.png"))
    assert len(drawn) == 6
    assert Image.open(drawn[0]).size == (6 * IMAGE_SIZE, 6 * IMAGE_SIZE)  # drawn enlarged
    assert (out / "train" / "model_final.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["AP50"] == result["AP50"] and metrics["ap_scale"] == "fraction"
    val = [json.loads(r) for r in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in val if r["type"] == "val"] == [1, 1.5]  # every epoch, the end
    assert len(json.loads((out / "data" / "val" / "annotations.json").read_text())["images"]) == 6
    # a second demo into the same folder is refused before anything is overwritten
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--out" in again.stderr and "earlier demo" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_demo_out_naming_a_file_is_one_line(tmp_path, capsys):
    from freeanchor.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f"), "--iters", "1"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_rejects_bad_iters(capsys):
    from freeanchor.cli import main

    assert main(["demo", "--out", "unused", "--iters", "0"]) == 2
    assert "--iters" in capsys.readouterr().err


def test_threads_one_on_a_busy_machine(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("freeanchor.demo.busy_cores", lambda: 1.7)
    assert choose_threads(None)[0] == 1 and "busy" in choose_threads(None)[1]
    monkeypatch.setattr("freeanchor.demo.busy_cores", lambda: 0.1)
    assert choose_threads(None)[0] == 2
    assert choose_threads(3) == (3, "--threads")
    # without /proc/stat: the load average
    monkeypatch.setattr("freeanchor.demo.busy_cores", lambda: None)
    monkeypatch.setattr("os.getloadavg", lambda: (10.0, 9.0, 8.0))
    assert choose_threads(None)[0] == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.1, 0.1))
    assert choose_threads(None)[0] == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat on this system")
def test_busy_cores_sees_a_spinning_process():
    from freeanchor.demo import busy_cores

    idle = busy_cores(0.3)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        busy = busy_cores(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert 0.0 <= idle <= (os.cpu_count() or 1)
    assert busy >= 0.7  # one core spinning (other jobs may add more, never less)
