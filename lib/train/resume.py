"""Continuing a run from a checkpoint: the model must be the same, then the Accelerate state
(models, optimizers, schedules, RNG), the EMA weights and the trainer state come back, and a
changed schedule is continued from the resume step.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import yaml
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from lib.config import Config, TrainConfig
from lib.errors import CheckpointError
from lib.train import checkpoint as ckpt
from lib.train.ema import EMA_FILE, load_ema
from lib.train.runlog import RunLog
from lib.train.schedule import rebase_scheduler

SCHEDULE_KEYS = ("lr", "min_lr", "lr_scheduler", "warmup_steps", "lr_power", "max_steps")
DATA_KEYS = ("simulation", "threshold", "cars_input", "split", "split_seed", "tx_per_map", "image_size")


def check_compatible(info: ckpt.CheckpointInfo, cfg: Config, sections: list[str]) -> dict[str, Any]:
    """Compare the checkpoint's saved config with ``cfg`` on ``sections`` (dotted, e.g.
    ``vae.model``): a different model shape is a one-line error naming the keys. Returns
    the saved config as a dict."""
    path = info.path / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        raise CheckpointError(f"{path}: missing or unreadable (not a checkpoint of this toolkit?)") from None
    now = cfg.to_dict()
    for section in sections:
        a, b = saved, now
        for part in section.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if isinstance(a, dict) and isinstance(b, dict):
            diffs = [(f"{section}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)]
        else:
            diffs = [(section, a, b)] if a != b else []
        if diffs:
            key, old, new = diffs[0]
            raise CheckpointError(
                f"{info.path} was saved with a different model: {key} = {old!r} there, "
                f"{new!r} in this config ({len(diffs)} differing key(s))")
    return saved


class _Said(logging.Handler):
    """The messages of a logger while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_training_state(accelerator: Accelerator, info: ckpt.CheckpointInfo) -> Optional[str]:
    """Restore models, optimizers, schedulers, RNG and scaler from ``info``'s ``accelerate/``.
    Returns a warning when the random states could not be read (Accelerate carries on without
    them and only says so at its INFO level), else None."""
    logger = logging.getLogger("accelerate.checkpointing")
    said, level = _Said(), logger.level
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    try:
        accelerator.load_state(str(info.path / "accelerate"))
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{info.path}: cannot restore the training state ({first[:200]})") from None
    finally:
        logger.removeHandler(said)
        logger.setLevel(level)
    if any("Could not load random states" in m for m in said.messages):
        return (f"{info.path / 'accelerate'}: the random states (random_states_{accelerator.process_index}.pkl) "
                f"could not be read; training continues with fresh ones, so it will not repeat an uninterrupted "
                f"run exactly (data order and weights are restored)")
    return None


def rebase_if_changed(saved_train: dict[str, Any], cfg: TrainConfig, step: int,
                      schedulers: dict[str, Any]) -> dict[str, Any]:
    """When a resume changes the schedule (e.g. a lower ``lr``), continue the new schedule
    from ``step``. Returns ``{key: [old, new]}`` for the changed keys ({} when unchanged)."""
    changes = {k: [saved_train.get(k), getattr(cfg, k)] for k in SCHEDULE_KEYS
               if k in saved_train and saved_train.get(k) != getattr(cfg, k)}
    if changes:
        for sched in schedulers.values():
            rebase_scheduler(getattr(sched, "scheduler", sched), cfg, step)
    return changes


def check_resume(resume: ckpt.CheckpointInfo, cfg: Config, model_keys: list[str],
                 allow_data_change: bool = False) -> dict[str, Any]:
    """Before anything is written: the checkpoint must be of the same model (``model_keys``),
    and of the same data (:data:`DATA_KEYS` of ``data``) unless ``allow_data_change``
    (``--allow-data-change``). Returns ``{"saved": its config, "data_changes": {key: [old,
    new]}}`` for :func:`restore_run`."""
    saved = check_compatible(resume, cfg, model_keys)
    then, now = saved.get("data", {}), cfg.to_dict()["data"]
    changes = {k: [then.get(k), now[k]] for k in DATA_KEYS if k in then and then.get(k) != now[k]}
    if changes and not allow_data_change:
        key, (old, new) = next(iter(changes.items()))
        raise CheckpointError(f"{resume.path} was trained on other data: data.{key} = {old!r} there, {new!r} "
                              f"now ({len(changes)} differing key(s)); resume with the same data, or pass "
                              f"--allow-data-change (recorded in run.json)")
    return {"saved": saved, "data_changes": changes}


def restore_run(accelerator: Accelerator, resume: ckpt.CheckpointInfo, cfg: Config, stage: str,
                checked: dict[str, Any], log: RunLog, schedulers: dict[str, Any],
                ema: Optional[EMAModel] = None, ema_module: Optional[torch.nn.Module] = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Continue from ``resume`` (checked by :func:`check_resume`): restore the Accelerate state
    (models, optimizers, schedulers, RNG) and the EMA weights, and rebase the schedules if this
    config changed them. Returns the checkpoint's trainer state and the note for ``run.json``."""
    rng_warning = load_training_state(accelerator, resume)
    if rng_warning:
        log.warning(rng_warning)
    state = resume.state
    step = state["step"]
    if ema is not None:
        load_ema(ema, ema_module, resume.path / EMA_FILE, state.get("ema_step", step))
    changes = rebase_if_changed(checked["saved"][stage]["train"], getattr(cfg, stage).train, step, schedulers)
    data_changes = checked["data_changes"]
    note = {"from_checkpoint": str(resume.path), "step": step, "changes": changes}
    if data_changes:
        note["data_changes"] = data_changes
    log.event("resume", step, f"resumed from {resume.path} at step {step}" +
              (f"; schedule changed {changes}, continuing it from step {step}" if changes else "") +
              (f"; data changed {data_changes} (--allow-data-change)" if data_changes else ""),
              level="INFO", from_checkpoint=str(resume.path), from_step=step, changes=changes,
              data_changes=data_changes)
    return state, note
