"""Scoring predicted maps against the ground truth: the loop that validation (both trainers)
and ``evaluate.py`` share, and the gathering of per-map values from every process.

Metrics are per map (:mod:`lib.metrics`); every method is scored on the same batches, and
its wall time is measured (waiting for the GPU).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from lib.metrics import MetricAccumulator

Method = Callable[[dict], torch.Tensor]      # a batch (on the device) -> maps in [-1, 1]


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    """``fn()`` and its wall time (waiting for the GPU to finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


@dataclass
class Scores:
    accs: dict[str, MetricAccumulator]          # per method: per-map metrics, grouped by simulation
    seconds: dict[str, float]                   # per method: wall time of its predictions
    first: Optional[dict[str, torch.Tensor]] = None   # the first batch (CPU): image, cond, each method's maps
    batches: int = 0
    extra: dict[str, list] = field(default_factory=dict)


def score_methods(batches: Iterable[dict], methods: dict[str, Method], device: torch.device,
                  simulations: list[str]) -> Scores:
    """Run every method on every batch (moved to ``device``) and score its maps against the
    batch's ``image``, per map, grouped by simulation name (``simulations[sim_id]``)."""
    out = Scores({k: MetricAccumulator() for k in methods}, dict.fromkeys(methods, 0.0))
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        x = batch["image"]
        names = [simulations[i] for i in batch["sim_id"].tolist()]
        preds = {}
        for name, method in methods.items():
            preds[name], dt = timed(lambda: method(batch), device)
            out.seconds[name] += dt
            out.accs[name].update(preds[name], x, names)
        if out.first is None:
            out.first = {"image": x.cpu(), "cond": batch["cond"].cpu(),
                         **{k: p.float().cpu() for k, p in preds.items()}}
        out.batches += 1
    return out


def gather_accumulator(accelerator: Accelerator, acc: MetricAccumulator) -> MetricAccumulator:
    """One accumulator holding every process's maps (on every process; ranks may hold
    different numbers of maps)."""
    if accelerator.num_processes == 1:
        return acc
    merged = MetricAccumulator()
    for state in gather_object([acc.state()]):
        merged.merge(MetricAccumulator.from_state(state))
    return merged


def gather_values(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """The concatenation of a 1-D CPU tensor from every process (lengths may differ)."""
    if accelerator.num_processes == 1:
        return values
    return torch.cat(gather_object([values.cpu()]))
