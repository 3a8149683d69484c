"""One error type for user mistakes, reported as a single line instead of a traceback."""
from __future__ import annotations

import functools
import sys


class CtclabError(Exception):
    """A problem the user can fix: the message names the file or key, what was found, what is expected."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def one_line_errors(main):
    """Wrap an entry point so a CtclabError prints `ctclab: <message>` and exits with status 2 (or
    the error's own `exit_code`, e.g. 130 for a training stopped by Ctrl-C)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CtclabError as err:
            print(f"ctclab: error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)

    return wrapper
