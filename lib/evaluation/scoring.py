"""Scoring predicted maps against the ground truth: the loop that validation (both trainers)
and ``evaluate.py`` share, and the gathering of per-map values from every process.

Metrics are per map (:mod:`lib.evaluation.metrics`); every method is scored on the same batches, and
its wall time is measured (waiting for the GPU).
"""
from __future__ import annotations

import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image

from lib.evaluation.metrics import MetricAccumulator, to_unit

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
    stopped: bool = False                       # ``stop`` said so before the last batch


def score_methods(batches: Iterable[dict], methods: dict[str, Method], device: torch.device,
                  simulations: list[str], after: Optional[Callable[[dict, dict], None]] = None,
                  stop: Optional[Callable[[], bool]] = None) -> Scores:
    """Run every method on every batch (moved to ``device``) and score its maps against the
    batch's ``image``, per map, grouped by simulation name (``simulations[sim_id]``);
    ``after(batch, predictions)`` is called after each batch. When ``stop()`` says so (checked
    before each batch: a preemption signal) the rest is abandoned (``stopped``)."""
    out = Scores({k: MetricAccumulator() for k in methods}, dict.fromkeys(methods, 0.0))
    for batch in batches:
        if stop is not None and stop():
            out.stopped = True
            break
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
            out.first = {"image": x.cpu(), **{k: batch[k].cpu() for k in ("cond", "map_id", "tx", "sim_id")
                                              if k in batch},
                         **{k: p.float().cpu() for k, p in preds.items()}}
        out.batches += 1
        if after is not None:
            after(batch, preds)
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


class PredictionStore:
    """``--save-predictions``: every prediction and its target exactly as the metrics saw them
    (float32 in [0, 1], the metrics' space: thresholded when ``data.threshold`` is on), written
    as ``predictions.npz`` (``pred``, ``target``: N x H x W; ``map_id``, ``tx``, ``simulation``;
    and the ``extra`` arrays, e.g. ``std`` and the quantiles of ``--samples K``, N x H x W, or
    ``samples``, N x K x H x W) and one 8-bit PNG per prediction,
    ``predictions/{simulation}/{map}_{tx}.png`` (``round(255 * pred)``), the dataset's own naming,
    and with a ``std``, ``{map}_{tx}_std.png`` (``round(255 * min(1, 4 std))``: white is a std of a
    quarter of the range). The arrays go to disk as they come (memory-mapped), so a full test set
    needs no more memory than one batch."""

    def __init__(self, folder: Path, count: int, size: int, extra: Optional[dict[str, tuple]] = None) -> None:
        self.folder, self.count, self.n = folder, count, 0
        self.tmp = folder / ".predictions.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        shapes = {"pred": (), "target": (), **(extra or {})}
        self.arrays = {k: np.lib.format.open_memmap(self.tmp / f"{k}.npy", mode="w+", dtype=np.float32,
                                                    shape=(count, *lead, size, size)) for k, lead in shapes.items()}
        self.names = list(shapes)
        self.keys: dict[str, list] = {"map_id": [], "tx": [], "simulation": []}

    def add(self, pred: torch.Tensor, target: torch.Tensor, map_ids: list[int], txs: list[int],
            simulations: list[str], extra: Optional[dict[str, torch.Tensor]] = None) -> None:
        """A batch of maps in model space ([-1, 1], (B, 1, H, W)); ``extra`` on the [0, 1] scale,
        (B, 1, H, W) or (B, K, H, W)."""
        k = pred.shape[0]
        for name, x in (("pred", pred), ("target", target)):
            self.arrays[name][self.n:self.n + k] = to_unit(x.detach().float()).cpu().numpy()[:, 0]
        for name, x in (extra or {}).items():
            arr = x.detach().float().cpu().numpy()
            self.arrays[name][self.n:self.n + k] = arr if self.arrays[name].ndim == 4 else arr[:, 0]
        for i in range(k):
            out = self.folder / "predictions" / simulations[i] / f"{map_ids[i]}_{txs[i]}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.rint(self.arrays["pred"][self.n + i] * 255.0).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(out, compress_level=1)
            if "std" in self.arrays:
                std = np.rint(np.minimum(1.0, 4.0 * self.arrays["std"][self.n + i]) * 255.0).astype(np.uint8)
                Image.fromarray(std, mode="L").save(out.with_name(f"{out.stem}_std.png"), compress_level=1)
        self.keys["map_id"] += map_ids
        self.keys["tx"] += txs
        self.keys["simulation"] += simulations
        self.n += k

    def close(self) -> Path:
        """Write ``predictions.npz`` (a zip of the .npy files, stored, not compressed)."""
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        np.save(self.tmp / "map_id.npy", np.asarray(self.keys["map_id"], dtype=np.int64))
        np.save(self.tmp / "tx.npy", np.asarray(self.keys["tx"], dtype=np.int64))
        np.save(self.tmp / "simulation.npy", np.asarray(self.keys["simulation"]))
        out = self.folder / "predictions.npz"
        with zipfile.ZipFile(self.folder / "predictions.npz.tmp", "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in (*self.names, "map_id", "tx", "simulation"):
                zf.write(self.tmp / f"{name}.npy", f"{name}.npy")
        os.replace(self.folder / "predictions.npz.tmp", out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return out
