"""A training run's lifecycle (:class:`Run`): the Accelerator, the run folder and its lock, the
seed, the run log and ``config.yaml``, the closing event and the error record; and
``--dry-run``, which shows what a run would do without starting one.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

from lib.config import Config, save_config
from lib.data.dataset import describe_data
from lib.errors import UserError, failure_message
from lib.models import prior, vae
from lib.numfmt import fmt_lr, fmt_step
from lib.outputs import RunLock
from lib.progress import progress
from lib.train import checkpoint as ckpt
from lib.train.accel import make_accelerator, resolve_precision
from lib.train.resume import check_resume, restore_run
from lib.train.runlog import RunLog, StartupLog, update_run_json
from lib.train.schedule import key_points

# Config keys that make a checkpoint another model, per stage: a resume with other values is refused.
RESUME_KEYS = {"vae": vae.RESUME_KEYS, "prior": prior.RESUME_KEYS}
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
    is wiped). A folder whose earlier start wrote no checkpoint is not a run (see :meth:`Run.open`)."""
    check_writable(run_dir)
    if resuming or not run_dir.is_dir():
        return
    found = _checkpoint_folders(run_dir)
    if found:
        raise UserError(f"{run_dir} already holds a run ({len(found)} checkpoint(s), the newest "
                        f"{found[-1].name}); continue it with --resume latest, or start elsewhere "
                        f"with --set output_dir=NEW_DIR")


