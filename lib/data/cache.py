"""A packed copy of a RadioMapSeer-layout folder: the PNGs decoded once into memory-mapped
uint8 arrays, so that reading a sample is a few array slices instead of three or four PNG
decodes.

    python -m lib.cache build --config configs/demo.yaml             # where data.cache says
    python -m lib.cache build --root data/RadioMapSeer --simulation DPM IRT2 --out /fast/rms-cache
    python -m lib.cache check --config configs/m.yaml --set data.cache=/fast/rms-cache

``data.cache`` selects it: ``off`` (read the PNGs), ``auto`` (use ``{data.root}/.cache/packed``,
building or rebuilding it when it is missing or stale) or the path of a cache built with the
command above. A cache folder holds the maps at their native size, and a resized float32
copy for each image size in use; a sample's values are exactly those of the PNG path::

    index.json          version, simulations, size, map ids, fingerprints, unreadable files
    buildings.npy       (maps, H, W) uint8           cars.npy   (maps, H, W) uint8, when cars are input
    pairs.npy           (pairs, 2) int64 map, tx     tx.npy     (pairs, 2) int32 pixel; -1: none
    gain-<sim>.npy      (pairs, H, W) uint8 per simulation
    size-<S>/           the same maps as float32 in [-1, 1] resized to S x S, written when a
                        config with data.image_size S != H uses the cache: its samples are
                        slices too (exactly the values the loader's resize gives)

Stale caches: ``index.json`` keeps a fingerprint (names, sizes, modification times) of each
source folder; a cache whose folders changed since is refused with a one-line
:class:`DataError` that says how to rebuild it (``auto`` rebuilds it instead). Files that
could not be decoded are recorded with the loader's reason, so ``data.on_bad_file`` behaves
exactly as on the PNG path. Reading a cache (:class:`PackedMaps`) is a few array slices per
sample: exactly the values the PNG path gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from lib.data.layout import (ANTENNAS_DIR, BUILDINGS_DIR, CARS_DIR, GAIN_DIR, BadFile, Sample, SamplePaths,
                              cars_channels, discover_maps, list_samples, read_png, relative, resize_maps,
                              sample_paths, to_unit, tx_pixel)
from lib.errors import DataError
from lib.outputs import filling, require_space, reserved_memmap
from lib.progress import progress

if TYPE_CHECKING:
    from lib.config import DataConfig

VERSION = 1
INDEX = "index.json"
VIEW_DONE = "view.json"
Log = Callable[[str], None]
AUTO_DIR = ".cache/packed"


class CacheError(DataError):
    """A cache that cannot be used: missing, damaged, stale, or without a needed sample."""

    def __init__(self, path: Path, reason: str) -> None:
        self.reason = reason
        super().__init__(f"data.cache {path}: {reason}; rebuild it with `python -m lib.cache build "
                         f"--config CONFIG` (or set data.cache: auto)")


# --------------------------------------------------------------------------- fingerprints
def source_folders(simulations: Sequence[str], cars: bool) -> list[str]:
    """The folders (relative to data.root) whose files a cache of ``simulations`` holds."""
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
        self.views: set[int] = set()                          # resized copies in use (sizes)
        self._map_row = {int(m): i for i, m in enumerate(index["maps"])}
        self._pair_row: Optional[dict[tuple[int, int], int]] = None
        self._arrays: dict[Optional[int], dict[str, np.ndarray]] = {}   # None: native uint8
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
            raise CacheError(path, f"damaged or not a cache of this toolkit ({detail(exc)})") from None
        return packed

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _arrays={}, _pair_row=None)

    def map_names(self) -> list[str]:
        return ["buildings"] + (["cars"] if self.index["cars"] else []) + [f"gain-{s}" for s in self.simulations]

    def arrays(self, size: Optional[int] = None) -> dict[str, np.ndarray]:
        """The memory-mapped arrays: native uint8 maps, or the float32 copy at ``size``."""
        if size not in self._arrays:
            n_maps, n_pairs = len(self.index["maps"]), int(self.index["num_pairs"])
            hw = tuple(self.size) if size is None else (size, size)
            shapes = {name: ((n_maps if name in ("buildings", "cars") else n_pairs), *hw)
                      for name in self.map_names()}
            if size is None:
                shapes.update({"pairs": (n_pairs, 2), "tx": (n_pairs, 2)})
            folder = self.path if size is None else self.path / f"size-{size}"
            arrays = {}
            for name, shape in shapes.items():
                arr = np.load(folder / f"{name}.npy", mmap_mode="r")
                if arr.shape != shape:
                    raise ValueError(f"{name}.npy has shape {arr.shape}, expected {shape}")
                arrays[name] = arr
            self._arrays[size] = arrays
        return self._arrays[size]

    def pair_row(self, map_id: int, tx: int) -> Optional[int]:
        if self._pair_row is None:
            pairs = np.asarray(self.arrays()["pairs"])
            self._pair_row = {(int(m), int(t)): i for i, (m, t) in enumerate(pairs.tolist())}
        return self._pair_row.get((map_id, tx))

    def check(self, root: Path, simulations: Sequence[str], cars: bool = False) -> None:
        """Raise a one-line DataError unless the cache holds ``simulations`` of ``root`` as
        its files are now."""
        missing = [s for s in simulations if s not in self.simulations]
        if missing:
            raise CacheError(self.path, f"holds simulations {self.simulations}, not {missing}")
        if cars and not self.index["cars"]:
            raise CacheError(self.path, "holds no cars maps (they are needed as an input channel now)")
        for folder in source_folders(simulations, bool(self.index["cars"])):
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

    def check_dataset(self, dataset: Any) -> None:
        """Fresh for the folder and simulations of ``dataset`` (a
        :class:`lib.data.dataset.RadioMapDataset`), and holding each of its samples."""
        self.check(dataset.root, dataset.simulations, bool(dataset._cars.any()))
        maps, txs, _ = dataset.sample_keys()
        for m, t in zip(maps.tolist(), txs.tolist()):
            if m not in self._map_row or self.pair_row(m, t) is None:
                raise CacheError(self.path, f"has no sample for map {m}, transmitter {t} of "
                                            f"{dataset.root}")

    def read(self, map_id: int, tx: int, simulation: str, cars: bool, size: Optional[int],
             paths: Callable[[], SamplePaths], gain: bool = True, condition: bool = True) -> Sample:
        """What :func:`lib.data.layout.read_sample` returns for that sample (``gain``, ``condition``
        as there), from the arrays (the maps already at ``size``, as float32, when that copy is in
        use). Files that were unreadable when the cache was built raise the loader's error, in the
        loader's order (``paths`` gives the sample's files; it is only called for that)."""
        if self.bad:
            p = paths()
            needed = [p.buildings, p.antenna] * condition + [p.gain] * gain + [p.cars] * condition
            for path in needed:
                reason = self.bad.get(relative(path)) if path is not None else None
                if reason is not None:
                    raise BadFile(path, reason)
        row, pair = self._map_row[map_id], self.pair_row(map_id, tx)
        a = self.arrays(size if size in self.views else None)
        g = a[f"gain-{simulation}"][pair] if gain else None
        if not condition:
            return (g, None, None), tuple(self.size), None
        buildings = a["buildings"][row]
        third = a["cars"][row] if cars else buildings
        ty, tx_x = self.arrays()["tx"][pair].tolist()
        return (g, buildings, third), tuple(self.size), (ty, tx_x) if ty >= 0 else None


def detail(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


# --------------------------------------------------------------------------- building
def build(root: str | os.PathLike, simulations: Sequence[str], out: str | os.PathLike,
          log: Log = print, cars: Optional[bool] = None) -> PackedMaps:
    """Pack ``simulations`` of the folder ``root`` into a cache at ``out`` (replacing one there).

    The folder is listed like the loader does (files it would report are left out; the loader
    still reports them); every needed PNG is decoded once. All maps must have one size.
    """
    root, out = Path(root), Path(out)
    sims = list(simulations)
    t0 = time.perf_counter()
    cars = any(cars_channels(sims)) if cars is None else cars
    fingerprints = {f: folder_fingerprint(root / f) for f in source_folders(sims, cars)}
    listed = list_samples(root, sims, discover_maps(root), on_bad_file="skip", cars=[cars] * len(sims))
    maps, txs, sim_idx = listed.maps, listed.txs, listed.sims
    pairs = sorted(set(zip(maps.tolist(), txs.tolist())))
    map_ids = sorted(set(maps.tolist()))
    bad: dict[str, str] = {}

    def decode(path: Path, shape: Optional[tuple[int, int]], like: Optional[Path]) -> Optional[np.ndarray]:
        try:
            return read_png(path, shape, like)
        except BadFile as exc:
            bad[relative(path)] = exc.reason
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
    pixels = size[0] * size[1]
    nbytes = pixels * (len(map_ids) * (1 + int(cars)) + len(pairs) * len(sims)) + 24 * len(pairs) + 2**20
    with filling(tmp, "data.cache", out, nbytes, DataError):     # one line on a full disk; tmp removed
        tmp.mkdir(parents=True)
        require_space(tmp, nbytes, "data.cache", 'free space there, or set data.cache to a folder on another disk '
                                                 'or to "off"')

        def array(name: str, shape: tuple, dtype=np.uint8) -> np.ndarray:
            return reserved_memmap(tmp / f"{name}.npy", shape, dtype)

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
        bar = progress(len(pairs), desc=f"packing {root.name}", unit="transmitter")
        for i, (m, t) in enumerate(pairs):
            bar.update(1)
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
            if bar.disable and (i + 1) % step == 0 and len(pairs) >= 1000:      # no bar: a line per 10 %
                log(f"data.cache: packed {i + 1}/{len(pairs)} transmitters "
                    f"({time.perf_counter() - t0:.0f} s)")
        bar.close()
        for arr in [b_arr, t_arr, *gains.values()] + ([c_arr] if cars else []):
            arr.flush()
        del b_arr, t_arr, gains
        index = {"version": VERSION, "root": str(root.resolve()), "simulations": sims,
                 "cars": cars, "size": list(size), "maps": map_ids, "num_pairs": len(pairs),
                 "fingerprints": fingerprints, "bad": bad, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        _publish(tmp, out)
    nbytes = sum(f.stat().st_size for f in out.iterdir())
    log(f"data.cache: packed {len(map_ids)} maps x {len(pairs) / max(1, len(map_ids)):.0f} "
        f"transmitters x {len(sims)} simulation(s) {sims} of {root} ({size[1]}x{size[0]} px, "
        f"{nbytes / 2**20:.0f} MiB) into {out} in {time.perf_counter() - t0:.1f} s"
        + (f"; {len(bad)} unreadable file(s) recorded" if bad else ""))
    return PackedMaps.open(out)


def _publish(tmp: Path, out: Path, marker: str = INDEX) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an older one there. Processes that build
    at once each publish a complete folder; the last one stays."""
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
        if not (out / marker).is_file():     # not a race lost to another complete copy
            raise


