"""The embedded default dataset: a synthetic city generator in the RadioMapSeer layout.

``generate`` writes the same folders as RadioMapSeer, so one loader (:mod:`lib.data.dataset`) reads
both::

    ROOT/png/buildings_complete/{map}.png      255 = building, 0 = free
    ROOT/png/antennas/{map}_{tx}.png           a single 255 pixel at the transmitter
    ROOT/png/cars/{map}.png                    255 = car (only with cars=True)
    ROOT/gain/{sim}/{map}_{tx}.png             gain map, 0..255 (lib.data.synthetic_radio, "Gray levels")

with ``sim`` in DPM, IRT2, IRT4 and, with cars=True, carsDPM, carsIRT2, carsIRT4; like
RadioMapSeer, IRT4 and carsIRT4 only for transmitters 0 and 1 of each map. All images
are 8-bit grayscale (PIL mode 'L'), ``size`` x ``size``. A file ``synthetic.json`` in ROOT
records the generator parameters (the loader ignores it).

The city (turned street grids, building footprints, cars) is drawn by
:mod:`lib.data.synthetic_city`, the gain maps of each simulation computed by
:mod:`lib.data.synthetic_radio` (RadioMapSeer's gray-level convention). Everything is drawn from
``np.random.default_rng([seed, map_id])``: map ``i`` is the same whatever ``num_maps`` is, and
the same seed gives byte-identical files. ``python -m lib.synthetic stats ROOT`` prints the
statistics of any RadioMapSeer-layout folder next to the published maps' (:mod:`lib.data.map_stats`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lib.data.layout import EXPECTED_TX
from lib.data.synthetic_city import city
from lib.data.synthetic_radio import CANYON_LOSS_PER_M, Canyons, Tables, gain_maps
from lib.errors import DataError
from lib.progress import progress

VERSION = 2                  # 2: turned street grids, varied footprints, RadioMapSeer's gray levels
PROGRESS_EVERY_S = 30.0      # generate() logs progress at most this often
MAX_THREADS = 8              # generate() writes maps in at most this many threads (and the CPUs it may use)
BASE_SIMULATIONS = ("DPM", "IRT2", "IRT4")
CAR_SIMULATIONS = ("carsDPM", "carsIRT2", "carsIRT4")


def simulations(cars: bool) -> tuple[str, ...]:
    return BASE_SIMULATIONS + (CAR_SIMULATIONS if cars else ())


# ---------------------------------------------------------------------------- writing
def _save(arr: np.ndarray, path: Path) -> None:
    """Write a 2-D uint8 array as an 8-bit grayscale PNG (mode 'L'); zlib level 1 for speed."""
    Image.fromarray(arr, mode="L").save(path, format="PNG", compress_level=1)


def _write_map(root: Path, map_id: int, tx_per_map: int, seed: int, size: int, cars: bool,
               tables: Tables) -> None:
    rng = np.random.default_rng([seed, map_id])
    town = city(rng, size, cars)
    free = ~town.buildings if town.cars is None else ~(town.buildings | town.cars)
    free_idx = np.flatnonzero(free & town.street)
    if free_idx.size < tx_per_map:                # a map without enough street: any free pixel
        free_idx = np.flatnonzero(free)
    if free_idx.size < tx_per_map:
        raise DataError(f"synthetic map {map_id}: only {free_idx.size} free pixels for "
                        f"{tx_per_map} transmitters (use a larger size)")
    pick = rng.choice(free_idx, size=tx_per_map, replace=False)
    tx = np.stack(np.divmod(pick, size), axis=1)

    _save(town.buildings.astype(np.uint8) * 255, root / "png" / "buildings_complete" / f"{map_id}.png")
    if town.cars is not None:
        _save(town.cars.astype(np.uint8) * 255, root / "png" / "cars" / f"{map_id}.png")
    antenna = np.zeros((size, size), np.uint8)
    for t, (y, x) in enumerate(tx):
        antenna[y, x] = 255
        _save(antenna, root / "png" / "antennas" / f"{map_id}_{t}.png")
        antenna[y, x] = 0
    # canyon geometry on the street grid's canvas (half resolution for large maps: a cell is
    # blocked if all its 4 pixels are)
    side = town.grid_buildings.shape[0]
    half = size >= 128
    blocked = town.grid_buildings.reshape(side // 2, 2, side // 2, 2).all(axis=(1, 3)) if half \
        else town.grid_buildings
    canyons = Canyons(blocked, CANYON_LOSS_PER_M * tables.m_per_px * (2 if half else 1))
    chunk = 8   # transmitters computed together (bounds memory at large tx_per_map)
    for start in range(0, tx_per_map, chunk):
        gains = gain_maps(tables, town, tx[start:start + chunk], canyons, half)
        for sim, maps in gains.items():
            for i, g in enumerate(maps):
                if sim in EXPECTED_TX and start + i not in EXPECTED_TX[sim]:
                    continue          # like RadioMapSeer: IRT4 only for transmitters 0 and 1
                _save(g, root / "gain" / sim / f"{map_id}_{start + i}.png")


def generate(root: str | os.PathLike, num_maps: int, tx_per_map: int, seed: int,
             size: int = 256, cars: bool = True, log: Callable[[str], None] = print) -> None:
    """Write a synthetic RadioMapSeer-layout dataset of ``num_maps`` x ``tx_per_map`` to ``root``.

    Files are written into a temporary sibling folder that is renamed to ``root`` at the
    end, so a half-written dataset never sits at ``root``. ``root`` must not exist yet.
    Maps are written by up to ``MAX_THREADS`` threads (one per CPU this process may use); the
    files do not depend on the number. Progress: a bar on a terminal, else a ``log`` line every
    30 s. Cost: about 0.19 s per map with 8 transmitters and 1.6 s per map with 80 at 256 px
    on one core.
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
        tables = Tables(size)
        t0 = last = time.perf_counter()
        # Maps are independent (each draws from its own generator) and NumPy and Pillow release
        # the GIL for most of a map's work: threads write them in parallel, the files identical.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        pool = ThreadPoolExecutor(max(1, min(num_maps, cpus, MAX_THREADS)))
        try:
            with progress(num_maps, desc=f"synthetic {root.name}", unit="map") as bar:
                jobs = [pool.submit(_write_map, tmp, i, tx_per_map, seed, size, cars, tables)
                        for i in range(num_maps)]
                for done, job in enumerate(as_completed(jobs), 1):
                    job.result()        # a map's error stops the generation
                    bar.update(1)
                    now = time.perf_counter()
                    if bar.disable and now - last >= PROGRESS_EVERY_S and done < num_maps:
                        last = now      # no bar (not a terminal): a line every PROGRESS_EVERY_S
                        eta = (now - t0) / done * (num_maps - done)
                        log(f"synthetic: {done}/{num_maps} maps of {root} written "
                            f"({now - t0:.0f} s, about {eta:.0f} s left)")
        finally:        # on an error or a signal: drop the maps not begun, wait for those running
            pool.shutdown(wait=True, cancel_futures=True)
        meta = {"generator": "lib.data.synthetic", "version": VERSION, "seed": seed, "num_maps": num_maps,
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

    An existing folder is left alone (the loader validates it; one written by an older version of
    this generator gets a warning). Several processes may call
    this at once: each writes its own temporary copy and the first to finish publishes it.
    """
    root = Path(data_cfg.root)
    if root.exists():
        try:
            made = json.loads((root / "synthetic.json").read_text(encoding="utf-8")).get("version", 1)
        except (OSError, ValueError):
            made = VERSION                      # not written by this generator: the loader checks it
        if made != VERSION:
            log(f"warning: data.root {root} was written by version {made} of the synthetic generator "
                f"(now {VERSION}); delete the folder to generate the current data")
        return
    syn = data_cfg.synthetic
    n_sims = len(simulations(syn.cars))
    what = (f"{syn.num_maps} maps x {syn.tx_per_map} transmitters x {n_sims} simulations, {syn.size} px, "
            f"seed {seed}")
    log(f"data.root {root} not found: generating a synthetic dataset there ({what})")
    t0 = time.perf_counter()
    try:
        generate(root, syn.num_maps, syn.tx_per_map, seed, size=syn.size, cars=syn.cars, log=log)
    except DataError:
        if root.exists():   # lost a race with another process writing the same data
            return
        raise
    log(f"generated the synthetic dataset {root} in {time.perf_counter() - t0:.1f} s")
