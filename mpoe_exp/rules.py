"""The rules a config key follows (`Rule`: type, range, choices, null, may be absent) and nested sections of
keys (`Section`): the vocabulary of the typed run spec (spec.py, whose annotations carry them), of the schema
(schema.py) and of what each expert-layer kind declares it takes (moe/kinds.py); and the check of a section of
keys against its table (`check_table`), whose refusals are one line naming the key and what it allows."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mpoe_exp.errors import UserError


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


# --- rules from type annotations ---------------------------------------------------------------------------


def annotation_rule(annotation: Any) -> Rule:
    """A rule from a type annotation: the rule of `Annotated[type, rule]` (or of `Annotated[type, make_rule]`,
    for choices that grow after import, like the registered model families); for bool, int, float, str, a Literal,
    list[X] or X | None, the type's."""
    if typing.get_origin(annotation) is typing.Annotated:  # a rule, or a function making it when checked
        rule = annotation.__metadata__[0]
        return rule if isinstance(rule, Rule | Section) else rule()
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        rule = annotation_rule(inner[0]) if len(inner) == 1 else anything()
        return rule.or_null() if type(None) in args else rule
    if typing.get_origin(annotation) is typing.Literal:
        return choice(*args)
    if typing.get_origin(annotation) is list:
        return list_of(annotation_rule(args[0]) if args else anything())
    simple = {bool: boolean(), int: integer(), float: number(), str: string()}
    return simple.get(annotation, anything())


# --- the check -------------------------------------------------------------------------------------------------


class Unresolved:
    """A value whose interpolation cannot resolve yet (${task.name} with no task chosen): not checked here."""


def check_table(prefix: str, node: dict, table: Table, root: dict, variant: str = "") -> None:
    where = prefix[:-1] or "the top level"
    context = f" ({variant})" if variant else ""
    for key in node:
        if key not in table:
            allowed = ", ".join(k for k in table if k != "hydra")
            raise UserError(f"unknown key {prefix}{key}: {where} takes {allowed}{context}")
    for key, rule in table.items():
        full = f"{prefix}{key}"
        if key not in node:
            if not rule.optional:
                what = "a section" if isinstance(rule, Section) else rule.allowed
                raise UserError(f"missing key {full}: {where} needs it ({what}){context}")
            continue
        value = node[key]
        if isinstance(rule, Section):
            check_section(full, value, rule, root)
        elif not isinstance(value, Unresolved) and not rule.accepts(value):
            raise UserError(f"{full}={show(value)} is not allowed: {full} must be {rule.allowed}")


def check_section(full: str, value: Any, section: Section, root: dict) -> None:
    if (value is None and section.null) or isinstance(value, Unresolved):
        return
    if not isinstance(value, dict):
        raise UserError(f"{full}={show(value)} is not allowed: {full} is a section of keys (choose it by group)")
    if callable(section.keys):
        table, variant = section.keys(value, root)
    else:
        table, variant = section.keys, ""
    check_table(f"{full}.", value, table, root, variant)


def show(value: Any) -> str:
    """A value as a command line would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list):
        return f"[{','.join(show(item) for item in value)}]"
    return str(value)
