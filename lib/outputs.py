"""Writing files safely: one run at a time in a run folder (:class:`RunLock`), an output folder
written whole or not at all by one process at a time (:class:`StagedFolder`: evaluate.py's
``eval/``, report.py's report folder), and disk space reserved before large memory-mapped arrays
are filled (the data and latent caches).

The run folder's lock, ``{run_dir}/.lock``, is taken before anything else is written: an
``fcntl`` lock held for the life of the run (the kernel drops it when the process ends, however
it ends) plus the holder's PID, host, start time and command in the file, so a refusal can name
the other run. A lock file whose lock is free was left by a process that is gone: it is taken
over, and the start says so (with that process's PID and host). On the same host a holder whose
PID is still alive is never taken over, unless that PID now belongs to another process (a
requeued job can get the PID of the one that died): the lock records when its process started,
and a PID that started later is not the holder.

A staged folder's new contents go to a hidden sibling, ``.{name}.tmp-{pid}``; only when they
are complete does that folder take the place of the old one (the old one is renamed aside, the
new one renamed in, the old one deleted; SIGINT and SIGTERM wait during those renames). A
failure, an error or a signal before that removes the staging folder and leaves the old outputs
as they were. A lock beside the folder (``.{name}.lock``, a :class:`RunLock`) refuses a second
writer in one line; the writer that holds it first removes what a killed writer left (staging
folders) and puts back an old folder that a kill between the two renames left aside.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Optional

import numpy as np

from lib.errors import UserError

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: it exists
        return True
    return True


def process_start(pid: int) -> Optional[int]:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat``), or None where
    that cannot be read. A PID the kernel reused belongs to a process that started later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])      # field 22, after "pid (comm) "
    except (OSError, ValueError, IndexError):
        return None


def _same_process(info: dict[str, Any]) -> bool:
    """Whether the process a lock file names is still running: its PID is alive and, where the
    file recorded it, started when the holder did (not a later process given the same PID)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    recorded = info.get("pid_start")
    return recorded is None or process_start(pid) in (None, recorded)


def _read(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder(info: dict[str, Any]) -> str:
    return (f"PID {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}")


class RunLock:
    """The lock of ``run_dir``; :meth:`acquire` creates the folder when it is missing and
    remembers what it created, so that a start that fails can remove it again."""

    def __init__(self, run_dir: Path, name: str = LOCK_FILE) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.created: list[Path] = []        # folders this start created, outermost first
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; a one-line :class:`UserError` naming the holder when another run has
        it. Returns a warning when a stale lock was taken over (else None)."""
        missing = [p for p in [self.run_dir, *self.run_dir.parents] if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.created = list(reversed(missing))
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write in {self.run_dir} ({exc.strerror or exc}); choose a writable folder "
                            f"(--set output_dir=NEW_DIR)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = _read(self.path) or (time.sleep(0.2) or _read(self.path))   # the holder writes it just after

            raise UserError(f"{self.run_dir} is in use by another run ({_holder(info)}); wait for it to "
                            f"end, or start elsewhere with --set output_dir=NEW_DIR") from None
        previous = _read(self.path)
        same_host = previous.get("host") == platform.node()
        if previous and same_host and previous.get("pid") != os.getpid() and _same_process(previous):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise UserError(f"{self.run_dir} is in use by another run ({_holder(previous)}; its lock file "
                            f"{self.path} is not locked, but that process is alive); stop it first")
        info = {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "host": platform.node(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": [sys.executable] + sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous:
            return (f"{self.path}: a stale lock of a run that is gone ({_holder(previous)}) was taken over; "
                    f"that run ended without releasing it (killed or crashed)")
        return None

    def release(self, remove_created: bool = False) -> None:
        """Release the lock and delete the lock file; with ``remove_created``, also the folders
        :meth:`acquire` created, if they are empty (a failed start leaves nothing behind)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
        if remove_created:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:         # not empty: something else is in it
                    break


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


@contextmanager
def filling(tmp: Path, key: str, target: Path, nbytes: int, error: Callable[[str], UserError]) -> Iterator[None]:
    """Writing the folder ``tmp`` that is to become ``target`` (a data or latent cache): an
    ``OSError`` (a full disk, a folder that cannot be written) is one line naming ``key``, the
    folder and, on a full disk, the ``nbytes`` needed, raised as ``error``, as is a
    :class:`UserError` from inside; ``tmp`` is removed either way (once published, it is gone)."""
    try:
        yield
    except OSError as exc:
        full = f", {size_text(nbytes)} needed" if no_space(exc) else ""
        raise error(f"{key}: cannot write {target} ({exc.strerror or exc}{full}); set {key} to a writable "
                    f"folder with room, or to off") from None
    except UserError as exc:
        raise error(str(exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
