"""The run folder and everything a run logs: ``metrics.jsonl``, TensorBoard, ``train.log``, ``run.json``.

One helper (:meth:`RunLog.record`) writes every record, to all three sinks, so the JSON, the
TensorBoard scalars and the human log always agree; :meth:`RunLog.train_record` builds the
training record (the interval means of every logged value, the LR of every optimizer, the
throughput). Numbers are printed with significant digits (:mod:`lib.numfmt`), never a fixed
number of decimals: the reference trainer's ``{:.5f}`` printed every LR below 5e-6 as
``0.00000`` for a whole run.

Records in ``metrics.jsonl`` have ``step`` (optimizer steps done), ``split`` (``train``,
``val`` or ``event``) and ``time`` (unix seconds); event records have ``event`` and
``message``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from lib.numfmt import fmt, fmt_lr
from lib.progress import echo
from lib.train.trackers import close_trackers, log_image, log_scalars, open_trackers


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "accelerate", "safetensors", "numpy", "torchmetrics"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def update_run_json(run_dir: Path, stage: str, resume: Optional[dict[str, Any]] = None,
                    extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write ``run.json`` at a start: command line, versions, git commit, start time, and the
    resume history (each resume appends an entry; earlier entries are kept)."""
    path = run_dir / "run.json"
    info: dict[str, Any] = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            info = {}
    info.setdefault("stage", stage)
    info.setdefault("started", now_iso())
    info.setdefault("resumes", [])
    info["command"] = [sys.executable] + sys.argv
    info["last_start"] = now_iso()
    info["versions"] = _versions()
    info["git_commit"] = _git_commit()
    info["host"] = platform.node()
    if extra:
        info.update(extra)
    if resume is not None:
        info["resumes"].append(dict(resume, time=now_iso()))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return info


def record_text(rec: dict[str, Any]) -> str:
    """``lr=1.000e-04 rec_loss=0.1016 ...``: the values present (never None), every LR in
    :func:`fmt_lr`, every other number in :func:`fmt` (4 significant digits)."""
    return " ".join(f"{k}={fmt_lr(v) if k.startswith('lr') else fmt(v)}" for k, v in rec.items()
                    if k not in ("step", "split", "time") and v is not None)


class StartupLog:
    """Messages of a run's start, before its folder may be written (inputs are checked first):
    shown at once, and written to ``train.log`` when the run log opens."""

    def __init__(self, is_main: bool = True, warnings: Sequence[str] = ()) -> None:
        self.is_main = is_main
        self.lines: list[tuple[str, str, str]] = []     # (time stamp, level, message)
        for w in warnings:
            self.warning(w)

    def _add(self, level: str, message: str) -> None:
        self.lines.append((time.strftime("%Y-%m-%d %H:%M:%S"), level, message))
        if self.is_main:
            echo(message if level == "INFO" else f"{level}: {message}")

    def info(self, message: str) -> None:
        self._add("INFO", message)

    def warning(self, message: str) -> None:
        self._add("WARNING", message)


