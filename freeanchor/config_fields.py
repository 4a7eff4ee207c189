"""Typed config fields: reading values from JSON or the command line, checked on assignment.

A value is converted to its field's annotated type (strictly: no strings for numbers, no NaN or
infinity, choices from `Literal[...]`) and checked against the field's rule (config_rules.py)
whenever it is assigned, construction included (`Section`). So a config is validated where it
is parsed: a JSON file, a checkpoint header, `--set a.b=value` or Python code.

A refusal is a `ConfigError` whose one-line message names the field, the value and what is
allowed, e.g. `train.lr=nan: expected a finite number`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from freeanchor.config_rules import did_you_mean, show
from freeanchor.errors import ConfigError, MissingFileError

# ----------------------------------------------------------------------------- types


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (they are strings in the source)."""
    return typing.get_type_hints(cls)


def describe_type(tp: Any) -> str:
    """What the type reads as in messages: 'an integer', 'one of off, bf16, fp16', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        inner = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(inner) + " or null"
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{len(args)} {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a finite number", bool: "true or false",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))  # fmt: skip


def convert(tp: Any, value: Any, name: str) -> Any:
    """`value` (Python or JSON) as type `tp`, strictly: no strings for numbers, no NaN/inf.

    Lists become tuples for tuple fields and ints become floats for float fields; anything
    else of the wrong type is a ConfigError naming `name`.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def refuse(extra: str = "") -> ConfigError:
        return ConfigError(f"{name}={show(value)}: expected {describe_type(tp)}{extra}")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        if value is None:
            raise refuse()
        return convert(inner, value, name)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise refuse(did_you_mean(str(value), map(str, args)))
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise refuse()
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise refuse(f", got {len(value)} values")
        items = [convert(args[0], v, name) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise refuse()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse()
        if not math.isfinite(value):
            raise refuse()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise refuse()
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise ConfigError(f"{name}: expected a {tp.__name__} section, got {show(value)}")
        return value
    raise TypeError(f"{name}: config fields of type {tp} are not supported")  # our bug


def parse_text(tp: Any, text: str, name: str) -> Any:
    """A command-line string (`--set a.b=TEXT`) read as a value of type `tp` (not yet checked).

    Numbers as Python writes them, booleans as true/false/yes/no/on/off/1/0, lists as
    comma-separated items (brackets optional, empty for an empty list), none/null for None.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = text.strip()
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_text(inner, text, name)
    if origin in (tuple, list):
        items = [t.strip() for t in text.strip("()[]").split(",")]
        return [parse_text(args[0], t, name) for t in items if t]
    if tp is bool:
        words = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}  # fmt: skip
        if text.lower() not in words:
            raise ConfigError(f"{name}={show(text)}: expected true or false")
        return words[text.lower()]
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{name}={show(text)}: expected {describe_type(tp)}") from None
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{name} is a section: set one of its fields, e.g. {name}.<field>=...")
    return text


def check_field(obj: Any, name: str, value: Any, path: str) -> Any:
    """`value` converted to field `name` of `obj`'s dataclass and checked against its rule."""
    f = obj.__dataclass_fields__[name]
    value = convert(field_types(type(obj))[name], value, path)
    rule = f.metadata.get("rule")
    if rule is not None and value is not None and not rule.ok(value):
        raise ConfigError(f"{path}={show(value)}: must be {rule.text}")
    return value


# ----------------------------------------------------------------------------- sections


class Section:
    """Base of the config dataclasses: every field assignment (construction included) is
    checked by `check_field`; rules that span fields (`check`) run after construction and
    in `config.validate`. `section` names the part of `Config` in messages ("model", ...).
    """

    section: ClassVar[str] = ""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dataclass_fields__:
            value = check_field(self, name, value, dotted(self.section, name))
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Rules that involve more than one field (none by default)."""


def dotted(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def field_paths(cls: type) -> list[str]:
    """Every field's dotted name (`train.lr`) of a config dataclass, sections expanded."""
    out = []
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        out += field_paths(tp) if dataclasses.is_dataclass(tp) else [dotted(cls.section, f.name)]
    return out


# Other tools' names for the image size (Ultralytics, MMDetection, torchvision): not close in
# spelling to input_scale, so difflib alone would not find it.
_SIZE_NAMES = {"imgsz", "img_size", "image_size", "input_size", "img_scale", "scale", "size",
               "min_size", "max_size", "resolution"}  # fmt: skip


def unknown_field(path: str, known: Sequence[str]) -> ConfigError:
    """ "no field 'train.lrr'; did you mean 'train.lr'?", also across sections by the name."""
    name = path.rsplit(".", 1)[-1]
    same_name = [p for p in known if p.rsplit(".", 1)[-1] == name]  # train.input_scale
    if name.lower().replace("-", "_") in _SIZE_NAMES and "model.input_scale" in known:
        hint = "; did you mean 'model.input_scale' (LONG,SHORT; the --imgsz flag sets it)?"
    elif same_name:
        hint = f"; did you mean {' or '.join(map(repr, same_name))}?"
    else:
        hint = did_you_mean(path, known)
    return ConfigError(f"no field {path!r}{hint} (`freeanchor config` lists every field)")


def build(cls: type, data: Any) -> Any:
    """Config dataclass `cls` from a mapping (sections: nested mappings), checked."""
    if not isinstance(data, Mapping):
        what = cls.section or "config"
        raise ConfigError(f"{what}: expected a mapping of fields, got {type(data).__name__}")
    hints = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in cls.__dataclass_fields__:
            own = [dotted(cls.section, name) for name in cls.__dataclass_fields__]
            raise unknown_field(dotted(cls.section, str(key)), own + field_paths(cls))
        kwargs[key] = build(hints[key], value) if dataclasses.is_dataclass(hints[key]) else value
    return cls(**kwargs)


def locate(cfg: Any, path: str) -> tuple[Any, str]:
    """(section object, field name) of dotted `path` (`train.lr`) in config `cfg`."""
    *parts, name = path.strip().split(".")
    target = cfg
    for part in [*parts, None]:
        if not isinstance(target, Section) or (part or name) not in target.__dataclass_fields__:
            raise unknown_field(path.strip(), field_paths(type(cfg)))
        if part is not None:
            target = getattr(target, part)
    return target, name


def read_json_file(path: Path, max_bytes: int) -> Any:
    """The JSON value in file `path`; every problem is one line naming the file."""
    if not path.exists():
        raise MissingFileError(f"{path}: no such config file")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ConfigError(f"{path}: {kind}, not a config file")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ConfigError(f"{path}: {size:,} bytes, too large for a config (max {max_bytes:,})")
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if b"\0" in raw:
            raise UnicodeError
        text = raw.decode("utf-8")
    except UnicodeError:
        raise ConfigError(f"{path}: not a text file (expected a JSON config)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of > 4300 digits
        raise ConfigError(f"{path}: not a usable JSON config ({type(e).__name__}: {e})") from None
