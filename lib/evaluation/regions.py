"""Metrics by region: where on the map a model is right or wrong.

Whole-image metrics count the buildings (gain 0 there, trivially predicted) and mix the easy
line-of-sight streets with the shadowed ones. :func:`region_masks` cuts each map into

- ``all``: every pixel; ``outside_buildings``: the pixels a measurement or a receiver can be at;
- ``unmeasured``: outside buildings, without the pixels a model was given as measurements
  (lib/data/measurements.py; the correction sets those to their measured values, so a score
  over them flatters the model): the same as ``outside_buildings`` for a method given none;
- ``los`` / ``nlos``: outside buildings, with the straight path from the transmitter free of
  buildings or not, from the same computation the prior's condition uses
  (:func:`lib.data.condition.obstruction_map`: the share of the path inside buildings, LOS when
  it is below :data:`LOS_SHARE`);
- ``d<32m``, ``d32-64m``, ``d64-128m``, ``d>=128m``: outside buildings, by distance from the
  transmitter in metres (RadioMapSeer's 1 m per pixel at 256 px: :data:`METRES_AT_256`).

:class:`RegionAccumulator` keeps, per region, set-level sums over every pixel of every map
(squared and absolute error, squared target, pixels), on the metrics' [0, 1] scale
(:func:`lib.evaluation.metrics.to_unit`); :meth:`RegionAccumulator.compute` gives NMSE_set,
RMSE_set, MAE and both in dB.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lib.data.condition import log_distance, obstruction_map
from lib.evaluation.metrics import NMSE_EPS, to_unit

LOS_SHARE = 0.02              # below this share of the direct path inside buildings: line of sight
METRES_AT_256 = 256.0          # the map's side in metres (RadioMapSeer: 1 m per pixel at 256 px)
BANDS = ((0.0, 32.0), (32.0, 64.0), (64.0, 128.0), (128.0, math.inf))
SUMS = ("sq_err", "abs_err", "target_sq", "pixels")


def band_name(low: float, high: float) -> str:
    if low == 0:
        return f"d<{high:g}m"
    return f"d>={low:g}m" if math.isinf(high) else f"d{low:g}-{high:g}m"


REGIONS = ("all", "outside_buildings", "unmeasured", "los", "nlos", *(band_name(lo, hi) for lo, hi in BANDS))


@torch.no_grad()
def region_masks(cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 1, S, S) bool masks of :data:`REGIONS` for conditions ``cond`` ((B, C, S, S), lib/data/condition.py);
    nothing measured (:func:`without_measured` for a method given measurements)."""
    cond = cond.float()
    free = cond[:, :1] < 0
    share = (obstruction_map(cond) + 1.0) / 2.0
    metres = 10.0 ** log_distance(cond).float() * (METRES_AT_256 / cond.shape[-1])
    masks = {"all": torch.ones_like(free), "outside_buildings": free, "unmeasured": free,
             "los": free & (share < LOS_SHARE), "nlos": free & (share >= LOS_SHARE)}
    for lo, hi in BANDS:
        masks[band_name(lo, hi)] = free & (metres >= lo) & (metres < hi)
    return masks


def unmeasured_pixels(free: torch.Tensor, measured: Optional[torch.Tensor]) -> torch.Tensor:
    """The pixels outside buildings (``free``) without the (B, 1, S, S) ``measured`` ones (None: all of them)."""
    return free if measured is None else free & ~measured.to(torch.bool)


def without_measured(masks: dict[str, torch.Tensor], measured: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` with ``unmeasured`` leaving out the ``measured`` pixels (None: as they are)."""
    return {**masks, "unmeasured": unmeasured_pixels(masks["outside_buildings"], measured)}


class RegionAccumulator:
    """Set-level sums per region (see the module docstring)."""

    def __init__(self) -> None:
        self.sums = {r: dict.fromkeys(SUMS, 0.0) for r in REGIONS}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        """``pred``, ``target``: (B, 1, S, S) model space ([-1, 1]); ``masks`` from :func:`region_masks`."""
        p, t = to_unit(pred.double()), to_unit(target.double())
        err = p - t
        for region, mask in masks.items():
            m = mask.to(err.dtype)
            s = self.sums[region]
            s["sq_err"] += float((err.pow(2) * m).sum())
            s["abs_err"] += float((err.abs() * m).sum())
            s["target_sq"] += float((t.pow(2) * m).sum())
            s["pixels"] += float(m.sum())

    def compute(self, db_per_unit: float, total: Optional[float] = None) -> dict[str, dict[str, float]]:
        """Per region: ``share`` of all pixels, ``nmse_set``, ``rmse_set``, ``mae``, ``rmse_db``, ``mae_db``
        (None for a region with no pixels)."""
        total = total or self.sums["all"]["pixels"] or 1.0
        out = {}
        for region, s in self.sums.items():
            n = s["pixels"]
            rmse = math.sqrt(s["sq_err"] / n) if n else None
            mae = s["abs_err"] / n if n else None
            out[region] = {"share": n / total, "pixels": int(n),
                           "nmse_set": s["sq_err"] / (s["target_sq"] + NMSE_EPS) if n else None,
                           "rmse_set": rmse, "mae": mae,
                           "rmse_db": None if rmse is None else rmse * db_per_unit,
                           "mae_db": None if mae is None else mae * db_per_unit}
        return out
