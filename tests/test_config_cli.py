"""`freeanchor config`: every field with its value, default and meaning; `--json` round trip;
no torch import (config and the printer stay light)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from freeanchor.cli import build_parser, main
from freeanchor.config import Config, load_config, preset
from freeanchor.config_fields import field_paths, field_types
from freeanchor.tools.config_info import describe_config, format_value

REPO = Path(__file__).resolve().parents[1]


def _fields(cfg: Config):
    """(dotted name, value, default, meaning) of every field, from the declarations."""
    for part in (cfg, cfg.model, cfg.data, cfg.train):
        default = type(part)()
        for f in dataclasses.fields(part):
            if not dataclasses.is_dataclass(field_types(type(part))[f.name]):
                name = f"{part.section}.{f.name}" if part.section else f.name
                yield name, getattr(part, f.name), getattr(default, f.name), f.metadata["meaning"]


def test_listing_has_every_field_value_default_and_meaning():
    cfg = Config(model=preset("freeanchor_r18_fpn_1x", num_classes=3))
    cfg.train.lr, cfg.model.input_scale = 0.02, (640, 384)
    lines = describe_config(cfg).splitlines()
    seen = 0
    for name, value, default, meaning in _fields(cfg):
        (i,) = [i for i, line in enumerate(lines) if line[2:].startswith(f"{name} = ")]
        if value != default:
            assert (
                lines[i] == f"* {name} = {format_value(value)}  (default: {format_value(default)})"
            )
        else:
            assert lines[i] == f"  {name} = {format_value(value)}  (default)"
        assert lines[i + 1].strip().startswith(meaning[:40]), (name, lines[i + 1])
        seen += 1
    assert seen == len(field_paths(Config)) == 72
    assert "* train.lr = 0.02  (default: 0.01)" in lines
    assert "* model.backbone = resnet18  (default: resnet50)" in lines
    assert "* model.input_scale = 640,384  (default: 1333,800)" in lines
    assert "  train.epochs = 12  (default)" in lines
    assert lines[lines.index("  train.amp = off  (default)") + 1].endswith("one of off, bf16, fp16")
    assert "      channels of every FPN level; an integer, 1 to 2048" in lines
    assert lines[-1].startswith("4 of 72 fields changed")  # backbone, num_classes, input_scale, lr


def test_json_round_trips_through_config_and_train(tmp_path, capsys):
    argv = ["config", "--model", "freeanchor_r18_fpn_1x", "--set", "train.lr=0.02", "--set",
            "model.input_scale=640,384", "--set", "train.milestones=5", "--json"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads(text)
    assert data["train"]["lr"] == 0.02 and data["model"]["input_scale"] == [640, 384]
    (tmp_path / "c.json").write_text(text)
    cfg = load_config(tmp_path / "c.json")
    assert cfg.model.backbone == "resnet18" and cfg.train.milestones == (5,)
    assert main(["config", "--config", str(tmp_path / "c.json"), "--json"]) == 0
    assert capsys.readouterr().out == text
    from freeanchor.engine.train import build_config

    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.json")])
    assert build_config(args) == cfg


def test_bad_set_is_one_line_exit_2(capsys):
    assert main(["config", "--set", "model.feat_channel=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["freeanchor config: error: --set model.feat_channel=64: no field "
                   "'model.feat_channel'; did you mean 'model.feat_channels'? "
                   "(`freeanchor config` lists every field)"]  # fmt: skip


def test_config_file_errors_through_the_cli(tmp_path, capsys):
    (tmp_path / "blob.json").write_bytes(bytes(range(256)))
    (tmp_path / "list.json").write_text("[]")
    for path in (tmp_path, tmp_path / "none.json", tmp_path / "blob.json", tmp_path / "list.json"):
        for command in ("train", "config"):
            assert main([command, "--config", str(path)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"error: {path}: " in err, err


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


# Runs the config command with torch made unimportable, the package's own __init__ bypassed:
# config.py, its rules, the printer and cli.py must not need torch.
_NO_TORCH = f"""
import importlib.abc, sys, types
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "numpy"):
            raise ImportError("imported " + name)
sys.meta_path.insert(0, NoTorch())
package = types.ModuleType("freeanchor")
package.__path__ = [{str(REPO / "freeanchor")!r}]
sys.modules["freeanchor"] = package
from freeanchor.cli import main
code = main(["config", "--model", "freeanchor_r18_fpn_1x", "--set", "train.lr=0.02"])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_config_modules_and_command_do_not_import_torch():
    run = _run(_NO_TORCH)
    assert run.returncode == 0, run.stderr
    assert "* train.lr = 0.02  (default: 0.01)" in run.stdout


def test_the_installed_command_does_not_import_torch():
    probe = _run("import sys, freeanchor; print('torch' in sys.modules)")
    if probe.stdout.strip() == "True":
        pytest.skip("freeanchor/__init__.py itself imports torch (FreeAnchorLoss); the light "
                    "`import freeanchor` is issue 13 item 7")  # fmt: skip
    run = _run("import sys; from freeanchor.cli import main; code = main(['config']); "
               "print('torch' in sys.modules)")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
