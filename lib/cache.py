"""A packed copy of a RadioMapSeer-layout folder: the PNGs decoded once into memory-mapped
uint8 arrays, so that reading a sample is a few array slices instead of three or four PNG
decodes.

    python -m lib.cache build --config configs/demo.yaml             # where data.cache says
    python -m lib.cache build --root data/RadioMapSeer --simulation DPM IRT2 --out /fast/rms-cache
    python -m lib.cache check --config configs/m.yaml --set data.cache=/fast/rms-cache

``data.cache`` selects it: ``off`` (read the PNGs), ``auto`` (use ``{data.root}/.cache/packed``,
building or rebuilding it when it is missing or stale) or the path of a cache built with the
command above. A cache folder holds, at the maps' native size (resizing stays in the loader,
so the values are exactly those of the PNG path)::

    index.json          version, simulations, size, map ids, fingerprints, unreadable files
    buildings.npy       (maps, H, W) uint8           cars.npy   (maps, H, W) uint8, if cars* used
    pairs.npy           (pairs, 2) int64 map, tx     tx.npy     (pairs, 2) int32 pixel; -1: none
    gain-<sim>.npy      (pairs, H, W) uint8 per simulation

Stale caches: ``index.json`` keeps a fingerprint (names, sizes, modification times) of each
source folder; a cache whose folders changed since is refused with a one-line
:class:`DataError` that says how to rebuild it (``auto`` rebuilds it instead). Files that
could not be decoded are recorded with the loader's reason, so ``data.on_bad_file`` behaves
exactly as on the PNG path.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from lib.data import (ANTENNAS_DIR, BUILDINGS_DIR, CARS_DIR, GAIN_DIR, RadioMapDataset, SamplePaths,
                      _BadFile, _read_png, discover_maps, sample_paths, tx_pixel)
from lib.errors import DataError, run_cli

if TYPE_CHECKING:
    from lib.config import DataConfig

VERSION = 1
INDEX = "index.json"
AUTO_DIR = ".cache/packed"
Log = Callable[[str], None]
Sample = tuple[np.ndarray, np.ndarray, np.ndarray, Optional[tuple[int, int]]]


def _quiet(message: str) -> None:
    pass


class CacheError(DataError):
    """A cache that cannot be used: missing, damaged, stale, or without a needed sample."""

    def __init__(self, path: Path, reason: str) -> None:
        self.reason = reason
        super().__init__(f"data.cache {path}: {reason}; rebuild it with `python -m lib.cache build "
                         f"--config CONFIG` (or set data.cache: auto)")


# --------------------------------------------------------------------------- fingerprints
def source_folders(simulations: Sequence[str]) -> list[str]:
    """The folders (relative to data.root) whose files a cache of ``simulations`` holds."""
    cars = any(s.startswith("cars") for s in simulations)
    return ([BUILDINGS_DIR, ANTENNAS_DIR] + ([CARS_DIR] if cars else [])
            + [f"{GAIN_DIR}/{s}" for s in simulations])


def folder_fingerprint(folder: Path) -> str:
    """``<files>:<sha1>`` of the (name, size, mtime) of the visible files in ``folder``."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e.name, e.stat()) for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        return "missing"
    h = hashlib.sha1()
    for name, st in entries:
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{len(entries)}:{h.hexdigest()}"


