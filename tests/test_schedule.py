import math

import pytest
import torch

from lib.config import TrainConfig
from lib.numfmt import fmt_lr
from lib.train.schedule import ScheduleMismatch, build_scheduler, check_schedule, key_points, lr_at, rebase_scheduler


def cfg(**kw):
    base = dict(max_steps=200, lr=1e-3, min_lr=1e-5, warmup_steps=20, lr_scheduler="cosine")
    base.update(kw)
    return TrainConfig(**base)


def expected(c, s):
    """The documented closed forms (lib/train/schedule.py docstring)."""
    if c.lr_scheduler != "constant" and s < c.warmup_steps:
        return c.lr * s / c.warmup_steps
    if c.lr_scheduler in ("constant", "constant_with_warmup"):
        return c.lr
    p = (s - c.warmup_steps) / (c.max_steps - c.warmup_steps)
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p,
             "polynomial": (1 - p) ** c.lr_power}[c.lr_scheduler]
    return c.min_lr + (c.lr - c.min_lr) * shape


@pytest.mark.parametrize("name", ["cosine", "linear", "polynomial", "constant", "constant_with_warmup"])
def test_lr_at_follows_closed_form(name):
    c = cfg(lr_scheduler=name, lr_power=2.0)
    for s in range(0, c.max_steps + 1):
        assert lr_at(c, s) == pytest.approx(expected(c, s), rel=1e-9, abs=1e-15), s


@pytest.mark.parametrize("name", ["cosine", "linear", "polynomial"])
def test_decay_ends_at_min_lr_absolute_floor(name):
    c = cfg(lr_scheduler=name, lr=5e-6, min_lr=5e-7, warmup_steps=0, max_steps=150_000, lr_power=0.95)
    assert lr_at(c, 150_000) == pytest.approx(5e-7, rel=1e-9)      # not 5e-6 * 5e-7, not 0
    assert all(lr_at(c, s) >= 5e-7 * (1 - 1e-9) for s in range(0, 150_001, 997))


@pytest.mark.parametrize("name", ["cosine", "linear", "polynomial", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("variant", [{}, {"warmup_steps": 0, "min_lr": 0.0}, {"lr_power": 0.95, "max_steps": 77},
                                     {"min_lr": 2e-3}])
def test_stepped_scheduler_equals_lr_at_every_step(name, variant):
    """diffusers' multiplier in the optimizer (the implementation) against the closed form
    lr_at (the specification), at every step and a little past max_steps."""
    c = cfg(lr_scheduler=name, **variant)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=123.0)       # the builder sets the base LR from the config
    sched = build_scheduler(opt, c)
    for s in range(c.max_steps + 10):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(c, s), rel=1e-12, abs=1e-18)
        check_schedule(opt, c, s)
        opt.step()
        sched.step()


def test_guard_catches_unstepped_and_double_stepped_schedules():
    c = cfg()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, c)
    opt.step()                                   # the seeds' bug: the scheduler is never stepped
    with pytest.raises(ScheduleMismatch, match="LR at step 1 is 0.000e\\+00 but the configured cosine schedule says 5.000e-05"):
        check_schedule(opt, c, 1)
    sched.step()
    sched.step()                                 # stepped twice
    with pytest.raises(ScheduleMismatch):
        check_schedule(opt, c, 1)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)   # no scheduler at all
    with pytest.raises(ScheduleMismatch):
        check_schedule(opt2, cfg(warmup_steps=0), 50)


def test_rebase_continues_new_schedule_from_step():
    c_old, c_new = cfg(lr=1e-3), cfg(lr=1e-4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, c_old)
    for _ in range(50):
        opt.step(); sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, c_old)
    sched2.load_state_dict(state)
    rebase_scheduler(sched2, c_new, 50)
    for s in range(50, 120):
        assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(c_new, s), rel=1e-12)
        opt2.step(); sched2.step()


def test_key_points_and_format():
    c = cfg(max_steps=1000, warmup_steps=100)
    pts = key_points(c, {"disc_start": 501})
    labels = [p[0] for p in pts]
    assert labels == ["start", "end of warmup", "25%", "50%", "disc_start", "75%", "100%"]
    assert pts[-1][2] == pytest.approx(c.min_lr)
    assert fmt_lr(5e-6) == "5.000e-06"


def test_lr_at_needs_no_torch():
    """report.py evaluates lr_at for every logged step without importing torch (seconds)."""
    import subprocess
    import sys
    code = ("import sys; from lib.config import TrainConfig; from lib.train.schedule import lr_at; "
            "lr_at(TrainConfig(), 10); print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert res.stdout.strip() == "[]"
