"""Synthetic radio propagation: the gain maps of every simulation for the transmitters of
one map (see :mod:`lib.data.synthetic`), in RadioMapSeer's gray-level convention.

Gray levels
-----------
RadioMapSeer stores pathloss (as a gain in dB) mapped linearly to [0, 1] between a truncation
level and the dataset's maximum, with everything below the truncation 0; the PNGs hold
0..255. The span, 80 dB, is stated by the RadioUNet paper ("the RMSE in dB is 80 times the
RMSE of gray level"). The two ends, a maximum M1 = -47 dB
and a truncation PL_trnc = -127 dB (``G_MAX``, ``G_FLOOR``), are as recalled from the
RadioUNet paper (Levie et al., "RadioUNet", IEEE TWC 2021, section on the dataset); this
project could not check them against the primary text (its search found no passage quoting
them), only that they span the stated 80 dB. The carrier, 5.9 GHz (``FREQ_HZ``), is from the
same recollection. So::

    pixel = round(255 * clip((G - G_FLOOR) / (G_MAX - G_FLOOR), 0, 1))

and building pixels are 0 in every gain map, as in RadioMapSeer.

Propagation model (all losses in dB; d = tx-pixel distance in metres, at least 1 m)
---------------------------------------------------------------------------------
Free space reference loss at d0 = 1 m for f = 5.9 GHz::

    PL0 = 20 log10(4 pi d0 f / c) = 47.9 dB       (about the dataset's maximum, -47 dB)

Log-distance loss with exponent n = 2.6 (``PATHLOSS_EXPONENT``; street level, ground
reflections)::

    G_fs(d) = -(PL0 + 10 n log10(d / d0))

Penetration: the straight tx->pixel segment is sampled in polar coordinates around the
transmitter (4*size rays x 1 px radial steps, nearest-pixel occupancy, cumulative sum along
each ray, bilinear lookup in angle and radius), giving the metres of building ``m_b`` and of
car ``m_c`` crossed (once per transmitter, shared by all simulations). Excess loss of the
direct path, with L_wall = 2.5 dB per metre of building (``WALL_LOSS_DPM``,
``WALL_LOSS_IRT``) and L_car = 1.0 dB per metre of car (``CAR_LOSS``, cars* simulations)::

    E0 = -(L_wall * m_b + L_car * m_c)            clipped at -300 dB

Street canyons: power travels along the free rows and columns of the street grid (computed on
the city's grid canvas, where the streets are axis-aligned, :mod:`lib.data.synthetic_city`, and
sampled back into the map): each interaction (a reflection or a turn at a corner) costs 6 dB
(``INTERACTION_LOSS``) plus 0.15 dB per metre travelled along the canyon
(``CANYON_LOSS_PER_M``)::

    E_k(p) = max over q in the same free row/column segment as p of
             [E_{k-1}(q) - 0.15 * |p - q|] - 6

Rows and columns alternate implicitly (each step takes the best of both), so k interactions
turn k - 1 corners. For size >= 128 the canyon terms run at half resolution (2x2 max pooling;
a cell blocks only if all its 4 pixels are building). The simulations differ as a
dominant-path model and a ray tracer do:

- ``DPM`` (dominant path): the single best path, the direct one or one around up to 2 corners
  (``DPM_TURNS``) at 6 dB per turn (``DPM_TURN_LOSS``), smoothed by a normalised box blur over
  free pixels of radius 6 m (``DPM_SMOOTH_M``), diffraction-like soft edges::

      G = G_fs + blur(max(E0, max_k E_k + k (6 - DPM_TURN_LOSS)))

- ``IRT2`` / ``IRT4`` (ray tracing with up to 2 / 4 interactions): the power sum of every
  path, sharp edges::

      G = G_fs + 10 log10( sum_{k=0..K} 10^(E_k / 10) )

  IRT4, like RadioMapSeer's, only for transmitters 0 and 1.
- ``cars*``: the same as the simulation named after ``cars``, the direct path also through
  cars (the canyon paths are the car-free simulation's).

With these constants the default output's statistics (median gray level, shares above 0.5
and below 0.05 outside buildings) fall inside the ranges of published RadioMapSeer maps
(``python -m lib.synthetic stats``, :mod:`lib.data.map_stats`; BENCHMARKS-style numbers in the
README).
"""
from __future__ import annotations

import math

import numpy as np

from lib.data.synthetic_city import CITY_SIZE_M, City

