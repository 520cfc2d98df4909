"""lib.outputs: a lock left by a process that is gone is taken over, one held by a live run is
not, and a PID the kernel gave to another process since is not mistaken for the holder."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from lib.errors import UserError
from lib.outputs import LOCK_FILE, RunLock, process_start


@pytest.fixture
def other_process():
    """A live process that is not the lock's holder (as a requeued job may meet its dead
    predecessor's PID in use by someone else)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(run_dir, **info) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": platform.node(), "started": "earlier", **info}))


def test_the_lock_records_when_its_process_started(tmp_path):
    lock = RunLock(tmp_path / "run")
    assert lock.acquire() is None
    info = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["pid_start"] == process_start(os.getpid()) > 0
    lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path, other_process):
    run_dir = tmp_path / "run"
    write_lock(run_dir, pid=other_process, pid_start=process_start(other_process) - 1)   # its PID, not its start
    lock = RunLock(run_dir)
    warning = lock.acquire()
    assert warning is not None and "a stale lock of a run that is gone" in warning and str(other_process) in warning
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_holder_is_never_taken_over(tmp_path, other_process):
    run_dir = tmp_path / "run"
    for info in ({"pid_start": process_start(other_process)}, {}):          # recorded, or an older lock file
        write_lock(run_dir, pid=other_process, **info)
        with pytest.raises(UserError, match=rf"in use by another run \(PID {other_process} on .*that process is alive"):
            RunLock(run_dir).acquire()
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == other_process    # left as it was
