"""Starting a run: the run folder, the Accelerator, the seed, the run log and ``config.yaml``;
and ``--dry-run``, which shows what a run would do without starting one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from lib import checkpoint as ckpt
from lib.accel import make_accelerator
from lib.config import Config, save_config
from lib.errors import UserError
from lib.numfmt import fmt_lr
from lib.runlog import RunLog, StartupLog
from lib.schedule import key_points
from lib.splits import configured_split

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "run.json")


def check_new_run_dir(run_dir: Path, resuming: bool) -> None:
    """Refuse to start a fresh run in a folder that already holds one (nothing is wiped)."""
    if resuming or not run_dir.exists():
        return
    found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if found:
        raise UserError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                        f"--resume latest, or start elsewhere with --set output_dir=NEW_DIR")


def begin_run(cfg: Config, stage: str, run_dir: Path, resuming: bool) -> Accelerator:
    """Before anything is written: refuse a fresh start over an existing run, create the
    Accelerator and seed everything."""
    check_new_run_dir(run_dir, resuming=resuming)
    accelerator = make_accelerator(getattr(cfg, stage).train)
    set_seed(cfg.seed)
    return accelerator


def open_run(cfg: Config, run_dir: Path, accelerator: Accelerator, earlier: StartupLog) -> RunLog:
    """Once every input has been checked: the run folder with its log (the ``earlier``
    messages first), ``config.yaml``, and no checkpoint folders a killed write left behind."""
    log = RunLog(run_dir, accelerator.is_main_process, earlier=earlier)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        ckpt.clean_temporaries(run_dir / "checkpoints")
    return log


def print_dry_run(cfg: Config, stage: str, extra_points: Optional[dict[str, int]] = None) -> int:
    """``--dry-run``: the resolved ``stage`` section and the LR at the schedule's key points
    (start, end of warmup, ``extra_points``, 25/50/75/100 %). Returns the exit code 0."""
    train_cfg = getattr(cfg, stage).train
    print(f"# resolved config ({cfg.source_path})")
    print(yaml.safe_dump({stage: cfg.to_dict()[stage]}, sort_keys=False))
    print(f"# data split: {configured_split(cfg.data)}")
    print(f"# {train_cfg.lr_scheduler} schedule, {train_cfg.max_steps} optimizer steps")
    for label, step, lr in key_points(train_cfg, extra_points):
        print(f"step {step:>9d}  lr {fmt_lr(lr)}  ({label})")
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
