"""Running the toolkit's own command lines from a benchmark script, in fresh processes."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], log: Optional[Path] = None) -> float:
    """``python *cmd`` from the repository root; its wall seconds. It must succeed: otherwise
    the script stops with the command and the end of its stderr. ``log``: where its output goes."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0
