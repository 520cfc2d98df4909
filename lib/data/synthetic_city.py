"""The synthetic city: buildings, streets and cars of one map (see :mod:`lib.data.synthetic`).

City
----
A map covers 256 m x 256 m (1 px = 1 m at the default 256 px, as RadioMapSeer's maps; the
physical scale is the same at every size). Each map has its own street grid, turned by a
random angle in [0°, 90°): the city is drawn axis-aligned on a square *grid canvas* of side
about ``size * sqrt(2)`` px that covers the map at any angle, and the map samples it
(nearest pixel) through that rotation (:class:`City`: ``to_grid``, ``to_map``).

On the canvas: rows and columns of blocks whose lengths mix small and large (a per-map base
of 35-80 m, each block 0.5-1.6 times it), separated by streets of 8-16 m, with a wide avenue
of 18-28 m in one gap of ten. One block in eight is left open (a square or a park). The others
are cut into 1-3 x 1-3 lots; a lot holds a building with a per-map probability in
[0.45, 0.8], behind setbacks of 1-6 m, of one of four footprints: a rectangle, an L (a
rectangle without one corner), a courtyard building (a rectangle without its middle) or a
rectangle turned by up to ±30° within the grid. Cars are 2 m x 4.5 m rectangles along the
streets (on the canvas, so they follow the streets' direction), never on a building or on
each other. Transmitters stand on free street pixels of the map (not in a block, so never in
a courtyard; not on a car), distinct per map.

Everything is drawn from ``np.random.default_rng([seed, map_id])``: map ``i`` is the same
whatever ``num_maps`` is, and the same seed gives byte-identical files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CITY_SIZE_M = 256.0          # side of every map in metres, whatever its pixel size


@dataclass
class City:
    buildings: np.ndarray    # bool (size, size): the map
    cars: np.ndarray | None  # bool (size, size) or None
    street: np.ndarray       # bool (size, size): outside every block (transmitters stand there)
    grid_buildings: np.ndarray   # bool (C, C): the grid canvas, streets axis-aligned
    to_grid: np.ndarray      # int64 (size * size,): the canvas pixel each map pixel samples
    to_map: np.ndarray       # int64 (C * C,): the map pixel each canvas pixel samples, -1 outside the map
    angle: float             # the street grid's orientation in the map (radians)


def canvas_side(size: int) -> int:
    """An even side that covers the map turned by any angle."""
    side = int(math.ceil(size * math.sqrt(2))) + 2
    return side + side % 2


def rotation_indices(size: int, side: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-pixel maps between the map (``size``²) and the canvas (``side``²) turned by
    ``angle`` about their common centre: (canvas index per map pixel, map index or -1 per
    canvas pixel)."""
    c, s = math.cos(angle), math.sin(angle)

    def sample(n_from: int, n_to: int, ang_c: float, ang_s: float) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(n_from, dtype=np.float64) + 0.5 - n_from / 2
        y, x = np.meshgrid(i, i, indexing="ij")
        ty = ang_c * y + ang_s * x + n_to / 2
        tx = -ang_s * y + ang_c * x + n_to / 2
        yi, xi = np.floor(ty).astype(np.int64), np.floor(tx).astype(np.int64)
        inside = (yi >= 0) & (yi < n_to) & (xi >= 0) & (xi < n_to)
        return np.where(inside, yi * n_to + xi, -1).ravel(), inside.ravel()

    to_grid, inside = sample(size, side, c, s)
    assert inside.all()                       # the canvas covers the map at any angle
    to_map, _ = sample(side, size, c, -s)
    return to_grid, to_map


def _spans(rng: np.random.Generator, length_px: int, px: float, base_m: float) -> list[tuple[int, int]]:
    """Blocks along one axis of the canvas: (start, end) pixel spans, streets between them."""
    out, pos = [], -rng.uniform(0, base_m) * px
    while pos < length_px:
        width = base_m * rng.uniform(0.5, 1.6) * px
        a, b = int(round(pos)), int(round(pos + width))
        a, b = max(a, 0), min(b, length_px)
        if b - a >= 2:
            out.append((a, b))
        street = rng.uniform(18, 28) if rng.random() < 0.1 else rng.uniform(8, 15)
        pos += width + max(street * px, 1.0)
    return out


