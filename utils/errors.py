"""One exception type for mistakes a user can make, and the entry-point wrapper that turns it into
one clear line on stderr and exit code 2 (no traceback, nothing half-written)."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

EXIT_USER_ERROR = 2

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix: a bad flag value, a missing file, malformed data.

    The message must say what is wrong, where (file, line, field, value) and how to fix it.
    """


def read_json_file(path: Path, fix: str) -> Any:
    """The parsed contents of a JSON file a user handed over (a model's config.json, a tokenizer file); a
    UserError naming the file, the line and `fix` when it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}): {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text): {fix}") from None


# What a full disk or a file-size limit looks like from the libraries that write our files: OSError from
# Python, "unexpected pos" / "file write failed" from torch.save's zip writer, "I/O error" from safetensors.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO}
_STORAGE_MESSAGES = ("No space left", "File too large", "Disk quota", "I/O error", "unexpected pos",
                     "file write failed")


def is_storage_error(err: BaseException) -> bool:
    """Whether `err` says that storage refused a write (disk full, quota, file-size limit, I/O error)."""
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        return True
    return any(m in str(err) for m in _STORAGE_MESSAGES)


def main_guard(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a `main()` so a UserError prints `error: <message>` and exits with code 2; so does an
    OSError of a full disk (or file-size limit) wherever it happens."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            _fail(str(err))
        except OSError as err:
            if not is_storage_error(err):
                raise
            _fail(f"writing {err.filename or 'a file'} failed ({err.strerror}): free disk space and run the same "
                  "command again; it resumes from its last complete checkpoint")

    return wrapper


def _fail(message: str) -> NoReturn:
    # progress bars left open by the failure end their line first, so the error starts a line of its own
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    # the CLI contract is this exact line, so it bypasses logging's timestamped format; a message that quotes
    # a library's multi-line text is folded onto it
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)
