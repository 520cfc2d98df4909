"""How a program ends: user-facing errors in one line that names the file, key or value and
what would be valid, exit codes, and the signals (:func:`handling_signals`, the one place they
are handled).

Every entry point wraps its ``main`` in :func:`run_cli`, which prints a :class:`UserError`
as a single ``error: ...`` line (no traceback) and exits with status 2, and turns SIGINT /
SIGTERM outside the training loop into one line and exit status 128 + the signal. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

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
    # "lib.errors.DataError: file x is corrupt" (or lib.data.layout.BadFile, ...) -> "file x is corrupt"
    for cls in (UserError, ConfigError, DataError, CheckpointError):
        for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
            if last.startswith(prefix):
                last = last[len(prefix):]
    return re.sub(r"^lib(\.\w+)+: ", "", last)


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside the training loop (which defers them itself: lib/train/faults.py)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _exit_now(signum: int, frame: object) -> None:
    sys.stderr.write(f"interrupted by {signal.Signals(signum).name} while starting\n")
    os._exit(128 + signum)      # nothing is written yet: nothing to clean up


@contextmanager
def handling_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` inside the block (also when they were inherited as
    ignored), and to what they went to before after it. The one place the toolkit handles
    signals, in three phases: before a script's slow imports the process exits at once
    (:func:`exit_on_signals`), from ``main`` on they raise :class:`Interrupted`
    (:func:`run_cli`), and the training loop defers them to the end of a step (lib/train/faults.py)."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:        # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def exit_on_signals() -> None:
    """Before the slow imports: SIGINT / SIGTERM end the program at once (a process started in
    the background inherits SIGINT ignored; a user who sends it means it)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_now)


def failure_message(exc: BaseException) -> str:
    """The one line a failure is reported with (and recorded with in a run's log)."""
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        return f"interrupted by {signal.Signals(signum).name}"
    if is_user_error(exc):
        return one_line(str(exc))
    return f"{type(exc).__name__}: {one_line(str(exc))} (a bug: the traceback is on stderr)"


def is_user_error(exc: BaseException) -> bool:
    """A :class:`UserError`, or a DataLoader worker's copy of one (re-raised as another type
    with the same name)."""
    return isinstance(exc, UserError) or type(exc).__name__ in {"DataError", "ConfigError", "CheckpointError",
                                                                 "UserError"}


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``: a :class:`UserError` becomes one ``error: ...`` line on stderr and exit
    code 2; SIGINT/SIGTERM (outside the training loop) one ``interrupted`` line and 128 + the
    signal. (A training run has recorded the failure in its own log by then, lib/train/run.py.)
    Other exceptions are bugs and keep their traceback."""
    try:
        with handling_signals(_interrupt):
            code = main()
    except (Interrupted, KeyboardInterrupt) as exc:
        print(failure_message(exc), file=sys.stderr)
        sys.exit(128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT))
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"error: {failure_message(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)
