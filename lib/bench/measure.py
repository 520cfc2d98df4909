"""Measuring a training step: wall time per phase of a step (:class:`PhaseTimer`), steps
taking turns (:func:`time_steps`), peak memory, the data loader alone, and the machine.

On a GPU every phase boundary synchronises, so GPU work is charged to the phase that queued it.
"""
from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lib.config import Config
from lib.data.batching import train_batches
from lib.data.cache import build
from lib.data.dataset import FIELDS, STAGE_FIELDS, RadioMapDataset, build_datasets

PHASES = {"vae": ("data", "forward", "backward", "optimizer", "logging"),
          "prior": ("data", "encode", "forward", "backward", "optimizer", "logging")}


def measure_data(cfg: Config, log, seconds: float = 0.5, fields: Sequence[str] = FIELDS,
                 by_stage: bool = False) -> tuple[dict[str, Any], dict[str, RadioMapDataset]]:
    """Loader samples/s of the samples' ``fields`` on the PNG path and on the cached path (the
    configured cache, or one built in a temporary folder when ``data.cache`` is off); with
    ``by_stage``, also for what each stage reads (:data:`STAGE_FIELDS`). Returns the numbers and
    the training split (all fields) as configured and on the PNG path (the reference reads PNGs)."""
    png = build_datasets(replace(cfg.data, cache="off"), cfg.seed, ("train",), log=log)["train"]
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        cached_cfg = cfg.data if cfg.data.cache != "off" else replace(cfg.data, cache=str(Path(tmp) / "packed"))
        if cfg.data.cache == "off":
            build(cfg.data.root, cfg.data.simulation, cached_cfg.cache, log=log)
        cached = build_datasets(cached_cfg, cfg.seed, ("train",), log=log)["train"]
        sets = {"": fields, **({f"{stage}/": f for stage, f in STAGE_FIELDS.items()} if by_stage else {})}
        rates = loader_rates({f"{k}{path}": ds.with_fields(f) for k, f in sets.items()
                              for path, ds in (("png", png), ("cached", cached))},
                             cfg.data.batch_size, cfg.seed, cfg.data.num_workers, seconds=seconds)
        rate_png, rate_cached = rates["png"], rates["cached"]
    uses_cache = cfg.data.cache != "off"
    out = {"data_fields": list(fields),
           "data_samples_per_sec": round(rate_cached if uses_cache else rate_png, 2),
           "data_samples_per_sec_png": round(rate_png, 2),
           "data_samples_per_sec_cached": round(rate_cached, 2),
           "cache_speedup": round(rate_cached / rate_png, 2),
           "data_path": "cached" if uses_cache else "png"}
    if by_stage:
        out["data_by_stage"] = {stage: {"fields": list(f), "png": round(rates[f"{stage}/png"], 2),
                                        "cached": round(rates[f"{stage}/cached"], 2)}
                                for stage, f in STAGE_FIELDS.items()}
    return out, {"configured": cached if uses_cache else png, "png": png}


