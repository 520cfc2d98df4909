"""Reference predictors that stage 2 is measured against.

The distance-only pathloss model: per simulation, the gain on the [0, 1] map scale as a
straight line in the log of the distance to the transmitter,

    gain(d) = intercept + slope * log10(max(d, 1 px)),

fitted by least squares over every pixel of the training maps and clamped to [0, 1] when
applied. It knows where the transmitter is and nothing else: buildings (zero gain in the
data) are not masked in the fit nor in the prediction, by definition. Distances are in
pixels of ``data.image_size``, so a fit applies to maps of that size.

This is what a model that ignores buildings gets; log-distance is the free-space form of
the simulators' pathloss, so the fit is not a straw man.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from lib.data.condition import log_distance


@dataclass
class _Sums:
    """Sufficient statistics of a least-squares line (float64)."""
    n: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.n += x.numel()
        self.x += float(x.sum())
        self.y += float(y.sum())
        self.xx += float((x * x).sum())
        self.xy += float((x * y).sum())

    def line(self) -> tuple[float, float]:
        """(intercept, slope); a flat line at the mean when x does not vary."""
        var = self.n * self.xx - self.x ** 2
        if var <= 1e-12 * max(1.0, self.n * self.xx):
            return self.y / self.n, 0.0
        slope = (self.n * self.xy - self.x * self.y) / var
        return (self.y - slope * self.x) / self.n, slope


@dataclass
class DistanceBaseline:
    """Per-simulation log-distance lines; see the module docstring."""
    lines: dict[str, tuple[float, float]] = field(default_factory=dict)   # sim -> (intercept, slope)

    def predict(self, cond: torch.Tensor, simulations: Sequence[str]) -> torch.Tensor:
        """Maps in model space ([-1, 1], (B, 1, H, W)) for ``cond`` and each map's simulation."""
        missing = sorted(set(simulations) - set(self.lines))
        if missing:
            raise ValueError(f"no distance fit for simulation(s) {missing}; fitted: {sorted(self.lines)}")
        coef = torch.tensor([self.lines[s] for s in simulations], dtype=torch.float64,
                            device=cond.device).view(-1, 2, 1, 1, 1)
        gain = (coef[:, 0] + coef[:, 1] * log_distance(cond)).clamp(0.0, 1.0)
        return (gain * 2.0 - 1.0).to(cond.dtype)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {s: {"intercept": a, "slope_per_decade": b} for s, (a, b) in sorted(self.lines.items())}


def fit_distance_baseline(batches: Iterable[dict], simulations: Sequence[str]) -> DistanceBaseline:
    """Least-squares lines of [0, 1] gain vs log10 distance, per simulation, over ``batches``
    (dicts with ``image`` (B, 1, H, W) and ``cond`` (B, 3, H, W) in [-1, 1] and ``sim_id``
    indexing ``simulations``)."""
    sums: dict[str, _Sums] = {}
    for batch in batches:
        x = log_distance(batch["cond"])
        y = (batch["image"].double() + 1.0) / 2.0
        for i, sid in enumerate(torch.as_tensor(batch["sim_id"]).tolist()):
            sums.setdefault(simulations[sid], _Sums()).add(x[i], y[i])
    if not sums:
        raise ValueError("no training maps to fit the distance baseline on")
    return DistanceBaseline({s: v.line() for s, v in sums.items()})
