"""`--imgsz`: one image-size convention (LONG,SHORT bounds, MMDetection's scale; one number =
a square bound) on train, config, data check, eval, predict, export and benchmark; the old
`--size` flags still work, with a warning; other tools' names for the size point to it."""

from __future__ import annotations

import argparse

import pytest

from freeanchor.cli import build_parser, main
from freeanchor.config import ModelConfig, resolve_config
from freeanchor.image_size import parse_imgsz, with_imgsz


@pytest.mark.parametrize(
    "text, sides",
    [("1333,800", (1333, 800)), ("800,1333", (1333, 800)), ("640", (640, 640)),
     (" 1024 , 512 ", (1024, 512)), ("1333x800", (1333, 800))],
)  # fmt: skip
def test_parse_gives_long_short(text, sides):
    assert parse_imgsz(text) == sides


@pytest.mark.parametrize("text", ["", "0", "640,", "a,b", "1,2,3", "-5,10", "9000,800"])
def test_parse_refuses_with_the_convention(text):
    with pytest.raises(argparse.ArgumentTypeError, match="LONG,SHORT"):
        parse_imgsz(text)


def test_the_bound_is_mmdetections_keep_ratio_resize():
    # The flag sets model.input_scale, whose meaning is MMDetection's rescale rule: a
    # 640x480 photo at --imgsz 1333,800 becomes 1067x800 (short side bound); a 2000x500
    # panorama 1333x333 (long side bound); at --imgsz 640 the long side becomes 640.
    from freeanchor.data.transforms import rescale_size

    assert rescale_size(640, 480, parse_imgsz("1333,800")) == (1067, 800)
    assert rescale_size(2000, 500, parse_imgsz("800,1333")) == (1333, 333)
    assert rescale_size(480, 640, parse_imgsz("640")) == (480, 640)
    assert rescale_size(1280, 720, parse_imgsz("640")) == (640, 360)


def test_train_and_config_resolve_it_as_the_config_field_in_order():
    p = build_parser()
    args = p.parse_args(
        ["train", "--train-ann", "a", "--imgsz", "640,384", "--set", "train.lr=0.02"]
    )
    assert args.imgsz == (640, 384)
    cfg = resolve_config(None, None, None, args.set)
    assert cfg.model.input_scale == (640, 384) and cfg.train.lr == 0.02
    # a later --set model.input_scale wins, as --set's own order does
    args = p.parse_args(["config", "--imgsz", "640", "--set", "model.input_scale=800,600"])
    assert resolve_config(None, None, None, args.set).model.input_scale == (800, 600)
    args = p.parse_args(["data", "check", "d.json", "--imgsz", "512"])
    assert args.set == ["model.input_scale=512,512"]


def test_config_command_shows_it(capsys):
    assert main(["config", "--imgsz", "1024,640"]) == 0
    assert "* model.input_scale = 1024,640  (default: 1333,800)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["eval", "--weights", "w", "--ann", "a", "--images", "i"],
     ["predict", "--weights", "w", "x.jpg"], ["export", "--weights", "w"]],
)  # fmt: skip
def test_eval_predict_export_take_it_default_the_checkpoints(argv):
    p = build_parser()
    assert p.parse_args(argv).imgsz is None  # None: the checkpoint's model.input_scale
    assert p.parse_args([*argv, "--imgsz", "800,1333"]).imgsz == (1333, 800)


def test_with_imgsz_changes_only_the_resize():
    cfg = ModelConfig()
    assert with_imgsz(cfg, None) is cfg
    new = with_imgsz(cfg, (640, 384))
    assert new.input_scale == (640, 384) and cfg.input_scale == (1333, 800)
    assert new.strides == cfg.strides and new.score_thr == cfg.score_thr


def test_benchmark_images_are_long_by_short(capsys):
    p = build_parser()
    assert p.parse_args(["benchmark"]).size == "1333x800"  # default unchanged, no warning
    assert p.parse_args(["benchmark", "--imgsz", "800,1333"]).size == "1333x800"  # W x H
    assert p.parse_args(["benchmark", "--imgsz", "640"]).size == "640x640"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv, order, value",
    [(["benchmark", "--size", "640x480"], "WxH", "640x480"),
     (["export", "--weights", "w", "--size", "800x1344"], "HxW", "800x1344")],
)  # fmt: skip
def test_old_size_flags_still_work_with_a_warning(argv, order, value, capsys):
    assert build_parser().parse_args(argv).size == value
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--size {order} is deprecated; use --imgsz LONG,SHORT" in err


@pytest.mark.parametrize("key", ["model.imgsz", "imgsz", "model.img_size", "data.image_size"])
def test_other_tools_names_for_the_size_point_to_it(key, capsys):
    assert main(["config", "--set", f"{key}=640"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'model.input_scale'" in err and "--imgsz" in err


def test_help_documents_the_convention(capsys):
    for command in ("train", "eval", "predict", "export", "benchmark"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--imgsz LONG,SHORT" in text and "MMDetection's scale" in text, command


class _Stop(Exception):
    pass


def _fake_model(monkeypatch):
    import types

    import freeanchor.models.weights as weights

    model = types.SimpleNamespace(cfg=ModelConfig(), extra={})
    monkeypatch.setattr(weights, "load_model", lambda *a, **k: model)
    return model


def test_eval_resizes_to_it(monkeypatch):
    import freeanchor.data.datasets as datasets

    model = _fake_model(monkeypatch)

    def load_dataset(*args, **kwargs):  # eval reads the data after the model: stop there
        raise _Stop

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(_Stop):
        main(["eval", "--weights", "w", "--ann", "a", "--images", "i", "--imgsz", "640",
              "--device", "cpu"])  # fmt: skip
    assert model.cfg.input_scale == (640, 640)


def test_export_saves_it_and_sizes_the_example_input_from_it(monkeypatch):
    import freeanchor.export as export

    model, seen = _fake_model(monkeypatch), {}

    def export_onnx(m, path, **kwargs):
        seen.update(kwargs, scale=m.cfg.input_scale, example=export.default_size(m.cfg))
        raise _Stop

    monkeypatch.setattr(export, "export_onnx", export_onnx)
    with pytest.raises(_Stop):
        main(["export", "--weights", "w", "--imgsz", "800,512"])
    assert seen["scale"] == (800, 512) and model.cfg.input_scale == (800, 512)
    assert seen["size"] is None and seen["example"] == (512, 800)  # H x W, landscape
