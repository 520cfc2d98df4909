"""Synthetic radio propagation: the gain maps of every simulation for the transmitters of
one map (see :mod:`lib.synthetic`).

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

import math

import numpy as np

from lib.synthetic_city import CITY_SIZE_M

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
INTERACTIONS = {"DPM": 0, "IRT2": 2, "IRT4": 4}


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


def gain_maps(tables: Tables, buildings: np.ndarray, cars: np.ndarray | None,
           tx: np.ndarray, canyons: Canyons, half: bool) -> dict[str, np.ndarray]:
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
