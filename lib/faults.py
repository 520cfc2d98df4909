"""Surviving faults: preemption signals, non-finite steps, and a divergence watchdog.

Exit codes (distinct so job scripts can tell them apart):
``EXIT_PREEMPTED`` after SIGTERM/SIGINT (a checkpoint was written: resume with
``--resume latest``); ``EXIT_STOPPED`` when the run stopped itself (too many non-finite
steps, or divergence with ``on_divergence: stop``).
"""
from __future__ import annotations

import math
import os
import signal
from dataclasses import asdict, dataclass
from typing import Any, Optional

EXIT_PREEMPTED = 3
EXIT_STOPPED = 4


class Preemption:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second signal aborts."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            # Second signal: the user (or the cluster) means it. No checkpoint.
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name

    def install(self) -> "Preemption":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@dataclass
class NonfiniteCounter:
    """Counts skipped updates: ``consecutive`` resets on a good step, ``total`` never does."""
    max_consecutive: int
    consecutive: int = 0
    total: int = 0

    def good(self) -> None:
        self.consecutive = 0

    def bad(self) -> bool:
        """Record a skipped update; True when the run must stop."""
        self.consecutive += 1
        self.total += 1
        return self.consecutive >= self.max_consecutive


@dataclass
class Divergence:
    began: int          # first log step of the rise
    best_step: int      # step of the best smoothed value before it
    best: float
    value: float


@dataclass
class DivergenceWatchdog:
    """An exponentially smoothed loss tracked against its best value.

    When the smoothed loss stays above ``factor`` × best for ``window`` consecutive
    updates (log records), :meth:`update` returns a :class:`Divergence` (once per episode).
    """
    factor: float
    window: int
    beta: float = 0.8            # smoothing of successive log records
    warmup: int = 3              # records before a best is trusted
    smoothed: Optional[float] = None
    best: float = math.inf
    best_step: int = 0
    count: int = 0
    above: int = 0
    began: Optional[int] = None
    reported: bool = False

    def update(self, step: int, value: Optional[float]) -> Optional[Divergence]:
        if value is None or not math.isfinite(value):
            return None
        self.smoothed = value if self.smoothed is None else self.beta * self.smoothed + (1 - self.beta) * value
        self.count += 1
        if self.count < self.warmup:
            return None
        if self.smoothed < self.best:
            self.best, self.best_step = self.smoothed, step
            self.above, self.began, self.reported = 0, None, False
            return None
        if self.smoothed > self.factor * self.best:
            self.above += 1
            if self.began is None:
                self.began = step
            if self.above >= self.window and not self.reported:
                self.reported = True
                return Divergence(self.began, self.best_step, self.best, self.smoothed)
        else:
            self.above, self.began = 0, None
        return None

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best"] = None if math.isinf(self.best) else self.best
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if k in ("factor", "window"):
                continue  # taken from the current config
            setattr(self, k, math.inf if (k == "best" and v is None) else v)
