"""The RadioMapSeer folder layout and its pixels: where a sample's files are, which samples a
folder holds, and how a PNG becomes a float map.

Layout under ``data.root`` (the synthetic generator in :mod:`lib.data.synthetic` writes the same)::

    png/buildings_complete/{map}.png    png/antennas/{map}_{tx}.png    png/cars/{map}.png
    gain/{simulation}/{map}_{tx}.png

Pixels: 8-bit grayscale PNGs (mode 'L'); a map in model space is ``pixel / 255 * 2 - 1``
(float32 arithmetic), in [-1, 1]. Maps of another size than the model's are resized with
:func:`resize_maps`.

Bad files: :func:`list_samples` finds missing and unexpected files from the folder listing
alone (no PNG is decoded); decoding errors, wrong modes and wrong sizes show up when a file is
read (:func:`read_png`). Either raises :class:`BadFile` (a :class:`DataError` naming the file
and the reason), or, with ``on_bad_file: skip``, records ``(path, reason)`` instead.

This module depends on nothing else in ``lib/`` but the errors; the cache and the dataset are
built on it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from lib.errors import DataError

if TYPE_CHECKING:
    import torch

BUILDINGS_DIR = "png/buildings_complete"
ANTENNAS_DIR = "png/antennas"
CARS_DIR = "png/cars"
GAIN_DIR = "gain"
LAYOUT = ("expected the RadioMapSeer layout: png/buildings_complete, png/antennas, "
          "gain/<simulation>, and png/cars for the cars* simulations")
NO_TX_PIXEL = "no transmitter pixel (expected one pixel > 0)"

_ID = r"(0|[1-9][0-9]*)"
_MAP_NAME = re.compile(_ID + r"\.png")
_TX_NAME = re.compile(_ID + "_" + _ID + r"\.png")


class BadFile(DataError):
    """A data file that is missing, unexpected, corrupt or of the wrong mode or size."""

    def __init__(self, path: Path | str, reason: Optional[str] = None) -> None:
        # One argument: the whole message (how a DataLoader worker's copy is re-raised).
        self.path, self.reason = str(path), reason or ""
        super().__init__(f"{path}: {reason}" if reason is not None else str(path))


# ------------------------------------------------------------------------ discovery
def require_dir(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_dir():
        raise DataError(f"data.root {root}: missing folder {path} ({LAYOUT})")
    return path


def require_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data.root {root}: folder not found ({LAYOUT})")


def file_names(folder: Path, sort: bool = True) -> list[str]:
    """File names in ``folder`` (hidden names such as .DS_Store are ignored)."""
    names = [n for n in os.listdir(folder) if not n.startswith(".")]
    return sorted(names) if sort else names


def discover_maps(root: str | os.PathLike) -> list[int]:
    """Map ids of ``png/buildings_complete/{map}.png`` under ``root``, sorted.

    Names that are not ``<map>.png`` are left to :func:`list_samples` to report.
    """
    root = Path(root)
    require_root(root)
    folder = require_dir(root, BUILDINGS_DIR)
    ids = sorted(int(m.group(1)) for n in file_names(folder) if (m := _MAP_NAME.fullmatch(n)))
    if not ids:
        raise DataError(f"data.root {root}: no building maps in {folder} (expected files "
                        f"named <map>.png, e.g. 0.png; {LAYOUT})")
    return ids


# RadioMapSeer simulates IRT4 (and carsIRT4) only for transmitters 0 and 1 of each map; every
# other simulation for every transmitter. A gain map that should exist and does not is an error.
EXPECTED_TX = {"IRT4": (0, 1), "carsIRT4": (0, 1)}


def is_cars_simulation(simulation: str) -> bool:
    """A simulation whose target has cars on the streets (gain/cars*)."""
    return simulation.startswith("cars")


def cars_channels(simulations: Sequence[str], cars_input: bool | str = "auto") -> list[bool]:
    """Per simulation, whether its samples' third condition channel is the cars map (else the
    buildings again): ``data.cars_input`` true or false for all, ``auto`` for the cars*
    simulations. (RadioUNet's ``carsInput``, independent of ``carsSimul``.)"""
    if isinstance(cars_input, bool):
        return [cars_input] * len(simulations)
    return [is_cars_simulation(s) for s in simulations]


@dataclass
class Listing:
    """The samples of a folder: one per (map, transmitter, simulation), ordered by map, then
    transmitter, then simulation (in the order given); and the files that were skipped."""
    maps: np.ndarray                      # int64 per sample
    txs: np.ndarray                       # int64 per sample
    sims: np.ndarray                      # int64 per sample: index into the simulations
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.maps)