def use_view(packed: PackedMaps, size: int, log: Log = print) -> None:
    """Use (building it first if needed) a float32 copy of the maps resized to ``size``, so
    that samples at that size are slices too. It holds exactly the values the loader's resize
    gives. Where it cannot be written (a read-only cache), samples are resized as they are
    read."""
    if (size, size) == tuple(packed.size) or size in packed.views:
        return
    folder = packed.path / f"size-{size}"
    if not (folder / VIEW_DONE).is_file():
        try:
            _build_view(packed, size, folder, log)
        except OSError as exc:
            log(f"data.cache {packed.path}: cannot write the {size} px copy ({detail(exc)}); "
                f"resizing each sample as it is read instead")
            return
    try:
        packed.arrays(size)
    except (OSError, ValueError) as exc:
        raise CacheError(packed.path, f"damaged {size} px copy ({detail(exc)})") from None
    packed.views.add(size)


def _build_view(packed: PackedMaps, size: int, folder: Path, log: Log) -> None:
    t0 = time.perf_counter()
    tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in packed.map_names():
            src = packed.arrays()[name]
            dst = reserved_memmap(tmp / f"{name}.npy", (len(src), size, size), np.float32)
            for i in range(0, len(src), 64):       # the loader's conversion and resize
                dst[i:i + 64] = resize_maps(to_unit(*src[i:i + 64]), size).numpy()
            dst.flush()
            del dst
        (tmp / VIEW_DONE).write_text(json.dumps({"size": size}), encoding="utf-8")
        _publish(tmp, folder, VIEW_DONE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data.cache: wrote the {size} px copy of {packed.path} in {time.perf_counter() - t0:.1f} s")


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
    cars = any(cars_channels(sims, data_cfg.cars_input))
    try:
        packed = PackedMaps.open(path)
        packed.check(Path(data_cfg.root), sims, cars)
    except CacheError as exc:
        if data_cfg.cache != "auto":
            raise
        if (path / INDEX).is_file():
            log(f"data.cache {path}: {exc.reason}; rebuilding it (data.cache: auto)")
        packed = build(data_cfg.root, sims, path, log=log, cars=cars)
    use_view(packed, data_cfg.image_size, log=log)
    return packed
