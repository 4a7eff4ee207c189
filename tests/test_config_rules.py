"""Every config value a user or a file can get wrong is refused where it is parsed, naming the
field, the value and what is allowed: from `--set`, from a JSON config file, from a checkpoint
header (`from_dict(ModelConfig, ...)`) and from the train command's flags."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from freeanchor.cli import main
from freeanchor.config import (
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    apply_override,
    from_dict,
    load_config,
)
from freeanchor.config_fields import field_types
from freeanchor.errors import ConfigError

NAN, INF = math.nan, math.inf

# (field, a bad value as JSON/Python holds it). The first block is the list of issue 9; the rest
# covers every other rule of every section.
BAD_VALUES = [
    ("model.size_divisor", 0),
    ("train.lr", NAN),
    ("train.lr", INF),
    ("model.input_scale", [0, 0]),
    ("train.imgs_per_gpu", 0),
    ("train.base_batch_size", 0),
    ("model.ratios", [0]),
    ("model.fpn_channels", 0),
    ("model.mean", [1, 2]),
    ("train.epochs", INF),  # epochs=1e400 in a JSON file
    ("train.max_bad_steps", 0),
    ("train.grad_clip", -1),
    ("model.nms_iou", 2),
    ("data.flip_prob", 7),
    ("train.normalize", "bogus"),
    ("train.amp", "fp61"),
    ("train.optimizer", "lion"),
    ("train.epochs", 0),
    ("train.epochs", -1),
    # sizes and counts
    ("model.num_classes", 0),
    ("model.num_classes", 10_001),
    ("model.feat_channels", 4000),
    ("model.feat_channels", 200_000),
    ("model.fpn_channels", 4096),
    ("model.stacked_convs", -1),
    ("model.stacked_convs", 9),
    ("model.input_scale", [60000, 60000]),
    ("model.input_scale", [1333]),
    ("model.size_divisor", 1024),
    ("model.frozen_stages", 5),
    ("model.scales_per_octave", 0),
    ("model.pre_anchor_topk", 0),
    ("model.max_per_img", 0),
    ("model.nms_pre", -5),
    ("train.batch_size", 0),
    ("train.warmup_iters", -1),
    ("train.max_iters", -1),
    ("train.eval_every", -1),
    ("train.checkpoint_every", -1),
    ("train.checkpoint_iters", -1),
    ("train.log_every", 0),
    ("train.keep_checkpoints", -1),
    ("train.seed", -1),
    ("train.seed", 2**32),
    ("data.workers", -1),
    ("data.min_size", -1),
    ("data.max_bad_images", -1),
    ("data.max_image_pixels", 0),
    ("data.multiscale_short", [0, 800]),
    ("data.multiscale_short", [800, 9000]),
    # ratios, probabilities, thresholds
    ("model.ratios", []),
    ("model.ratios", [0.5, -1.0]),
    ("model.ratios", [0.5] * 10),
    ("model.std", [58.0, 0.0, 57.0]),
    ("model.std", [58.0, NAN, 57.0]),
    ("model.mean", [123.0, INF, 103.0]),
    ("model.target_stds", [0.1, 0.1, 0.2]),
    ("model.target_stds", [0.1, 0.1, 0.2, 0.0]),
    ("model.prior_prob", 0),
    ("model.prior_prob", 1),
    ("model.bbox_thr", 1),
    ("model.bbox_thr", 0),
    ("model.nms_iou", 0),
    ("model.score_thr", 1),
    ("model.score_thr", -0.1),
    ("model.alpha", 1.5),
    ("model.gamma", -1),
    ("model.beta", 0),
    ("model.bbox_weight", -0.5),
    ("model.octave_base_scale", 0),
    ("train.momentum", 1),
    ("train.weight_decay", -1e-4),
    ("train.warmup_ratio", 2),
    ("train.lr_gamma", 0),
    ("train.lr_gamma", 10),
    ("train.lr", 0),
    ("train.lr", -0.01),
    ("train.ema_decay", 1),
    ("train.ema_decay", 0),
    ("train.ema_ramp", 0),
    # strides and schedule
    ("model.strides", [4, 8, 16, 32, 64]),
    ("model.strides", [8, 16]),
    ("model.strides", [8, 16, 33, 64, 128]),
    ("model.strides", [8, 16, 32, 64, 128, 256, 512, 1024]),
    ("model.strides", [16, 8, 32]),
    ("train.milestones", [11, 8]),
    ("train.milestones", [8, 8]),
    ("train.milestones", [0, 8]),
    # choices, paths, types
    ("model.backbone", "vgg16"),
    ("model.loss", "focal"),
    ("device", "gpu"),
    ("device", "cuda:x"),
    ("work_dir", ""),
    ("data.train_ann", " "),
    ("train.pretrained", ""),
    ("train.scale_lr", "maybe"),
]


def _text(value) -> str:
    """The value as typed after `--set a.b=`."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _nested(path: str, value) -> dict:
    *sections, name = path.split(".")
    data = {name: value}
    for section in reversed(sections):
        data = {section: data}
    return data


