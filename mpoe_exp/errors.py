"""Errors meant for people: the CLI prints their message and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input from the user (config choice, shapes, data); the message says what was wrong and how to fix it."""
