"""The optimizer update both trainers make after their backward passes: clip, check, step.

:func:`build_optimizer` is the one place an optimizer is made (AdamW with the stage's
``lr``, ``adam_betas`` and ``weight_decay``). :func:`update` is one optimizer update of one
or more optimizers together: clip each one's gradients (:func:`clip_grad_norms`), check
that every loss and gradient norm is finite on every process (:func:`all_finite`), then
step every optimizer and every schedule, or none (:func:`apply_updates`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from accelerate import Accelerator

from lib.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the stage's ``lr``, ``adam_betas`` and ``weight_decay``, in torch's fused
    implementation (one kernel over all parameters) where the parameters' device has it (CPU,
    CUDA): one kernel instead of a loop over the parameters (BENCHMARKS.md has the timings).
    Same update rule."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return ChannelsLastAdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


def _nhwc_only(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class ChannelsLastAdamW(torch.optim.AdamW):
    """torch's AdamW, except that weights stored ``channels_last`` are updated through their
    contiguous (N, H, W, C) views. The fused CPU kernel copies every tensor it gets that is not
    contiguous (the weight, its gradient and both moments) and copies the results back: with
    ``channels_last`` that doubled the optimizer's time for the m.yaml VAE (0.083 against 0.050 s
    per step at 64 px, 2 threads; BENCHMARKS.md). AdamW is elementwise, so the update is the same
    to the bit (tests/test_optim.py); the state and its checkpoints are torch's own."""

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, *rest):   # torch's lists, filled
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, *rest)
        if not group["amsgrad"]:
            lists = (params, grads, exp_avgs, exp_avg_sqs)
            for i in range(len(params)):
                if all(_nhwc_only(t[i]) for t in lists):
                    for t in lists:
                        t[i] = t[i].permute(0, 2, 3, 1)      # the same memory, contiguous
        return has_complex


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
        with warnings.catch_warnings():
            # Before disc_start the discriminator's schedule advances with the step count while
            # its optimizer does not step: torch's "lr_scheduler.step() before optimizer.step()"
            # warning is expected there (the schedule guard checks every LR at every log step).
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            for sched in schedulers:
                sched.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return applied


@dataclass
class Update:
    applied: bool                   # False: skipped (a non-finite loss or gradient)
    grad_norms: list[torch.Tensor]  # pre-clip global norm per optimizer


def update(accelerator: Accelerator, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any],
           grad_clip: float, losses: Sequence[torch.Tensor]) -> Update:
    """One optimizer update after the backward passes: clip every optimizer's gradients, then
    step all ``optimizers`` and ``schedulers`` if every loss and gradient norm is finite on
    every process, else none of them (the gradients are dropped either way).

    ``schedulers`` may hold more than ``optimizers``: a schedule whose optimizer sits out this
    update (the discriminator's before ``disc_start``) still follows the step count.
    """
    norms = clip_grad_norms(accelerator, optimizers, grad_clip)
    finite = all_finite(accelerator, list(losses) + norms)
    return Update(apply_updates(accelerator, optimizers, schedulers, finite), norms)
