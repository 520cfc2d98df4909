"""Starting a run: the run folder, the Accelerator, the seed, the run log and ``config.yaml``;
and ``--dry-run``, which shows what a run would do without starting one.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from lib import checkpoint as ckpt
from lib.accel import make_accelerator, resolve_precision
from lib.config import Config, save_config
from lib.dataset import describe_data
from lib.errors import FAILURE_HOOKS, UserError
from lib.numfmt import fmt_lr, fmt_step
from lib.runlock import RunLock
from lib.runlog import RunLog, StartupLog
from lib.schedule import key_points

RUN_FILES = ("metrics.jsonl", "train.log", "run.json", "config.yaml", "tb", "samples", "checkpoints")


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted(p for p in folder.iterdir() if ckpt.NAME_RE.match(p.name)) if folder.is_dir() else []


def check_writable(run_dir: Path) -> None:
    """The run folder can be made and written: its first existing ancestor is a folder this
    process may write in (else one line naming it, not a traceback at the first write)."""
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"output_dir: {existing} is a file, not a folder; the run folder {run_dir} cannot be made "
                        f"there (pass --set output_dir=NEW_DIR)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: {existing} is not writable, so the run folder {run_dir} cannot be "
                        f"{'written' if existing == run_dir else 'made'} (pass --set output_dir=NEW_DIR)")


def check_new_run_dir(run_dir: Path, resuming: bool) -> None:
    """Refuse to start a fresh run in a folder that holds one: one with a checkpoint (nothing
    is wiped). A folder whose earlier start wrote no checkpoint is not a run (see open_run)."""
    check_writable(run_dir)
    if resuming or not run_dir.is_dir():
        return
    found = _checkpoint_folders(run_dir)
    if found:
        raise UserError(f"{run_dir} already holds a run ({len(found)} checkpoint(s), the newest "
                        f"{found[-1].name}); continue it with --resume latest, or start elsewhere "
                        f"with --set output_dir=NEW_DIR")


class _Started:
    """This process's run: its lock, and its log once open (for the failure hook)."""

    def __init__(self, lock: Optional[RunLock]) -> None:
        self.lock, self.log = lock, None

    def fail(self, message: str) -> None:
        """The failure hook (lib/errors.py): the reason in the run's own log, or, when the
        start failed before its log existed, no trace left but the folders that were there."""
        if self.log is not None:
            self.log.event("error", self.log.last_step, message, level="ERROR", echo=False)
            self.log.close()
        if self.lock is not None:
            self.lock.release(remove_created=self.log is None)


def begin_run(cfg: Config, stage: str, run_dir: Path, resuming: bool) -> Accelerator:
    """Before anything but the lock is written: create the Accelerator, take the run folder's
    lock (lib/runlock.py: a second run into the folder stops here, naming the first), refuse a
    fresh start over an existing run, and seed everything."""
    accelerator = make_accelerator(getattr(cfg, stage).train, f"{stage}.train.mixed_precision")
    check_writable(run_dir)
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    stale = lock.acquire() if lock is not None else None
    started = _Started(lock)
    FAILURE_HOOKS.append(started.fail)
    _STARTED[0] = started
    check_new_run_dir(run_dir, resuming=resuming)
    if stale:
        cfg.warnings.append(stale)
    set_seed(cfg.seed)
    return accelerator


_STARTED: list[Optional[_Started]] = [None]


