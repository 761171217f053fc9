"""Errors meant for people: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """Bad input from the user (config choice, shapes, data); the message says what was wrong and how to fix it."""


def run_command(action: Callable[[], object]) -> int:
    """A command's exit status: 0 once `action` ran, or 2 after printing its UserError as one `error:` line."""
    try:
        action()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
