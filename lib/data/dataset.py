"""The radio-map dataset: one sample per (map, transmitter, simulation) of a RadioMapSeer-layout
folder, as float32 arrays in [-1, 1].

A sample is ``image`` (1, S, S), the gain map (with ``data.threshold``, RadioUNet's noise
floor applied: :func:`lib.data.layout.threshold_into`), and ``cond`` (3, S, S), the stage-2
condition (:mod:`lib.data.condition`: buildings, transmitter, cars or buildings again per
``data.cars_input``), plus ``sim_id`` (index into the dataset's simulations), ``map_id``,
``tx`` and ``index`` (its row in the split: stage 2's latent cache, lib/models/latents.py).
Maps whose files are not ``image_size`` square are resized (:func:`lib.data.layout.resize_maps`;
the threshold is applied after the resize).

Each stage asks only for the fields it uses (``fields``, :data:`STAGE_FIELDS`), and only
their files are read: stage 1 the gain map (one PNG per sample), stage 2 on the latent cache
the condition (no gain map: its latent is a cache row), evaluation both.

Which samples exist comes from the folder listing (:func:`lib.data.layout.list_samples`); the
pixels come from the PNGs, or with ``data.cache`` from the memory-mapped arrays of
:mod:`lib.data.cache` (the same values). Bad files: ``on_bad_file="error"`` raises a one-line
:class:`DataError` naming the file; ``"skip"`` drops the affected samples (listing) or
substitutes the next readable sample (reading), and records ``(path, reason)`` in
``dataset.skipped``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lib.data.cache import PackedMaps, open_configured_cache
from lib.data.condition import fill_condition
from lib.data.layout import (EXPECTED_TX, NO_TX_PIXEL, BadFile, SamplePaths, cars_channels, check_headers,
                             discover_maps, list_samples, read_sample, resize_maps, sample_paths, threshold_into,
                             to_unit, unit_into)
from lib.data.splits import Split, make_split
from lib.data.synthetic import ensure_synthetic
from lib.errors import DataError
from lib.progress import progress

Log = Callable[[str], None]
FIELDS = ("image", "cond")
# What each stage reads: stage 1 the gain map, stage 2 on its latent cache the condition alone.
STAGE_FIELDS = {"vae": ("image",), "prior-cached": ("cond",), "prior": FIELDS, "evaluate": FIELDS}


class RadioMapDataset(Dataset):
    """(map, transmitter, simulation) samples of a RadioMapSeer-layout folder.

    ``map_ids``: the maps of this split. ``tx_per_map=K`` keeps each map's K lowest
    transmitter ids. Sample index order is map, then transmitter, then simulation (in the
    order given). ``cache``: a :class:`lib.data.cache.PackedMaps` of this folder, read instead of
    the PNGs (the folder listing still decides which samples exist).
    """

    def __init__(self, root: str | os.PathLike, simulations: Sequence[str],
                 map_ids: Sequence[int], image_size: int, tx_per_map: int | None = None,
                 on_bad_file: str = "error", log: Log = print,
                 cache: Optional[PackedMaps] = None, cars_input: bool | str = "auto",
                 threshold: float = 0.0, fields: Sequence[str] = FIELDS) -> None:
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', not {on_bad_file!r}")
        if not simulations:
            raise ValueError("simulations must name at least one gain/<simulation> folder")
        self.root = Path(root)
        self.simulations = list(simulations)
        self.image_size = int(image_size)
        self.on_bad_file = on_bad_file
        self.log = log
        self.threshold = float(threshold)
        self.fields = _check_fields(fields)
        self._bad: set[int] = set()
        self._cars = np.array(cars_channels(self.simulations, cars_input), dtype=bool)
        listing = list_samples(self.root, self.simulations, map_ids, tx_per_map, on_bad_file, self._cars.tolist())
        # Every file is checked now (headers, or the cache's record), not found bad at step N.
        with progress(len(listing) * 3, desc=f"checking {self.root} files", unit="file", leave=False,
                      show=len(listing) >= 20_000, mininterval=1.0) as bar:
            listing = check_headers(self.root, listing, self.simulations, self._cars.tolist(), on_bad_file,
                                    None if cache is None else cache.bad, bar.update)
        self._map, self._tx, self._sim = listing.maps, listing.txs, listing.sims
        self.skipped: list[tuple[str, str]] = listing.skipped
        self.map_ids = sorted(set(self._map.tolist()))
        if self.skipped:
            path, reason = self.skipped[0]
            log(f"data.root {root}: skipped {len(self.skipped)} bad or missing file(s) "
                f"(on_bad_file: skip), {len(self)} samples left; first: {path}: {reason}")
        if len(self) == 0:
            raise DataError(f"data.root {root}: no samples for {len(map_ids)} map(s) and "
                            f"simulation(s) {self.simulations}")
        self.cache = cache
        if cache is not None:
            cache.check_dataset(self)       # fresh, and holds every sample: else a DataError

    def __len__(self) -> int:
        return len(self._map)

    def with_fields(self, fields: Sequence[str]) -> "RadioMapDataset":
        """The same samples, reading only ``fields`` (a shallow copy: listing and cache shared)."""
        other = copy.copy(self)
        other.fields = _check_fields(fields)
        return other

    def sample_key(self, index: int) -> tuple[int, int, str]:
        """(map, tx, simulation) of ``index`` (without reading any file)."""
        return int(self._map[index]), int(self._tx[index]), self.simulations[self._sim[index]]

    def sample_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(map ids, transmitter ids, simulation indices) of every sample, in index order."""
        return self._map, self._tx, self._sim

    def sample_paths(self, index: int) -> SamplePaths:
        """The files sample ``index`` is made of (without reading them)."""
        m, tx, s = int(self._map[index]), int(self._tx[index]), int(self._sim[index])
        return sample_paths(self.root, m, tx, self.simulations[s], bool(self._cars[s]))

    def _arrays(self, *batch: int) -> dict[str, np.ndarray]:
        size = self.image_size
        return {f: np.empty((*batch, 1 if f == "image" else 3, size, size), dtype=np.float32) for f in self.fields}

    def __getitem__(self, index: int) -> dict:
        arrays = self._arrays()
        s, map_id, tx = self._read_into(index, arrays.get("image"), arrays.get("cond"))
        return {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "sim_id": s, "map_id": map_id, "tx": tx,
                "index": index}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch, each sample written in place into the batch's arrays: what
        ``__getitem__`` and collation give, with one allocation per batch and no copy.
        (:class:`torch.utils.data.DataLoader` calls it; :func:`lib.data.batching.collate` passes it
        through.)"""
        arrays = self._arrays(len(indices))
        image, cond = arrays.get("image"), arrays.get("cond")
        keys = [self._read_into(i, None if image is None else image[k], None if cond is None else cond[k])
                for k, i in enumerate(indices)]
        sims, maps, txs = torch.tensor(keys, dtype=torch.int64).reshape(-1, 3).T.contiguous()
        return {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "sim_id": sims, "map_id": maps,
                "tx": txs, "index": torch.tensor(indices, dtype=torch.int64)}

    def _read_into(self, index: int, image: Optional[np.ndarray], cond: Optional[np.ndarray]) -> tuple[int, int, int]:
        """Sample ``index`` (or, with ``on_bad_file: skip``, the next readable one) into
        ``image`` (1, S, S) and ``cond`` (3, S, S), those not None; returns its (simulation
        index, map, tx)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        if self.on_bad_file == "error":
            return self._load(index, image, cond)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                return self._load(j, image, cond)
            except BadFile as exc:
                self._bad.add(j)
                if all(exc.path != p for p, _ in self.skipped):   # report each file once
                    self.skipped.append((exc.path, exc.reason))
                    self.log(f"data: skipping {exc.path}: {exc.reason} (sample {j}; the next "
                             f"readable sample is used instead, on_bad_file: skip)")
        raise DataError(f"data.root {self.root}: no readable sample left (every file was bad)")

    def _load(self, index: int, image: Optional[np.ndarray], cond: Optional[np.ndarray]) -> tuple[int, int, int]:
        """Write sample ``index`` into ``image`` (gain) and ``cond`` (the condition), those not
        None, float32 in [-1, 1] at ``image_size``; only their files are read."""
        size = self.image_size
        map_id, tx, s = int(self._map[index]), int(self._tx[index]), int(self._sim[index])
        wanted = {"gain": image is not None, "condition": cond is not None}
        if self.cache is None:
            layers, shape, pixel = read_sample(self.sample_paths(index), **wanted)
        else:                      # the file paths are only needed for files recorded as bad
            layers, shape, pixel = self.cache.read(map_id, tx, self.simulations[s], bool(self._cars[s]),
                                                   size, lambda: self.sample_paths(index), **wanted)
        gain, buildings, third = layers
        if cond is not None:
            if pixel is None:
                raise BadFile(self.sample_paths(index).antenna, NO_TX_PIXEL)
            fill_condition(cond, buildings, third, pixel, shape)
        if image is not None:
            unit_into(image[0], gain if gain.shape == (size, size) else resize_maps(to_unit(gain), size).numpy()[0])
            threshold_into(image[0], self.threshold)
        return s, map_id, tx


