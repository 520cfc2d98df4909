"""Writing outputs safely: a folder written whole or not at all, by one process at a time
(evaluate.py's ``eval/``, report.py's report folder), and disk space reserved before large
memory-mapped arrays are filled (the data and latent caches).

The new contents go to a hidden sibling, ``.{name}.tmp-{pid}``; only when they are complete
does that folder take the place of the old one (the old one is renamed aside, the new one
renamed in, the old one deleted; SIGINT and SIGTERM wait during those renames). A failure,
an error or a signal before that removes the staging folder and leaves the old outputs as they
were. A lock beside the folder (``.{name}.lock``, lib/runlock.py) refuses a second writer in
one line; the writer that holds it first removes what a killed writer left (staging folders)
and puts back an old folder that a kill between the two renames left aside.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

import numpy as np

from lib.errors import UserError
from lib.runlock import RunLock


class StagedFolder:
    """``with StagedFolder(final) as work:`` write into ``work``; on a clean exit ``work``
    replaces ``final``. ``what`` names the writer in a refusal (e.g. "evaluation")."""

    def __init__(self, final: Path, what: str = "run") -> None:
        self.final = Path(final)
        self.what = what
        self.work = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.lock = RunLock(self.final.parent, name=f".{self.final.name}.lock")

    def __enter__(self) -> Path:
        try:
            stale = self.lock.acquire()
        except UserError as exc:
            raise UserError(str(exc).replace("another run", f"another {self.what}")) from None
        except OSError as exc:
            raise UserError(f"cannot write {self.final}: {exc.strerror or exc} (choose another output folder)") from None
        del stale                                        # its leftovers are handled here
        try:
            self._recover()
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir()
        except OSError as exc:
            self.lock.release()
            raise UserError(f"cannot write {self.final}: {exc.strerror or exc} (choose another output folder)") from None
        return self.work

    def _recover(self) -> None:
        """What a killed writer left: staging folders (removed) and an old folder set aside
        (put back when there is no folder in its place, else removed)."""
        parent, name = self.final.parent, self.final.name
        for old in sorted(parent.glob(f".{name}.old-*")):
            if not self.final.exists():
                old.rename(self.final)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def __exit__(self, kind: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        try:
            if kind is None:
                self._replace()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
            self.lock.release()

    def _replace(self) -> None:
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        signals = {signal.SIGINT, signal.SIGTERM}
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            if self.final.exists():
                self.final.rename(old)
            self.work.rename(self.final)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- disk space
def size_text(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def require_space(folder: Path, nbytes: int, what: str, advice: str) -> None:
    """A one-line :class:`UserError` when ``folder``'s file system has less than ``nbytes`` free
    (``what`` needs them; ``advice`` says what to do)."""
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise UserError(f"{what}: {folder} has {size_text(free)} free, {size_text(nbytes)} needed; {advice}")


def no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """A full disk or quota, also as torch and safetensors report it (not as an OSError)."""
    if isinstance(exc, OSError):
        return no_space(exc)
    text = str(exc)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "file write failed"))


def reserved_memmap(path: Path, shape: tuple, dtype: Any) -> np.memmap:
    """``numpy.lib.format.open_memmap(path, "w+")`` with the file's blocks allocated at once: a
    full disk is then an ``OSError`` (ENOSPC) here, instead of a SIGBUS that kills the process
    when a page of the map is first written."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):   # a file system without it: checked before
            del arr
            raise
    finally:
        os.close(fd)
    return arr