# --------------------------------------------------------------------------- measuring
class PhaseTimer:
    """Wall seconds per phase of a step. On a GPU each phase boundary synchronises (``sync``),
    which stalls the queue of kernels: throughput is timed with ``sync=False``, where the
    phases are not measured."""

    def __init__(self, device: torch.device, phases: tuple[str, ...] = PHASES["vae"], sync: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.measure = sync or not self.cuda
        self.seconds = dict.fromkeys(phases, 0.0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.measure:
            yield
            return
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] += time.perf_counter() - t0


def peak_memory_mb(device: torch.device) -> dict[str, Optional[float]]:
    """This process's peak resident set size, and its peak of allocated CUDA memory on a GPU."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss, 1), "cuda_peak_mb": None if cuda is None else round(cuda, 1)}


def time_steps(steps_by_name: dict[str, Any], steps: int, warmup: int,
               device: torch.device, phases: tuple[str, ...] = PHASES["vae"]) -> dict[str, dict[str, Any]]:
    """Run each ``step(timer)`` of ``steps_by_name`` ``warmup`` times untimed, then ``steps``
    timed times, taking turns (so that a machine whose load changes slows all of them alike).
    Returns, per name, seconds per step in total and per phase (``other``: time outside the
    phases).

    On a CPU the turns are single steps and the phases come from the same steps. On a GPU the
    turns are blocks of consecutive steps, synchronised only at their ends, so the GPU's queue
    runs as in training; the phases then come from ``max(2, steps // 4)`` further steps whose
    phase boundaries synchronise (their time split, scaled to the throughput's step time)."""
    for _ in range(warmup):
        for step in steps_by_name.values():
            step(PhaseTimer(device, phases))
    cuda = device.type == "cuda"
    block = max(1, steps // 4) if cuda else 1
    timers = {name: PhaseTimer(device, phases, sync=not cuda) for name in steps_by_name}
    wall, done = dict.fromkeys(steps_by_name, 0.0), dict.fromkeys(steps_by_name, 0)
    while min(done.values()) < steps:
        for name, step in steps_by_name.items():
            n = min(block, steps - done[name])
            timers[name].sync()
            t0 = time.perf_counter()
            for _ in range(n):
                step(timers[name])
            timers[name].sync()
            wall[name] += time.perf_counter() - t0
            done[name] += n
    split_steps = steps
    if cuda:                                     # the split, from steps that synchronise per phase
        split_steps = max(2, steps // 4)
        timers = {name: PhaseTimer(device, phases) for name in steps_by_name}
        for _ in range(split_steps):
            for name, step in steps_by_name.items():
                step(timers[name])
    out = {}
    for name, timer in timers.items():
        total = wall[name] / steps
        split = {k: v / split_steps for k, v in timer.seconds.items()}
        if cuda and sum(split.values()) > total:         # synchronised phases are slower: scale them
            split = {k: v * total / sum(split.values()) for k, v in split.items()}
        split["other"] = max(0.0, total - sum(split.values()))
        out[name] = {"seconds_per_step": total, "steps_per_sec": 1.0 / total,
                     "time_split": {k: round(v, 6) for k, v in split.items()},
                     "time_share": {k: round(v / total, 4) for k, v in split.items()}}
    return out


class _FlopCount(TorchDispatchMode):
    """Adds up ``torch.utils.flop_counter``'s count of every operator that runs (its registry:
    matmuls, convolutions, attention, forward and backward). FlopCounterMode itself also tracks
    modules with gradient hooks, which ``torch.autograd.grad`` on a leaf (the adaptive GAN
    weight's) refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = FlopCounterMode().flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def count_flops(step: Any, device: torch.device, phases: tuple[str, ...] = PHASES["vae"]) -> int:
    """Floating-point operations of one ``step(timer)`` as executed (matmuls, convolutions and
    attention, forward and backward; recomputation under gradient checkpointing included). Run
    it after a warm-up step: a compiled model compiles outside it."""
    with _FlopCount() as counter:
        step(PhaseTimer(device, phases))
    return int(counter.total)


def profile_steps(steps_by_name: dict[str, Any], device: torch.device, path: Path,
                  phases: tuple[str, ...] = PHASES["vae"], title: str = "") -> None:
    """One step of each of ``steps_by_name`` under ``torch.profiler`` (CPU, and CUDA on a GPU);
    appends to ``path`` each one's operators by self time (``bench.py --profile``)."""
    from contextlib import contextmanager

    from torch.profiler import ProfilerActivity, profile, record_function

    @contextmanager
    def phase(name: str) -> Iterator[None]:          # the step's phases as profiler ranges
        with record_function(f"phase:{name}"):
            yield

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "a", encoding="utf-8") as out:
        for name, step in steps_by_name.items():
            with profile(activities=activities) as prof:
                step(phase)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            out.write(f"=== {title}{name}: one step, operators by self time\n")
            out.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60) + "\n\n")


def loader_rates(datasets: dict[str, RadioMapDataset], batch_size: int, seed: int, num_workers: int,
                 rounds: int = 3, seconds: float = 0.5) -> dict[str, float]:
    """Samples per second of the training stream alone, per dataset: the median of ``rounds``
    rounds of at least ``seconds`` each, the datasets taking turns."""
    streams = {k: train_batches(ds, batch_size, seed, num_workers=num_workers) for k, ds in datasets.items()}
    for stream in streams.values():
        next(stream)                          # start-up (workers, first batch) not counted
    rates: dict[str, list[float]] = {k: [] for k in streams}
    for _ in range(rounds):
        for k, stream in streams.items():
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < seconds:
                next(stream)
                n += 1
            rates[k].append(n * batch_size / (time.perf_counter() - t0))
    return {k: sorted(v)[len(v) // 2] for k, v in rates.items()}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
