"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad input (a missing file, an impossible layout, a corrupt checkpoint...). The message says how to fix it."""
