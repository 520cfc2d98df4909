"""The embedded default dataset: a synthetic city generator in the RadioMapSeer layout.

``generate`` writes the same folders as RadioMapSeer, so one loader (:mod:`lib.dataset`) reads
both::

    ROOT/png/buildings_complete/{map}.png      255 = building, 0 = free
    ROOT/png/antennas/{map}_{tx}.png           a single 255 pixel at the transmitter
    ROOT/png/cars/{map}.png                    255 = car (only with cars=True)
    ROOT/gain/{sim}/{map}_{tx}.png             gain map, 0..255 (lib.synthetic_radio, "Mapping to pixels")

with ``sim`` in DPM, IRT2, IRT4 and, with cars=True, carsDPM, carsIRT2, carsIRT4; like
RadioMapSeer, IRT4 and carsIRT4 only for transmitters 0 and 1 of each map. All images
are 8-bit grayscale (PIL mode 'L'), ``size`` x ``size``. A file ``synthetic.json`` in ROOT
records the generator parameters (the loader ignores it).

The city (streets, building footprints, cars) is drawn by :mod:`lib.synthetic_city`, the
gain maps of each simulation computed by :mod:`lib.synthetic_radio`. Everything is drawn
from ``np.random.default_rng([seed, map_id])``: map ``i`` is the same whatever ``num_maps``
is, and the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lib.errors import DataError, run_cli
from lib.layout import EXPECTED_TX
from lib.progress import progress
from lib.synthetic_city import city, place_cars
from lib.synthetic_radio import CANYON_LOSS_PER_M, Canyons, Tables, gain_maps

PROGRESS_EVERY_S = 30.0      # generate() logs progress at most this often
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
    buildings, street = city(rng, size)
    car_map = place_cars(rng, buildings, street) if cars else None
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
    canyons = Canyons(blocked, CANYON_LOSS_PER_M * tables.m_per_px * (2 if half else 1))
    chunk = 8   # transmitters computed together (bounds memory at large tx_per_map)
    for start in range(0, tx_per_map, chunk):
        gains = gain_maps(tables, buildings, car_map, tx[start:start + chunk], canyons, half)
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
    Progress: a bar on a terminal, else a ``log`` line every 30 s. Cost: about 0.2 s per map with 8
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
        tables = Tables(size)
        t0 = last = time.perf_counter()
        with progress(num_maps, desc=f"synthetic {root.name}", unit="map") as bar:
            for map_id in range(num_maps):
                _write_map(tmp, map_id, tx_per_map, seed, size, cars, tables)
                bar.update(1)
                now = time.perf_counter()
                if bar.disable and now - last >= PROGRESS_EVERY_S and map_id + 1 < num_maps:
                    last = now          # no bar (not a terminal): a line every PROGRESS_EVERY_S
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
