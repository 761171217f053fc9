"""`Registry`: a name -> thing mapping (router types, expert kinds, layer kinds, task types) whose unknown names
are refused with the list of known ones, and which grows by one line: `REGISTRY["name"] = thing`."""

from __future__ import annotations

from typing import Any

from mpoe_exp.errors import UserError


class Registry(dict):
    """A dict whose missing keys raise a `UserError` naming what kind of thing was asked for and the known names."""

    def __init__(self, kind: str, entries: dict[str, Any] | None = None):
        super().__init__(entries or {})
        self.kind = kind

    def __missing__(self, name: Any):
        raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(map(str, self)))}")