def _check_message(message: str, path: str) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{path}="), message  # the field and the bad value ...
    assert "must be" in message or "expected" in message, message  # ... and what is allowed


@pytest.mark.parametrize("path, value", BAD_VALUES, ids=lambda v: str(v))
def test_refused_from_set_with_the_field_named(path, value):
    with pytest.raises(ConfigError) as e:
        apply_override(Config(), f"{path}={_text(value)}")
    _check_message(str(e.value), path)


@pytest.mark.parametrize("path, value", BAD_VALUES, ids=lambda v: str(v))
def test_refused_from_a_config_file_with_the_file_and_field_named(tmp_path, path, value):
    file = tmp_path / "c.json"
    file.write_text(json.dumps(_nested(path, value)))  # NaN / Infinity as Python's json writes
    with pytest.raises(ConfigError) as e:
        load_config(file)
    prefix = f"{file}: "
    assert str(e.value).startswith(prefix)
    _check_message(str(e.value)[len(prefix) :], path)


@pytest.mark.parametrize(
    "path, value", [c for c in BAD_VALUES if c[0].startswith("model.")], ids=lambda v: str(v)
)
def test_refused_from_a_checkpoint_header(path, value):
    header = json.loads(json.dumps({path.split(".", 1)[1]: value}))
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, header, "w.safetensors: config")
    assert str(e.value).startswith("w.safetensors: config: ")
    _check_message(str(e.value).removeprefix("w.safetensors: config: "), path)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-1"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--device", "gpu"], "--device"),
        (["--work-dir", ""], "--work-dir"),
        (["--train-ann", ""], "--train-ann"),
        (["--pretrained", ""], "--pretrained"),
    ],
)
def test_train_flags_refused_with_the_option_named(capsys, argv, option):
    assert main(["train", "--train-ann", "a.json", "--train-images", "i", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {option}: " in err, err


def test_set_errors_name_the_assignment(capsys):
    assert main(["train", "--set", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: --set train.lrr=0.1: no field 'train.lrr'; did you mean "
                        "'train.lr'? (`freeanchor config` lists every field)")  # fmt: skip


def test_every_field_has_a_meaning_and_numbers_a_range():
    """So no field is added without its meaning, and no number without its allowed range."""
    no_range = {"mean"}  # any 3 finite values are a valid mean
    for section in (ModelConfig, DataConfig, TrainConfig, Config):
        for f in dataclasses.fields(section):
            tp = field_types(section)[f.name]
            if dataclasses.is_dataclass(tp):
                continue
            assert f.metadata["meaning"].strip(), f.name
            numeric = tp in (int, float) or (
                typing.get_origin(tp) is tuple and typing.get_args(tp)[0] in (int, float)
            )
            if numeric and f.name not in no_range:
                assert f.metadata["rule"] is not None, f"{section.section}.{f.name} has no rule"


def test_good_values_at_the_edges_are_accepted():
    for assignment in ["model.strides=8,16,32", "model.strides=8,16,32,64,128,256,512",
                       "model.stacked_convs=0", "model.nms_pre=0", "model.frozen_stages=-1",
                       "model.score_thr=0", "model.nms_iou=1", "train.grad_clip=0",
                       "train.milestones=", "train.milestones=1,2,30", "train.warmup_ratio=1",
                       "model.input_scale=8192,8192", "device=cuda:3", "device=cpu",
                       "train.seed=4294967295", "data.workers=0", "model.alpha=0",
                       "model.num_classes=10000"]:  # fmt: skip
        cfg = Config()
        apply_override(cfg, assignment)
        path, text = assignment.split("=")
        section, _, name = path.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        assert _text(list(value) if isinstance(value, tuple) else value) == text or (
            float(text) == value
        )


def test_set_errors_name_the_value_once(capsys):
    assert main(["train", "--set", "model.size_divisor=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "freeanchor train: error: --set model.size_divisor=0: must be 1 to 512"
