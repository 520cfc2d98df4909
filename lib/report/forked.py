"""Work done meanwhile by a forked helper process when there is a second core: ``report.py``
writes its CSV and draws its two heaviest figures this way. Outputs are files; when a helper
cannot start or fails, the caller does the work itself."""
from __future__ import annotations

from typing import Any


def start_helper(target, *args: Any):
    """Run ``target(*args)`` in a forked process when there is a second core (the outputs it
    writes are files); None when it cannot (one core, no fork): the caller does it itself."""
    import multiprocessing
    import os
    if (os.cpu_count() or 1) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    try:
        proc = multiprocessing.get_context("fork").Process(target=_helper_main, args=(target, *args),
                                                           daemon=True)
        proc.start()
    except OSError:
        return None
    return proc


def _helper_main(target, *args: Any) -> None:
    try:
        target(*args)
    except Exception:           # the parent does the work again and reports any error itself
        raise SystemExit(1)


def finish_helper(proc, fallback) -> None:
    """Wait for a helper; run ``fallback`` here when there was none or it failed."""
    if proc is not None:
        proc.join()
        if proc.exitcode == 0:
            return
    fallback()


