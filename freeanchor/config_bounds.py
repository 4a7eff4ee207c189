"""Bounds on what a model config may ask for: no file makes us allocate what no real model needs.

A config read from a checkpoint header is untrusted data. Before anything is built, the rules
of its fields (config.py, with the bounds below) limit each size, and `check_model_bounds`
limits their combination: the values of the model's state dict and the outputs of one image's
forward pass, both computed from the config alone (no torch, nothing allocated).

Every bound is far above any released or plausible FreeAnchor / RetinaNet model; the reason for
each is written beside it.
"""

from __future__ import annotations

import math
from typing import Any

from freeanchor.errors import ConfigError

# RetinaNet/FreeAnchor FPNs and heads are 256 wide; 2048 (8x) is the widest backbone output.
MAX_CHANNELS = 2048
# RetinaNet's towers have 4 convs; no published variant of this head doubles that.
MAX_STACKED_CONVS = 8
# LVIS has 1203 classes, OpenImages 601, Objects365 365; 10k is 8x the largest of them.
MAX_CLASSES = 10_000
# Anchors per location: RetinaNet has 9 (3 scales x 3 ratios); 4x that.
MAX_ANCHORS = 36
# Input sides: COCO's recipe resizes to 1333x800; 8192 is 6x its long side (0.8 GB per image).
MAX_SIDE = 8192
# Pyramid levels: P3..P7 (5) in every released model; 7 levels reach stride 512.
MAX_LEVELS = 7
# State-dict values: the largest released FreeAnchor (X-101-32x4d) has 56M, an LVIS-size head on
# it 80M; 2**28 (268M values, 1 GiB in float32) is 4.8x the largest released model.
MAX_STATE_VALUES = 2**28
# Forward outputs of one image (network input, pyramid, head outputs; float32): a COCO-size
# image with the default head needs 0.10 GB, the largest input (8192x8192) 6.0 GiB.
MAX_IMAGE_BYTES = 16 * 2**30

# Backbone: (values in its state dict, including BatchNorm buffers; channels of C3, C4, C5).
# Counted from the torchvision definitions, as models/backbone.py builds them (a test checks).
BACKBONE_SIZES: dict[str, tuple[int, tuple[int, int, int]]] = {
    "resnet10": (4_911_564, (128, 256, 512)),
    "resnet18": (11_186_132, (128, 256, 512)),
    "resnet34": (21_301_732, (128, 256, 512)),
    "resnet50": (23_561_205, (512, 1024, 2048)),
    "resnet101": (42_605_608, (512, 1024, 2048)),
    "resnext101_32x4d": (42_266_664, (512, 1024, 2048)),
    "mobilenet_v2": (2_258_036, (32, 96, 1280)),
}


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out  # weight + bias


def estimate_state_values(cfg: Any) -> int:
    """Number of values in the state dict of the detector `cfg` (a ModelConfig) describes.

    Exact for our layout: backbone (table above) + FPN (1x1 laterals, 3x3 outputs, stride-2
    extra levels, the first on C5) + head (two towers of `stacked_convs` 3x3 convs, then the
    3x3 classification and box convs with A anchors per location).
    """
    backbone, (c3, c4, c5) = BACKBONE_SIZES[cfg.backbone]
    f, w, n = cfg.fpn_channels, cfg.feat_channels, cfg.stacked_convs
    extra = len(cfg.strides) - 3
    fpn = sum(_conv(c, f, 1) + _conv(f, f, 3) for c in (c3, c4, c5))
    fpn += (_conv(c5, f, 3) + (extra - 1) * _conv(f, f, 3)) if extra > 0 else 0
    tower = (_conv(f, w, 3) + (n - 1) * _conv(w, w, 3)) if n > 0 else 0
    last = w if n > 0 else f
    a = len(cfg.ratios) * cfg.scales_per_octave
    head = 2 * tower + _conv(last, a * cfg.num_classes, 3) + _conv(last, a * 4, 3)
    return backbone + fpn + head


def estimate_image_bytes(cfg: Any) -> int:
    """Bytes (float32) of one image's forward outputs at the largest input `cfg` allows.

    The padded network input [3, H, W] (H, W: the sides of `input_scale`, rounded up to
    `size_divisor`), the pyramid [fpn_channels, H/s, W/s] and the head outputs
    [A * (num_classes + 4), H/s, W/s] of every level s. The backbone's own activations are
    not counted: this is a lower bound of what the forward pass needs.
    """
    d = cfg.size_divisor
    h, w = (math.ceil(side / d) * d for side in cfg.input_scale)
    locations = sum(math.ceil(h / s) * math.ceil(w / s) for s in cfg.strides)
    a = len(cfg.ratios) * cfg.scales_per_octave
    return 4 * (3 * h * w + (cfg.fpn_channels + a * (cfg.num_classes + 4)) * locations)


def check_model_bounds(cfg: Any) -> None:
    """Refuse (ConfigError) a model config whose weights or per-image outputs no real model has.

    Run by every ModelConfig (construction, `from_dict`, `validate`), so a config read from a
    checkpoint header is bounded before any tensor is allocated.
    """
    a = len(cfg.ratios) * cfg.scales_per_octave
    if a > MAX_ANCHORS:
        raise ConfigError(
            f"model.ratios x model.scales_per_octave = {len(cfg.ratios)} x "
            f"{cfg.scales_per_octave} = {a} anchors per location: at most {MAX_ANCHORS}"
        )
    values = estimate_state_values(cfg)
    if values > MAX_STATE_VALUES:
        raise ConfigError(
            f"model: {values:,} weights ({cfg.backbone}, fpn_channels={cfg.fpn_channels}, "
            f"feat_channels={cfg.feat_channels}, stacked_convs={cfg.stacked_convs}, "
            f"num_classes={cfg.num_classes}): at most {MAX_STATE_VALUES:,} "
            "(no real FreeAnchor model is that large)"
        )
    image = estimate_image_bytes(cfg)
    if image > MAX_IMAGE_BYTES:
        raise ConfigError(
            f"model: input_scale={cfg.input_scale} with num_classes={cfg.num_classes} needs "
            f"{image / 2**30:.1f} GiB per image for its outputs alone: at most "
            f"{MAX_IMAGE_BYTES / 2**30:.0f} GiB"
        )