def _check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    fields = tuple(fields)
    if not fields or any(f not in FIELDS for f in fields):
        raise ValueError(f"fields {fields}: expected a non-empty subset of {FIELDS}")
    return tuple(f for f in FIELDS if f in fields)


def prepare_data(data_cfg, seed: int, log: Log = print) -> Split:
    """Generate the synthetic data if needed (``data.source: synthetic``), find the maps and
    make the split ``data.split`` names (a one-line error when its maps are not there)."""
    if data_cfg.source == "synthetic":
        ensure_synthetic(data_cfg, seed, log=log)
    if data_cfg.cars_input is True and not (Path(data_cfg.root) / "png" / "cars").is_dir():
        raise DataError(f"data.cars_input = true: {Path(data_cfg.root) / 'png' / 'cars'} not found (cars as an "
                        f"input channel need the cars maps); set data.cars_input: auto or false")
    return make_split(data_cfg, discover_maps(data_cfg.root))


def build_datasets(data_cfg, seed: int, parts: Sequence[str] = ("train", "val"), log: Log = print,
                   split: Optional[Split] = None, fields: Sequence[str] = FIELDS) -> dict[str, RadioMapDataset]:
    """The datasets of the requested parts of ``split`` (default: :func:`prepare_data`), reading
    ``fields`` (:data:`STAGE_FIELDS`) through the packed cache when ``data.cache`` is not ``off``."""
    unknown = [p for p in parts if p not in ("train", "val", "test")]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected train, val, test")
    split = split or prepare_data(data_cfg, seed, log)
    cache = open_configured_cache(data_cfg, log=log)
    return {part: RadioMapDataset(data_cfg.root, list(data_cfg.simulation), split.maps(part), data_cfg.image_size,
                                  tx_per_map=data_cfg.tx_per_map, on_bad_file=data_cfg.on_bad_file, log=log,
                                  cache=cache, cars_input=data_cfg.cars_input, threshold=data_cfg.threshold,
                                  fields=fields)
            for part in parts}


