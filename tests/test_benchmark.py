"""`freeanchor benchmark` runs on a tiny preset and its last line is valid JSON (no timing
assertions: speed is measured by the benchmark itself, not by tests)."""

from __future__ import annotations

import json

from freeanchor.cli import main


def test_benchmark_prints_json_with_ratios(capsys):
    argv = ["benchmark", "--model", "freeanchor_r18_fpn_1x", "--size", "128x96", "--repeats",
            "1", "--warmup", "0", "--train", "--compare", "torchvision"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [r["name"] for r in summary["results"]]
    assert names == ["freeanchor_r18_fpn_1x", "torchvision_retinanet_r50"]
    for r in summary["results"]:
        assert r["e2e_fps"] > 0 and r["model_fps"] > 0 and r["train_step_s"] > 0
    assert set(summary["ratios"]) >= {"e2e_speedup", "model_speedup", "train_step_ratio"}


def test_benchmark_refuses_cuda_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["benchmark", "--device", "cuda", "--size", "64x64"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
