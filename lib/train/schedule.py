"""Learning-rate schedules: diffusers ``get_scheduler`` shapes with ``min_lr`` as an absolute floor.

Two computations of one schedule, checked against each other:

- :func:`lr_at` says what the LR is after ``step`` optimizer updates: the closed forms below,
  plain Python (no torch import, so ``report.py`` can evaluate it for 150K logged steps
  at once). It is the specification.
- :func:`build_scheduler` attaches the implementation to an optimizer: a ``LambdaLR`` over
  the multiplier of diffusers' ``get_scheduler`` for the same name, floored at ``min_lr``.

``tests/test_schedule.py`` asserts they agree at every step of every schedule, and the
trainers check the optimizer's LR against :func:`lr_at` at every log step
(:func:`check_schedule`), so the LR a run *should* have and the LR it *has* cannot drift apart.

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

diffusers' multipliers decay to 0; the floor is applied as ``min_lr + (lr - min_lr) *
multiplier``, so ``min_lr`` is an LR, not a factor of ``lr`` (the reference trainer's
``max(mult, min_lr)`` floored at ``lr * min_lr``). A decaying schedule with ``min_lr >= lr``
has nothing to decay and is ``constant_with_warmup``.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable

from lib.config import TrainConfig
from lib.errors import UserError
from lib.numfmt import fmt_lr

if TYPE_CHECKING:                    # torch and diffusers are imported where a scheduler is built
    import torch
    from torch.optim.lr_scheduler import LambdaLR

DECAYING = ("cosine", "linear", "polynomial")


class ScheduleMismatch(UserError):
    """The LR in an optimizer differs from what the configured schedule says."""


def _shape(cfg: TrainConfig) -> str:
    """The schedule name in effect: a decaying schedule without room to decay is constant."""
    if cfg.lr_scheduler in DECAYING and cfg.min_lr >= cfg.lr:
        return "constant_with_warmup"
    return cfg.lr_scheduler


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate after ``step`` optimizer updates under schedule ``cfg`` (closed form)."""
    name = _shape(cfg)
    w, n = cfg.warmup_steps, cfg.max_steps
    if name != "constant" and step < w:
        return cfg.lr * (step / max(1, w))
    if name in ("constant", "constant_with_warmup"):
        return cfg.lr
    p = (step - w) / max(1, n - w)
    if name == "cosine":
        m = max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    elif name == "linear":
        m = max(0.0, (n - step) / max(1, n - w))
    else:
        m = (1.0 - min(p, 1.0)) ** cfg.lr_power
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * m


@functools.lru_cache(maxsize=32)
def _diffusers_multiplier(name: str, warmup: int, total: int, power: float) -> Callable[[int], float]:
    """diffusers' multiplier for schedule ``name`` (decaying to 0), as a function of the step."""
    import torch
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler
    # diffusers builds a LambdaLR around an optimizer; its lambda is a pure function of the
    # step, so a throwaway one-parameter optimizer yields exactly the multiplier it applies.
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=1.0)
    if name == "polynomial":     # get_scheduler has no power argument; end at 0 like the others
        return get_polynomial_decay_schedule_with_warmup(
            dummy, num_warmup_steps=warmup, num_training_steps=total, lr_end=0.0, power=power).lr_lambdas[0]
    kwargs: dict = {}
    if name != "constant":
        kwargs["num_warmup_steps"] = warmup
    if name in DECAYING:
        kwargs["num_training_steps"] = total
    return get_scheduler(name, dummy, **kwargs).lr_lambdas[0]


def _factor(cfg: TrainConfig) -> Callable[[int], float]:
    """``LR(step) / cfg.lr`` from diffusers' multiplier with the ``min_lr`` floor."""
    name = _shape(cfg)
    m = _diffusers_multiplier(name, cfg.warmup_steps, cfg.max_steps, cfg.lr_power)
    if name not in DECAYING:
        return lambda s: float(m(s))
    w, floor = cfg.warmup_steps, cfg.min_lr / cfg.lr
    return lambda s: float(m(s)) if s < w else floor + (1.0 - floor) * float(m(s))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A LambdaLR over diffusers' multiplier for ``cfg`` with the ``min_lr`` floor: its LR
    after ``s`` steps is :func:`lr_at(cfg, s)`.

    Every param group's ``lr`` is set to ``cfg.lr`` first so that the multiplier is relative
    to the configured base LR.
    """
    from torch.optim.lr_scheduler import LambdaLR
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group["initial_lr"] = cfg.lr
    return LambdaLR(optimizer, _factor(cfg))


def rebase_scheduler(scheduler: LambdaLR, cfg: TrainConfig, step: int) -> None:
    """After a resume: follow schedule ``cfg`` (e.g. a new base LR) from ``step`` on.

    The restored scheduler keeps its step count; its base LR and lambda are replaced and
    the optimizer's LR is set to ``lr_at(cfg, step)``.
    """
    factor = _factor(cfg)
    lr = cfg.lr * factor(step)
    scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    scheduler.lr_lambdas = [factor for _ in scheduler.lr_lambdas]
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = lr
    scheduler._last_lr = [lr for _ in scheduler.base_lrs]


def check_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                   name: str = "optimizer", rtol: float = 1e-6) -> None:
    """Raise :class:`ScheduleMismatch` unless the optimizer's LR equals ``lr_at(cfg, step)``.

    Catches a schedule that is not stepped, stepped twice, or overwritten (the original trainer: a
    cosine schedule was configured and never built; the LR stayed at 1e-4 and the loss
    diverged).
    """
    expected = lr_at(cfg, step)
    actual = optimizer.param_groups[0]["lr"]
    if not math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-20):
        raise ScheduleMismatch(
            f"schedule guard: {name} LR at step {step} is {fmt_lr(actual)} but the configured "
            f"{cfg.lr_scheduler} schedule says {fmt_lr(expected)} (is the scheduler stepped "
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


def check_schedules(cfg: TrainConfig, step: int, optimizers: dict[str, "torch.optim.Optimizer"]) -> None:
    """The schedule guard: :func:`check_schedule` for every optimizer (named by its record key)."""
    for name, opt in optimizers.items():
        check_schedule(opt, cfg, step, name)
