"""The embedded default dataset: a synthetic city generator in the RadioMapSeer layout.

``generate`` writes the same folders as RadioMapSeer, so one loader (:mod:`lib.data`) reads
both::

    ROOT/png/buildings_complete/{map}.png      255 = building, 0 = free
    ROOT/png/antennas/{map}_{tx}.png           a single 255 pixel at the transmitter
    ROOT/png/cars/{map}.png                    255 = car (only with cars=True)
    ROOT/gain/{sim}/{map}_{tx}.png             gain map, 0..255 (see "Mapping to pixels")

with ``sim`` in DPM, IRT2, IRT4 and, with cars=True, carsDPM, carsIRT2, carsIRT4. All images
are 8-bit grayscale (PIL mode 'L'), ``size`` x ``size``. A file ``synthetic.json`` in ROOT
records the generator parameters (the loader ignores it).

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

Propagation model (all losses in dB; d = tx-pixel distance in metres, at least 1 m)
---------------------------------------------------------------------------------
Free space reference loss at d0 = 1 m for f = 3.5 GHz::

    PL0 = 20 log10(4 pi d0 f / c) = 43.3 dB

Log-distance loss with exponent n = 2.2 (``PATHLOSS_EXPONENT``)::

    G_fs(d) = -(PL0 + 10 n log10(d / d0))

Penetration: the straight tx->pixel segment is sampled in polar coordinates around the
transmitter (4*size rays x 1 px radial steps, nearest-pixel occupancy, cumulative sum along
each ray, bilinear lookup in angle and radius), giving the metres of building ``m_b`` and of
car ``m_c`` crossed (computed once per transmitter, shared by all simulations). Excess loss of the direct path::

    E0 = -(L_wall * m_b + L_car * m_c)        (L_car term only in the cars* simulations)

clipped at -300 dB. The simulations differ as a dominant-path model and a ray tracer do:

- ``DPM`` (dominant path): L_wall = 1.0 dB/m (``WALL_LOSS_DPM``); the excess loss is
  smoothed by a normalised box blur over free pixels of radius 6 m (``DPM_SMOOTH_M``),
  a diffraction-like softening of shadow edges: ``G = G_fs + blur(E0)``.
- ``IRT2`` / ``IRT4`` (ray tracing with up to 2 / 4 interactions): lower wall loss,
  L_wall = 0.7 dB/m (``WALL_LOSS_IRT``) for the direct ray, plus k = 1..K interaction
  terms. Interaction k carries power along street canyons (rows and columns of free pixels,
  stopped by buildings) from the best point of interaction k-1 and costs 6 dB
  (``INTERACTION_LOSS``) plus 0.25 dB per metre travelled along the canyon
  (``CANYON_LOSS_PER_M``)::

      E_k(p) = max over q in the same free row/column segment as p of
               [E_{k-1}(q) - 0.25 * |p - q|] - 6
      G = G_fs + 10 log10( sum_{k=0..K} 10^(E_k / 10) )

  Rows then columns alternate implicitly (each step takes the best of both), so K = 2 can
  turn one corner and K = 4 three corners: IRT4 fills more of the shadowed side streets.
  For size >= 128 the canyon terms run at half resolution (2x2 max pooling of E0; a cell
  blocks only if all its 4 pixels are building) and are repeated back to full size.
- ``cars*``: the same as the simulation named after ``cars``, with L_car = 1.0 dB/m
  (``CAR_LOSS``) of car crossed on the direct path.

Mapping to pixels
-----------------
The gain G (dB) maps linearly to 0..255 between G_FLOOR = -150 dB (pixel 0) and
G_MAX = -50 dB (pixel 255): ``pixel = round(255 * (G - G_FLOOR) / (G_MAX - G_FLOOR))``,
clipped to [0, 255]; gains below the floor give 0 (as RadioMapSeer's threshold). Building
pixels are 0 in every gain map.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lib.errors import DataError, run_cli

# ----------------------------------------------------------------------- model constants
FREQ_HZ = 3.5e9
SPEED_OF_LIGHT = 299_792_458.0
REF_DISTANCE_M = 1.0
PL0_DB = 20 * math.log10(4 * math.pi * REF_DISTANCE_M * FREQ_HZ / SPEED_OF_LIGHT)  # 43.3
PATHLOSS_EXPONENT = 2.2
WALL_LOSS_DPM = 1.0          # dB per metre of building on the direct path (DPM)
WALL_LOSS_IRT = 0.7          # dB per metre of building on the direct ray (IRT2/IRT4)
CAR_LOSS = 1.0               # dB per metre of car on the direct path (cars* simulations)
DPM_SMOOTH_M = 6.0           # radius of the DPM diffraction smoothing (metres)
INTERACTION_LOSS = 6.0       # dB per reflection/diffraction (IRT)
CANYON_LOSS_PER_M = 0.25     # dB per metre along a street canyon after an interaction
EXCESS_FLOOR = -300.0        # excess losses are clipped here (far below G_FLOOR)
G_FLOOR = -150.0             # gain (dB) mapped to pixel 0; anything lower is 0 as well
G_MAX = -50.0                # gain (dB) mapped to pixel 255; anything higher is 255
CITY_SIZE_M = 256.0          # side of every map in metres, whatever its pixel size
PROGRESS_EVERY_S = 30.0      # generate() logs progress at most this often

BASE_SIMULATIONS = ("DPM", "IRT2", "IRT4")
CAR_SIMULATIONS = ("carsDPM", "carsIRT2", "carsIRT4")
INTERACTIONS = {"DPM": 0, "IRT2": 2, "IRT4": 4}


def simulations(cars: bool) -> tuple[str, ...]:
    return BASE_SIMULATIONS + (CAR_SIMULATIONS if cars else ())


# ----------------------------------------------------------------------------- city
def _city(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
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


def _cars(rng: np.random.Generator, buildings: np.ndarray, street: np.ndarray) -> np.ndarray:
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


# ------------------------------------------------------------------ propagation tables
class _Tables:
    """Per-size geometry shared by every transmitter (computed once per ``generate``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.m_per_px = CITY_SIZE_M / size
        n_ang = 4 * size
        n_rad = int(math.ceil(math.hypot(size, size))) + 2
        self.n_ang, self.n_rad = n_ang, n_rad
        # occupancy code: building 1, car 1 << car_shift (per-ray counts stay < 1 << car_shift)
        self.car_shift = int(n_rad).bit_length()
        # ray samples at radii (j + 0.5) px; occupancy looked up in a zero-padded map
        theta = 2 * np.pi * np.arange(n_ang) / n_ang
        r = np.arange(n_rad) + 0.5
        dy = np.floor(r[None, :] * np.sin(theta)[:, None] + 0.5).astype(np.int64)
        dx = np.floor(r[None, :] * np.cos(theta)[:, None] + 0.5).astype(np.int64)
        self.pad = n_rad + 1
        self.padded_w = size + 2 * self.pad
        self.ray_offsets = (dy * self.padded_w + dx).astype(np.int32)      # (n_ang, n_rad)
        # per integer offset (oy, ox) in [-(size-1), size-1]^2: the 4 corners and weights
        # of a bilinear lookup (angle, radius) into the cumulative table C (n_ang rows of
        # n_rad + 1: C[a, k] = occupied cells on ray a up to radius k px)
        o = np.arange(-(size - 1), size)
        oy, ox = np.meshgrid(o, o, indexing="ij")
        dist = np.hypot(oy, ox)
        ang = (np.arctan2(oy, ox) % (2 * np.pi)) * n_ang / (2 * np.pi)
        a0 = np.floor(ang).astype(np.int64)
        wa = (ang - a0).astype(np.float32)
        a0 %= n_ang
        a1 = (a0 + 1) % n_ang
        k0 = np.floor(dist).astype(np.int64)
        wk = (dist - k0).astype(np.float32)
        stride = n_rad + 1
        self.corners = [((a * stride + k).astype(np.int32), w.astype(np.float32))
                        for a, k, w in [(a0, k0, (1 - wa) * (1 - wk)), (a0, k0 + 1, (1 - wa) * wk),
                                        (a1, k0, wa * (1 - wk)), (a1, k0 + 1, wa * wk)]]
        d_m = np.maximum(dist * self.m_per_px, REF_DISTANCE_M)
        self.g_fs = (-(PL0_DB + 10 * PATHLOSS_EXPONENT * np.log10(d_m / REF_DISTANCE_M))
                     ).astype(np.float32)

    def window(self, table: np.ndarray, ty: int, tx: int) -> np.ndarray:
        s = self.size
        return table[s - 1 - ty:2 * s - 1 - ty, s - 1 - tx:2 * s - 1 - tx]

    def crossed(self, occ_padded: np.ndarray, ty: int, tx: int,
                cars: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Metres of building (and of car) on the segment tx->pixel, for every pixel (HxW).

        ``occ_padded``: the flattened, zero-padded occupancy code (building 1, car
        ``1 << car_shift``).
        """
        s = self.size
        far = max(ty, s - 1 - ty) ** 2 + max(tx, s - 1 - tx) ** 2
        n_rad = min(self.n_rad, int(math.ceil(math.sqrt(far))) + 2)   # rays leave the map
        base = (ty + self.pad) * self.padded_w + (tx + self.pad)
        samples = np.take(occ_padded, self.ray_offsets[:, :n_rad] + np.int32(base))
        cum = np.empty((self.n_ang, self.n_rad + 1), np.int32)   # columns > n_rad unused
        cum[:, 0] = 0
        np.cumsum(samples, axis=1, dtype=np.int32, out=cum[:, 1:n_rad + 1])
        flat = cum.ravel()
        m_b = np.zeros((s, s), np.float32)
        m_c = np.zeros((s, s), np.float32) if cars else None
        mask = np.int32((1 << self.car_shift) - 1)
        for idx, w in self.corners:
            v = np.take(flat, self.window(idx, ty, tx))
            w = self.window(w, ty, tx)
            if cars:
                m_b += (v & mask) * w
                m_c += (v >> self.car_shift) * w
            else:
                m_b += v * w
        scale = np.float32(self.m_per_px)
        m_b *= scale
        if cars:
            m_c *= scale
        return m_b, m_c


def _box_blur(x: np.ndarray, r: int) -> np.ndarray:
    """Sum over a (2r+1)^2 window (zero outside) along the last two axes."""
    for axis in (-2, -1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(x, pad), axis=axis)
        n = x.shape[axis]
        hi = [slice(None)] * x.ndim
        lo = [slice(None)] * x.ndim
        hi[axis] = slice(2 * r + 1, 2 * r + 1 + n)
        lo[axis] = slice(0, n)
        x = c[tuple(hi)] - c[tuple(lo)]
    return x


def _masked_blur(e: np.ndarray, free: np.ndarray, r: int) -> np.ndarray:
    f = free.astype(np.float32)
    num = _box_blur(e * f, r)
    den = _box_blur(f, r)
    return num / np.maximum(den, 1e-6)


class _Canyons:
    """Street-canyon spreading over one map's free rows and columns (K x H x W arrays).

    ``spread(e)[p] = max over q in p's free row/column segment of e(q) - step * |p - q|``,
    as a segmented running maximum: adding ``BIG * (blocked pixels passed so far)`` makes
    every value of a later segment beat every value of an earlier one, so one
    ``np.maximum.accumulate`` per direction respects the buildings.
    """

    BIG = 1024.0   # > |EXCESS_FLOOR - INTERACTION_LOSS| + step * size

    def __init__(self, blocked: np.ndarray, step: float) -> None:
        n = blocked.shape[0]
        self.blocked = blocked
        pos = np.arange(n, dtype=np.float32) * np.float32(step)
        self.dirs = []
        for axis in (1, 2):
            shape = [1, 1, 1]
            shape[axis] = n
            p = pos.reshape(shape)
            for flip in (False, True):
                bl = np.flip(blocked, axis - 1) if flip else blocked
                seg = (np.cumsum(bl, axis=axis - 1, dtype=np.float32) * np.float32(self.BIG))[None]
                # added before the running max; -1e9 on blocked pixels; subtracted after
                add = np.where(bl[None], np.float32(-1e9), p + seg).astype(np.float32)
                self.dirs.append((axis, flip, add, p + seg))

    def spread(self, e: np.ndarray) -> np.ndarray:
        best = np.full(e.shape, EXCESS_FLOOR, np.float32)
        for axis, flip, add, sub in self.dirs:
            ee = np.flip(e, axis) if flip else e
            run = np.maximum.accumulate(ee + add, axis=axis)
            run -= sub
            np.maximum(best, np.flip(run, axis) if flip else run, out=best)
        best[:, self.blocked] = EXCESS_FLOOR
        return best


_LN10_10 = np.float32(math.log(10) / 10)
_PIX_SCALE = np.float32(255.0 / (G_MAX - G_FLOOR))


def _db_to_power(e: np.ndarray) -> np.ndarray:
    return np.exp(e * _LN10_10)


def _to_pixels(g: np.ndarray, buildings: np.ndarray) -> np.ndarray:
    """Gain (dB) -> uint8: linear between G_FLOOR (0) and G_MAX (255); below the floor 0."""
    v = (g - np.float32(G_FLOOR)) * _PIX_SCALE
    np.clip(v, 0, 255, out=v)
    v += np.float32(0.5)                 # round half up (v >= 0)
    out = v.astype(np.uint8)
    out[..., buildings] = 0
    return out


def _half(x: np.ndarray) -> np.ndarray:
    """2x2 max pooling (K x H x W): a half-resolution cell is as lit as its best pixel."""
    return np.maximum(np.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                      np.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def _double(x: np.ndarray) -> np.ndarray:
    k, h, w = x.shape
    return np.broadcast_to(x[:, :, None, :, None], (k, h, 2, w, 2)).reshape(k, 2 * h, 2 * w)


def _gains(tables: _Tables, buildings: np.ndarray, cars: np.ndarray | None,
           tx: np.ndarray, canyons: _Canyons, half: bool) -> dict[str, np.ndarray]:
    """uint8 gain maps (K x H x W) per simulation for the transmitters ``tx`` (K x 2)."""
    size = tables.size
    occ = buildings.astype(np.int32)
    if cars is not None:
        occ[cars & ~buildings] = 1 << tables.car_shift
    occ_p = np.pad(occ, tables.pad).ravel()
    k = len(tx)
    crossed = [tables.crossed(occ_p, y, x, cars is not None) for y, x in tx]
    m_b = np.stack([c[0] for c in crossed])
    m_c = np.stack([c[1] for c in crossed]) if cars is not None else None
    g_fs = np.stack([tables.window(tables.g_fs, y, x) for y, x in tx])
    free = ~buildings
    r_px = max(1, int(round(DPM_SMOOTH_M / tables.m_per_px)))

    out: dict[str, np.ndarray] = {}
    for with_cars in ([False, True] if cars is not None else [False]):
        prefix = "cars" if with_cars else ""
        car_loss = np.float32(CAR_LOSS) * m_c if with_cars else np.float32(0)
        e_dpm = np.maximum(-(np.float32(WALL_LOSS_DPM) * m_b + car_loss), EXCESS_FLOOR)
        e_dpm = _masked_blur(e_dpm, free, r_px)
        out[prefix + "DPM"] = _to_pixels(g_fs + e_dpm, buildings)

        e0 = np.maximum(-(np.float32(WALL_LOSS_IRT) * m_b + car_loss), np.float32(EXCESS_FLOOR))
        direct = _db_to_power(e0)
        e = _half(e0) if half else e0
        spill = np.zeros(e.shape, np.float32)
        for level in range(1, max(INTERACTIONS.values()) + 1):
            e = canyons.spread(e)
            e -= np.float32(INTERACTION_LOSS)
            np.maximum(e, np.float32(EXCESS_FLOOR), out=e)
            spill += _db_to_power(e)
            if level in (2, 4):
                power = direct + (_double(spill) if half else spill)
                out[prefix + f"IRT{level}"] = _to_pixels(g_fs + 10.0 * np.log10(power), buildings)
    assert all(v.shape == (k, size, size) for v in out.values())
    return out


# ---------------------------------------------------------------------------- writing
def _save(arr: np.ndarray, path: Path) -> None:
    """Write a 2-D uint8 array as an 8-bit grayscale PNG (mode 'L'); zlib level 1 for speed."""
    Image.fromarray(arr, mode="L").save(path, format="PNG", compress_level=1)


def _write_map(root: Path, map_id: int, tx_per_map: int, seed: int, size: int, cars: bool,
               tables: _Tables) -> None:
    rng = np.random.default_rng([seed, map_id])
    buildings, street = _city(rng, size)
    car_map = _cars(rng, buildings, street) if cars else None
    free = ~buildings if car_map is None else ~(buildings | car_map)
    free_idx = np.flatnonzero(free)
    if free_idx.size < tx_per_map:
        raise DataError(f"synthetic map {map_id}: only {free_idx.size} free pixels for "
                        f"{tx_per_map} transmitters (use a larger size)")
    pick = rng.choice(free_idx, size=tx_per_map, replace=False)
    tx = np.stack(np.divmod(pick, size), axis=1)

    _save(buildings.astype(np.uint8) * 255, root / "png" / "buildings_complete" / f"{map_id}.png")
    if car_map is not None:
        _save(car_map.astype(np.uint8) * 255, root / "png" / "cars" / f"{map_id}.png")
    antenna = np.zeros((size, size), np.uint8)
    for t, (y, x) in enumerate(tx):
        antenna[y, x] = 255
        _save(antenna, root / "png" / "antennas" / f"{map_id}_{t}.png")
        antenna[y, x] = 0
    # canyon geometry (half resolution for large maps: a cell is blocked if all 4 are)
    half = size >= 128 and size % 2 == 0
    blocked = buildings.reshape(size // 2, 2, size // 2, 2).all(axis=(1, 3)) if half else buildings
    canyons = _Canyons(blocked, CANYON_LOSS_PER_M * tables.m_per_px * (2 if half else 1))
    chunk = 8   # transmitters computed together (bounds memory at large tx_per_map)
    for start in range(0, tx_per_map, chunk):
        gains = _gains(tables, buildings, car_map, tx[start:start + chunk], canyons, half)
        for sim, maps in gains.items():
            for i, g in enumerate(maps):
                _save(g, root / "gain" / sim / f"{map_id}_{start + i}.png")


def generate(root: str | os.PathLike, num_maps: int, tx_per_map: int, seed: int,
             size: int = 256, cars: bool = True, log: Callable[[str], None] = print) -> None:
    """Write a synthetic RadioMapSeer-layout dataset of ``num_maps`` x ``tx_per_map`` to ``root``.

    Files are written into a temporary sibling folder that is renamed to ``root`` at the
    end, so a half-written dataset never sits at ``root``. ``root`` must not exist yet.
    Long runs ``log`` a progress line every 30 s. Cost: about 0.2 s per map with 8
    transmitters and 2.9 s per map with 80 at 256 px (one core).
    """
    root = Path(root)
    if num_maps < 1 or tx_per_map < 1:
        raise DataError(f"synthetic: num_maps ({num_maps}) and tx_per_map ({tx_per_map}) "
                        f"must be >= 1")
    if size < 8:
        raise DataError(f"synthetic: size {size} is too small (at least 8)")
    if root.exists():
        raise DataError(f"synthetic: {root} already exists (remove it or pick another root)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)        # mkdtemp makes it private; the dataset is not
        for sub in ["png/buildings_complete", "png/antennas"] + (["png/cars"] if cars else []):
            (tmp / sub).mkdir(parents=True)
        for sim in simulations(cars):
            (tmp / "gain" / sim).mkdir(parents=True)
        tables = _Tables(size)
        t0 = last = time.perf_counter()
        for map_id in range(num_maps):
            _write_map(tmp, map_id, tx_per_map, seed, size, cars, tables)
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and map_id + 1 < num_maps:
                last = now
                eta = (now - t0) / (map_id + 1) * (num_maps - map_id - 1)
                log(f"synthetic: {map_id + 1}/{num_maps} maps of {root} written "
                    f"({now - t0:.0f} s, about {eta:.0f} s left)")
        meta = {"generator": "lib.synthetic", "version": 1, "seed": seed, "num_maps": num_maps,
                "tx_per_map": tx_per_map, "size": size, "cars": cars,
                "simulations": list(simulations(cars))}
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, root)
        except OSError:
            if root.exists():     # another process published the same dataset first
                raise DataError(f"synthetic: {root} already exists (remove it or pick another "
                                f"root)") from None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic(data_cfg, seed: int, log: Callable[[str], None] = print) -> None:
    """Generate the synthetic dataset at ``data_cfg.root`` unless that folder exists.

    An existing folder is left alone (the loader validates it). Several processes may call
    this at once: each writes its own temporary copy and the first to finish publishes it.
    """
    root = Path(data_cfg.root)
    if root.exists():
        return
    syn = data_cfg.synthetic
    t0 = time.perf_counter()
    try:
        generate(root, syn.num_maps, syn.tx_per_map, seed, size=syn.size, cars=syn.cars, log=log)
    except DataError:
        if root.exists():   # lost a race with another process writing the same data
            return
        raise
    n_sims = len(simulations(syn.cars))
    log(f"data.root {root} not found: generated a synthetic dataset there "
        f"({syn.num_maps} maps x {syn.tx_per_map} transmitters x {n_sims} simulations, "
        f"{syn.size} px, seed {seed}) in {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.synthetic",
                                description="Write a synthetic city dataset in the RadioMapSeer layout.")
    p.add_argument("--root", required=True, help="output folder (must not exist)")
    p.add_argument("--num-maps", type=int, required=True)
    p.add_argument("--tx-per-map", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--no-cars", action="store_true", help="skip png/cars and gain/cars*")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    generate(a.root, a.num_maps, a.tx_per_map, a.seed, size=a.size, cars=not a.no_cars)
    print(f"wrote {a.num_maps} maps x {a.tx_per_map} transmitters x "
          f"{len(simulations(not a.no_cars))} simulations ({a.size} px) to {a.root} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
