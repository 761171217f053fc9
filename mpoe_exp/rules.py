"""The rules a config key follows (`Rule`: type, range, choices, null, may be absent) and nested sections of
keys (`Section`): the vocabulary of the schema (schema.py) and of what each expert-layer kind declares it takes
(moe/kinds.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What one key may hold: `accepts(value)`, a phrase for messages, whether the key may be absent."""

    allowed: str
    accepts: Callable[[Any], bool]
    optional: bool = False

    def or_null(self) -> Rule:
        """The same rule, also accepting null."""
        return replace(self, allowed=f"null or {self.allowed}", accepts=lambda v, a=self.accepts: v is None or a(v))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _bounds(ge=None, gt=None, le=None, lt=None) -> tuple[str, Callable[[float], bool]]:
    """The phrase (">= 0 and < 1") and the test of optional bounds."""
    parts = [(op, bound) for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if bound is not None]
    tests = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    phrase = " and ".join(f"{op} {bound:g}" for op, bound in parts)
    return phrase, lambda v: all(tests[op](v, bound) for op, bound in parts)


def integer(*, ge=None, gt=None, le=None, lt=None, null=False, optional=False) -> Rule:
    """An int (not a bool) within the bounds."""
    phrase, within = _bounds(ge, gt, le, lt)
    rule = Rule(f"an integer {phrase}".strip(), lambda v: is_int(v) and within(v), optional)
    return rule.or_null() if null else rule


def number(*, ge=None, gt=None, le=None, lt=None, null=False, optional=False) -> Rule:
    """A finite int or float (not a bool) within the bounds."""
    phrase, within = _bounds(ge, gt, le, lt)
    rule = Rule(f"a number {phrase}".strip(), lambda v: _is_number(v) and within(v), optional)
    return rule.or_null() if null else rule


def boolean(*, optional=False) -> Rule:
    """true or false (not 0/1, not a string)."""
    return Rule("true or false", lambda v: isinstance(v, bool), optional)


def string(*, null=False, optional=False) -> Rule:
    """A non-empty string."""
    rule = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "", optional)
    return rule.or_null() if null else rule


def choice(*values: Any, optional=False) -> Rule:
    """One of the given strings."""
    return Rule(f"one of {', '.join(map(str, values))}", lambda v: isinstance(v, str) and v in values, optional)


def list_of(item: Rule, *, nonempty=False, optional=False) -> Rule:
    """A list whose every item follows `item`."""
    what = f"a {'non-empty ' if nonempty else ''}list, each item {item.allowed}"
    return Rule(
        what, lambda v: isinstance(v, list) and (v or not nonempty) and all(item.accepts(x) for x in v), optional
    )


def mapping(what: str, *, null=False, optional=False) -> Rule:
    """Any mapping (its content checked elsewhere), described as `what`."""
    rule = Rule(what, lambda v: isinstance(v, dict), optional)
    return rule.or_null() if null else rule


def anything(*, optional=False) -> Rule:
    """Any value (checked elsewhere)."""
    return Rule("anything", lambda v: True, optional)


Table = Mapping[str, "Rule | Section"]


@dataclass(frozen=True)
class Section:
    """A nested section of keys: a fixed table, or a function (section, whole config) -> (table, variant phrase)."""

    keys: Table | Callable[[dict, dict], tuple[Table, str]] = field(default_factory=dict)
    null: bool = False  # the whole section may be null (task: a dry run needs none)
    optional: bool = False