def list_samples(root: Path, simulations: Sequence[str], map_ids: Sequence[int],
                 tx_per_map: Optional[int] = None, on_bad_file: str = "error",
                 cars: Optional[Sequence[bool]] = None) -> Listing:
    """The samples of ``map_ids`` x transmitters x ``simulations`` in the folder ``root``, from
    its file listing (no PNG is decoded). A map's transmitters are its
    ``png/antennas/{map}_{tx}.png`` files (``tx_per_map=K`` keeps the K lowest ids); a
    simulation has the ones it has gain maps for, and must have those of :data:`EXPECTED_TX`
    (all, except IRT4). ``cars[s]``: simulation ``s`` reads the cars map (default: the cars*
    ones). A missing or unexpected file raises :class:`BadFile` (``on_bad_file: error``) or is
    recorded in ``skipped`` and its samples left out (``skip``)."""
    skipped: list[tuple[str, str]] = []

    def problem(path: Path, reason: str) -> None:
        if on_bad_file == "error":
            raise BadFile(path, reason)
        skipped.append((str(path), reason))

    require_root(root)
    bdir = require_dir(root, BUILDINGS_DIR)
    adir = require_dir(root, ANTENNAS_DIR)
    gdirs = [require_dir(root, f"{GAIN_DIR}/{s}") for s in simulations]
    cars_sim = np.array(cars_channels(simulations) if cars is None else list(cars), dtype=bool)
    cdir = require_dir(root, CARS_DIR) if cars_sim.any() else None

    # -- building maps
    all_maps: set[int] = set()
    for n in file_names(bdir):
        m = _MAP_NAME.fullmatch(n)
        if m:
            all_maps.add(int(m.group(1)))
        else:
            problem(bdir / n, "unexpected file name (expected <map>.png, e.g. 12.png)")
    maps = []
    for m in sorted(set(int(i) for i in map_ids)):
        if m in all_maps:
            maps.append(m)
        else:
            problem(bdir / f"{m}.png", "missing building map")
    wanted = set(maps)

    # -- transmitters
    tx_of: dict[int, list[int]] = {}
    ant_names: set[str] = set()      # antenna files of existing maps (all splits)
    for n in file_names(adir):
        t = _TX_NAME.fullmatch(n)
        if not t:
            problem(adir / n, "unexpected file name (expected <map>_<tx>.png, e.g. 12_3.png)")
            continue
        m = int(t.group(1))
        if m not in all_maps:
            problem(adir / n, f"unexpected file: no building map {bdir / f'{m}.png'}")
            continue
        ant_names.add(n)
        if m in wanted:
            tx_of.setdefault(m, []).append(int(t.group(2)))
    for m in maps:
        if m not in tx_of:
            problem(adir / f"{m}_0.png", f"missing file: map {m} has no transmitter files "
                                         f"{adir}/{m}_<tx>.png")
    pairs = []                       # indexed (map, tx), sorted
    for m in sorted(tx_of):
        pairs.extend((m, tx) for tx in sorted(tx_of[m])[:tx_per_map])
    pair_names = [f"{m}_{tx}.png" for m, tx in pairs]

    # -- cars maps
    have_cars: set[int] = set()
    if cdir is not None:
        for n in file_names(cdir):
            c = _MAP_NAME.fullmatch(n)
            if not c:
                problem(cdir / n, "unexpected file name (expected <map>.png)")
            elif int(c.group(1)) not in all_maps:
                problem(cdir / n, f"unexpected file: no building map {bdir / c.group(0)}")
            else:
                have_cars.add(int(c.group(1)))
        for m in maps:
            if m in tx_of and m not in have_cars:
                problem(cdir / f"{m}.png", "missing cars map (the cars input channel needs it)")

    # -- gain maps (set operations on names: real data has ~56k files per simulation)
    keep = np.zeros((len(pairs), len(simulations)), bool)
    for s, gdir in enumerate(gdirs):
        present = set(file_names(gdir, sort=False))
        for n in sorted(present - ant_names):
            if _TX_NAME.fullmatch(n):
                problem(gdir / n, f"unexpected file: no transmitter file {adir / n}")
            else:
                problem(gdir / n, "unexpected file name (expected <map>_<tx>.png, e.g. 12_3.png)")
        found = np.fromiter((n in present for n in pair_names), bool, len(pairs))
        only = EXPECTED_TX.get(simulations[s])
        expected = np.fromiter((only is None or tx in only for _, tx in pairs), bool, len(pairs))
        for i in np.flatnonzero(expected & ~found):
            problem(gdir / pair_names[i], f"missing gain map (transmitter {adir / pair_names[i]} exists)")
        keep[:, s] = found
        if cars_sim[s]:
            keep[:, s] &= np.fromiter((m in have_cars for m, _ in pairs), bool, len(pairs))
    p_idx, s_idx = np.nonzero(keep)          # row-major: map, tx, then simulation
    pair_arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return Listing(pair_arr[p_idx, 0].copy(), pair_arr[p_idx, 1].copy(), s_idx.astype(np.int64), skipped)


