"""One exception type for mistakes a user can make, and the entry-point wrapper that turns it into
one clear line on stderr and exit code 2 (no traceback, nothing half-written)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix: a bad flag value, a missing file, malformed data.

    The message must say what is wrong, where (file, line, field, value) and how to fix it.
    """


def main_guard(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a `main()` so a UserError prints `error: <message>` and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            # the CLI contract is this exact line, so it bypasses logging's timestamped format
            sys.stderr.write(f"error: {err}\n")
            sys.stderr.flush()
            sys.exit(EXIT_USER_ERROR)

    return wrapper