# --------------------------------------------------------------------------- reading
class PackedMaps:
    """An opened cache. The arrays are memory-mapped on first use in each process (a
    DataLoader worker gets the index, not the arrays, and maps the files itself)."""

    def __init__(self, path: Path, index: dict) -> None:
        self.path = path
        self.index = index
        self.simulations: list[str] = list(index["simulations"])
        self.size = tuple(index["size"])
        self.bad: dict[str, str] = dict(index["bad"])        # root-relative path -> reason
        self._map_row = {int(m): i for i, m in enumerate(index["maps"])}
        self._pair_row: Optional[dict[tuple[int, int], int]] = None
        self._arrays: Optional[dict[str, np.ndarray]] = None
        self._checked: set[tuple[str, str]] = set()           # (root, folder) found fresh

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PackedMaps":
        """Open the cache at ``path``; a missing or damaged one is a one-line DataError."""
        path = Path(path)
        if not (path / INDEX).is_file():
            raise CacheError(path, "no cache there")
        try:
            index = json.loads((path / INDEX).read_text(encoding="utf-8"))
            if index.get("version") != VERSION:
                raise ValueError(f"version {index.get('version')!r}, expected {VERSION}")
            packed = cls(path, index)
            packed.arrays()                      # every file there, of the recorded shape
        except (OSError, ValueError, KeyError, TypeError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise CacheError(path, f"damaged or not a cache of this toolkit ({detail[:200]})") from None
        return packed

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _arrays=None, _pair_row=None)

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            n_maps, n_pairs = len(self.index["maps"]), int(self.index["num_pairs"])
            shapes = {"buildings": (n_maps, *self.size), "pairs": (n_pairs, 2), "tx": (n_pairs, 2)}
            if self.index["cars"]:
                shapes["cars"] = (n_maps, *self.size)
            shapes.update({f"gain-{s}": (n_pairs, *self.size) for s in self.simulations})
            arrays = {}
            for name, shape in shapes.items():
                arr = np.load(self.path / f"{name}.npy", mmap_mode="r")
                if arr.shape != shape:
                    raise ValueError(f"{name}.npy has shape {arr.shape}, expected {shape}")
                arrays[name] = arr
            self._arrays = arrays
        return self._arrays

    def pair_row(self, map_id: int, tx: int) -> Optional[int]:
        if self._pair_row is None:
            pairs = np.asarray(self.arrays()["pairs"])
            self._pair_row = {(int(m), int(t)): i for i, (m, t) in enumerate(pairs.tolist())}
        return self._pair_row.get((map_id, tx))

    def check(self, root: Path, simulations: Sequence[str]) -> None:
        """Raise a one-line DataError unless the cache holds ``simulations`` of ``root`` as
        its files are now."""
        missing = [s for s in simulations if s not in self.simulations]
        if missing:
            raise CacheError(self.path, f"holds simulations {self.simulations}, not {missing}")
        for folder in source_folders(simulations):
            key = (str(Path(root).resolve()), folder)
            if key in self._checked:
                continue
            then = self.index["fingerprints"].get(folder)
            now = folder_fingerprint(Path(root) / folder)
            if then != now:
                count = lambda fp: str(fp).split(":")[0]  # noqa: E731
                raise CacheError(self.path, f"stale: {Path(root) / folder} changed since the cache "
                                            f"was built ({count(then)} files then, {count(now)} now; "
                                            f"or files were modified)")
            self._checked.add(key)

    def check_dataset(self, dataset: RadioMapDataset) -> None:
        """Fresh for the dataset's folder and simulations, and holding each of its samples."""
        self.check(dataset.root, dataset.simulations)
        maps, txs, _ = dataset.sample_keys()
        for m, t in zip(maps.tolist(), txs.tolist()):
            if m not in self._map_row or self.pair_row(m, t) is None:
                raise CacheError(self.path, f"has no sample for map {m}, transmitter {t} of "
                                            f"{dataset.root}")

    def read(self, p: SamplePaths) -> Sample:
        """(gain, buildings, cars-or-buildings, transmitter pixel): what
        :func:`lib.data.read_sample` returns for ``p``, sliced from the arrays. Files that were
        unreadable when the cache was built raise the loader's error, in the loader's order."""
        if self.bad:
            for path in (p.buildings, p.antenna, p.gain, p.cars):
                reason = self.bad.get(_relative(path)) if path is not None else None
                if reason is not None:
                    raise _BadFile(path, reason)
        a = self.arrays()
        row, pair = self._map_row[p.map_id], self.pair_row(p.map_id, p.tx)
        buildings = a["buildings"][row]
        third = a["cars"][row] if p.cars is not None else buildings
        gain = a[f"gain-{p.gain.parent.name}"][pair]
        ty, tx = a["tx"][pair].tolist()
        return gain, buildings, third, (ty, tx) if ty >= 0 else None