def check_headers(root: Path, listing: Listing, simulations: Sequence[str], cars: Sequence[bool],
                  on_bad_file: str = "error", bad: Optional[dict[str, str]] = None,
                  progress: Optional[Callable[[int], Any]] = None) -> Listing:
    """Every file ``listing``'s samples read, checked before training starts: from its PNG
    header (format, 8-bit grayscale, the size of its building map; no pixel is decoded), or,
    with ``bad`` (a cache's record of the files it could not decode, root-relative), against
    that record. A bad file raises :class:`BadFile` (``on_bad_file: error``) or is recorded
    and its samples left out (``skip``). ``progress(n)`` is called as files are checked."""
    skipped = list(listing.skipped)
    reasons: dict[str, Optional[str]] = {}

    def reason(path: Path, shape: Optional[tuple[int, int]], like: Optional[Path]) -> Optional[str]:
        key = str(path)
        if key not in reasons:
            if bad is not None:
                reasons[key] = bad.get(relative(path))
            else:
                try:
                    with Image.open(path) as im:
                        if im.format != "PNG":
                            reasons[key] = f"not a PNG file ({im.format}); expected an 8-bit grayscale PNG"
                        elif im.mode != "L":
                            reasons[key] = f"image mode {im.mode!r}; expected 8-bit grayscale (mode 'L')"
                        elif shape is not None and (im.height, im.width) != shape:
                            reasons[key] = (f"size {im.width}x{im.height}; expected {shape[1]}x{shape[0]} like "
                                            f"its building map {like}")
                        else:
                            reasons[key] = None
                            sizes[key] = (im.height, im.width)
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                    reasons[key] = f"corrupt or truncated PNG ({' '.join(str(exc).split()) or type(exc).__name__})"
            if progress is not None:
                progress(1)
        return reasons[key]

    sizes: dict[str, tuple[int, int]] = {}
    keep = np.ones(len(listing), bool)
    for i, (m, tx, s) in enumerate(zip(listing.maps.tolist(), listing.txs.tolist(), listing.sims.tolist())):
        p = sample_paths(root, m, tx, simulations[s], bool(cars[s]))
        problem = None
        for path in (p.buildings, p.antenna, p.gain) + ((p.cars,) if p.cars is not None else ()):
            shape = None if path == p.buildings else sizes.get(str(p.buildings))   # buildings come first
            why = reason(path, shape, p.buildings)
            if why is not None:
                problem = (path, why)
                break
        if problem is None:
            continue
        path, why = problem
        if on_bad_file == "error":
            raise BadFile(path, why)
        keep[i] = False
        if all(str(path) != q for q, _ in skipped):
            skipped.append((str(path), why))
    return Listing(listing.maps[keep], listing.txs[keep], listing.sims[keep], skipped)


# ------------------------------------------------------------------------ files of a sample
class SamplePaths(NamedTuple):
    """The files one sample is made of; ``cars`` is None for the simulations without cars."""
    map_id: int
    tx: int
    buildings: Path
    antenna: Path
    gain: Path
    cars: Optional[Path]


def sample_paths(root: Path, map_id: int, tx: int, simulation: str, cars: bool) -> SamplePaths:
    return SamplePaths(map_id, tx, root / BUILDINGS_DIR / f"{map_id}.png",
                       root / ANTENNAS_DIR / f"{map_id}_{tx}.png",
                       root / GAIN_DIR / simulation / f"{map_id}_{tx}.png",
                       root / CARS_DIR / f"{map_id}.png" if cars else None)


def relative(path: Path) -> str:
    """``png/antennas/3_1.png`` from ``{root}/png/antennas/3_1.png`` (every data file is
    three levels below data.root: png/<kind>/<file> or gain/<simulation>/<file>)."""
    return "/".join(Path(path).parts[-3:])


