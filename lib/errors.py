"""User-facing errors: one line that names the file, key or value and what would be valid.

Every entry point wraps its ``main`` in :func:`run_cli`, which prints a :class:`UserError`
as a single ``error: ...`` line (no traceback) and exits with status 2. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: a config value, a data file, a checkpoint path."""


class ConfigError(UserError):
    """A config file or ``--set`` override that is missing, malformed or out of range."""


class DataError(UserError):
    """A dataset folder or file that is missing, corrupt or of the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not match the model."""


def one_line(message: str) -> str:
    """Collapse a message to its last meaningful line.

    DataLoader workers re-raise exceptions with the worker's traceback folded into the
    message; the user only needs the line that says what is wrong.
    """
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    last = lines[-1]
    # "lib.errors.DataError: file x is corrupt" -> "file x is corrupt"
    for cls in (UserError, ConfigError, DataError, CheckpointError):
        for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
            if last.startswith(prefix):
                last = last[len(prefix):]
    return last


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main`` and turn a :class:`UserError` into one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:  # DataLoader workers re-raise our errors as RuntimeError-like copies
        if type(exc).__name__ in {"DataError", "ConfigError", "CheckpointError", "UserError"}:
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        raise
    sys.exit(code or 0)
