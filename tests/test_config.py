"""Typed config: presets, JSON round trip, `a.b=value` overrides, unknown keys, config files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from freeanchor.config import (
    COCO_CLASSES,
    PRESETS,
    Config,
    ModelConfig,
    apply_override,
    from_dict,
    load_config,
    preset,
    save_config,
    validate,
)
from freeanchor.errors import ConfigError, MissingFileError


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
    with pytest.raises(ConfigError, match="unknown model 'retinanet'"):
        preset("retinanet")
    with pytest.raises(ConfigError, match="did you mean 'freeanchor_r18_fpn_1x'"):
        preset("freeanchor_r18_fpn")


def test_presets_and_demo_config_validate():
    from freeanchor.demo import demo_config

    for name in PRESETS:
        validate(Config(model=preset(name)))
    paths = SimpleNamespace(train_ann="a.json", train_images="i", val_ann="v.json", val_images="j")
    for iters in (None, 20):
        cfg = demo_config(paths, "out/train", iters, seed=1)
        validate(cfg)
        assert from_dict(Config, json.loads(json.dumps(_plain(cfg)))) == cfg


def _plain(cfg):
    from freeanchor.config import to_dict

    return to_dict(cfg)


def test_json_round_trip(tmp_path):
    cfg = Config()
    cfg.model = preset("freeanchor_r18_fpn_1x", num_classes=2)
    apply_override(cfg, "train.lr=0.02")
    apply_override(cfg, "model.input_scale=640,480")
    apply_override(cfg, "train.amp=bf16")
    apply_override(cfg, "data.multiscale_short=(480, 512)")
    apply_override(cfg, "train.milestones=")
    apply_override(cfg, "train.pretrained=torchvision")
    apply_override(cfg, "data.val_ann=null")
    save_config(cfg, tmp_path / "c.json")
    back = load_config(tmp_path / "c.json")
    assert back == cfg
    assert back.model.input_scale == (640, 480) and back.train.lr == 0.02
    assert back.data.multiscale_short == (480, 512) and back.train.milestones == ()
    assert back.train.pretrained == "torchvision" and back.data.val_ann is None


def test_new_fields_have_their_defaults():
    cfg = Config()
    assert cfg.data.max_image_pixels == 89_478_485 and cfg.data.allow_outside_root is False
    assert cfg.model.loss == "freeanchor"
    assert (cfg.train.ema, cfg.train.ema_decay, cfg.train.keep_checkpoints) == (False, 0.9998, 0)
    apply_override(cfg, "model.loss=retinanet")
    apply_override(cfg, "data.allow_outside_root=yes")
    assert cfg.model.loss == "retinanet" and cfg.data.allow_outside_root is True


@pytest.mark.parametrize(
    "bad, match",
    [
        ("train.lr=fast", r"^train\.lr='fast': expected a finite number$"),
        ("train.epochs=1.5", r"^train\.epochs='1\.5': expected an integer$"),
        ("train.lr", "section.field=value"),
        ("model.backbone=vgg", r"^model\.backbone='vgg': expected one of resnet10, .*mobilenet"),
        ("train.scale_lr=maybe", r"^train\.scale_lr='maybe': expected true or false$"),
        ("model=resnet18", "model is a section"),
        ("model.classes=a,b", r"model\.classes: 2 names for model\.num_classes=80"),
    ],
)
def test_bad_overrides_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        apply_override(Config(), bad)


@pytest.mark.parametrize(
    "assignment, suggestion",
    [
        ("train.lrr=1", "'train.lr'"),
        ("train.epoch=3", "'train.epochs'"),
        ("trian.lr=1", "'train.lr'"),
        ("lr=1", "'train.lr'"),
        ("train.input_scale=640,480", "'model.input_scale'"),  # the right name, wrong section
        ("model.feat_channel=64", "'model.feat_channels'"),
        ("data.flip=0.5", "'data.flip_prob'"),
    ],
)
def test_unknown_key_suggests_close_matches(assignment, suggestion):
    path = assignment.split("=")[0]
    with pytest.raises(ConfigError) as e:
        apply_override(Config(), assignment)
    assert str(e.value).startswith(f"no field {path!r}; did you mean {suggestion}?")


def test_unknown_choice_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"train\.amp='fp61': expected one of off, bf16, fp16; "
                                          r"did you mean 'fp16'\?"):  # fmt: skip
        apply_override(Config(), "train.amp=fp61")


def test_unknown_key_in_file_and_header(tmp_path):
    (tmp_path / "c.json").write_text('{"model": {"backbone": "resnet18", "depth": 3}}')
    with pytest.raises(ConfigError, match=r"c\.json: no field 'model\.depth'"):
        load_config(tmp_path / "c.json")
    (tmp_path / "d.json").write_text('{"train": {"lrr": 0.1}}')
    with pytest.raises(
        ConfigError, match=r"d\.json: no field 'train\.lrr'; did you mean 'train\.lr'"
    ):
        load_config(tmp_path / "d.json")
    (tmp_path / "e.json").write_text('{"trian": {"lr": 0.1}}')
    with pytest.raises(ConfigError, match=r"e\.json: no field 'trian'; did you mean 'train'"):
        load_config(tmp_path / "e.json")
    message = r"^w\.safetensors: config: no field 'model\.feat_channel'; did you mean 'model\."
    with pytest.raises(ConfigError, match=message + r"feat_channels'\?"):
        from_dict(ModelConfig, {"feat_channel": 64}, "w.safetensors: config")


def test_config_file_errors_are_one_line_naming_the_file(tmp_path):
    cases = {
        "missing.json": (None, MissingFileError, "no such config file"),
        "folder": ("dir", ConfigError, "a folder, not a config file"),
        "weights.bin": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ConfigError,
                        r"not a text file \(expected a JSON config\)"),
        "latin1.json": ('{"work_dir": "caf\xe9"}'.encode("latin-1"), ConfigError, "not a text"),
        "list.json": ("[1, 2, 3]", ConfigError, "expected a JSON object .*got list"),
        "string.json": ('"model"', ConfigError, "expected a JSON object .*got str"),
        "broken.json": ("{not json", ConfigError, r"not valid JSON \(Expecting"),
        "section.json": ('{"model": [1]}', ConfigError, "model: expected a mapping of fields"),
        "inf.json": ('{"train": {"epochs": 1e400}}', ConfigError,
                     r"train\.epochs=inf: expected an integer"),
        "digits.json": ('{"train": {"epochs": ' + "9" * 5000 + "}}", ConfigError,
                        "not a usable JSON config"),
        "deep.json": ("[" * 200_000 + "]" * 200_000, ConfigError, "not a usable JSON config"),
    }  # fmt: skip
    for name, (content, error, match) in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(error) as e:
            load_config(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert __import__("re").search(match, message), (name, message)


def test_checks_hold_for_python_assignment_too():
    cfg = Config()
    with pytest.raises(ConfigError, match=r"^train\.lr=nan: expected a finite number$"):
        cfg.train.lr = float("nan")
    with pytest.raises(ConfigError, match=r"^model\.num_classes=True: expected an integer$"):
        ModelConfig(num_classes=True)
    with pytest.raises(ConfigError, match=r"^model\.input_scale=\(640,\): expected 2 integers"):
        ModelConfig(input_scale=(640,))
    assert cfg.train.lr == 0.01  # a refused value is not kept
    cfg.model.ratios = [1, 2]  # lists and ints are converted to the declared types
    assert cfg.model.ratios == (1.0, 2.0) and isinstance(cfg.model.ratios[0], float)
    # Rules spanning fields run at construction and in validate(), not between assignments.
    cfg.model.num_classes, cfg.model.classes = 2, ["a", "b"]
    cfg.model.classes = ["a", "b", "c"]
    with pytest.raises(ConfigError, match="3 names for model.num_classes=2"):
        validate(cfg)
