"""Typed config: presets, JSON round trip, `a.b=value` overrides checked by type."""

from __future__ import annotations

import pytest

from freeanchor.config import (
    COCO_CLASSES,
    PRESETS,
    Config,
    apply_override,
    load_config,
    preset,
    save_config,
)


def test_presets_named_after_seed_configs():
    assert set(PRESETS) >= {
        "freeanchor_r50_fpn_1x_coco",
        "freeanchor_r101_fpn_1x_coco",
        "freeanchor_x101-32x4d_fpn_1x_coco",
        "freeanchor_r18_fpn_1x",
        "freeanchor_mobilenetv2_fpn_1x",
    }
    cfg = preset("freeanchor_x101-32x4d_fpn_1x_coco")
    assert cfg.backbone == "resnext101_32x4d" and cfg.classes == list(COCO_CLASSES)
    assert preset("freeanchor_r18_fpn_1x", num_classes=3).class_names() == [
        "class_0", "class_1", "class_2"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown model"):
        preset("retinanet")


def test_json_round_trip(tmp_path):
    cfg = Config()
    cfg.model = preset("freeanchor_r18_fpn_1x", num_classes=2)
    apply_override(cfg, "train.lr=0.02")
    apply_override(cfg, "model.input_scale=640,480")
    apply_override(cfg, "train.amp=bf16")
    save_config(cfg, tmp_path / "c.json")
    back = load_config(tmp_path / "c.json")
    assert back == cfg
    assert back.model.input_scale == (640, 480) and back.train.lr == 0.02


@pytest.mark.parametrize(
    "bad, match",
    [
        ("train.lr=fast", "expected float"),
        ("train.epochs=1.5", "expected int"),
        ("train.nope=1", "no field"),
        ("nosection.x=1", "no config section"),
        ("train.lr", "section.field=value"),
        ("model.backbone=vgg", "unknown backbone"),
        ("train.scale_lr=maybe", "true/false"),
    ],
)
def test_bad_overrides_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        apply_override(Config(), bad)


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "c.json").write_text('{"model": {"backbone": "resnet18", "depth": 3}}')
    with pytest.raises(ValueError, match="unknown field"):
        load_config(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "d.json")
