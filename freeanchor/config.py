"""Typed configuration: dataclasses, the named presets, JSON round trip and `a.b=value` overrides.

Presets are plain Python functions named after MMDetection's seed configs; nothing is looked
up by a string type. `Config` bundles the parts a run needs. Each field is declared as
`setting(default, meaning, rule)`: its one-line meaning (printed by `freeanchor config`) and
the values it accepts sit beside it, and every assignment is checked (config_rules.py), so a
config read from a file, a checkpoint header, `--set` or built in Python is valid once built.
Sizes are bounded so that no header makes us allocate what no real model needs
(config_bounds.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from freeanchor import config_bounds as bounds
from freeanchor.config_fields import Section, build, field_types, locate, parse_text, read_json_file
from freeanchor.config_rules import (
    AT_LEAST_0,
    AT_LEAST_1,
    INCREASING,
    NON_EMPTY,
    OPEN_UNIT,
    POSITIVE,
    UNIT,
    Rule,
    between,
    did_you_mean,
    each,
    setting,
)
from freeanchor.errors import ConfigError, OptionError

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# resnet10: ResNet-18 with one block per stage, for training from scratch (no ImageNet weights).
Backbone = Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101",
                   "resnext101_32x4d", "mobilenet_v2"]  # fmt: skip
BACKBONES: tuple[str, ...] = typing.get_args(Backbone)
RGB = tuple[float, float, float]

# Rules used by several fields (the bounds and their reasons: config_bounds.py).
CHANNELS, SIDE = between(1, bounds.MAX_CHANNELS), between(1, bounds.MAX_SIDE)
IOU, SCORE = between(0.0, 1.0, lo_open=True), between(0.0, 1.0, hi_open=True)
PATH = NON_EMPTY
# The backbone gives C3-C5 (strides 8, 16, 32); every extra FPN level halves the previous one.
STRIDES = Rule(
    f"8, 16, 32, then x2 per extra level (3 to {bounds.MAX_LEVELS} levels)",
    lambda v: 3 <= len(v) <= bounds.MAX_LEVELS and all(s == 8 * 2**i for i, s in enumerate(v)),
)
DEVICE = Rule("auto, cpu, cuda or cuda:N", lambda s: re.fullmatch(r"auto|cpu|cuda(:\d+)?", s))


@dataclass
class ModelConfig(Section):
    """Architecture, loss and test-time settings (MMDetection names where one exists)."""

    section: ClassVar[str] = "model"
    backbone: Backbone = setting("resnet50", "backbone network (ImageNet-style, gives C3-C5)")
    num_classes: int = setting(
        80, "foreground classes, no background", between(1, bounds.MAX_CLASSES)
    )
    classes: list[str] | None = setting(None, "num_classes names, index = label; none: class_<i>")
    frozen_stages: int = setting(1, "stem + layer1..k frozen (0, -1: none)", between(-1, 4))
    norm_eval: bool = setting(True, "keep every backbone BatchNorm in eval mode")
    fpn_channels: int = setting(256, "channels of every FPN level", CHANNELS)
    stacked_convs: int = setting(
        4, "3x3 convs per head tower", between(0, bounds.MAX_STACKED_CONVS)
    )
    feat_channels: int = setting(256, "channels of the head towers", CHANNELS)
    prior_prob: float = setting(0.01, "initial foreground probability", OPEN_UNIT)
    # anchors
    strides: tuple[int, ...] = setting((8, 16, 32, 64, 128), "stride per level P3..", STRIDES)
    octave_base_scale: float = setting(4.0, "smallest anchor size, in strides", POSITIVE)
    scales_per_octave: int = setting(3, "anchor sizes per level, 2**(1/n) apart", between(1, 9))
    ratios: tuple[float, ...] = setting(
        (0.5, 1.0, 2.0), "anchor aspect ratios h/w", each(POSITIVE, (1, 9))
    )
    # box coder
    target_stds: tuple[float, float, float, float] = setting(
        (0.1, 0.1, 0.2, 0.2), "std of the box deltas dx, dy, dw, dh", each(POSITIVE)
    )
    # loss
    loss: Literal["freeanchor", "retinanet"] = setting(
        "freeanchor", "training loss: learned matching (freeanchor) or IoU matching"
    )
    pre_anchor_topk: int = setting(50, "anchors in each object's bag (n)", AT_LEAST_1)
    bbox_thr: float = setting(0.6, "IoU of the saturated-linear box likelihood (t)", OPEN_UNIT)
    gamma: float = setting(2.0, "focal exponent of the negative term", AT_LEAST_0)
    alpha: float = setting(0.5, "weight of the positive term (1 - alpha: negative)", UNIT)
    beta: float = setting(0.11, "SmoothL1 beta of the box likelihood", POSITIVE)
    bbox_weight: float = setting(0.75, "box likelihood exp(-w * SmoothL1): w", AT_LEAST_0)
    # test-time post-processing
    nms_pre: int = setting(1000, "best boxes per level kept before NMS (0: all)", AT_LEAST_0)
    score_thr: float = setting(0.05, "smallest score kept at test time", SCORE)
    nms_iou: float = setting(0.5, "IoU above which NMS drops a box", IOU)
    max_per_img: int = setting(100, "detections kept per image", AT_LEAST_1)
    # preprocessing: keep-ratio resize to fit (long, short) = input_scale, pad to size_divisor
    input_scale: tuple[int, int] = setting((1333, 800), "resize to fit (long, short)", each(SIDE))
    size_divisor: int = setting(32, "pad the input to a multiple of this", between(1, 512))
    mean: RGB = setting((123.675, 116.28, 103.53), "RGB mean subtracted (0-255 pixels)")
    std: RGB = setting((58.395, 57.12, 57.375), "RGB std divided by", each(POSITIVE))

    def check(self) -> None:
        if self.classes is not None and len(self.classes) != self.num_classes:
            n, k = len(self.classes), self.num_classes
            raise ConfigError(f"model.classes: {n} names for model.num_classes={k}")
        bounds.check_model_bounds(self)

    def class_names(self) -> list[str]:
        if self.classes:
            return list(self.classes)
        return [f"class_{i}" for i in range(self.num_classes)]


@dataclass
class DataConfig(Section):
    """Where the data is and how it is augmented."""

    section: ClassVar[str] = "data"
    train_ann: str | None = setting(None, "training annotations (COCO JSON)", PATH)
    train_images: str | None = setting(None, "folder of the training images", PATH)
    val_ann: str | None = setting(None, "validation annotations (COCO JSON)", PATH)
    val_images: str | None = setting(None, "folder of the validation images", PATH)
    flip_prob: float = setting(0.5, "probability of a horizontal flip in training", UNIT)
    multiscale_short: tuple[int, ...] = setting(
        (), "short sides to sample in training (long: model.input_scale[0]); () off", each(SIDE)
    )
    min_size: int = setting(32, "training images with a side below this are dropped", AT_LEAST_0)
    workers: int = setting(2, "data loading processes (0: in the main process)", between(0, 64))
    max_bad_images: int = setting(100, "unreadable images skipped before a stop", AT_LEAST_0)
    max_image_pixels: int = setting(
        89_478_485, "larger images are refused (Pillow's limit)", AT_LEAST_1
    )
    allow_outside_root: bool = setting(False, "allow annotation image paths outside the folder")


@dataclass
class TrainConfig(Section):
    """The MMDetection 1x recipe (spec 3.2); lr is for `base_batch_size` and scaled linearly."""

    section: ClassVar[str] = "train"
    epochs: int = setting(12, "training epochs", AT_LEAST_1)
    batch_size: int = setting(2, "images per process and step", AT_LEAST_1)
    lr: float = setting(0.01, "learning rate for base_batch_size images", POSITIVE)
    base_batch_size: int = setting(16, "global batch that lr is for", AT_LEAST_1)
    scale_lr: bool = setting(True, "lr x global batch / base_batch_size (linear scaling)")
    optimizer: Literal["sgd", "adamw"] = setting(
        "sgd", "sgd is the recipe; adamw learns faster from scratch (lr ~1e-3)"
    )
    momentum: float = setting(0.9, "SGD momentum", between(0.0, 1.0, hi_open=True))
    weight_decay: float = setting(1e-4, "L2 weight decay (decoupled for adamw)", AT_LEAST_0)
    warmup_iters: int = setting(500, "iterations of linear lr warm-up (0: none)", AT_LEAST_0)
    warmup_ratio: float = setting(0.001, "lr factor at the first warm-up iteration", UNIT)
    milestones: tuple[int, ...] = setting(
        (8, 11), "epochs after which lr *= lr_gamma (one >= epochs is never reached)", INCREASING
    )
    lr_gamma: float = setting(0.1, "lr factor at each milestone", IOU)
    grad_clip: float = setting(35.0, "max L2 norm of the gradient (0: off)", AT_LEAST_0)
    amp: Literal["off", "bf16", "fp16"] = setting("off", "mixed precision (fp16: loss scaled)")
    channels_last: bool = setting(False, "channels-last memory format (faster on tensor cores)")
    normalize: Literal["local", "global"] = setting(
        "local", "loss normaliser: per imgs_per_gpu images (local, the reference) or per batch"
    )
    imgs_per_gpu: int = setting(2, "chunk size of the local normaliser", AT_LEAST_1)
    max_bad_steps: int = setting(10, "non-finite steps in a row before a stop", AT_LEAST_1)
    max_iters: int = setting(0, "stop after this many iterations in all (0: none)", AT_LEAST_0)
    eval_every: int = setting(1, "epochs between evaluations (0: only at the end)", AT_LEAST_0)
    checkpoint_every: int = setting(1, "epochs between epoch_N.pt files (0: none)", AT_LEAST_0)
    keep_checkpoints: int = setting(0, "keep the last k epoch_N.pt files (0: all)", AT_LEAST_0)
    seed: int = setting(0, "random seed", between(0, 2**32 - 1))  # numpy's range
    deterministic: bool = setting(False, "deterministic algorithms (slower)")
    pretrained: str | None = setting(None, "backbone weights: a file, a URL or torchvision", PATH)
    log_every: int = setting(20, "iterations between log lines", AT_LEAST_1)
    checkpoint_iters: int = setting(0, "also write last.pt every N iterations (0: off)", AT_LEAST_0)
    ema: bool = setting(False, "keep an exponential moving average of the weights")
    ema_decay: float = setting(0.9998, "EMA decay per iteration", OPEN_UNIT)
    ema_ramp: int = setting(
        2000, "iterations over which the EMA decay ramps up (YOLOX: 2000)", AT_LEAST_1
    )


@dataclass
class Config(Section):
    """A run: model, data, training, where its outputs go and on which device."""

    section: ClassVar[str] = ""
    model: ModelConfig = setting(None, "", factory=ModelConfig)
    data: DataConfig = setting(None, "", factory=DataConfig)
    train: TrainConfig = setting(None, "", factory=TrainConfig)
    work_dir: str = setting("work_dirs/run", "folder of the run's outputs", PATH)
    device: str = setting("auto", "where to run (auto: a GPU if there is one)", DEVICE)

    def check(self) -> None:
        for part in (self.model, self.data, self.train):
            part.check()


# ----------------------------------------------------------------------------- presets


def freeanchor_r50_fpn_1x_coco(num_classes: int = 80) -> ModelConfig:
    return ModelConfig(backbone="resnet50", num_classes=num_classes)


def freeanchor_r101_fpn_1x_coco(num_classes: int = 80) -> ModelConfig:
    return ModelConfig(backbone="resnet101", num_classes=num_classes)


def freeanchor_x101_32x4d_fpn_1x_coco(num_classes: int = 80) -> ModelConfig:
    return ModelConfig(backbone="resnext101_32x4d", num_classes=num_classes)


def freeanchor_r18_fpn_1x(num_classes: int = 80) -> ModelConfig:
    return ModelConfig(backbone="resnet18", num_classes=num_classes)


def freeanchor_mobilenetv2_fpn_1x(num_classes: int = 80) -> ModelConfig:
    # MobileNetV2's BN is folded into its convs in the shared weights; keep every BN frozen.
    return ModelConfig(backbone="mobilenet_v2", num_classes=num_classes)


DEFAULT_MODEL = "freeanchor_r50_fpn_1x_coco"
PRESETS = {
    "freeanchor_r50_fpn_1x_coco": freeanchor_r50_fpn_1x_coco,
    "freeanchor_r101_fpn_1x_coco": freeanchor_r101_fpn_1x_coco,
    "freeanchor_x101-32x4d_fpn_1x_coco": freeanchor_x101_32x4d_fpn_1x_coco,
    "freeanchor_r18_fpn_1x": freeanchor_r18_fpn_1x,
    "freeanchor_mobilenetv2_fpn_1x": freeanchor_mobilenetv2_fpn_1x,
}


def preset(name: str, num_classes: int = 80) -> ModelConfig:
    """The ModelConfig of a named preset (see PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown model {name!r}{did_you_mean(name, PRESETS)} (presets: {', '.join(PRESETS)})"
        )
    cfg = PRESETS[name](num_classes)
    if num_classes == 80:
        cfg.classes = list(COCO_CLASSES)
    return cfg