def describe_data(data_cfg, seed: int) -> list[str]:
    """What ``--dry-run`` says about the data, from file listings only (nothing is read or
    written): the split, and per part and simulation the maps, transmitters per map and
    samples. A missing ``data.root`` (real data) or missing maps raise the error a run gives;
    synthetic data that a run would generate is described from its config."""
    root, sims = Path(data_cfg.root), list(data_cfg.simulation)
    counts: dict[tuple[str, str], tuple[int, int]] = {}        # (part, simulation) -> (maps, samples)
    if data_cfg.source == "synthetic" and not root.exists():
        syn = data_cfg.synthetic
        split = make_split(data_cfg, range(syn.num_maps))
        head = (f"data.root {root} not found: a run generates the synthetic dataset there ({syn.num_maps} maps x "
                f"{syn.tx_per_map} transmitters, {syn.size} px, seed {seed})")
        for part in ("train", "val", "test"):
            for sim in sims:
                tx = len([t for t in range(syn.tx_per_map) if t in EXPECTED_TX.get(sim, range(syn.tx_per_map))])
                tx = min(tx, data_cfg.tx_per_map or tx)
                counts[part, sim] = (len(split.maps(part)), len(split.maps(part)) * tx)
    else:
        split = prepare_data(data_cfg, seed, log=lambda m: None)      # root exists: nothing is generated
        head = f"data.root {root} ({data_cfg.source}, found {len(discover_maps(root))} maps)"
        cars = cars_channels(sims, data_cfg.cars_input)
        for part in ("train", "val", "test"):
            listing = list_samples(root, sims, split.maps(part), data_cfg.tx_per_map, data_cfg.on_bad_file, cars)
            for i, sim in enumerate(sims):
                mine = listing.sims == i
                counts[part, sim] = (len(np.unique(listing.maps[mine])), int(mine.sum()))
            if listing.skipped:
                head += f"; {part}: {len(listing.skipped)} file(s) would be skipped (on_bad_file skip)"
    lines = [head, f"split {split.describe()}; images {data_cfg.image_size} px, threshold {data_cfg.threshold:g}",
             f"{'part':<6} {'simulation':<12} {'maps':>6} {'tx/map':>7} {'samples':>9}"]
    for part in ("train", "val", "test"):
        for sim in sims:
            maps, samples = counts[part, sim]
            lines.append(f"{part:<6} {sim:<12} {maps:>6} {samples / max(maps, 1):>7.3g} {samples:>9,}")
        lines.append(f"{part:<6} {'(all)':<12} {len(split.maps(part)):>6} {'':>7} "
                     f"{sum(counts[part, s][1] for s in sims):>9,}")
    return lines
