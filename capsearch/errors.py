"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a missing folder, a bad value, an unreadable file)."""

    exit_code = 2
