"""Several maps per input from a stochastic prior: their spread, and whether it is calibrated.

``evaluate.py --samples K`` and ``predict.py --samples K`` draw K maps per input. Scored is their
mean; :func:`sample_stats` gives per pixel the mean, the std and the quantiles
:data:`QUANTILES` (``torch.quantile``'s linear interpolation, NumPy's default), on the metrics'
[0, 1] scale (:func:`lib.evaluation.metrics.to_unit`). :class:`CalibrationAccumulator` says, per
region (:mod:`lib.evaluation.regions`), how often the true pixel lies inside the central 50 %
(q25..q75) and 90 % (q05..q95) intervals of the samples (a calibrated model: 0.5 and 0.9) and the
CRPS of the samples' empirical distribution, ``mean_k |x_k - y| - 1/(2 K^2) sum_kl |x_k - x_l|``
(the mean absolute error of a single map when K = 1; lower is better).
"""
from __future__ import annotations

import torch

from lib.evaluation.metrics import to_unit
from lib.evaluation.regions import REGIONS

QUANTILES = (0.05, 0.25, 0.75, 0.95)
SUMS = ("in50", "in90", "crps", "std", "pixels")


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


class CalibrationAccumulator:
    """Coverage of the central 50 % and 90 % intervals, CRPS and mean std, per region."""

    def __init__(self) -> None:
        self.sums = {r: dict.fromkeys(SUMS, 0.0) for r in REGIONS}

    @torch.no_grad()
    def update(self, samples: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        """``samples`` (K, B, 1, S, S) and ``target`` (B, 1, S, S) in model space."""
        stats = sample_stats(samples)
        u, y = to_unit(samples.double()), to_unit(target.double())
        score = crps(u, y)
        in50 = ((y >= stats["q25"]) & (y <= stats["q75"])).double()
        in90 = ((y >= stats["q05"]) & (y <= stats["q95"])).double()
        for region, mask in masks.items():
            m = mask.double()
            s = self.sums[region]
            s["in50"] += float((in50 * m).sum())
            s["in90"] += float((in90 * m).sum())
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
                                             "mean_std_db"))
                continue
            out[region] = {"coverage50": s["in50"] / n, "coverage90": s["in90"] / n, "crps": s["crps"] / n,
                           "crps_db": s["crps"] / n * db_per_unit, "mean_std": s["std"] / n,
                           "mean_std_db": s["std"] / n * db_per_unit}
        return out

