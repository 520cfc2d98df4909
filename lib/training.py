"""Training-loop mechanics shared by both trainers: the optimizer update (clip, non-finite
skip, schedule step), the training record, and checkpoint save/restore through Accelerate."""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import yaml
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from lib import checkpoint as ckpt
from lib.config import Config, TrainConfig, save_config
from lib.errors import CheckpointError
from lib.runlog import MeanTracker, RunLog, check_new_run_dir, fmt
from lib.schedule import check_schedule, key_points, rebase_scheduler

# Schedulers are stepped on every update, also for the discriminator before it starts
# training (its LR follows the same curve); torch warns about that order once.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")


# --------------------------------------------------------------------------- run start
def print_dry_run(cfg: Config, stage: str, extra_points: Optional[dict[str, int]] = None) -> int:
    """``--dry-run``: the resolved ``stage`` section and the LR at the schedule's key points
    (start, end of warmup, ``extra_points``, 25/50/75/100 %). Returns the exit code 0."""
    tcfg = getattr(cfg, stage).train
    print(f"# resolved config ({cfg.source_path})")
    print(yaml.safe_dump({stage: cfg.to_dict()[stage]}, sort_keys=False))
    print(f"# {tcfg.lr_scheduler} schedule, {tcfg.max_steps} optimizer steps")
    for label, step, lr in key_points(tcfg, extra_points):
        print(f"step {step:>9d}  lr {lr:.3e}  ({label})")
    for w in cfg.warnings:
        print(f"warning: {w}")
    return 0


def open_run(cfg: Config, stage: str, run_dir: Path, ckpt_dir: Path, resuming: bool,
             warnings: Sequence[str] = ()) -> tuple[Accelerator, RunLog]:
    """Start (or continue) the run in ``run_dir``: refuse a fresh start over an existing run,
    create the Accelerator, seed everything, open the run log (``warnings`` go there first),
    and write ``config.yaml``."""
    from accelerate.utils import set_seed
    from lib.accel import make_accelerator
    check_new_run_dir(run_dir, resuming=resuming)
    accelerator = make_accelerator(getattr(cfg, stage).train)
    set_seed(cfg.seed)
    log = RunLog(run_dir, accelerator.is_main_process)
    for w in warnings:
        log.warning(w)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        ckpt.clean_temporaries(ckpt_dir)
    return accelerator, log


# --------------------------------------------------------------------------- updates
def _raw(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)      # AcceleratedOptimizer -> torch optimizer


def clip_grad_norms(accelerator: Accelerator, optimizers: Sequence[torch.optim.Optimizer],
                    max_norm: float) -> list[torch.Tensor]:
    """Clip each optimizer's gradients to ``max_norm`` (0: measure only); return the pre-clip
    global norms.

    Runs before the optimizer steps (the reference trainer clipped after them, to no effect).
    Gradients are already synchronised across processes here. Under fp16 each optimizer's
    gradients are unscaled exactly once first.
    """
    limit = max_norm if max_norm > 0 else math.inf
    norms = []
    for opt in optimizers:
        if accelerator.scaler is not None:
            accelerator.scaler.unscale_(_raw(opt))
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            norms.append(torch.zeros((), device=accelerator.device))
            continue
        norms.append(torch.nn.utils.clip_grad_norm_(params, limit))
    return norms


def apply_updates(accelerator: Accelerator, optimizers: Sequence[torch.optim.Optimizer],
                  schedulers: Sequence[Any], finite: bool) -> bool:
    """Step every optimizer and scheduler, or none of them. Returns whether the update happened.

    ``finite`` is False when a loss or gradient norm was NaN/inf: then nothing changes (no
    weight, schedule or EMA update). Under fp16 the gradient scaler decides instead: it steps
    all optimizers (skipping them on inf/NaN gradients) and updates its scale once, and a
    step it skipped does not advance the schedule.
    """
    scaler = accelerator.scaler
    if scaler is not None:
        scale = scaler.get_scale()
        for opt in optimizers:
            scaler.step(_raw(opt))
        scaler.update()
        applied = scaler.get_scale() >= scale      # the scale drops exactly when it skipped
    else:
        applied = finite
        if applied:
            for opt in optimizers:
                opt.step()
    if applied:
        for sched in schedulers:
            sched.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return applied


def all_finite(accelerator: Accelerator, values: Iterable[torch.Tensor]) -> bool:
    """True if every value is finite on every process (one decision for all replicas)."""
    flag = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all()
    flag = flag.float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "min")
    return bool(flag.item() > 0)


