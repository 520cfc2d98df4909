"""The stage-2 condition: what the prior is told about the environment of a radio map.

A condition is a ``(3, S, S)`` float32 stack in [-1, 1] (:data:`CHANNELS`):

- 0 ``buildings``: the building map (+1 building, -1 free);
- 1 ``transmitter``: +1 at the transmitter's pixel, -1 everywhere else;
- 2 ``cars``: the cars map for the cars* simulations, the building map again otherwise.

:func:`assemble_condition` writes it: the dataset (:mod:`lib.dataset`) calls it for every
sample. The prior (:mod:`lib.prior`) adds one channel computed from it on the device,
:func:`distance_map` (log-distance to the transmitter), before its condition encoder.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from lib.layout import unit_into

CHANNELS = ("buildings", "transmitter", "cars")


def scale_pixel(pixel: tuple[int, int], native: tuple[int, int], size: int) -> tuple[int, int]:
    """A pixel position on a map of ``native`` (H, W) moved to the same place on an ``size``
    square map (the centre of the pixel is kept)."""
    if tuple(native) == (size, size):
        return int(pixel[0]), int(pixel[1])
    return (min(size - 1, int((pixel[0] + 0.5) * size / native[0])),
            min(size - 1, int((pixel[1] + 0.5) * size / native[1])))


def assemble_condition(cond: np.ndarray, buildings: np.ndarray, cars: Optional[np.ndarray],
                       transmitter: tuple[int, int]) -> None:
    """Write the condition into ``cond`` ((3, S, S) float32): ``buildings`` and ``cars`` are
    (S, S) uint8 pixels or float32 maps in [-1, 1]; ``cars`` None repeats the buildings;
    ``transmitter`` is its (row, column) on the S x S map."""
    unit_into(cond[0], buildings)
    unit_into(cond[2], cars if cars is not None else buildings)
    cond[1].fill(-1.0)
    cond[1, transmitter[0], transmitter[1]] = 1.0


def transmitter_position(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the transmitter pixel of each condition in a (B, C, H, W) batch."""
    b, _, h, w = cond.shape
    flat = cond[:, 1].reshape(b, -1).argmax(dim=1)
    return flat // w, flat % w


def log_distance(cond: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) conditions -> (B, 1, H, W) log10 of the pixel distance to the
    transmitter, at least 1 px (log10 = 0)."""
    b, _, h, w = cond.shape
    rows, cols = transmitter_position(cond)
    ty, tx = rows.double(), cols.double()
    ys = torch.arange(h, dtype=torch.float64, device=cond.device).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64, device=cond.device).view(1, 1, w)
    d = ((ys - ty.view(b, 1, 1)) ** 2 + (xs - tx.view(b, 1, 1)) ** 2).sqrt().clamp(min=1.0)
    return d.log10().unsqueeze(1)


def distance_map(cond: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) log-distance to the transmitter scaled to [-1, 1] (-1 at the transmitter,
    +1 at the far corner of the map): the transmitter pixel spread over the whole map, which
    a few convolutions would otherwise take many steps to learn to do."""
    size = cond.shape[-1]
    return (log_distance(cond) / math.log10(size * math.sqrt(2)) * 2.0 - 1.0).to(cond.dtype)
