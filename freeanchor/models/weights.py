"""Checkpoint I/O: our safetensors format, MMDetection's released `.pth` files, the model zoo.

Our format is one safetensors file: the model's state_dict, with the ModelConfig (class names
included), optional `extra` metadata as JSON strings and a checksum of the tensors
(freeanchor/checksum.py) in the safetensors header, so the weights and what they mean cannot
drift apart and a corrupt file is refused. Written atomically. Files without a checksum (ours
from before, MMDetection's releases) still load.

`load_model` also reads (detected from the file, not the name):
- MMDetection checkpoints `{"meta", "state_dict"}` (names `backbone.*`, `neck.*`,
  `bbox_head.*`; the architecture is inferred from the keys and shapes),
- our engine's training checkpoints `{"model": state_dict, "config": {...}}` (the EMA weights
  when the run kept an EMA: those are the ones it evaluated),
- bare state_dicts in either naming.
Every key must be accounted for: a missing, unexpected or mis-shaped one is an error naming it
and the file. `torch.load` always runs with `weights_only=True`.

Reading returns data (`read_checkpoint` -> `Checkpoint`: config, state_dict in our key names,
extra); the detector builds itself from it (`FreeAnchor.from_checkpoint`). `load_model` is the
two together. Downloads and the zoo live in `zoo.py`.

    freeanchor convert retinanet_free_anchor_r50_fpn_1x_coco_20200130-0f67375f.pth r50.safetensors
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freeanchor.checksum import digest
from freeanchor.config import COCO_CLASSES, ModelConfig, from_dict, preset, to_dict
from freeanchor.errors import CheckpointError, FreeAnchorError, MissingFileError
from freeanchor.files import write_bytes
from freeanchor.models.detector import FreeAnchor
from freeanchor.models.zoo import ZOO, download, first_line

__all__ = [
    "Checkpoint", "CheckpointError", "ZOO", "download", "from_mmdet_key", "load_model",
    "read_checkpoint", "run_convert", "save_model", "to_mmdet_key",
]  # fmt: skip

FORMAT = "freeanchor"
FORMAT_VERSION = "1"

# ----------------------------------------------------------------------------- key names

_WRAPPED = re.compile(r"^(lateral_convs|fpn_convs|cls_convs|reg_convs)\.(\d+)\.conv\.(.+)$")
_PLAIN = re.compile(r"^(lateral_convs|fpn_convs|cls_convs|reg_convs)\.(\d+)\.([^.]+)$")
_PREFIXES = (("backbone.", "backbone."), ("neck.", "fpn."), ("bbox_head.", "head."))


def from_mmdet_key(key: str) -> str | None:
    """Our name for an MMDetection state_dict key, or None if it has no counterpart.

    `neck.fpn_convs.3.conv.weight` -> `fpn.fpn_convs.3.weight`; backbone names are the same.
    """
    for theirs, ours in _PREFIXES:
        if key.startswith(theirs):
            rest = key[len(theirs) :]
            if theirs != "backbone.":
                rest = _WRAPPED.sub(r"\1.\2.\3", rest)
            return ours + rest
    return None


def to_mmdet_key(key: str) -> str:
    """MMDetection's name for one of our state_dict keys (inverse of `from_mmdet_key`)."""
    for theirs, ours in _PREFIXES:
        if key.startswith(ours):
            rest = key[len(ours) :]
            if ours != "backbone.":
                rest = _PLAIN.sub(r"\1.\2.conv.\3", rest)
            return theirs + rest
    return key


# ----------------------------------------------------------------------------- saving


