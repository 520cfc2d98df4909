"""Reading a packed data cache (built by :mod:`lib.cache`): memory-mapped arrays that hold
exactly the values the PNG path gives, a few array slices per sample.

A cache records a fingerprint (names, sizes, modification times) of each source folder and
the files it could not decode, with the loader's reason; :meth:`PackedMaps.check` refuses a
stale cache with a one-line :class:`CacheError` that says how to rebuild it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lib.errors import DataError
from lib.layout import (ANTENNAS_DIR, BUILDINGS_DIR, CARS_DIR, GAIN_DIR, BadFile, Sample, SamplePaths,
                        relative)

VERSION = 1
INDEX = "index.json"
VIEW_DONE = "view.json"
Log = Callable[[str], None]


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
        :class:`lib.dataset.RadioMapDataset`), and holding each of its samples."""
        self.check(dataset.root, dataset.simulations, bool(dataset._cars.any()))
        maps, txs, _ = dataset.sample_keys()
        for m, t in zip(maps.tolist(), txs.tolist()):
            if m not in self._map_row or self.pair_row(m, t) is None:
                raise CacheError(self.path, f"has no sample for map {m}, transmitter {t} of "
                                            f"{dataset.root}")

    def read(self, map_id: int, tx: int, simulation: str, cars: bool, size: Optional[int],
             paths: Callable[[], SamplePaths]) -> Sample:
        """What :func:`lib.layout.read_sample` returns for that sample, from the arrays (the maps
        already at ``size``, as float32, when that copy is in use). Files that were unreadable
        when the cache was built raise the loader's error, in the loader's order (``paths``
        gives the sample's files; it is only called for that)."""
        if self.bad:
            p = paths()
            for path in (p.buildings, p.antenna, p.gain, p.cars):
                reason = self.bad.get(relative(path)) if path is not None else None
                if reason is not None:
                    raise BadFile(path, reason)
        row, pair = self._map_row[map_id], self.pair_row(map_id, tx)
        a = self.arrays(size if size in self.views else None)
        buildings = a["buildings"][row]
        third = a["cars"][row] if cars else buildings
        ty, tx_x = self.arrays()["tx"][pair].tolist()
        return (a[f"gain-{simulation}"][pair], buildings, third), tuple(self.size), \
            (ty, tx_x) if ty >= 0 else None


def detail(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