def any_process(accelerator: Accelerator, value: bool) -> bool:
    """True if ``value`` is true on any process (e.g. a preemption signal seen by one rank)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([1.0 if value else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item() > 0)


# --------------------------------------------------------------------------- logging
def train_record(accelerator: Accelerator, tracker: MeanTracker, keys: list[str],
                 lrs: dict[str, torch.optim.Optimizer], steps_per_sec: float,
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The one place a training record is built: interval means of ``keys`` averaged across
    processes, the LR of every optimizer read from its param groups, throughput."""
    values: dict[str, Any] = {name: opt.param_groups[0]["lr"] for name, opt in lrs.items()}
    reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    values.update(tracker.result(keys, reduce))
    values["steps_per_sec"] = steps_per_sec
    values.update(extra or {})
    return values


def guard_schedules(cfg: TrainConfig, step: int, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """The schedule guard: every optimizer's LR must equal the configured schedule's value."""
    for name, opt in optimizers.items():
        check_schedule(opt, cfg, step, name)


class Cadence:
    """When a training loop writes a training record (``log_every``), validates
    (``val_every``) and checkpoints (``checkpoint_every``; the last step of the run does both);
    its progress bar and the throughput between training records."""

    def __init__(self, cfg: TrainConfig, until_step: Optional[int] = None, bar: Any = None) -> None:
        self.cfg, self.bar = cfg, bar
        self.stop_at = min(cfg.max_steps, until_step or cfg.max_steps)    # --until-step
        self._since, self._steps = time.perf_counter(), 0

    def stepped(self) -> None:
        """One optimizer update was applied."""
        self._steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.stop_at

    def steps_per_sec(self) -> float:
        """Updates per second since the previous call (or the start)."""
        now = time.perf_counter()
        rate = self._steps / max(now - self._since, 1e-9)
        self._since, self._steps = now, 0
        return rate

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.stop_at

    def validate_due(self, step: int) -> bool:
        """A validation without a checkpoint (a checkpoint validates anyway)."""
        return step % self.cfg.val_every == 0 and not self.checkpoint_due(step)


def training_batches(accelerator: Accelerator, cfg: Config, dataset: Any, start_batch: int) -> Iterator[dict]:
    """This process's shard of the run's training stream, from batch ``start_batch`` on."""
    from lib.data import train_batches
    return train_batches(dataset, cfg.data.batch_size, cfg.seed, start_batch=start_batch,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory)


class BestValidation:
    """The validation a checkpoint records: run at most once per step (a stop right after a
    scheduled checkpoint does not write it again), with the best (lowest) loss so far."""

    def __init__(self, validate: Callable[[int], float], best: float = math.inf) -> None:
        self.validate, self.best, self._last = validate, best, -1

    def __call__(self, step: int) -> Optional[float]:
        """The validation loss at ``step``; None when ``step`` is checkpointed already."""
        if step == self._last:
            return None
        self._last = step
        loss = self.validate(step)
        self.best = min(self.best, loss)
        return loss


# --------------------------------------------------------------------------- EMA
def save_ema(ema: EMAModel, module: torch.nn.Module, path: Path) -> None:
    """EMA weights as a safetensors state dict keyed like ``module``'s parameters."""
    names = [n for n, _ in module.named_parameters()]
    save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, ema.shadow_params)}, str(path))


def load_ema(ema: EMAModel, module: torch.nn.Module, path: Path, optimization_step: int) -> None:
    tensors = load_file(str(path))
    for (name, _), shadow in zip(module.named_parameters(), ema.shadow_params):
        if name not in tensors or tensors[name].shape != shadow.shape:
            raise CheckpointError(f"{path}: EMA weights do not match the model ({name})")
        shadow.data.copy_(tensors[name].to(shadow.device))
    ema.optimization_step = optimization_step


