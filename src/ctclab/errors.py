"""One error type for user mistakes, reported as a single line instead of a traceback."""
from __future__ import annotations

import functools
import sys


class CtclabError(Exception):
    """A problem the user can fix: the message names the file or key, what was found, what is expected."""


def one_line_errors(main):
    """Wrap an entry point so a CtclabError prints `ctclab: <message>` and exits with status 2 (or
    the error's own `exit_code`, e.g. 130 for a training stopped by Ctrl-C)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CtclabError as err:
            print(f"ctclab: error: {err}", file=sys.stderr)
            sys.exit(getattr(err, "exit_code", 2))

    return wrapper
