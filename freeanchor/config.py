"""Typed configuration: dataclasses, the named presets, JSON round trip and `a.b=value` overrides.

Presets are plain Python functions named after MMDetection's seed configs; nothing is looked
up by a string type. `Config` bundles the four parts a run needs.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x4d", "mobilenet_v2")


@dataclass
class ModelConfig:
    """Architecture, loss and test-time settings (MMDetection names where one exists)."""

    backbone: str = "resnet50"  # one of BACKBONES
    num_classes: int = 80  # foreground classes, no background
    classes: list[str] | None = None  # class names, index = label; None -> "class_<i>"
    frozen_stages: int = 1  # stem + layer1 frozen, as MMDetection
    norm_eval: bool = True  # BatchNorm always in eval mode
    fpn_channels: int = 256
    stacked_convs: int = 4
    feat_channels: int = 256
    prior_prob: float = 0.01
    # anchors
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # box coder
    target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    # FreeAnchor loss
    pre_anchor_topk: int = 50
    bbox_thr: float = 0.6
    gamma: float = 2.0
    alpha: float = 0.5
    beta: float = 0.11
    bbox_weight: float = 0.75
    # test-time post-processing
    nms_pre: int = 1000
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    # preprocessing: keep-ratio resize to (long, short) = input_scale, pad to size_divisor
    input_scale: tuple[int, int] = (1333, 800)
    size_divisor: int = 32
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")

    def class_names(self) -> list[str]:
        if self.classes:
            return list(self.classes)
        return [f"class_{i}" for i in range(self.num_classes)]


@dataclass
class DataConfig:
    """Where the data is and how it is augmented."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    flip_prob: float = 0.5
    # multi-scale training: short sides to sample from (long side stays input_scale[0]); empty = off
    multiscale_short: tuple[int, ...] = ()
    min_size: int = 32  # images smaller than this are dropped from training (spec 3.1)
    workers: int = 2
    max_bad_images: int = 100  # unreadable images skipped before the run is stopped


@dataclass
class TrainConfig:
    """The MMDetection 1x recipe (spec 3.2); lr is for `base_batch_size` and scaled linearly."""

    epochs: int = 12
    batch_size: int = 2  # images per process
    lr: float = 0.01
    base_batch_size: int = 16  # linear scaling rule: lr * global_batch / base_batch_size
    scale_lr: bool = True
    optimizer: str = "sgd"  # sgd (the recipe) | adamw (faster from scratch; lr ~1e-3)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    milestones: tuple[int, ...] = (8, 11)  # epochs after which lr *= gamma
    lr_gamma: float = 0.1
    grad_clip: float = 35.0  # max L2 norm, 0 = off
    amp: str = "off"  # off | bf16 | fp16
    channels_last: bool = False
    normalize: str = "local"  # FreeAnchor loss normaliser: local (reference) | global
    imgs_per_gpu: int = 2  # chunk size of the "local" normaliser
    max_bad_steps: int = 10  # consecutive non-finite losses before stopping
    max_iters: int = 0  # stop after this many iterations in total (0 = no limit)
    eval_every: int = 1  # epochs between evaluations (0 = only at the end)
    checkpoint_every: int = 1
    seed: int = 0
    deterministic: bool = False
    pretrained: str | None = None  # backbone weights: a local path, or "torchvision" (download)
    log_every: int = 20
    checkpoint_iters: int = 0  # also write last.pt every N iterations (0 = only per epoch)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    work_dir: str = "work_dirs/run"
    device: str = "auto"  # auto | cpu | cuda | cuda:N


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
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name](num_classes)
    if num_classes == 80:
        cfg.classes = list(COCO_CLASSES)
    return cfg


# ----------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a JSON value (or a string from the command line) to the annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: cannot read {value!r} as {tp}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            value = [v.strip() for v in value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ValueError(f"{where}: expected int, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one `a.b=value` override in place, checked against the field's type."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form section.field=value")
    path, value = assignment.split("=", 1)
    parts = path.strip().split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise ValueError(f"override {assignment!r}: no config section {part!r}")
        target = getattr(target, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(target) or name not in {
        f.name for f in dataclasses.fields(target)
    }:
        raise ValueError(f"override {assignment!r}: no field {path!r}")
    hints = typing.get_type_hints(type(target))
    setattr(target, name, _coerce(hints[name], value, path))
    if hasattr(target, "__post_init__"):
        target.__post_init__()


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as JSON, atomically."""
    from freeanchor.files import write_json

    write_json(path, to_dict(cfg))


def load_config(path: str | Path) -> Config:
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return from_dict(Config, data, str(path))
