"""Surviving faults: preemption signals, non-finite steps, and a divergence watchdog.

:class:`FaultPolicy` is what a training loop asks: after each update (was it skipped?), after
each training record (is the loss diverging?) and once per iteration (did a signal arrive?).
It logs each event and says whether the run must stop (:attr:`FaultPolicy.stopping`, with
:attr:`FaultPolicy.exit_code`); the loop then writes a checkpoint and ends. It never calls
back into the loop.

Exit codes (distinct so job scripts can tell them apart):
``EXIT_PREEMPTED`` after SIGTERM/SIGINT (a checkpoint was written: resume with
``--resume latest``); ``EXIT_STOPPED`` when the run stopped itself (too many non-finite
steps, or divergence with ``on_divergence: stop``).
"""
from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from lib.errors import handling_signals
from lib.numfmt import fmt, fmt_lr
from lib.train import checkpoint as ckpt
from lib.train.optim import any_process

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lib.config import TrainConfig
    from lib.train.runlog import RunLog

EXIT_PREEMPTED = 3
EXIT_STOPPED = 4


class Preemption:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second signal aborts."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            # Second signal: the user (or the cluster) means it. No checkpoint.
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name

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


class FaultPolicy:
    """One run's fault policy, the same for both stages (see the module docstring)."""

    def __init__(self, accelerator: "Accelerator", cfg: "TrainConfig", stage: str, log: "RunLog",
                 ckpt_dir: Path) -> None:
        self.accelerator, self.cfg, self.stage, self.log, self.ckpt_dir = accelerator, cfg, stage, log, ckpt_dir
        self.nonfinite = NonfiniteCounter(cfg.max_nonfinite)
        self.watchdog = DivergenceWatchdog(cfg.divergence_factor, cfg.divergence_window)
        self.preemption = Preemption()
        self.exit_code = 0

    @property
    def stopping(self) -> bool:
        """The run must stop now (after writing a checkpoint)."""
        return self.exit_code != 0

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_total": self.nonfinite.total, "watchdog": self.watchdog.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite.total = state.get("nonfinite_total", 0)
        self.watchdog.load_state_dict(state.get("watchdog", {}))

    @contextmanager
    def signals(self) -> Iterator["FaultPolicy"]:
        """SIGTERM/SIGINT are caught inside the block (a second one aborts at once)."""
        with handling_signals(self.preemption.handle):
            yield self

    def after_update(self, step: int, applied: bool, values: dict[str, torch.Tensor]) -> bool:
        """After an optimizer update; ``applied`` False: it was skipped, ``values`` (the step's
        losses and gradient norms) say why. True when the run must stop (``max_nonfinite``
        skips in a row)."""
        if applied:
            self.nonfinite.good()
            return False
        bad = [k for k, v in values.items() if v is not None and not torch.isfinite(v).all()]
        self.log.event("nonfinite", step, f"non-finite {', '.join(bad) or 'gradient (fp16 scaler)'}: "
                       f"update skipped, weights unchanged ({self.nonfinite.consecutive + 1} in a row)",
                       terms=bad)
        if not self.nonfinite.bad():
            return False
        self.log.event("stopped", step, f"{self.nonfinite.consecutive} non-finite updates in a row; "
                       f"checkpointing the last good state (step {step}; not if its weights are not finite: "
                       f"then the newest checkpoint keeps the last finite ones). Try a lower "
                       f"{self.stage}.train.lr or grad_clip, or bf16 instead of fp16, then --resume latest")
        self.exit_code = EXIT_STOPPED
        return True

    def after_record(self, step: int, value: Optional[float], name: str) -> bool:
        """After a training record: the divergence watchdog on its ``name`` value. True when
        the run must stop (``on_divergence: stop``)."""
        div = self.watchdog.update(step, value)
        if div is None:
            return False
        before = [c for c in ckpt.list_checkpoints(self.ckpt_dir, self.log.warning) if c.step <= div.best_step]
        best = ckpt.best_of(before) or (before[-1] if before else None)
        if best is not None and self.accelerator.is_main_process:
            (best.path / ckpt.KEEP_FILE).write_text(f"kept: last good checkpoint before the divergence "
                                                    f"that began at step {div.began}\n")
        where = f"best checkpoint before it: {best.path}" if best else "no checkpoint before it"
        self.log.event("divergence", step, f"smoothed {name} {fmt(div.value)} > "
                       f"{self.cfg.divergence_factor:g} x best {fmt(div.best)} (step {div.best_step}) "
                       f"since step {div.began}; {where}", began=div.began, best_step=div.best_step,
                       best_checkpoint=str(best.path) if best else None)
        if self.cfg.on_divergence != "stop":
            return False
        hint = (f"resume from it with a lower LR: --resume {best.path} --set "
                f"{self.stage}.train.lr={fmt_lr(self.cfg.lr / 10)}") if best else f"lower {self.stage}.train.lr"
        self.log.event("stopped", step, f"stopping on divergence; {hint}")
        self.exit_code = EXIT_STOPPED
        return True

    def check_preemption(self, step: int) -> bool:
        """True (on every process) once SIGTERM/SIGINT reached any process. A collective on N
        processes: every process calls it at the same point of the loop."""
        if self.exit_code == EXIT_PREEMPTED:
            return True
        if not any_process(self.accelerator, self.preemption.requested):
            return False
        self.log.event("preempted", step, f"{self.preemption.signal_name or 'signal'}: writing a "
                       f"checkpoint at step {step}; continue with --resume latest")
        self.exit_code = EXIT_PREEMPTED
        return True