class Run:
    """One training run, from its first check to its closing event::

        with Run(cfg, "vae", args) as run:      # accelerator, lock, seed, --resume found and checked
            ...                                 # inputs checked (run.start collects the messages)
            log = run.open()                    # the folder, its log, config.yaml
            state = run.restore(...)            # with --resume: the training state
            ...                                 # the loop, run.save_checkpoint(...)
            run.close(step, exit_code)          # paused / end

    It owns the Accelerator, the run folder's lock, the log and the error record: a run that
    fails (a one-line error, a signal, a bug) leaves the reason as an ``error`` event in its own
    log, or, when it failed before its log existed, nothing but the folders that were there."""

    def __init__(self, cfg: Config, stage: str, args: Any) -> None:
        """``args``: the trainer's command line (``resume``, ``allow_data_change``)."""
        self.cfg, self.stage, self.args, self.resume_spec = cfg, stage, args, args.resume
        self.train_cfg = getattr(cfg, stage).train
        self.dir = Path(cfg.output_dir) / stage
        self.ckpt_dir = self.dir / "checkpoints"
        self.lock: Optional[RunLock] = None
        self.log: Optional[RunLog] = None
        self.resume: Optional[ckpt.CheckpointInfo] = None
        self.checked: Optional[dict[str, Any]] = None

    def __enter__(self) -> "Run":
        """Before anything but the lock is written: the Accelerator, the run folder's lock
        (lib/outputs.py: a second run into the folder stops here, naming the first), no fresh
        start over an existing run, the seed, and the checkpoint ``--resume`` names, which must be
        of the same model (:data:`RESUME_KEYS`) and data (lib/train/resume.py)."""
        self.accelerator = make_accelerator(self.train_cfg, f"{self.stage}.train.mixed_precision")
        check_writable(self.dir)
        self.lock = RunLock(self.dir) if self.accelerator.is_main_process else None
        try:
            stale = self.lock.acquire() if self.lock is not None else None
            check_new_run_dir(self.dir, resuming=self.resume_spec is not None)
            if stale:
                self.cfg.warnings.append(stale)
            set_seed(self.cfg.seed)
            self.start = StartupLog(self.accelerator.is_main_process, self.cfg.warnings)   # to train.log later
            self.resume = ckpt.resolve_resume(self.resume_spec, self.ckpt_dir, self.start.warning, self.start.info)
            if self.resume is not None:
                self.checked = check_resume(self.resume, self.cfg, RESUME_KEYS[self.stage],
                                            getattr(self.args, "allow_data_change", False))
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def open(self) -> RunLog:
        """Once every input has been checked: the run folder with its log (the start's
        messages first), ``config.yaml``, and no checkpoint folders a killed write left behind.
        The files of an earlier start that wrote no checkpoint are moved aside first."""
        if self.accelerator.is_main_process and not _checkpoint_folders(self.dir):
            leftovers = [self.dir / f for f in RUN_FILES if (self.dir / f).exists()]
            if leftovers:
                aside = self.dir / f"failed-start-{time.strftime('%Y%m%d-%H%M%S')}"
                aside.mkdir()
                for path in leftovers:
                    path.rename(aside / path.name)
                self.start.warning(f"{self.dir}: an earlier start wrote no checkpoint; its files are in {aside}")
        self.log = RunLog(self.dir, self.accelerator.is_main_process, earlier=self.start,
                          report_to=self.train_cfg.report_to, key=f"{self.stage}.train.report_to",
                          config=self.cfg.to_dict())
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.dir / "config.yaml")
            ckpt.clean_temporaries(self.ckpt_dir)
        return self.log

    def restore(self, schedulers: dict[str, Any], ema: Optional[EMAModel] = None,
                ema_module: Optional[torch.nn.Module] = None) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """With ``--resume``: the Accelerate state, the EMA weights and rebased ``schedulers``
        (:func:`lib.train.resume.restore_run`). Returns the checkpoint's trainer state (empty for
        a fresh start) and the note for ``run.json``."""
        if self.resume is None:
            return {}, None
        return restore_run(self.accelerator, self.resume, self.cfg, self.stage, self.checked, self.log, schedulers,
                           ema, ema_module)

    def write_run_json(self, resume_note: Optional[dict[str, Any]], **extra: Any) -> None:
        """``run.json``: command line, versions, resume history, the precision and ``extra``."""
        if self.accelerator.is_main_process:
            extra["precision"] = self.accelerator.precision.to_dict()
            update_run_json(self.dir, self.stage, resume_note, extra)

    def save_checkpoint(self, step: int, state: dict[str, Any], files: dict[str, Any]) -> Optional[Path]:
        """``checkpoints/step-N``: ``files``, the Accelerate state and ``state`` (lib/train/checkpoint.py)."""
        return ckpt.save_checkpoint(self.accelerator, self.ckpt_dir, step, self.cfg, state, files,
                                    self.train_cfg.keep_last, self.log)

    def progress(self, step: int) -> Any:
        """The training progress bar (main process, terminal only), from ``step``."""
        return progress(self.train_cfg.max_steps, step, self.stage, show=self.accelerator.is_main_process)

    def close(self, step: int, exit_code: int) -> None:
        """The closing event of a run that was not stopped by a fault (paused at ``--until-step``,
        or the end), with the seconds the run log spent writing; then every process waits for the
        others. (The process group is destroyed at exit, lib/train/accel.py, once the trainer's DDP
        wrappers are gone: destroying it while they live can hang the exit on N processes.)"""
        log, max_steps = self.log, self.train_cfg.max_steps
        if exit_code == 0 and step < max_steps:
            log.event("paused", step, f"stopped at --until-step {step} of {max_steps}; continue with "
                      f"--resume latest", level="INFO", logging_seconds=round(log.seconds, 4))
        elif exit_code == 0:
            log.event("end", step, f"finished {step} steps; checkpoints in {self.ckpt_dir}", level="INFO",
                      logging_seconds=round(log.seconds, 4))
        self.accelerator.wait_for_everyone()

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        """Close the log and release the lock; after a failure, first the ``error`` event
        (:func:`lib.errors.failure_message`), or, before the log existed, remove what the start
        created. The exception goes on to :func:`lib.errors.run_cli`."""
        try:
            if exc is not None and self.log is not None:
                self.log.event("error", self.log.last_step, failure_message(exc), level="ERROR", echo=False)
        finally:
            if self.log is not None:
                self.log.close()
            if self.lock is not None:
                self.lock.release(remove_created=exc is not None and self.log is None)
                self.lock = None
        return False


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