def _relative(path: Path) -> str:
    """``png/antennas/3_1.png`` from ``{root}/png/antennas/3_1.png`` (every data file is
    three levels below data.root: png/<kind>/<file> or gain/<simulation>/<file>)."""
    return "/".join(path.parts[-3:])


# --------------------------------------------------------------------------- building
def build(root: str | os.PathLike, simulations: Sequence[str], out: str | os.PathLike,
          log: Log = print) -> PackedMaps:
    """Pack ``simulations`` of the folder ``root`` into a cache at ``out`` (replacing one there).

    The folder is listed like the loader does (files it would report are left out; the loader
    still reports them); every needed PNG is decoded once. All maps must have one size.
    """
    root, out = Path(root), Path(out)
    sims = list(simulations)
    t0 = time.perf_counter()
    fingerprints = {f: folder_fingerprint(root / f) for f in source_folders(sims)}
    listed = RadioMapDataset(root, sims, discover_maps(root), 8, on_bad_file="skip", log=_quiet)
    maps, txs, sim_idx = listed.sample_keys()
    pairs = sorted(set(zip(maps.tolist(), txs.tolist())))
    map_ids = sorted(set(maps.tolist()))
    cars = any(s.startswith("cars") for s in sims)
    bad: dict[str, str] = {}

    def decode(path: Path, shape: Optional[tuple[int, int]], like: Optional[Path]) -> Optional[np.ndarray]:
        try:
            return _read_png(path, shape, like)
        except _BadFile as exc:
            bad[_relative(path)] = exc.reason
            return None

    buildings, size = {}, None
    for m in map_ids:
        p = sample_paths(root, m, 0, sims[0], False)
        arr = decode(p.buildings, None, None)
        if arr is None:
            continue
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise DataError(f"data.cache: {p.buildings} is {arr.shape[1]}x{arr.shape[0]} but other "
                            f"maps are {size[1]}x{size[0]}; a cache needs one map size (use "
                            f"data.cache: off)")
        buildings[m] = arr
    if size is None:
        raise DataError(f"data.cache: no readable building map under {root}")

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        def array(name: str, shape: tuple, dtype=np.uint8) -> np.ndarray:
            return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

        row = {m: i for i, m in enumerate(map_ids)}
        b_arr = array("buildings", (len(map_ids), *size))
        for m, arr in buildings.items():
            b_arr[row[m]] = arr
        if cars:
            c_arr = array("cars", (len(map_ids), *size))
            for m in map_ids:
                p = sample_paths(root, m, 0, sims[0], True)
                if m in buildings and (arr := decode(p.cars, size, p.buildings)) is not None:
                    c_arr[row[m]] = arr
        np.save(tmp / "pairs.npy", np.array(pairs, dtype=np.int64).reshape(-1, 2))
        t_arr = array("tx", (len(pairs), 2), np.int32)
        gains = {s: array(f"gain-{s}", (len(pairs), *size)) for s in sims}
        present = {(m, t, int(s)) for m, t, s in zip(maps.tolist(), txs.tolist(), sim_idx.tolist())}
        step = max(1, len(pairs) // 10)
        for i, (m, t) in enumerate(pairs):
            if m not in buildings:
                continue
            p = sample_paths(root, m, t, sims[0], False)
            antenna = decode(p.antenna, size, p.buildings)
            pixel = tx_pixel(antenna) if antenna is not None else None
            t_arr[i] = pixel if pixel is not None else (-1, -1)
            for s, sim in enumerate(sims):
                if (m, t, s) in present:
                    gain = decode(sample_paths(root, m, t, sim, False).gain, size, p.buildings)
                    if gain is not None:
                        gains[sim][i] = gain
            if (i + 1) % step == 0 and len(pairs) >= 1000:
                log(f"data.cache: packed {i + 1}/{len(pairs)} transmitters "
                    f"({time.perf_counter() - t0:.0f} s)")
        for arr in [b_arr, t_arr, *gains.values()] + ([c_arr] if cars else []):
            arr.flush()
        del b_arr, t_arr, gains
        index = {"version": VERSION, "root": str(root.resolve()), "simulations": sims,
                 "cars": cars, "size": list(size), "maps": map_ids, "num_pairs": len(pairs),
                 "fingerprints": fingerprints, "bad": bad, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nbytes = sum(f.stat().st_size for f in out.iterdir())
    log(f"data.cache: packed {len(map_ids)} maps x {len(pairs) / max(1, len(map_ids)):.0f} "
        f"transmitters x {len(sims)} simulation(s) {sims} of {root} ({size[1]}x{size[0]} px, "
        f"{nbytes / 2**20:.0f} MiB) into {out} in {time.perf_counter() - t0:.1f} s"
        + (f"; {len(bad)} unreadable file(s) recorded" if bad else ""))
    return PackedMaps.open(out)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an older cache there. Processes that
    build at once each publish a complete cache; the last one stays."""
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        try:
            os.rename(out, old)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / INDEX).is_file():      # not a race lost to another complete cache
            raise


# --------------------------------------------------------------------------- config
def configured_path(data_cfg: "DataConfig") -> Optional[Path]:
    """Where ``data.cache`` points: None for ``off``, ``{root}/.cache/packed`` for ``auto``."""
    if data_cfg.cache == "off":
        return None
    if data_cfg.cache == "auto":
        return Path(data_cfg.root) / AUTO_DIR
    return Path(data_cfg.cache)


def open_configured_cache(data_cfg: "DataConfig", log: Log = print) -> Optional[PackedMaps]:
    """The cache ``data.cache`` selects, checked against ``data.root`` (None for ``off``).

    ``auto`` builds it when it is missing, damaged, stale or lacks a simulation; an explicit
    path must hold a fresh cache (else a one-line DataError saying how to rebuild it).
    """
    path = configured_path(data_cfg)
    if path is None:
        return None
    sims = list(data_cfg.simulation)
    try:
        packed = PackedMaps.open(path)
        packed.check(Path(data_cfg.root), sims)
        return packed
    except CacheError as exc:
        if data_cfg.cache != "auto":
            raise
        if (path / INDEX).is_file():
            log(f"data.cache {path}: {exc.reason}; rebuilding it (data.cache: auto)")
    return build(data_cfg.root, sims, path, log=log)


# --------------------------------------------------------------------------- command line
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.cache", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["build", "check"],
                   help="build: pack the PNGs (replacing a cache there); check: is it fresh?")
    p.add_argument("--config", help="experiment YAML: data.root, data.simulation and data.cache")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.cache=/fast/cache")
    p.add_argument("--root", help="dataset folder (instead of --config)")
    p.add_argument("--simulation", nargs="+", default=None, help="with --root: simulations to pack")
    p.add_argument("--out", help="with --root: cache folder")
    a = p.parse_args(argv)
    if a.config is not None:
        from lib.config import load_config
        full = load_config(a.config, a.set)
        cfg = full.data
        if cfg.source == "synthetic":
            from lib.synthetic import ensure_synthetic
            ensure_synthetic(cfg, full.seed)
        root, sims = Path(cfg.root), list(cfg.simulation)
        out = configured_path(cfg) or Path(cfg.root) / AUTO_DIR
        if cfg.cache == "off":
            print(f"note: data.cache is off in {a.config}; building at {out} (use it with "
                  f"--set data.cache=auto)", file=sys.stderr)
    elif a.root and a.out:
        root, out = Path(a.root), Path(a.out)
        sims = a.simulation or ["DPM"]
    else:
        p.error("give --config CONFIG, or --root ROOT --out OUT [--simulation SIM ...]")
    if a.command == "build":
        build(root, sims, out)
        return 0
    packed = PackedMaps.open(out)
    packed.check(root, sims)
    print(f"data.cache {out}: fresh for {root} ({', '.join(sims)}; built {packed.index['created']})")
    return 0


if __name__ == "__main__":
    run_cli(main)
