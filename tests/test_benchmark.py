"""`freeanchor benchmark` runs on a tiny preset and its last line is valid JSON with every field
(no timing assertions: speed is measured by the benchmark itself, not by tests)."""

from __future__ import annotations

import json

import torch

from freeanchor.cli import main

STAT_KEYS = {"median", "min", "max", "repeats", "spread_pct"}


def test_benchmark_prints_json_with_ratios(capsys):
    argv = ["benchmark", "--model", "freeanchor_r18_fpn_1x", "--size", "64x64", "--repeats",
            "2", "--warmup", "0", "--train", "--compare", "torchvision"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    names = [r["name"] for r in summary["results"]]
    assert names == ["freeanchor_r18_fpn_1x", "torchvision_retinanet_resnet18"]
    assert summary["results"][1]["peer_note"] == "same depth"
    for r in summary["results"]:
        for key in ("e2e_fps", "model_fps", "train_step_s", "train_img_s"):
            assert set(r[key]) == STAT_KEYS and r[key]["repeats"] == 2
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
        for key in ("infer_peak_mb", "train_peak_mb"):
            assert r[key] is None or r[key] > 0  # None off Linux
    assert set(summary["ratios"]) >= {"e2e_speedup", "model_speedup", "train_step_ratio"}
    assert isinstance(summary["warnings"], list)
    assert "0.000" not in out.splitlines()[1]


def test_benchmark_unmeasured_columns_are_null(capsys):
    argv = ["benchmark", "--model", "freeanchor_r18_fpn_1x", "--size", "64x64", "--repeats",
            "1", "--warmup", "0"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (r,) = json.loads(lines[-1])["results"]
    assert r["train_step_s"] is None and r["train_peak_mb"] is None and r["e2e_fps"]["median"] > 0
    assert "—" in lines[2] and "ratios" not in json.loads(lines[-1])


def test_benchmark_refuses_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        return
    assert main(["benchmark", "--device", "cuda", "--size", "64x64"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_benchmark_onnx_runs_ours_on_onnxruntime(capsys):
    argv = ["benchmark", "--model", "freeanchor_r18_fpn_1x", "--imgsz", "64,64", "--repeats",
            "2", "--warmup", "0", "--onnx", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    (r,) = json.loads(captured.out.strip().splitlines()[-1])["results"]
    assert r["name"] == "freeanchor_r18_fpn_1x (onnxruntime)"
    assert r["e2e_fps"]["repeats"] == 2 and r["model_fps"]["median"] > 0
    assert "onnxruntime within" in captured.err  # the export was checked against PyTorch


def test_benchmark_onnx_refuses_what_the_graph_cannot_do(capsys):
    argv = ["benchmark", "--model", "freeanchor_r18_fpn_1x", "--imgsz", "64,64", "--onnx",
            "--dtype", "bf16"]  # fmt: skip
    assert main(argv) == 2
    assert "--onnx" in capsys.readouterr().err
