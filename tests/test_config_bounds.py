"""Bounds on model configs: the size estimates are exact, and a checkpoint header asking for a
model or an input no real checkpoint has is refused before anything is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from freeanchor.config import BACKBONES, ModelConfig, from_dict, preset
from freeanchor.config_bounds import (
    MAX_IMAGE_BYTES,
    MAX_STATE_VALUES,
    estimate_image_bytes,
    estimate_state_values,
)
from freeanchor.errors import ConfigError
from freeanchor.models.detector import FreeAnchor

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(fpn_channels=16, feat_channels=24, num_classes=3)


@pytest.mark.parametrize(
    "cfg",
    [ModelConfig(backbone=b, **SMALL) for b in BACKBONES]
    + [
        preset("freeanchor_r50_fpn_1x_coco"),
        ModelConfig(backbone="resnet18", stacked_convs=0, strides=(8, 16, 32), **SMALL),
        ModelConfig(
            backbone="resnet34",
            strides=(8, 16, 32, 64, 128, 256, 512),
            ratios=(1.0,),
            scales_per_octave=2,
            stacked_convs=1,
            **SMALL,
        ),  # fmt: skip
    ],
    ids=lambda c: f"{c.backbone}-{c.fpn_channels}-{c.stacked_convs}-{len(c.strides)}",
)
def test_state_estimate_is_the_models_state_dict_size(cfg):
    model = FreeAnchor(cfg)
    assert estimate_state_values(cfg) == sum(v.numel() for v in model.state_dict().values())


@pytest.mark.parametrize("scale, divisor", [((200, 120), 32), ((97, 61), 1), ((130, 64), 64)])
def test_image_estimate_is_the_forward_outputs_size(scale, divisor):
    cfg = ModelConfig(backbone="resnet18", input_scale=scale, size_divisor=divisor, **SMALL)
    model = FreeAnchor(cfg).eval()
    h, w = (-(-side // divisor) * divisor for side in scale)
    images = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        pyramid = model.fpn(model.backbone(images))
        cls_scores, box_deltas = model.head(pyramid)
    tensors = [images, *pyramid, *cls_scores, *box_deltas]
    assert estimate_image_bytes(cfg) == sum(t.numel() * 4 for t in tensors)


def test_released_models_are_far_inside_the_bounds():
    for name in ("freeanchor_r50_fpn_1x_coco", "freeanchor_x101-32x4d_fpn_1x_coco"):
        cfg = preset(name)
        assert estimate_state_values(cfg) < MAX_STATE_VALUES / 4
        assert estimate_image_bytes(cfg) < MAX_IMAGE_BYTES / 100
    lvis = ModelConfig(backbone="resnext101_32x4d", num_classes=1203, input_scale=(4096, 4096))
    assert estimate_state_values(lvis) < MAX_STATE_VALUES / 3  # accepted


@pytest.mark.parametrize(
    "header, match",
    [
        ({"feat_channels": 4000}, r"model\.feat_channels=4000: must be 1 to 2048"),
        ({"feat_channels": 200000}, r"model\.feat_channels=200000: must be 1 to 2048"),
        ({"input_scale": [60000, 60000]}, r"model\.input_scale=\(60000, 60000\): must be 1 to"),
        # each field inside its bound, together a model no checkpoint has:
        (
            {"backbone": "resnext101_32x4d", "feat_channels": 2048, "stacked_convs": 8},
            r"model: 602,151,708 weights .*at most 268,435,456",
        ),
        (
            {"num_classes": 10000, "fpn_channels": 2048, "feat_channels": 2048},
            r"model: \d[\d,]+ weights",
        ),
        (
            {"num_classes": 10000, "input_scale": [8192, 8192]},
            r"model: input_scale=\(8192, 8192\) with num_classes=10000 needs 470\.6 GiB per image",
        ),
        (
            {"ratios": [0.5, 1, 2, 3, 4], "scales_per_octave": 9},
            r"model\.ratios x model\.scales_per_octave = 5 x 9 = 45 anchors per location: at "
            r"most 36",
        ),
    ],
)
def test_huge_header_configs_are_refused(header, match):
    with pytest.raises(ConfigError, match="^w.safetensors: config: " + match):
        from_dict(ModelConfig, header, "w.safetensors: config")


def _evil_files(tmp_path):
    from safetensors.torch import save_file

    header = {"backbone": "resnet18", "num_classes": 3, "feat_channels": 4000}
    st = tmp_path / "evil.safetensors"
    save_file({"w": torch.zeros(1)}, str(st), metadata={
        "format": "freeanchor", "format_version": "1", "config": json.dumps(header),
        "extra": "{}"})  # fmt: skip
    pt = tmp_path / "evil.pt"
    big_input = {"backbone": "resnet18", "num_classes": 3, "input_scale": [60000, 60000]}
    torch.save({"model": {"w": torch.zeros(1)}, "config": {"model": big_input}}, pt)
    return st, pt


def test_loading_a_huge_header_never_builds_the_model(tmp_path, monkeypatch):
    from freeanchor.models import detector, weights

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built from an unchecked header")

    monkeypatch.setattr(detector.FreeAnchor, "__init__", no_model)
    st, pt = _evil_files(tmp_path)
    with pytest.raises(ConfigError, match=r"evil\.safetensors: config: model\.feat_channels=4000"):
        weights.load_model(st)
    with pytest.raises(ConfigError, match=r"evil\.pt: config: model\.input_scale=\(60000, 60000\)"):
        weights.load_model(pt)


def test_a_huge_header_is_one_line_and_exit_2_on_the_command_line(tmp_path):
    st, _ = _evil_files(tmp_path)
    run = subprocess.run([sys.executable, "-m", "freeanchor", "convert", str(st), "out.st"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"freeanchor convert: error: {st}: config: model.feat_channels=4000: must be 1 to 2048"
    ]
    assert not (tmp_path / "out.st").exists()
