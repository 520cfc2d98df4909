"""Learning-rate schedules: diffusers ``get_scheduler`` shapes with ``min_lr`` as an absolute floor.

One function says what the LR is after ``step`` optimizer updates (:func:`lr_at`); the
scheduler attached to an optimizer (:func:`build_scheduler`) is built from that same
function, so the LR a run *should* have and the LR it *has* cannot drift apart. The
trainers check them against each other at every log step (:func:`check_schedule`).

Convention (as in diffusers and ``torch.optim.lr_scheduler``): ``lr_at(s)`` is the value in
the optimizer's param groups after ``s`` optimizer steps, i.e. the LR that update ``s + 1``
uses. With warmup, ``lr_at(0) == 0``; ``lr_at(max_steps) == min_lr`` for the decaying
schedules.

Shapes (``w`` = warmup_steps, ``N`` = max_steps, ``p = (s - w) / (N - w)``):

- warmup (all but ``constant``): ``lr * s / w`` for ``s < w``
- ``cosine``:      ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))``
- ``linear``:      ``min_lr + (lr - min_lr) * (1 - p)``
- ``polynomial``:  ``min_lr + (lr - min_lr) * (1 - p) ** lr_power``
- ``constant`` / ``constant_with_warmup``: ``lr``

The decaying part comes from diffusers' own multiplier (which decays to 0); the floor is
applied as ``min_lr + (lr - min_lr) * multiplier``, so ``min_lr`` is an LR, not a factor of
``lr`` (the reference trainer's ``max(mult, min_lr)`` floored at ``lr * min_lr``).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler
from torch.optim.lr_scheduler import LambdaLR

from lib.config import TrainConfig
from lib.errors import UserError


class ScheduleMismatch(UserError):
    """The LR in an optimizer differs from what the configured schedule says."""


@functools.lru_cache(maxsize=32)
def _diffusers_multiplier(name: str, warmup: int, total: int, power: float,
                          lr: float, min_lr: float) -> Callable[[int], float]:
    # diffusers builds a LambdaLR around an optimizer; its lambda is a pure function of the
    # step, so a throwaway one-parameter optimizer yields exactly the multiplier it applies.
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=lr)
    if name == "polynomial":
        # diffusers' polynomial schedule has an absolute end LR of its own: use min_lr there.
        sched = get_polynomial_decay_schedule_with_warmup(
            dummy, num_warmup_steps=warmup, num_training_steps=total, lr_end=min_lr, power=power)
        return sched.lr_lambdas[0]
    kwargs: dict = {}
    if name != "constant":
        kwargs["num_warmup_steps"] = warmup
    if name in ("cosine", "linear"):
        kwargs["num_training_steps"] = total
    return get_scheduler(name, dummy, **kwargs).lr_lambdas[0]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate after ``step`` optimizer updates under schedule ``cfg``."""
    name = cfg.lr_scheduler
    if name in ("cosine", "linear", "polynomial") and cfg.min_lr >= cfg.lr:
        name = "constant_with_warmup"      # nothing to decay
    m = float(_diffusers_multiplier(name, cfg.warmup_steps, cfg.max_steps, cfg.lr_power,
                                    cfg.lr, cfg.min_lr)(step))
    if name in ("constant", "constant_with_warmup", "polynomial") or step < cfg.warmup_steps:
        return cfg.lr * m
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * m


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A LambdaLR whose LR after ``s`` steps is exactly :func:`lr_at(cfg, s)`.

    Every param group's ``lr`` is set to ``cfg.lr`` first so that the multiplier is relative
    to the configured base LR.
    """
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group["initial_lr"] = cfg.lr
    return LambdaLR(optimizer, lambda s: lr_at(cfg, s) / cfg.lr)


def rebase_scheduler(scheduler: LambdaLR, cfg: TrainConfig, step: int) -> None:
    """After a resume: follow schedule ``cfg`` (e.g. a new base LR) from ``step`` on.

    The restored scheduler keeps its step count; its base LR and lambda are replaced and
    the optimizer's LR is set to ``lr_at(cfg, step)``.
    """
    scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    scheduler.lr_lambdas = [lambda s: lr_at(cfg, s) / cfg.lr for _ in scheduler.lr_lambdas]
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = lr_at(cfg, step)
    scheduler._last_lr = [lr_at(cfg, step) for _ in scheduler.base_lrs]


def check_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                   name: str = "optimizer", rtol: float = 1e-6) -> None:
    """Raise :class:`ScheduleMismatch` unless the optimizer's LR equals ``lr_at(cfg, step)``.

    Catches a schedule that is not stepped, stepped twice, or overwritten (seeds/001: a
    cosine schedule was configured and never built; the LR stayed at 1e-4 and the loss
    diverged).
    """
    expected = lr_at(cfg, step)
    actual = optimizer.param_groups[0]["lr"]
    if not math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-20):
        raise ScheduleMismatch(
            f"schedule guard: {name} LR at step {step} is {format_lr(actual)} but the configured "
            f"{cfg.lr_scheduler} schedule says {format_lr(expected)} (is the scheduler stepped "
            f"exactly once per optimizer step?)")


def key_points(cfg: TrainConfig, extra: dict[str, int] | None = None) -> list[tuple[str, int, float]]:
    """(label, step, lr) at step 0, end of warmup, any ``extra`` steps, and 25/50/75/100 %."""
    points: list[tuple[str, int]] = [("start", 0)]
    if cfg.warmup_steps > 0:
        points.append(("end of warmup", cfg.warmup_steps))
    for label, step in (extra or {}).items():
        if 0 <= step <= cfg.max_steps:
            points.append((label, step))
    for pct in (25, 50, 75, 100):
        points.append((f"{pct}%", round(cfg.max_steps * pct / 100)))
    points.sort(key=lambda p: p[1])
    return [(label, step, lr_at(cfg, step)) for label, step in points]


def format_lr(value: float) -> str:
    """Significant digits, never fixed decimals (``5.000e-06``, not ``0.00001``)."""
    return f"{value:.3e}"