def save_model(model: FreeAnchor, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the model as safetensors with its config (and `extra`, JSON-able) in the header."""
    path = Path(path)
    extra = dict(model.extra if extra is None else extra)
    try:
        extra_json = json.dumps(extra)
    except TypeError as e:
        raise CheckpointError(f"{path}: extra metadata is not JSON-serialisable ({e})") from None
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(to_dict(model.cfg)),
        "extra": extra_json,
        "checksum": digest(state),
    }
    # Serialised in memory, written by Python: a full disk is one line (files.py), not a
    # safetensors error from a half-written file.
    write_bytes(path, save(state, metadata=metadata))
    return path


# ----------------------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    """What a checkpoint file holds, read and validated as far as the file alone allows.

    Attributes:
        cfg: the model config (from the file, or inferred from MMDetection keys and shapes).
        state: the state_dict in our key names.
        extra: plain metadata (e.g. the dataset's "cat_ids").
        path: the file, for messages.
    """

    cfg: ModelConfig
    state: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path = Path("?")
    spell: Callable[[str], str] = str  # our key -> the file's spelling, for messages
    unmapped: list[str] = field(default_factory=list)  # file keys with no counterpart

    def check_keys(self, expected: dict[str, Tensor]) -> None:
        """Raise `CheckpointError` naming the first missing, unexpected or mis-shaped keys."""
        missing = [self.spell(k) for k in expected if k not in self.state]
        unexpected = self.unmapped + [self.spell(k) for k in self.state if k not in expected]
        if missing or unexpected:
            what = [f"missing key {k!r}" for k in missing[:3]]
            what += [f"unexpected key {k!r}" for k in unexpected[:3]]
            n = len(missing) + len(unexpected)
            more = f" ({n} mismatched keys in all)" if n > len(what) else ""
            raise CheckpointError(f"{self.path}: {'; '.join(what)}{more}")
        for k, v in expected.items():
            if tuple(self.state[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"{self.path}: key {self.spell(k)!r} has shape {list(self.state[k].shape)}, "
                    f"the model ({self.cfg.backbone}, {self.cfg.num_classes} classes) needs "
                    f"{list(v.shape)}"
                )


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint (see the module docstring) into a `Checkpoint`.

    Args:
        path: a local file (our safetensors, an MMDetection `.pth`, an engine checkpoint), an
            http(s) URL (downloaded into the torch hub cache), or a zoo name (see `ZOO`,
            downloaded on demand with a sha256-prefix check).

    Raises:
        MissingFileError: no such file. CheckpointError: anything else wrong with it.
    """
    name = str(path)
    base_cfg = None
    if name in ZOO:
        url, prefix, preset_name = ZOO[name]
        path, base_cfg = download(url, prefix), preset(preset_name)
    elif name.startswith(("http://", "https://")):
        path = download(name)
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: checkpoint not found (zoo names: {', '.join(ZOO)})")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_torch_object(_torch_load(path), path, base_cfg)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> FreeAnchor:
    """A FreeAnchor model, in eval mode, from a checkpoint (`read_checkpoint`'s sources)."""
    return FreeAnchor.from_checkpoint(read_checkpoint(path)).to(device).eval()


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length and a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[:2] == b"PK" or head[:1] == b"\x80":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= path.stat().st_size


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects that torch.load(weights_only=True) does "
            f"not allow; only tensors and plain containers are loaded ({first_line(e)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from None


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({first_line(e)})"
        ) from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without a freeanchor config header")
    try:
        cfg_dict = json.loads(meta["config"])
        extra = json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt config in the header ({e})") from None
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: extra metadata in the header is not a JSON object")
    if "checksum" in meta and meta["checksum"] != digest(state):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    return Checkpoint(_config(cfg_dict, path), state, extra, path)


def _config(cfg_dict: Any, path: Path) -> ModelConfig:
    try:
        return from_dict(ModelConfig, cfg_dict, f"{path}: config")
    except FreeAnchorError:
        raise
    except ValueError as e:  # a config error of another type still names the file
        raise CheckpointError(str(e).splitlines()[0]) from None


def _read_torch_object(obj: Any, path: Path, base_cfg: ModelConfig | None) -> Checkpoint:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict):
        # Our engine's training checkpoint: {"model": state_dict, "config": Config or Model}.
        if "checksum" in obj and obj["checksum"] != digest(
            {k: v for k, v in obj.items() if k != "checksum"}
        ):
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
        cfg_dict = obj["config"]
        if isinstance(cfg_dict.get("model"), dict):
            cfg_dict = cfg_dict["model"]
        ema = obj.get("ema")
        weights = ema["model"] if isinstance(ema, dict) and isinstance(ema.get("model"), dict) \
            else obj["model"]  # fmt: skip
        state = {k.removeprefix("module."): v for k, v in weights.items()}
        if obj.get("extra") is not None and not isinstance(obj["extra"], dict):
            raise CheckpointError(f"{path}: 'extra' is a {type(obj['extra']).__name__}, "
                                  "expected a mapping")  # fmt: skip
        extra = dict(obj.get("extra") or {})
        return Checkpoint(_config(cfg_dict, path), state, extra, path)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: not a FreeAnchor checkpoint (top-level keys {sorted(map(str, obj))[:6]})"
        )
    if any(k.startswith(("fpn.", "head.")) for k in state):  # a bare state_dict in our names
        state = {to_mmdet_key(k): v for k, v in state.items()}
    cfg = _infer_mmdet_config(state, meta, path, base_cfg)
    ours = {from_mmdet_key(k): v for k, v in state.items() if from_mmdet_key(k) is not None}
    unmapped = [k for k in state if from_mmdet_key(k) is None]
    return Checkpoint(cfg, ours, {}, path, to_mmdet_key, unmapped)


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """Number of distinct `prefix<i>.` children, e.g. blocks of `backbone.layer3.`."""
    ids = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return len({i for i in ids if i.isdigit()})


