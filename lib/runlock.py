"""One run at a time in a run folder: an exclusive lock, taken before anything else is written.

The lock is ``{run_dir}/.lock``: an ``fcntl`` lock held for the life of the run (the kernel
drops it when the process ends, however it ends) plus the holder's PID, host, start time and
command in the file, so a refusal can name the other run. A lock file whose lock is free was
left by a process that is gone: it is taken over, and the start says so (with that process's
PID and host). On the same host a holder whose PID is still alive is never taken over, unless
that PID now belongs to another process (a requeued job can get the PID of the one that died):
the lock records when its process started, and a PID that started later is not the holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

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