def _footprint(rng: np.random.Generator, h: int, w: int, px: float) -> np.ndarray:
    """A building footprint (bool h x w) filling a lot of h x w pixels (setbacks included)."""
    out = np.zeros((h, w), bool)
    back = np.round(rng.uniform(0.5, 3.5, size=4) * px).astype(int)
    y0, y1, x0, x1 = back[0], h - back[1], back[2], w - back[3]
    if y1 - y0 < 2 or x1 - x0 < 2:
        return out
    kind = rng.choice(4, p=[0.35, 0.25, 0.15, 0.25])
    if kind == 3:                                   # a rectangle turned within the grid
        ang = math.radians(rng.uniform(-30, 30))
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        # largest turned rectangle of the lot's aspect that fits its inner box
        hh, ww = (y1 - y0) / 2, (x1 - x0) / 2
        c, s = abs(math.cos(ang)), abs(math.sin(ang))
        scale = min(hh / (hh * c + ww * s), ww / (ww * c + hh * s))
        u = (yy - cy) * math.cos(ang) - (xx - cx) * math.sin(ang)
        v = (yy - cy) * math.sin(ang) + (xx - cx) * math.cos(ang)
        return (np.abs(u) <= hh * scale) & (np.abs(v) <= ww * scale)
    out[y0:y1, x0:x1] = True
    if kind == 1 and y1 - y0 >= 4 and x1 - x0 >= 4:        # an L: one corner cut away
        cy = int(round((y1 - y0) * rng.uniform(0.35, 0.65)))
        cx = int(round((x1 - x0) * rng.uniform(0.35, 0.65)))
        corner = rng.integers(4)
        ys = slice(y0, y0 + cy) if corner < 2 else slice(y1 - cy, y1)
        xs = slice(x0, x0 + cx) if corner % 2 == 0 else slice(x1 - cx, x1)
        out[ys, xs] = False
    elif kind == 2 and min(y1 - y0, x1 - x0) >= 18 * px:    # a courtyard building: wings 6-10 m deep
        wing = int(round(rng.uniform(6, 10) * px))
        out[y0 + wing:y1 - wing, x0 + wing:x1 - wing] = False
    return out


def _grid_city(rng: np.random.Generator, side: int, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Buildings and blocks (bool side x side) of an axis-aligned city on the canvas."""
    base = rng.uniform(35, 80)
    fill = rng.uniform(0.6, 0.95)
    buildings = np.zeros((side, side), bool)
    blocks = np.zeros((side, side), bool)
    for y0, y1 in _spans(rng, side, px, base):
        for x0, x1 in _spans(rng, side, px, base):
            blocks[y0:y1, x0:x1] = True
            if rng.random() < 0.08:                            # an open square or park
                continue
            ny = int(np.clip((y1 - y0) // max(1, round(22 * px)), 1, 3))
            nx = int(np.clip((x1 - x0) // max(1, round(22 * px)), 1, 3))
            ys = np.linspace(y0, y1, ny + 1).round().astype(int)
            xs = np.linspace(x0, x1, nx + 1).round().astype(int)
            for i in range(ny):
                for j in range(nx):
                    if rng.random() < fill:
                        buildings[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] |= _footprint(
                            rng, ys[i + 1] - ys[i], xs[j + 1] - xs[j], px)
    return buildings, blocks


def _grid_cars(rng: np.random.Generator, allowed: np.ndarray, size: int, px: float) -> np.ndarray:
    """2 m x 4.5 m cars on the canvas's free street pixels (``allowed``)."""
    side = allowed.shape[0]
    w, length = max(1, round(2.0 * px)), max(1, round(4.5 * px))
    cars = np.zeros_like(allowed)
    want = max(2, int(rng.integers(15, 45) * (size / 256) ** 2))
    cand = np.flatnonzero(allowed)
    placed = 0
    for _ in range(want * 20 if cand.size else 0):
        if placed >= want:
            break
        y, x = divmod(int(cand[rng.integers(cand.size)]), side)
        h, ww = (w, length) if rng.random() < 0.5 else (length, w)
        area = (slice(y, y + h), slice(x, x + ww))
        if y + h <= side and x + ww <= side and allowed[area].all() and not cars[area].any():
            cars[area] = True
            placed += 1
    return cars


def city(rng: np.random.Generator, size: int, with_cars: bool) -> City:
    """One map's city (see the module docstring)."""
    px = size / CITY_SIZE_M
    side = canvas_side(size)
    angle = rng.uniform(0, math.pi / 2)
    grid_b, blocks = _grid_city(rng, side, px)
    to_grid, to_map = rotation_indices(size, side, angle)
    buildings = grid_b.ravel()[to_grid].reshape(size, size)
    street = ~blocks.ravel()[to_grid].reshape(size, size)
    cars = None
    if with_cars:
        on_map = (to_map >= 0).reshape(side, side)
        grid_cars = _grid_cars(rng, ~blocks & ~grid_b & on_map, size, px)
        cars = grid_cars.ravel()[to_grid].reshape(size, size) & ~buildings
    return City(buildings, cars, street, grid_b, to_grid, to_map, angle)
