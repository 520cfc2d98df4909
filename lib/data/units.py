"""What the numbers mean: gray levels, the model's space and decibels.

RadioMapSeer stores pathloss as 8-bit gray levels, linear in dB between a truncation level
(gray 0: that pathloss or worse, and the buildings) and the strongest pathloss of the dataset
(gray 255). ``data.db_range: [low, high]`` are those two levels in dB; the default
``[-127, -47]`` spans the 80 dB of RadioUNet's "RMSE in dB = 80 x the RMSE of gray level".

- gray level ``g`` in [0, 1] (``pixel / 255``; what predict.py writes) <-> dB: ``low + g (high - low)``;
- the model's space ``y`` in [-1, 1] is ``2 u - 1`` with ``u = g`` or, with RadioUNet's threshold
  ``t`` (``data.threshold``), ``u = (max(g, t) - t) / (1 - t)``; metrics are on ``u``, so one unit of
  ``u`` is ``(1 - t) (high - low)`` dB.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def gray_to_db(gray: np.ndarray | float, db_range: Sequence[float]) -> np.ndarray:
    low, high = float(db_range[0]), float(db_range[1])
    return (low + np.asarray(gray, dtype=np.float64) * (high - low)).astype(np.float32)


def db_to_gray(db: np.ndarray | float, db_range: Sequence[float]) -> np.ndarray:
    low, high = float(db_range[0]), float(db_range[1])
    return ((np.asarray(db, dtype=np.float64) - low) / (high - low)).astype(np.float32)


def db_per_unit(db_range: Sequence[float], threshold: float) -> float:
    """dB per unit of the metrics' [0, 1] scale (``u`` above)."""
    return (float(db_range[1]) - float(db_range[0])) * (1.0 - threshold)


def gray_to_model(gray: np.ndarray | float, threshold: float) -> np.ndarray:
    """Gray levels in [0, 1] -> model space ([-1, 1], after the threshold, as the dataset's targets)."""
    g = np.clip(np.asarray(gray, dtype=np.float64), 0.0, 1.0)
    if threshold > 0:
        g = (np.maximum(g, threshold) - threshold) / (1.0 - threshold)
    return (2.0 * g - 1.0).astype(np.float32)


def unit_to_gray(u: np.ndarray, threshold: float) -> np.ndarray:
    """The metrics' [0, 1] scale back to gray levels (the threshold undone)."""
    u = np.asarray(u, dtype=np.float32)
    return (threshold + (1.0 - threshold) * u).astype(np.float32) if threshold > 0 else u
