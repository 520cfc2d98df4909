"""The synthetic city: buildings, streets and cars of one map (see :mod:`lib.synthetic`).

City
----
Every map has its own random street grid: blocks of 30-60 m (per map, jittered per block)
separated by 6-14 m streets; each block is split into 1-2 x 1-2 lots and each lot holds,
with a per-map fill probability in [0.45, 0.95], a rectangular or L-shaped footprint with
0-3 m setbacks. Cars are 2 m x 4.5 m rectangles on street pixels (outside blocks, never
overlapping buildings or each other). Transmitters stand on free pixels (not building, not
car), distinct per map. A map of ``size`` pixels covers 256 m x 256 m, so the physical scale
is the same at every size (1 px = 1 m at the default 256 px, as in RadioMapSeer).
Everything is drawn from ``np.random.default_rng([seed, map_id])``: map ``i`` is the same
whatever ``num_maps`` is, and the same seed gives byte-identical files.
"""
from __future__ import annotations

import numpy as np

CITY_SIZE_M = 256.0          # side of every map in metres, whatever its pixel size


def city(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Buildings (bool HxW) and the street mask (pixels outside every block)."""
    px = size / CITY_SIZE_M                       # pixels per metre
    block_m = rng.uniform(30, 60)
    street_m = rng.uniform(6, 14)
    fill = rng.uniform(0.45, 0.95)

    def to_px(m: float) -> int:
        return int(np.clip(round(m * px), 0, size))

    def spans() -> list[tuple[int, int]]:
        out = []
        pos = -rng.uniform(0, block_m)
        while pos < CITY_SIZE_M:
            width = block_m * rng.uniform(0.6, 1.4)
            a, b = to_px(pos), to_px(pos + width)
            if b - a >= 1:
                out.append((a, b))
            pos += width + max(street_m * rng.uniform(0.7, 1.3), 1.0 / px)
        return out

    buildings = np.zeros((size, size), bool)
    blocks = np.zeros((size, size), bool)
    rows, cols = spans(), spans()
    for y0, y1 in rows:
        for x0, x1 in cols:
            blocks[y0:y1, x0:x1] = True
            ny, nx = rng.integers(1, 3, size=2)
            ys = np.linspace(y0, y1, ny + 1).round().astype(int)
            xs = np.linspace(x0, x1, nx + 1).round().astype(int)
            for i in range(ny):
                for j in range(nx):
                    if rng.random() >= fill:
                        continue
                    back = rng.uniform(0, 3, size=4) * px
                    a0 = ys[i] + int(round(back[0]))
                    a1 = ys[i + 1] - int(round(back[1]))
                    b0 = xs[j] + int(round(back[2]))
                    b1 = xs[j + 1] - int(round(back[3]))
                    if a1 - a0 < 1 or b1 - b0 < 1:
                        continue
                    buildings[a0:a1, b0:b1] = True
                    if rng.random() < 0.35 and a1 - a0 >= 3 and b1 - b0 >= 3:   # L shape
                        cy = int(round((a1 - a0) * rng.uniform(0.3, 0.6)))
                        cx = int(round((b1 - b0) * rng.uniform(0.3, 0.6)))
                        corner = rng.integers(4)
                        ys_ = slice(a0, a0 + cy) if corner < 2 else slice(a1 - cy, a1)
                        xs_ = slice(b0, b0 + cx) if corner % 2 == 0 else slice(b1 - cx, b1)
                        buildings[ys_, xs_] = False
    return buildings, ~blocks


def place_cars(rng: np.random.Generator, buildings: np.ndarray, street: np.ndarray) -> np.ndarray:
    size = buildings.shape[0]
    px = size / CITY_SIZE_M
    w, l = max(1, round(2.0 * px)), max(1, round(4.5 * px))
    cars = np.zeros_like(buildings)
    want = max(2, int(rng.integers(15, 45) * (size / 256) ** 2))
    allowed = street & ~buildings
    cand = np.flatnonzero(allowed)
    if cand.size == 0:
        return cars
    placed = 0
    for _ in range(want * 20):
        if placed >= want:
            break
        y, x = divmod(int(cand[rng.integers(cand.size)]), size)
        h, ww = (w, l) if rng.random() < 0.5 else (l, w)
        if y + h > size or x + ww > size:
            continue
        area = (slice(y, y + h), slice(x, x + ww))
        if allowed[area].all() and not cars[area].any():
            cars[area] = True
            placed += 1
    return cars