# ----------------------------------------------------------------------------- (de)serialisation

MAX_CONFIG_BYTES = 16 * 2**20  # a config with 10k class names is ~0.2 MB


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: Any, where: str | None = None) -> Any:
    """Build config dataclass `cls` from a dict (a JSON file, a checkpoint header), checking
    every key, type and rule. `where` (e.g. the file) starts every error message."""
    try:
        return build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def set_value(cfg: Config, path: str, value: Any) -> None:
    """Set field `path` (`train.lr`) of `cfg` to a Python value, checked."""
    target, name = locate(cfg, path)
    setattr(target, name, value)


def apply_override(cfg: Config, assignment: str, check: bool = True) -> None:
    """Apply one `a.b=value` override in place, checked against the field's type and rule.

    `check`: also run the rules that span fields (skip it between overrides applied together,
    then call `validate`).
    """
    if "=" not in assignment:
        raise ConfigError(f"{assignment!r} is not of the form section.field=value")
    path, text = assignment.split("=", 1)
    target, name = locate(cfg, path)
    value = parse_text(field_types(type(target))[name], text, path.strip())
    setattr(target, name, value)
    if check:
        validate(cfg)


def validate(cfg: Any) -> None:
    """Run the rules that span fields (classes vs num_classes, model size bounds, ...).

    Every single field is already checked when assigned; call this after assigning fields
    one by one (as a loader that infers a config from a state dict does).
    """
    cfg.check()