FREQ_HZ = 5.9e9
SPEED_OF_LIGHT = 299_792_458.0
REF_DISTANCE_M = 1.0
PL0_DB = 20 * math.log10(4 * math.pi * REF_DISTANCE_M * FREQ_HZ / SPEED_OF_LIGHT)  # 47.9
PATHLOSS_EXPONENT = 2.6
WALL_LOSS_DPM = 2.5          # dB per metre of building on the direct path (DPM)
WALL_LOSS_IRT = 2.5          # dB per metre of building on the direct ray (IRT2/IRT4)
CAR_LOSS = 1.0               # dB per metre of car on the direct path (cars* simulations)
DPM_SMOOTH_M = 6.0           # radius of the DPM diffraction smoothing (metres)
INTERACTION_LOSS = 6.0       # dB per reflection/diffraction (IRT)
CANYON_LOSS_PER_M = 0.15     # dB per metre along a street canyon after an interaction
EXCESS_FLOOR = -300.0        # excess losses are clipped here (far below G_FLOOR)
G_FLOOR = -127.0             # RadioMapSeer's truncation: gain (dB) mapped to gray level 0, and below it
G_MAX = -47.0                # RadioMapSeer's maximum: gain (dB) mapped to gray level 1 (pixel 255)
INTERACTIONS = {"DPM": 0, "IRT2": 2, "IRT4": 4}
DPM_TURNS = 2                # DPM: the dominant path turns at most this many street corners
DPM_TURN_LOSS = 6.0          # dB per turn of the dominant path (diffraction around a corner)


# ------------------------------------------------------------------ propagation tables
class Tables:
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


class Canyons:
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


def gain_maps(tables: Tables, city: City, tx: np.ndarray, canyons: Canyons, half: bool) -> dict[str, np.ndarray]:
    """uint8 gain maps (K x H x W) per simulation for the transmitters ``tx`` (K x 2, map pixels)."""
    size, buildings, cars = tables.size, city.buildings, city.cars
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
    on_map = city.to_map >= 0
    to_map = np.where(on_map, city.to_map, 0)

    def to_canvas(e: np.ndarray) -> np.ndarray:      # map frame -> the street grid's canvas
        out = e.reshape(k, -1)[:, to_map]
        out[:, ~on_map] = EXCESS_FLOOR               # no source outside the map
        side = canyons.blocked.shape[0] * (2 if half else 1)
        return out.reshape(k, side, side)

    def back_to_map(x: np.ndarray) -> np.ndarray:      # the canvas -> the map frame
        return (_double(x) if half else x).reshape(k, -1)[:, city.to_grid].reshape(k, size, size)

    # Paths along the street canyons, from the direct path's excess loss without cars (shared by
    # the cars* simulations: cars attenuate their direct path only): the power sums of up to
    # 2 and 4 interactions (IRT2, IRT4) and the best single path of up to DPM_TURNS turns (DPM).
    e0 = np.maximum(-np.float32(WALL_LOSS_IRT) * m_b, np.float32(EXCESS_FLOOR))
    e = to_canvas(e0)
    e = _half(e) if half else e
    spill = np.zeros(e.shape, np.float32)
    dominant = np.full(e.shape, EXCESS_FLOOR, np.float32)
    reflected = {}
    for level in range(1, max(INTERACTIONS.values()) + 1):
        e = canyons.spread(e)
        e -= np.float32(INTERACTION_LOSS)
        np.maximum(e, np.float32(EXCESS_FLOOR), out=e)
        spill += _db_to_power(e)
        if level <= DPM_TURNS:
            np.maximum(dominant, e + np.float32(level * (INTERACTION_LOSS - DPM_TURN_LOSS)), out=dominant)
        if level in (2, 4):
            reflected[level] = back_to_map(spill)
    around = back_to_map(dominant)

    out: dict[str, np.ndarray] = {}
    for with_cars in ([False, True] if cars is not None else [False]):
        prefix = "cars" if with_cars else ""
        car_loss = np.float32(CAR_LOSS) * m_c if with_cars else np.float32(0)
        direct = _db_to_power(np.maximum(-(np.float32(WALL_LOSS_IRT) * m_b + car_loss), np.float32(EXCESS_FLOOR)))
        for level, power in reflected.items():
            out[prefix + f"IRT{level}"] = _to_pixels(g_fs + 10.0 * np.log10(direct + power), buildings)
        e_dpm = np.maximum(-(np.float32(WALL_LOSS_DPM) * m_b + car_loss), around)
        e_dpm = _masked_blur(np.maximum(e_dpm, EXCESS_FLOOR), free, r_px)
        out[prefix + "DPM"] = _to_pixels(g_fs + e_dpm, buildings)
    assert all(v.shape == (k, size, size) for v in out.values())
    return out