@contextmanager
def ema_weights(ema: Optional[EMAModel], parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block the parameters hold the EMA weights (unchanged when ``ema`` is None)."""
    if ema is None:
        yield
        return
    params = list(parameters)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                 hint: str) -> None:
    """Load ``tensors`` into ``module``: every key of its state dict must be there with its
    shape, and nothing else; otherwise a one-line :class:`CheckpointError` naming the first
    difference, ``source`` and ``hint`` (what to do about it)."""
    own = module.state_dict()
    problems = [f"{k}: missing" for k in own if k not in tensors]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} there, {tuple(v.shape)} in this config"
                 for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    problems += [f"{k}: not in this model" for k in tensors if k not in own]
    if problems:
        raise CheckpointError(f"{source}: the weights do not match the configured model "
                              f"({problems[0]}; {len(problems)} difference(s)); {hint}")
    module.load_state_dict(tensors)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, step: int, cfg: Config,
                    state: dict[str, Any], write_files: Callable[[Path], None],
                    keep_last: int, log: RunLog) -> Optional[Path]:
    """Write ``checkpoints/step-{step:07d}`` atomically on the main process (every process
    contributes its RNG state through ``save_state``), then rotate old checkpoints."""
    tmp = ckpt_dir / f"{ckpt.TMP_PREFIX}{ckpt.checkpoint_name(step)}"
    if accelerator.is_main_process:
        ckpt.begin(ckpt_dir, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        write_files(tmp)
        save_config(cfg, tmp / "config.yaml")
        final = ckpt.commit(tmp, dict(state, step=step))
        removed = ckpt.rotate(ckpt_dir, keep_last, log.warning)
        log.info(f"checkpoint {final}" + (f" (removed {len(removed)} older)" if removed else ""))
    accelerator.wait_for_everyone()
    return final


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


def load_training_state(accelerator: Accelerator, info: ckpt.CheckpointInfo) -> None:
    """Restore models, optimizers, schedulers, RNG and scaler from ``info``'s ``accelerate/``."""
    try:
        accelerator.load_state(str(info.path / "accelerate"))
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{info.path}: cannot restore the training state ({first[:200]})") from None


SCHEDULE_KEYS = ("lr", "min_lr", "lr_scheduler", "warmup_steps", "lr_power", "max_steps")


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


def restore_run(accelerator: Accelerator, resume: ckpt.CheckpointInfo, cfg: Config, stage: str,
                model_keys: list[str], sup: "Supervisor", log: RunLog, schedulers: dict[str, Any],
                ema: Optional[EMAModel] = None, ema_module: Optional[torch.nn.Module] = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Continue from ``resume``: check the model keys, restore the Accelerate state (models,
    optimizers, schedulers, RNG), the fault policy's counters and the EMA weights, and rebase
    the schedules if this config changed them. Returns the checkpoint's trainer state and the
    note for ``run.json``."""
    saved = check_compatible(resume, cfg, model_keys)
    load_training_state(accelerator, resume)
    state = resume.state
    step = state["step"]
    sup.load_state_dict(state)
    if ema is not None:
        load_ema(ema, ema_module, resume.path / "ema.safetensors", state.get("ema_step", step))
    changes = rebase_if_changed(saved[stage]["train"], getattr(cfg, stage).train, step, schedulers)
    note = {"from_checkpoint": str(resume.path), "step": step, "changes": changes}
    log.event("resume", step, f"resumed from {resume.path} at step {step}" +
              (f"; schedule changed {changes}, continuing it from step {step}" if changes else ""),
              level="INFO", from_checkpoint=str(resume.path), from_step=step, changes=changes)
    return state, note


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- fault policy
class Supervisor:
    """One run's fault policy, the same for both stages: non-finite updates, the schedule
    guard, the divergence watchdog and preemption signals (see lib/faults.py).

    The trainer asks it after each update and each log record whether to stop; when it says
    so, the trainer writes a checkpoint and exits with :attr:`exit_code`.
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, stage: str, log: RunLog,
                 ckpt_dir: Path) -> None:
        from lib.faults import DivergenceWatchdog, NonfiniteCounter, Preemption
        self.accelerator, self.cfg, self.stage, self.log, self.ckpt_dir = accelerator, cfg, stage, log, ckpt_dir
        self.nonfinite = NonfiniteCounter(cfg.max_nonfinite)
        self.watchdog = DivergenceWatchdog(cfg.divergence_factor, cfg.divergence_window)
        self.preemption = Preemption()
        self.exit_code = 0

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_total": self.nonfinite.total, "watchdog": self.watchdog.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite.total = state.get("nonfinite_total", 0)
        self.watchdog.load_state_dict(state.get("watchdog", {}))

    def update_done(self, applied: bool, step: int, values: dict[str, torch.Tensor]) -> bool:
        """After an optimizer step: ``applied`` False means it was skipped. Returns True when
        the run must stop (``max_nonfinite`` skips in a row)."""
        from lib.faults import EXIT_STOPPED
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
                       f"checkpointing the last good state (step {step}). Try a lower "
                       f"{self.stage}.train.lr or grad_clip, or bf16 instead of fp16, then --resume latest")
        self.exit_code = EXIT_STOPPED
        return True

    def record_done(self, step: int, watched: Optional[float], watched_name: str,
                    optimizers: dict[str, torch.optim.Optimizer]) -> bool:
        """After a training record: the schedule guard (raises on a mismatch) and the
        divergence watchdog on ``watched``. Returns True when the run must stop."""
        from lib.faults import EXIT_STOPPED
        guard_schedules(self.cfg, step, optimizers)
        div = self.watchdog.update(step, watched)
        if div is None:
            return False
        before = [c for c in ckpt.list_checkpoints(self.ckpt_dir, self.log.warning) if c.step <= div.best_step]
        best = ckpt.best_of(before) or (before[-1] if before else None)
        if best is not None and self.accelerator.is_main_process:
            (best.path / ckpt.KEEP_FILE).write_text(f"kept: last good checkpoint before the divergence "
                                                    f"that began at step {div.began}\n")
        where = f"best checkpoint before it: {best.path}" if best else "no checkpoint before it"
        self.log.event("divergence", step, f"smoothed {watched_name} {div.value:.4g} > "
                       f"{self.cfg.divergence_factor:g} x best {div.best:.4g} (step {div.best_step}) "
                       f"since step {div.began}; {where}", began=div.began, best_step=div.best_step,
                       best_checkpoint=str(best.path) if best else None)
        if self.cfg.on_divergence != "stop":
            return False
        hint = (f"resume from it with a lower LR: --resume {best.path} --set "
                f"{self.stage}.train.lr={self.cfg.lr / 10:.3e}") if best else f"lower {self.stage}.train.lr"
        self.log.event("stopped", step, f"stopping on divergence; {hint}")
        self.exit_code = EXIT_STOPPED
        return True

    def log_train(self, step: int, tracker: MeanTracker, keys: list[str],
                  optimizers: dict[str, torch.optim.Optimizer], cadence: Cadence, watched: str) -> bool:
        """A training record (:func:`train_record`, with the skipped updates) to the run log and
        the progress bar, then :meth:`record_done` on ``watched``. True when the run must stop."""
        rec = self.log.record("train", step, train_record(
            self.accelerator, tracker, keys, optimizers, cadence.steps_per_sec(),
            {"nonfinite_skipped": self.nonfinite.total}), echo=False)
        cadence.bar.set_postfix_str(f"{watched} {fmt(rec[watched])} lr {rec['lr']:.3e}")
        return self.record_done(step, rec[watched], watched, optimizers)

    def preempted(self, step: int) -> bool:
        """True (on every process) once SIGTERM/SIGINT reached any process."""
        from lib.faults import EXIT_PREEMPTED
        if not any_process(self.accelerator, self.preemption.requested):
            return False
        self.log.event("preempted", step, f"{self.preemption.signal_name or 'signal'}: writing a "
                       f"checkpoint at step {step}; continue with --resume latest")
        self.exit_code = EXIT_PREEMPTED
        return True

    @contextmanager
    def running(self, step: int, until_step: Optional[int] = None) -> Iterator[Cadence]:
        """Around the training loop from ``step``, yielding its :class:`Cadence` (with a progress
        bar): preemption signals are caught inside; on the way out, also on an error, the bar
        and the run log close and the signal handlers are restored."""
        from tqdm import tqdm
        bar = tqdm(total=self.cfg.max_steps, initial=step, desc=self.stage, dynamic_ncols=True,
                   disable=not self.accelerator.is_main_process)
        self.preemption.install()
        try:
            yield Cadence(self.cfg, until_step, bar)
        finally:
            bar.close()
            self.preemption.uninstall()
            self.log.close()

    def periodic(self, step: int, applied: bool, cadence: Cadence, validate: Callable[[int], Any],
                 save: Callable[[int], None]) -> bool:
        """The end of a loop iteration: validation or a checkpoint when ``cadence`` says so, a
        checkpoint on a preemption signal. Returns True when the loop must stop (preempted)."""
        preempted = self.preempted(step)          # every iteration: a collective on N processes
        if preempted or (applied and cadence.checkpoint_due(step)):
            save(step)
        elif applied and cadence.validate_due(step):
            validate(step)
        return preempted

    def finish(self, step: int) -> None:
        """After the loop (inside :meth:`running`): the closing event of a run that was not
        stopped (paused at ``--until-step``, or the end), and the end of Accelerate's trackers."""
        if self.exit_code == 0 and step < self.cfg.max_steps:
            self.log.event("paused", step, f"stopped at --until-step {step} of {self.cfg.max_steps}; "
                           f"continue with --resume latest", level="INFO")
        elif self.exit_code == 0:
            self.log.event("end", step, f"finished {step} steps; checkpoints in {self.ckpt_dir}",
                           level="INFO")
        # The process group is destroyed at exit (lib/accel.py), after the trainer's DDP
        # wrappers are gone: destroying it while they live can hang the exit on N processes.
        self.accelerator.wait_for_everyone()