def resolve_config(
    base: Config | None = None,
    model: str | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """A run's Config: `base` (else the defaults with preset `model` or DEFAULT_MODEL), then
    preset `model` replacing base's model, then `flags` ({option: (field path, value)}; None
    values skipped), then every `--set` override in order; validated as a whole at the end.
    """
    if base is None:
        cfg = Config(model=preset(model or DEFAULT_MODEL))
    else:
        cfg = base
        if model:
            cfg.model = preset(model)
    for option, (path, value) in (flags or {}).items():
        if value is not None:
            try:
                set_value(cfg, path, value)
            except ConfigError as e:
                raise OptionError(f"{option}: {e}") from None
    for assignment in overrides:
        try:
            apply_override(cfg, assignment, check=False)
        except ConfigError as e:
            path = assignment.split("=", 1)[0].strip()
            names_it = str(e).startswith(f"{path}=")  # "train.lr=nan: expected ..."
            raise ConfigError(f"--set {e}" if names_it else f"--set {assignment}: {e}") from None
    validate(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as JSON, atomically."""
    from freeanchor.files import write_json

    write_json(path, to_dict(cfg))


def load_config(path: str | Path) -> Config:
    """The Config in JSON file `path`; every problem is one line naming the file."""
    data = read_json_file(Path(path), MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}: expected a JSON object (model, data, train, ...), got {kind}")
    return from_dict(Config, data, str(path))
