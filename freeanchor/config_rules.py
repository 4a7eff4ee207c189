"""What a config field accepts: rules, declared beside each field with `setting(...)`.

Every field of the config dataclasses is declared as `setting(default, meaning, rule)`: its
meaning (one line, shown by `freeanchor config`) and its rule (the values it accepts) sit next
to the field; choices are `Literal[...]` types. config_fields.py checks each assigned value
against both.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """The values a field accepts: `text` says which (in messages and `freeanchor config`)."""

    text: str
    ok: Callable[[Any], bool]


def between(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Rule:
    """lo <= x <= hi (`<` at an open end); a missing bound is no bound."""

    def ok(x: float) -> bool:
        above = lo is None or (x > lo if lo_open else x >= lo)
        below = hi is None or (x < hi if hi_open else x <= hi)
        return above and below

    a, b = _num(lo), _num(hi)
    if hi is None:
        text = f"> {a}" if lo_open else f">= {a}"
    elif lo is None:
        text = f"< {b}" if hi_open else f"<= {b}"
    elif not (lo_open or hi_open):
        text = f"{a} to {b}"
    else:
        text = f"in {'(' if lo_open else '['}{a}, {b}{')' if hi_open else ']'}"
    return Rule(text, ok)


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,}".replace(",", "_") if isinstance(x, int) and abs(x) >= 10**5 else f"{x:g}"


def each(rule: Rule, count: tuple[int, int] | None = None) -> Rule:
    """Every item of a tuple or list follows `rule`; `count`: allowed (min, max) length."""
    lo, hi = count if count else (0, math.inf)
    many = f"{lo} to {hi} values, " if count else ""
    return Rule(f"{many}{rule.text} each", lambda v: lo <= len(v) <= hi and all(map(rule.ok, v)))


NON_EMPTY = Rule("a non-empty string", lambda s: bool(s.strip()))
POSITIVE = between(0, lo_open=True)
AT_LEAST_0, AT_LEAST_1 = between(0), between(1)
UNIT = between(0.0, 1.0)  # probabilities, loss weights
OPEN_UNIT = between(0.0, 1.0, lo_open=True, hi_open=True)
INCREASING = Rule("strictly increasing, each >= 1", lambda v: all(m >= 1 for m in v)
                  and list(v) == sorted(set(v)))  # fmt: skip


def setting(default: Any, meaning: str, rule: Rule | None = None, factory: Any = None) -> Any:
    """A dataclass field with its one-line meaning and its rule (None: the type says it all)."""
    meta = {"meaning": meaning, "rule": rule}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- messages


def show(value: Any, limit: int = 60) -> str:
    """A value as messages print it: repr, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """ "; did you mean 'x'?" with the closest candidate(s) (case-insensitive), or ""."""
    by_lower = {c.lower(): c for c in candidates}
    scored = sorted(
        ((difflib.SequenceMatcher(None, word.lower(), c).ratio(), c) for c in by_lower),
        reverse=True,
    )
    close = [c for r, c in scored if r >= max(0.6, scored[0][0] - 0.05)] if scored else []
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(by_lower[c]) for c in close[:3]) + "?"