def _infer_mmdet_config(
    state: dict[str, Tensor], meta: dict, path: Path, base: ModelConfig | None
) -> ModelConfig:
    """ModelConfig of an MMDetection RetinaNet-style state_dict, from key names and shapes."""
    for key in ("backbone.layer1.0.conv1.weight", "bbox_head.retina_cls.weight",
                "bbox_head.retina_reg.weight", "neck.lateral_convs.0.conv.weight"):  # fmt: skip
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r} (not an MMDetection ResNet "
                                  "RetinaNet/FreeAnchor checkpoint)")  # fmt: skip
    blocks = tuple(_count(state, f"backbone.layer{i}.") for i in range(1, 5))
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    conv2 = state["backbone.layer1.0.conv2.weight"].shape
    groups = conv2[0] // conv2[1]
    arch = {
        (False, (2, 2, 2, 2), 1, 64): "resnet18",
        (False, (3, 4, 6, 3), 1, 64): "resnet34",
        (True, (3, 4, 6, 3), 1, 64): "resnet50",
        (True, (3, 4, 23, 3), 1, 64): "resnet101",
        (True, (3, 4, 23, 3), 32, 128): "resnext101_32x4d",
    }.get((bottleneck, blocks, groups, conv2[0]))
    if arch is None:
        raise CheckpointError(
            f"{path}: unsupported backbone (blocks per stage {list(blocks)}, "
            f"{'bottleneck' if bottleneck else 'basic'} blocks, {groups} groups, "
            f"layer1 width {conv2[0]})"
        )
    num_anchors = state["bbox_head.retina_reg.weight"].shape[0] // 4
    num_classes, rest = divmod(state["bbox_head.retina_cls.weight"].shape[0], num_anchors)
    if rest:
        raise CheckpointError(f"{path}: retina_cls has {num_classes * num_anchors + rest} "
                              f"channels, not a multiple of {num_anchors} anchors")  # fmt: skip
    classes = meta.get("CLASSES")
    if classes is None and isinstance(meta.get("dataset_meta"), dict):
        classes = meta["dataset_meta"].get("classes")
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(classes) != num_classes:
            raise CheckpointError(
                f"{path}: meta lists {len(classes)} class names, the head has {num_classes}"
            )
    elif num_classes == len(COCO_CLASSES):
        classes = list(COCO_CLASSES)
    cfg = base if base is not None else ModelConfig(backbone=arch, num_classes=num_classes)
    if (cfg.backbone, cfg.num_classes) != (arch, num_classes):
        raise CheckpointError(
            f"{path}: holds a {arch} model with {num_classes} classes, expected "
            f"{cfg.backbone} with {cfg.num_classes}"
        )
    cfg.classes = classes
    cfg.fpn_channels = int(state["neck.lateral_convs.0.conv.weight"].shape[0])
    cfg.stacked_convs = _count(state, "bbox_head.cls_convs.")
    if cfg.stacked_convs:
        cfg.feat_channels = int(state["bbox_head.cls_convs.0.conv.weight"].shape[0])
    return cfg


# ----------------------------------------------------------------------------- CLI


def run_convert(args) -> int:
    """`freeanchor convert SRC DST`: any supported checkpoint -> our safetensors format."""
    model = load_model(args.src)
    extra = dict(model.extra)
    extra.setdefault("source", Path(str(args.src)).name)
    out = save_model(model, args.dst, extra=extra)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {out}: {model.cfg.backbone}, {model.cfg.num_classes} classes, "
        f"{len(model.state_dict())} tensors, {n:,} parameters, "
        f"{out.stat().st_size / 1e6:.1f} MB"
    )
    return 0