def open_run(cfg: Config, run_dir: Path, accelerator: Accelerator, earlier: StartupLog) -> RunLog:
    """Once every input has been checked: the run folder with its log (the ``earlier``
    messages first), ``config.yaml``, and no checkpoint folders a killed write left behind.
    The files of an earlier start that wrote no checkpoint are moved aside first."""
    if accelerator.is_main_process and not _checkpoint_folders(run_dir):
        leftovers = [run_dir / f for f in RUN_FILES if (run_dir / f).exists()]
        if leftovers:
            aside = run_dir / f"failed-start-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for path in leftovers:
                path.rename(aside / path.name)
            earlier.warning(f"{run_dir}: an earlier start wrote no checkpoint; its files are in {aside}")
    stage = run_dir.name                   # {output_dir}/vae or /prior
    log = RunLog(run_dir, accelerator.is_main_process, earlier=earlier, report_to=getattr(cfg, stage).train.report_to,
                 key=f"{stage}.train.report_to", config=cfg.to_dict())
    if _STARTED[0] is not None:
        _STARTED[0].log = log
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        ckpt.clean_temporaries(run_dir / "checkpoints")
    return log


def print_dry_run(cfg: Config, stage: str, resuming: bool, extra_points: Optional[dict[str, int]] = None,
                  notes: Sequence[str] = ()) -> int:
    """``--dry-run``: the checks a start makes without writing anything (a missing data root,
    missing maps or a fresh start over a run fail as they would), then the whole resolved
    config, the data found (:func:`describe_data`), the LR at the schedule's key points (start,
    end of warmup, ``extra_points``, 25/50/75/100 %), ``notes`` and where the outputs go.
    Returns the exit code 0."""
    train_cfg, run_dir = getattr(cfg, stage).train, Path(cfg.output_dir) / stage
    check_new_run_dir(run_dir, resuming)
    data_lines = describe_data(cfg.data, cfg.seed)
    print(f"# resolved config ({cfg.source_path})")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print("# data\n" + "\n".join(data_lines))
    print(f"\n# {stage} schedule: {train_cfg.lr_scheduler}, {fmt_step(train_cfg.max_steps)} optimizer steps, "
          f"batch {cfg.batch_size(stage)} x {train_cfg.gradient_accumulation_steps} accumulation per process")
    for label, step, lr in key_points(train_cfg, extra_points):
        print(f"step {step:>9d}  lr {fmt_lr(lr)}  ({label})")
    print(f"\n# precision\n{resolve_precision(train_cfg, f'{stage}.train.mixed_precision').describe()}")
    print("\n# outputs")
    for what, where in (("run folder", f"{run_dir}" + (" (continued: --resume)" if resuming else "")),
                        ("checkpoints", f"{run_dir / 'checkpoints'} (every {fmt_step(train_cfg.checkpoint_every)} "
                                        f"steps; the newest {train_cfg.keep_last} and the best are kept)"),
                        ("logs", f"{run_dir / 'train.log'}, {run_dir / 'metrics.jsonl'}, {run_dir / 'tb'}"),
                        ("samples", f"{run_dir / 'samples'} (at every validation, every "
                                    f"{fmt_step(train_cfg.val_every)} steps)"), *notes):
        print(f"{what:<12} {where}")
    for w in cfg.warnings:
        print(f"warning: {w}")
    return 0


def close_run(accelerator: Accelerator, log: RunLog, step: int, max_steps: int, exit_code: int,
              ckpt_dir: Path) -> None:
    """The closing event of a run that was not stopped by a fault (paused at ``--until-step``,
    or the end), with the seconds the run log spent writing; then every process waits for the
    others. (The process group is destroyed at exit, lib/accel.py, once the trainer's DDP
    wrappers are gone: destroying it while they live can hang the exit on N processes.)"""
    if exit_code == 0 and step < max_steps:
        log.event("paused", step, f"stopped at --until-step {step} of {max_steps}; continue with "
                  f"--resume latest", level="INFO", logging_seconds=round(log.seconds, 4))
    elif exit_code == 0:
        log.event("end", step, f"finished {step} steps; checkpoints in {ckpt_dir}", level="INFO",
                  logging_seconds=round(log.seconds, 4))
    accelerator.wait_for_everyone()
    log.close()
    started, _STARTED[0] = _STARTED[0], None
    if started is not None:
        if started.fail in FAILURE_HOOKS:
            FAILURE_HOOKS.remove(started.fail)
        if started.lock is not None:
            started.lock.release()
