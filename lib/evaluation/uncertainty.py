"""Several maps per input from a stochastic prior: their spread, and whether it is calibrated.

``evaluate.py --samples K`` and ``predict.py --samples K`` draw K maps per input. Scored is their
mean; :func:`sample_stats` gives per pixel the mean, the std and the quantiles
:data:`QUANTILES` (``torch.quantile``'s linear interpolation, NumPy's default), on the metrics'
[0, 1] scale (:func:`lib.evaluation.metrics.to_unit`). :class:`CalibrationAccumulator` says, per
region (:mod:`lib.evaluation.regions`), how often the true pixel lies inside the central 50 %
(q25..q75) and 90 % (q05..q95) intervals of the samples (a calibrated model: 0.5 and 0.9) and the
CRPS of the samples' empirical distribution, ``mean_k |x_k - y| - 1/(2 K^2) sum_kl |x_k - x_l|``
(the mean absolute error of a single map when K = 1; lower is better).

The spread of a prior trained briefly can be far narrower than its error (its samples stay near
the mean). ``evaluate.py --conformal`` then widens the intervals by conformalized quantile
regression (Romano, Patterson and Candès, 2019) fitted on other maps, the validation split:
a pixel's score is how far the truth lies outside the interval, ``max(q_lo - y, y - q_hi)``
(:func:`conformity`), and the interval becomes ``[q_lo - c, q_hi + c]`` with ``c`` the
``ceil((n + 1) p) / n`` quantile of the n validation scores outside buildings
(:class:`ConformalFit`; p = 0.5 and 0.9), which covers a share p of the pixels of maps like them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lib.evaluation.metrics import to_unit
from lib.evaluation.regions import REGIONS

QUANTILES = (0.05, 0.25, 0.75, 0.95)
INTERVALS = {50: ("q25", "q75"), 90: ("q05", "q95")}       # central share -> its quantiles
SUMS = ("in50", "in90", "in50_conformal", "in90_conformal", "crps", "std", "pixels")


@torch.no_grad()
def sample_stats(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """``samples``: (K, B, 1, S, S) model space -> (B, 1, S, S) float32 ``mean``, ``std`` (population)
    and ``q05``, ``q25``, ``q75``, ``q95``, on the [0, 1] scale."""
    u = to_unit(samples.float())
    q = torch.quantile(u, torch.tensor(QUANTILES, device=u.device), dim=0)
    return {"mean": u.mean(dim=0), "std": u.std(dim=0, correction=0),
            **{f"q{round(p * 100):02d}": q[i] for i, p in enumerate(QUANTILES)}}


@torch.no_grad()
def crps(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per pixel CRPS of the ensemble ``samples`` (K, ...) against ``target`` (...), same scale."""
    k = samples.shape[0]
    spread_to_target = (samples - target.unsqueeze(0)).abs().mean(dim=0)
    ranked = samples.sort(dim=0).values           # sum_kl |x_k - x_l| = 2 sum_i (2 i - K - 1) x_(i)
    w = (2.0 * torch.arange(1, k + 1, device=samples.device, dtype=samples.dtype) - k - 1).view(-1, *[1] * (samples.ndim - 1))
    pairwise = 2.0 * (w * ranked).sum(dim=0)
    return spread_to_target - pairwise / (2.0 * k * k)


def conformity(stats: dict[str, torch.Tensor], target_unit: torch.Tensor, share: int) -> torch.Tensor:
    """How far the truth lies outside the central ``share`` % interval (negative: inside)."""
    lo, hi = INTERVALS[share]
    return torch.maximum(stats[lo] - target_unit, target_unit - stats[hi])


class ConformalFit:
    """The widening ``c`` per interval from scores on calibration maps (pixels outside buildings;
    at most ``keep`` random scores per batch, so a large split needs bounded memory)."""

    def __init__(self, keep: int = 20_000, seed: int = 0) -> None:
        self.scores: dict[int, list[torch.Tensor]] = {s: [] for s in INTERVALS}
        self.keep, self.rng = keep, torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, samples: torch.Tensor, target: torch.Tensor, free: torch.Tensor) -> None:
        stats, y = sample_stats(samples), to_unit(target.float())
        pick = None
        for share in INTERVALS:
            scores = conformity(stats, y, share)[free].double().cpu()
            if pick is None and scores.numel() > self.keep:
                pick = torch.randperm(scores.numel(), generator=self.rng)[:self.keep]
            self.scores[share].append(scores if pick is None else scores[pick])

    def widen(self) -> dict[int, float]:
        out = {}
        for share, parts in self.scores.items():
            scores = torch.cat(parts).sort().values
            n = scores.numel()
            if n == 0:
                raise ValueError("no calibration pixels outside buildings")
            k = min(n, math.ceil((n + 1) * share / 100.0))
            out[share] = float(scores[k - 1])
        return out

    @property
    def pixels(self) -> int:
        return sum(int(t.numel()) for t in self.scores[90])


class CalibrationAccumulator:
    """Coverage of the central 50 % and 90 % intervals, CRPS and mean std, per region."""

    def __init__(self) -> None:
        self.sums = {r: dict.fromkeys(SUMS, 0.0) for r in REGIONS}
        self.conformal = False

    @torch.no_grad()
    def update(self, samples: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor],
               widen: Optional[dict[int, float]] = None) -> None:
        """``samples`` (K, B, 1, S, S) and ``target`` (B, 1, S, S) in model space; ``widen``: the
        conformal widening of each interval (:class:`ConformalFit`), if any."""
        stats = sample_stats(samples)
        u, y = to_unit(samples.double()), to_unit(target.double())
        score = crps(u, y)
        inside = {f"in{p}": (conformity(stats, y.float(), p) <= 0).double() for p in INTERVALS}
        if widen is not None:
            self.conformal = True
            inside.update({f"in{p}_conformal": (conformity(stats, y.float(), p) <= widen[p]).double()
                           for p in INTERVALS})
        for region, mask in masks.items():
            m = mask.double()
            s = self.sums[region]
            for key, hit in inside.items():
                s[key] += float((hit * m).sum())
            s["crps"] += float((score * m).sum())
            s["std"] += float((stats["std"].double() * m).sum())
            s["pixels"] += float(m.sum())

    def compute(self, db_per_unit: float) -> dict[str, dict[str, float]]:
        """Per region: ``coverage50``, ``coverage90``, ``crps`` and ``mean_std`` ([0, 1] scale), both in dB too."""
        out = {}
        for region, s in self.sums.items():
            n = s["pixels"]
            if not n:
                out[region] = dict.fromkeys(("coverage50", "coverage90", "crps", "crps_db", "mean_std",
                                             "mean_std_db", "coverage50_conformal", "coverage90_conformal"))
                continue
            out[region] = {"coverage50": s["in50"] / n, "coverage90": s["in90"] / n, "crps": s["crps"] / n,
                           "crps_db": s["crps"] / n * db_per_unit, "mean_std": s["std"] / n,
                           "mean_std_db": s["std"] / n * db_per_unit,
                           **{f"coverage{p}_conformal": s[f"in{p}_conformal"] / n if self.conformal else None
                              for p in INTERVALS}}
        return out

