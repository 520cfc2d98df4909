"""The stage-2 condition: what the prior is told about the environment of a radio map.

A condition is a ``(3, S, S)`` float32 stack in [-1, 1] (:data:`CHANNELS`):

- 0 ``buildings``: the building map (+1 building, -1 free);
- 1 ``transmitter``: +1 at the transmitter's pixel, -1 everywhere else;
- 2 ``cars``: the cars map for the cars* simulations, the building map again otherwise.

:func:`fill_condition` makes it from an environment (the maps at their own size, resized like
the gain maps): the dataset (:mod:`lib.data.dataset`) for every sample, and ``predict.py`` for a new
city. The prior (:mod:`lib.models.prior`) adds one channel computed from it on the device,
:func:`distance_map` (log-distance to the transmitter), before its condition encoder.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from lib.data.layout import resize_maps, to_unit, unit_into

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


def fill_condition(cond: np.ndarray, buildings: np.ndarray, cars: Optional[np.ndarray],
                   transmitter: tuple[int, int], native: tuple[int, int]) -> None:
    """The condition of an environment into ``cond`` ((3, S, S) float32): ``buildings`` and
    ``cars`` (None: the buildings again) as uint8 pixels at their own size ``native``, or float32
    maps already at S (a cache's resized copy); ``transmitter`` is the (row, column) at ``native``.
    Maps of another size than S are resized as the gain maps are (:func:`lib.data.layout.resize_maps`)."""
    size = cond.shape[-1]
    if buildings.shape != (size, size):
        buildings, cars = resize_maps(to_unit(buildings, buildings if cars is None else cars), size).numpy()
    assemble_condition(cond, buildings, cars, scale_pixel(transmitter, native, size))


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


def obstruction_map(cond: torch.Tensor, samples: int = 32, resolution: int = 64) -> torch.Tensor:
    """(B, 1, S, S) in [-1, 1]: the share of the straight path from the transmitter to each pixel
    that runs through buildings (-1: line of sight, +1: all building), from the condition's
    building channel. Sampled at ``samples`` points per path, on a grid of at most
    ``resolution`` px (bilinearly brought to S), so that its cost does not grow with S."""
    b, _, size, _ = cond.shape
    n = min(size, resolution)
    buildings = (cond[:, :1] > 0).to(torch.float32)
    if n != size:
        buildings = torch.nn.functional.interpolate(buildings, size=(n, n), mode="area")
    rows, cols = transmitter_position(cond)
    # pixel centres in grid_sample's coordinates (align_corners=False: -1 and 1 are the outer edges)
    centre = lambda i, m: (2.0 * i.to(torch.float32) + 1.0) / m - 1.0  # noqa: E731
    ty, tx = centre(rows, size).view(b, 1, 1, 1), centre(cols, size).view(b, 1, 1, 1)
    grid_1d = centre(torch.arange(n, device=cond.device), n)
    py, px = grid_1d.view(1, 1, n, 1), grid_1d.view(1, 1, 1, n)
    f = (torch.arange(samples, device=cond.device, dtype=torch.float32) + 0.5).view(1, samples, 1, 1) / samples
    x = (tx + f * (px - tx)).expand(b, samples, n, n)
    y = (ty + f * (py - ty)).expand(b, samples, n, n)
    grid = torch.stack([x, y], dim=-1).reshape(b, samples * n, n, 2)
    inside = torch.nn.functional.grid_sample(buildings, grid, mode="bilinear", align_corners=False)
    share = inside.view(b, samples, n, n).mean(dim=1, keepdim=True)
    if n != size:
        share = torch.nn.functional.interpolate(share, size=(size, size), mode="bilinear", align_corners=False)
    return (share * 2.0 - 1.0).to(cond.dtype)
