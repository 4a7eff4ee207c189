"""How `freeanchor train` resolves its configuration: --config, --model, flags, --set."""

from __future__ import annotations

import json

import pytest

from freeanchor.cli import build_parser
from freeanchor.config import Config, preset, save_config
from freeanchor.engine.train import build_config, save_resolved_config


def _args(*argv):
    return build_parser().parse_args(["train", *argv])


def test_defaults_flags_and_overrides_in_order():
    argv = ["--train-ann", "a.json", "--train-images", "imgs", "--epochs", "3", "--lr", "0.02",
            "--batch-size", "4", "--amp", "bf16", "--set", "train.epochs=5",
            "--set", "model.input_scale=640,384"]  # fmt: skip
    cfg = build_config(_args(*argv))
    assert cfg.model.backbone == "resnet50" and cfg.work_dir == "work_dirs/run"
    assert (cfg.data.train_ann, cfg.data.train_images) == ("a.json", "imgs")
    assert cfg.train.epochs == 5  # --set comes after the flags
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.amp) == (0.02, 4, "bf16")
    assert cfg.model.input_scale == (640, 384)


def test_config_file_then_model_then_flags(tmp_path):
    base = Config(model=preset("freeanchor_r18_fpn_1x"), work_dir=str(tmp_path / "from_cfg"))
    base.train.epochs, base.model.input_scale = 7, (320, 192)
    save_config(base, tmp_path / "c.json")
    cfg = build_config(_args("--config", str(tmp_path / "c.json")))
    assert cfg.model.backbone == "resnet18" and cfg.train.epochs == 7
    assert cfg.work_dir == str(tmp_path / "from_cfg")
    cfg = build_config(_args("--config", str(tmp_path / "c.json"), "--model",
                             "freeanchor_mobilenetv2_fpn_1x", "--work-dir", "w"))  # fmt: skip
    assert cfg.model.backbone == "mobilenet_v2" and cfg.model.input_scale == (1333, 800)
    assert cfg.train.epochs == 7 and cfg.work_dir == "w"


def test_resume_reads_the_runs_own_config(tmp_path):
    run = Config(model=preset("freeanchor_r18_fpn_1x"), work_dir=str(tmp_path))
    run.train.epochs = 4
    save_resolved_config(run)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 4
    cfg = build_config(_args("--work-dir", str(tmp_path), "--resume", "--epochs", "6"))
    assert cfg.model.backbone == "resnet18" and cfg.train.epochs == 6


def test_bad_override_is_a_value_error():
    with pytest.raises(ValueError, match="train.epochs"):
        build_config(_args("--set", "train.epochs=many"))