# ------------------------------------------------------------------------ pixels
def read_png(path: Path, shape: tuple[int, int] | None, like: Path | None = None) -> np.ndarray:
    """Decode an 8-bit grayscale PNG; ``shape`` (H, W) is the size it must have."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise BadFile(path, f"not a PNG file ({im.format}); expected an 8-bit grayscale PNG")
            if im.mode != "L":
                raise BadFile(path, f"image mode {im.mode!r}; expected 8-bit grayscale (mode 'L')")
            if shape is not None and (im.height, im.width) != shape:
                raise BadFile(path, f"size {im.width}x{im.height}; expected {shape[1]}x{shape[0]} "
                                    f"like its building map {like}")
            im.load()
            return np.asarray(im, dtype=np.uint8)
    except BadFile:
        raise
    except FileNotFoundError:
        raise BadFile(path, "missing file (it was there when the dataset was built)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise BadFile(path, f"corrupt or truncated PNG ({detail})") from None


_UNIT_SCALE = np.float32(2.0 / 255.0)


def threshold_into(x: np.ndarray, threshold: float) -> None:
    """RadioUNet's noise floor, in place on a gain map in model space ([-1, 1]): with the gray
    level ``g = (x + 1) / 2``, ``y = (max(g, t) - t) / (1 - t)`` (RadioUNet ``lib/loaders.py``,
    ``thresh``), written back as ``2 y - 1``. Everything at or below the floor becomes -1."""
    if threshold <= 0:
        return
    t = np.float32(threshold)
    np.add(x, np.float32(1.0), out=x)
    np.multiply(x, np.float32(0.5), out=x)
    np.maximum(x, t, out=x)
    np.subtract(x, t, out=x)
    np.multiply(x, np.float32(2.0) / (np.float32(1.0) - t), out=x)
    np.subtract(x, np.float32(1.0), out=x)


def unit_into(out: np.ndarray, layer: np.ndarray) -> None:
    """Write a map into the float32 array ``out``: uint8 pixels as ``pixel / 255 * 2 - 1``
    (float32 arithmetic), float32 maps (already in [-1, 1]) as they are."""
    if layer.dtype == np.uint8:
        np.multiply(layer, _UNIT_SCALE, out=out, dtype=np.float32)
        np.subtract(out, np.float32(1.0), out=out)
    else:
        np.copyto(out, layer)


def to_unit(*maps: np.ndarray) -> "torch.Tensor":
    """uint8 (H, W) maps -> one float32 (len(maps), H, W) tensor of ``pixel / 255 * 2 - 1``."""
    import torch  # here, not at the top: the data tools (lib.data.synthetic) start fast
    out = np.empty((len(maps), *maps[0].shape), dtype=np.float32)
    for i, layer in enumerate(maps):
        unit_into(out[i], layer)
    return torch.from_numpy(out)


def resize_maps(maps: "torch.Tensor", size: int) -> "torch.Tensor":
    """(C, H, W) maps in [-1, 1] -> (C, size, size): antialiased bilinear (area-like when
    shrinking), clamped to [-1, 1]. Channels are resized independently."""
    import torch.nn.functional as F
    return F.interpolate(maps[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp_(-1.0, 1.0)


def tx_pixel(antenna: np.ndarray) -> Optional[tuple[int, int]]:
    """(row, column) of the transmitter: the first brightest pixel; None when all are 0."""
    flat = int(np.argmax(antenna))
    if antenna.flat[flat] == 0:
        return None
    return divmod(flat, antenna.shape[1])


# (gain, buildings, cars-or-buildings) as (h, w) arrays: uint8 pixels, or float32 in [-1, 1]
# (a cache's resized copy); the maps' native (H, W); and the transmitter's pixel at the native
# size (None: the antenna map has none)
Sample = tuple[tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]], tuple[int, int],
               Optional[tuple[int, int]]]


def read_sample(p: SamplePaths, gain: bool = True, condition: bool = True) -> Sample:
    """Decode a sample's PNGs: the gain map (``gain``), and the buildings, transmitter and cars
    (``condition``); what is not asked for is None and not read. Every file must have its
    building map's size (the gain map alone: the size its header had when the dataset was made);
    the first bad file raises :class:`BadFile`."""
    if not condition:
        g = read_png(p.gain, None)
        return (g, None, None), g.shape, None
    buildings = read_png(p.buildings, None)
    shape = buildings.shape
    antenna = read_png(p.antenna, shape, p.buildings)
    g = read_png(p.gain, shape, p.buildings) if gain else None
    third = read_png(p.cars, shape, p.buildings) if p.cars is not None else buildings
    return (g, buildings, third), shape, tx_pixel(antenna)
