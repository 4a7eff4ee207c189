"""`freeanchor config`: the resolved config, every field with its value, default and meaning.

    freeanchor config                                        # defaults (r50 preset)
    freeanchor config --model freeanchor_r18_fpn_1x --set model.input_scale=640,384
    freeanchor config --config work_dirs/run/config.json --json > my.json  # for --config

The config is resolved as `freeanchor train` resolves it (--config, then --model, then each
--set). Meanings and allowed values come from the field declarations in config.py, so this
listing and the code cannot drift apart. Imports no torch: it answers at once.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from typing import Any

from freeanchor.config import Config, load_config, resolve_config, to_dict
from freeanchor.config_fields import Section, describe_type, dotted, field_types

WIDTH = 88


def format_value(value: Any, limit: int = 48) -> str:
    """A value as `--set` takes it: lists comma-separated, none, true/false; long lists cut."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        if not value:
            return "()"
        text = ",".join(format_value(v) for v in value)
        if len(text) > limit:
            text = text[:limit].rsplit(",", 1)[0] + f",... ({len(value)} values)"
        return text
    return str(value)


def _allowed(section: type, f: dataclasses.Field) -> str:
    """'an integer, >= 1', 'one of off, bf16, fp16', 'a non-empty string or none', ..."""
    rule, kind = f.metadata.get("rule"), describe_type(field_types(section)[f.name])
    if kind in ("a string", "a string or null"):  # the rule says it better
        return rule.text + (" or none" if kind.endswith("null") else "")
    return f"{kind}, {rule.text}" if rule is not None else kind


def describe_config(cfg: Config) -> str:
    """The listing `freeanchor config` prints: per field `name = value (default ...)`, then its
    meaning and allowed values; `*` marks a value that differs from the default."""
    lines = ["freeanchor config (* = changed from the default; set any field with --set A.B=V)"]
    changed = total = 0

    def section(part: Section) -> None:
        nonlocal changed, total
        cls = type(part)
        default = cls()
        title = (cls.__doc__ or "").strip().splitlines()[0]
        lines.extend(["", f"[{cls.section or 'run'}] {title}"])
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, Section):
                continue
            initial = getattr(default, f.name)
            differs = value != initial
            changed, total = changed + differs, total + 1
            mark, name = "*" if differs else " ", dotted(cls.section, f.name)
            note = f"(default: {format_value(initial)})" if differs else "(default)"
            lines.append(f"{mark} {name} = {format_value(value)}  {note}")
            meaning = f"{f.metadata['meaning']}; {_allowed(cls, f)}"
            lines.extend(textwrap.wrap(meaning, WIDTH, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))  # fmt: skip

    for part in (cfg, cfg.model, cfg.data, cfg.train):
        section(part)
    lines.extend(["", f"{changed} of {total} fields changed; --json prints this config as JSON "
                      "for --config."])  # fmt: skip
    return "\n".join(lines)


def run_config(args) -> int:
    """Entry point of `freeanchor config`."""
    base = load_config(args.config) if args.config else None
    cfg = resolve_config(base, args.model, None, args.set or [])
    if args.json:
        print(json.dumps(to_dict(cfg), indent=2))
    else:
        print(describe_config(cfg))
    return 0
