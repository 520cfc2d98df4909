"""User-facing errors: one line that names the file, key or value and what would be valid.

Every entry point wraps its ``main`` in :func:`run_cli`, which prints a :class:`UserError`
as a single ``error: ...`` line (no traceback) and exits with status 2, and turns SIGINT /
SIGTERM outside the training loop into one line and exit status 128 + the signal. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re
import signal
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
    # "lib.errors.DataError: file x is corrupt" (or lib.layout.BadFile, ...) -> "file x is corrupt"
    for cls in (UserError, ConfigError, DataError, CheckpointError):
        for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
            if last.startswith(prefix):
                last = last[len(prefix):]
    return re.sub(r"^lib(\.\w+)+: ", "", last)


class Interrupted(BaseException):
    """SIGINT or SIGTERM before the training loop (which catches them itself: lib/faults.py)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


# Called with the one-line message when an entry point fails (lib/run.py registers the run
# folder's cleanup: an ``error`` record in its log, or, before the log exists, removing what
# the start created); emptied after each failure.
FAILURE_HOOKS: list[Callable[[str], None]] = []


def _failed(message: str) -> None:
    hooks = list(FAILURE_HOOKS)
    FAILURE_HOOKS.clear()
    for hook in hooks:
        try:
            hook(message)
        except Exception:       # cleanup must never hide the error it reports
            pass


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``: a :class:`UserError` becomes one ``error: ...`` line on stderr and exit
    code 2; SIGINT/SIGTERM (outside the training loop) one ``interrupted`` line and 128 + the
    signal. Either way the failure hooks run first (the run's own log says why it stopped, and
    a failed start leaves nothing behind). Other exceptions are bugs and keep their traceback."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _interrupt)     # also when inherited as ignored
        except ValueError:        # not the main thread
            pass
    try:
        code = main()
    except UserError as exc:
        message = one_line(str(exc))
        _failed(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        message = f"interrupted by {signal.Signals(signum).name}"
        _failed(message)
        print(message, file=sys.stderr)
        sys.exit(128 + signum)
    except Exception as exc:  # DataLoader workers re-raise our errors as RuntimeError-like copies
        if type(exc).__name__ in {"DataError", "ConfigError", "CheckpointError", "UserError"}:
            message = one_line(str(exc))
            _failed(message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        _failed(f"{type(exc).__name__}: {one_line(str(exc))} (a bug: the traceback is on stderr)")
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(code or 0)