class RunLog:
    """Writes records and messages of one run; everything is a no-op off the main process."""

    def __init__(self, run_dir: Path, is_main: bool = True, earlier: Optional[StartupLog] = None,
                 report_to: str = "tensorboard", key: str = "train.report_to", config: Optional[dict] = None) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self._jsonl = None
        self._text = None
        self.trackers: list = []                # lib/train/trackers.py (report_to)
        self.seconds = 0.0                      # spent writing records and events
        self.last_step = 0                      # of the newest record or event
        self._last_train: Optional[tuple[float, int]] = None   # (time, step) of the last train record
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._text = open(run_dir / "train.log", "a", encoding="utf-8")
        for stamp, level, message in (earlier.lines if earlier is not None else []):
            self._text.write(f"{stamp} {level} {message}\n")
        self._text.flush()
        self.trackers = open_trackers(report_to, key, run_dir, f"radiodiff-{run_dir.name}", config)

    # -- human-readable lines
    def _line(self, level: str, message: str) -> None:
        if not self.is_main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._text.write(f"{stamp} {level} {message}\n")
        self._text.flush()
        echo(message if level == "INFO" else f"{level}: {message}")

    def info(self, message: str) -> None:
        self._line("INFO", message)

    def warning(self, message: str) -> None:
        self._line("WARNING", message)

    # -- records
    def record(self, split: str, step: int, values: dict[str, Any], echo: bool = True) -> dict[str, Any]:
        """Write one record (``split`` = train | val) to metrics.jsonl, TensorBoard and train.log."""
        t0 = time.perf_counter()
        self.last_step = int(step)
        rec = {"step": int(step), "split": split, "time": time.time()}
        rec.update({k: _plain(v) for k, v in values.items()})
        if not self.is_main or self._jsonl is None:
            return rec
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self.trackers:
            log_scalars(self.trackers, {f"{split}/{k}": v for k, v in rec.items() if k not in ("step", "time", "split")
                                        and isinstance(v, (int, float)) and not isinstance(v, bool)}, int(step))
        text = record_text(rec)
        if echo:
            self._line("INFO", f"[{split} {step}] {text}")
        else:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO [{split} {step}] {text}\n")
            self._text.flush()
        self.seconds += time.perf_counter() - t0
        return rec

    def train_record(self, step: int, tracker: "MeanTracker", optimizers: dict[str, torch.optim.Optimizer],
                     reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     extra: Optional[dict[str, Any]] = None, echo: bool = False) -> dict[str, Any]:
        """The training record at ``step``, written (echoed only when ``echo``: a progress bar
        shows it otherwise):
        the LR of every optimizer (read from its param groups after the update: the LR the next
        update uses), the interval means of everything ``tracker`` holds (averaged across
        processes by ``reduce``), optimizer steps per second since the previous record, and
        ``extra``. Every process must call it (``reduce`` is a collective)."""
        values: dict[str, Any] = {name: opt.param_groups[0]["lr"] for name, opt in optimizers.items()}
        values.update(tracker.result(reduce))
        now = time.perf_counter()
        if self._last_train is not None and step > self._last_train[1]:
            values["steps_per_sec"] = (step - self._last_train[1]) / max(now - self._last_train[0], 1e-9)
        self._last_train = (now, step)
        values.update(extra or {})
        return self.record("train", step, values, echo=echo)

    def start_clock(self, step: int) -> None:
        """Measure the next record's ``steps_per_sec`` from now, at ``step``."""
        self._last_train = (time.perf_counter(), step)

    def event(self, name: str, step: int, message: str, level: str = "WARNING", echo: bool = True,
              **extra: Any) -> None:
        """An event record (start, resume, preempted, nonfinite, divergence, error, ...) plus a
        log line (on stderr too unless not ``echo``)."""
        if not self.is_main or self._jsonl is None:
            return
        t0 = time.perf_counter()
        self.last_step = int(step)
        rec = {"step": int(step), "split": "event", "time": time.time(), "event": name,
               "message": message}
        rec.update({k: _plain(v) for k, v in extra.items()})
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if echo:
            self._line(level, f"[{name} at step {step}] {message}")
        else:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} [{name} at step {step}] {message}\n")
            self._text.flush()
        self.seconds += time.perf_counter() - t0

    def image(self, tag: str, path: Path, step: int) -> None:
        """A figure already written (a sample grid) to the trackers as an image."""
        if self.is_main and self.trackers:
            log_image(self.trackers, tag, path, step)

    def close(self) -> None:
        for h in (self._jsonl, self._text):
            if h is not None:
                h.close()
        close_trackers(self.trackers)
        self._jsonl = self._text = None
        self.trackers = []


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) or isinstance(v, int) or v is None or isinstance(v, (str, bool, list, dict)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


class MeanTracker:
    """Running means of detached tensors over a log interval, synchronised only when read.
    Every key that is added is in the result; None values are not added."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Optional[torch.Tensor]]) -> None:
        for k, v in values.items():
            if v is None:
                continue
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def result(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
        """Mean of each key since the last call, then forget them; ``reduce`` averages the means
        across processes (e.g. ``lambda t: accelerator.reduce(t, 'mean')``; every process adds
        the same keys in the same order)."""
        keys = list(self.sums)
        out: dict[str, float] = {}
        if keys:
            means = torch.stack([self.sums[k] / self.counts[k] for k in keys])
            if reduce is not None:
                means = reduce(means)
            out = dict(zip(keys, means.tolist()))
        self.sums.clear()
        self.counts.clear()
        return out


def mean_logs(logs: list[dict[str, Optional[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Per key, the mean of the (detached) tensors of several micro-batches; keys whose value
    is None are left out."""
    if len(logs) == 1:
        return {k: v.detach() for k, v in logs[0].items() if v is not None}
    keys = [k for k, v in logs[0].items() if v is not None]
    return {k: torch.stack([d[k].detach().float() for d in logs]).mean() for k in keys}
