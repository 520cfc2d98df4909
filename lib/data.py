"""Radio-map dataset (RadioMapSeer layout), map-level splits and deterministic batching.

Layout read under ``data.root`` (the synthetic generator in :mod:`lib.synthetic` writes the
same)::

    png/buildings_complete/{map}.png    png/antennas/{map}_{tx}.png    png/cars/{map}.png
    gain/{simulation}/{map}_{tx}.png

One sample per (map, transmitter, simulation): ``image`` (1,S,S) is the gain map and
``cond`` (3,S,S) holds buildings, the transmitter (one +1 pixel) and, for the cars*
simulations, the cars map (buildings again otherwise); all float32 in [-1, 1]
(``pixel / 255 * 2 - 1``). Maps whose files are not ``image_size`` square are resized.

Bad data: construction lists the folders (no PNG is decoded) and finds missing and
unexpected files; decoding errors, wrong modes and wrong sizes show up when a sample is
read. ``on_bad_file="error"`` raises :class:`DataError` with one line naming the file;
``"skip"`` drops the affected samples (construction) or substitutes the next readable
sample (reading), and records ``(path, reason)`` in ``dataset.skipped``.

With ``data.cache`` (see :mod:`lib.cache`) the pixels come from memory-mapped arrays packed
once from the folder (and resized once to ``image_size``), instead of three or four PNG
decodes and a resize per sample; the values are the same.

Batching does not use accelerate's dataloader wrapping: :func:`train_batches` is an
infinite, exactly resumable stream whose epoch ``e`` order is a permutation drawn from
``seed * 1000003 + e``, sharded disjointly over ranks; :func:`eval_batches` is a fixed
order, sharded over ranks.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from lib.errors import DataError

if TYPE_CHECKING:
    from lib.cache import PackedMaps

BUILDINGS_DIR = "png/buildings_complete"
ANTENNAS_DIR = "png/antennas"
CARS_DIR = "png/cars"
GAIN_DIR = "gain"
LAYOUT = ("expected the RadioMapSeer layout: png/buildings_complete, png/antennas, "
          "gain/<simulation>, and png/cars for the cars* simulations")

_ID = r"(0|[1-9][0-9]*)"
_MAP_NAME = re.compile(_ID + r"\.png")
_TX_NAME = re.compile(_ID + "_" + _ID + r"\.png")

Log = Callable[[str], None]


# ------------------------------------------------------------------------ discovery
def _require_dir(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_dir():
        raise DataError(f"data.root {root}: missing folder {path} ({LAYOUT})")
    return path


def _require_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data.root {root}: folder not found ({LAYOUT})")


def _names(folder: Path, sort: bool = True) -> list[str]:
    """File names in ``folder`` (hidden names such as .DS_Store are ignored)."""
    names = [n for n in os.listdir(folder) if not n.startswith(".")]
    return sorted(names) if sort else names


def discover_maps(root: str | os.PathLike) -> list[int]:
    """Map ids of ``png/buildings_complete/{map}.png`` under ``root``, sorted.

    Names that are not ``<map>.png`` are left to :class:`RadioMapDataset` to report.
    """
    root = Path(root)
    _require_root(root)
    folder = _require_dir(root, BUILDINGS_DIR)
    ids = sorted(int(m.group(1)) for n in _names(folder) if (m := _MAP_NAME.fullmatch(n)))
    if not ids:
        raise DataError(f"data.root {root}: no building maps in {folder} (expected files "
                        f"named <map>.png, e.g. 0.png; {LAYOUT})")
    return ids


def split_maps(map_ids: Sequence[int], train_maps: int, val_maps: int, test_maps: int,
               seed: int) -> dict[str, list[int]]:
    """Disjoint train/val/test map lists drawn by a seeded permutation of ``map_ids``.

    ``val_maps`` of the ``train_maps`` are held back: train gets ``train_maps - val_maps``.
    Each list is sorted.
    """
    ids = sorted(set(int(m) for m in map_ids))
    if val_maps < 1 or train_maps <= val_maps or test_maps < 1:
        raise DataError(f"map split: need train_maps > val_maps >= 1 and test_maps >= 1 "
                        f"(got train_maps={train_maps}, val_maps={val_maps}, "
                        f"test_maps={test_maps})")
    need = train_maps + test_maps
    if len(ids) < need:
        raise DataError(f"not enough maps: found {len(ids)}, but data.train_maps ({train_maps}) "
                        f"+ data.test_maps ({test_maps}) = {need} are needed")
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_train = train_maps - val_maps
    out = {"train": sorted(perm[:n_train]),
           "val": sorted(perm[n_train:train_maps]),
           "test": sorted(perm[train_maps:need])}
    assert not (set(out["train"]) & set(out["val"])
                or set(out["train"]) & set(out["test"])
                or set(out["val"]) & set(out["test"])), "map splits overlap"
    return out


# -------------------------------------------------------------------------- dataset
class _BadFile(DataError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def _read_png(path: Path, shape: tuple[int, int] | None, like: Path | None = None) -> np.ndarray:
    """Decode an 8-bit grayscale PNG; ``shape`` (H, W) is the size it must have."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise _BadFile(path, f"not a PNG file ({im.format}); expected an 8-bit "
                                     f"grayscale PNG")
            if im.mode != "L":
                raise _BadFile(path, f"image mode {im.mode!r}; expected 8-bit grayscale "
                                     f"(mode 'L')")
            if shape is not None and (im.height, im.width) != shape:
                raise _BadFile(path, f"size {im.width}x{im.height}; expected {shape[1]}x"
                                     f"{shape[0]} like its building map {like}")
            im.load()
            return np.asarray(im, dtype=np.uint8)
    except _BadFile:
        raise
    except FileNotFoundError:
        raise _BadFile(path, "missing file (it was there when the dataset was built)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise _BadFile(path, f"corrupt or truncated PNG ({detail})") from None


_UNIT_SCALE = np.float32(2.0 / 255.0)


def _unit_into(out: np.ndarray, layer: np.ndarray) -> None:
    """Write a map into the float32 array ``out``: uint8 pixels as ``pixel / 255 * 2 - 1``
    (float32 arithmetic), float32 maps (already in [-1, 1]) as they are."""
    if layer.dtype == np.uint8:
        np.multiply(layer, _UNIT_SCALE, out=out, dtype=np.float32)
        np.subtract(out, np.float32(1.0), out=out)
    else:
        np.copyto(out, layer)


def _to_unit(*maps: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) maps -> one float32 (len(maps), H, W) tensor of ``pixel / 255 * 2 - 1``."""
    out = np.empty((len(maps), *maps[0].shape), dtype=np.float32)
    for i, layer in enumerate(maps):
        _unit_into(out[i], layer)
    return torch.from_numpy(out)


NO_TX_PIXEL = "no transmitter pixel (expected one pixel > 0)"


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


def tx_pixel(antenna: np.ndarray) -> Optional[tuple[int, int]]:
    """(row, column) of the transmitter: the first brightest pixel; None when all are 0."""
    flat = int(np.argmax(antenna))
    if antenna.flat[flat] == 0:
        return None
    return divmod(flat, antenna.shape[1])


# (gain, buildings, cars-or-buildings) as (h, w) arrays: uint8 pixels, or float32 in [-1, 1]
# (a cache's resized copy); the maps' native (H, W); and the transmitter's pixel at the native
# size (None: the antenna map has none)
Sample = tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[int, int], Optional[tuple[int, int]]]


def read_sample(p: SamplePaths) -> Sample:
    """Decode a sample's PNGs. Every file must have its building map's size; the first bad
    file raises :class:`DataError`."""
    buildings = _read_png(p.buildings, None)
    shape = buildings.shape
    antenna = _read_png(p.antenna, shape, p.buildings)
    gain = _read_png(p.gain, shape, p.buildings)
    third = _read_png(p.cars, shape, p.buildings) if p.cars is not None else buildings
    return (gain, buildings, third), shape, tx_pixel(antenna)


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) maps in [-1, 1] -> (C, size, size): antialiased bilinear (area-like when
    shrinking), clamped to [-1, 1]. Channels are resized independently."""
    return F.interpolate(maps[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp_(-1.0, 1.0)


class RadioMapDataset(Dataset):
    """(map, transmitter, simulation) samples of a RadioMapSeer-layout folder.

    ``map_ids``: the maps of this split. Transmitters are the ``png/antennas/{map}_{tx}.png``
    files of each map; ``tx_per_map=K`` keeps the K lowest ids. Sample index order is
    map, then transmitter, then simulation (in the order given).

    ``cache``: a :class:`lib.cache.PackedMaps` of this folder; samples are then slices of its
    memory-mapped arrays instead of PNG decodes, with the same values and the same bad-file
    behaviour. The folder listing still decides which samples exist.
    """

    def __init__(self, root: str | os.PathLike, simulations: Sequence[str],
                 map_ids: Sequence[int], image_size: int, tx_per_map: int | None = None,
                 on_bad_file: str = "error", log: Log = print,
                 cache: Optional["PackedMaps"] = None) -> None:
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', not {on_bad_file!r}")
        if not simulations:
            raise ValueError("simulations must name at least one gain/<simulation> folder")
        self.root = Path(root)
        self.simulations = list(simulations)
        self.image_size = int(image_size)
        self.on_bad_file = on_bad_file
        self.log = log
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        self._cars = np.array([s.startswith("cars") for s in self.simulations])

        root = self.root
        _require_root(root)
        bdir = _require_dir(root, BUILDINGS_DIR)
        adir = _require_dir(root, ANTENNAS_DIR)
        gdirs = [_require_dir(root, f"{GAIN_DIR}/{s}") for s in self.simulations]
        cdir = _require_dir(root, CARS_DIR) if self._cars.any() else None

        # -- building maps
        all_maps: set[int] = set()
        for n in _names(bdir):
            m = _MAP_NAME.fullmatch(n)
            if m:
                all_maps.add(int(m.group(1)))
            else:
                self._problem(bdir / n, "unexpected file name (expected <map>.png, e.g. 12.png)")
        maps = []
        for m in sorted(set(int(i) for i in map_ids)):
            if m in all_maps:
                maps.append(m)
            else:
                self._problem(bdir / f"{m}.png", "missing building map")
        wanted = set(maps)

        # -- transmitters
        tx_of: dict[int, list[int]] = {}
        ant_names: set[str] = set()      # antenna files of existing maps (all splits)
        for n in _names(adir):
            t = _TX_NAME.fullmatch(n)
            if not t:
                self._problem(adir / n, "unexpected file name (expected <map>_<tx>.png, "
                                        "e.g. 12_3.png)")
                continue
            m = int(t.group(1))
            if m not in all_maps:
                self._problem(adir / n, f"unexpected file: no building map {bdir / f'{m}.png'}")
                continue
            ant_names.add(n)
            if m in wanted:
                tx_of.setdefault(m, []).append(int(t.group(2)))
        for m in maps:
            if m not in tx_of:
                self._problem(adir / f"{m}_0.png", f"missing file: map {m} has no transmitter "
                                                    f"files {adir}/{m}_<tx>.png")
        pairs = []                       # indexed (map, tx), sorted
        for m in sorted(tx_of):
            txs = sorted(tx_of[m])[:tx_per_map]
            pairs.extend((m, tx) for tx in txs)
        pair_names = [f"{m}_{tx}.png" for m, tx in pairs]

        # -- cars maps
        have_cars: set[int] = set()
        if cdir is not None:
            for n in _names(cdir):
                c = _MAP_NAME.fullmatch(n)
                if not c:
                    self._problem(cdir / n, "unexpected file name (expected <map>.png)")
                elif int(c.group(1)) not in all_maps:
                    self._problem(cdir / n, f"unexpected file: no building map "
                                            f"{bdir / c.group(0)}")
                else:
                    have_cars.add(int(c.group(1)))
            for m in maps:
                if m in tx_of and m not in have_cars:
                    self._problem(cdir / f"{m}.png", "missing cars map (needed by the cars* "
                                                     "simulations)")

        # -- gain maps (set operations on names: real data has ~56k files per simulation)
        keep = np.zeros((len(pairs), len(self.simulations)), bool)
        for s, gdir in enumerate(gdirs):
            present = set(_names(gdir, sort=False))
            for n in sorted(present - ant_names):
                if _TX_NAME.fullmatch(n):
                    self._problem(gdir / n, f"unexpected file: no transmitter file {adir / n}")
                else:
                    self._problem(gdir / n, "unexpected file name (expected <map>_<tx>.png, "
                                            "e.g. 12_3.png)")
            found = np.fromiter((n in present for n in pair_names), bool, len(pairs))
            for i in np.flatnonzero(~found):
                self._problem(gdir / pair_names[i], f"missing gain map (transmitter "
                                                    f"{adir / pair_names[i]} exists)")
            keep[:, s] = found
            if self._cars[s]:
                keep[:, s] &= np.fromiter((m in have_cars for m, _ in pairs), bool, len(pairs))
        p_idx, s_idx = np.nonzero(keep)          # row-major: map, tx, then simulation
        pair_arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        self._map = pair_arr[p_idx, 0].copy()
        self._tx = pair_arr[p_idx, 1].copy()
        self._sim = s_idx.astype(np.int64)
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

    def _problem(self, path: Path, reason: str) -> None:
        if self.on_bad_file == "error":
            raise _BadFile(path, reason)
        self.skipped.append((str(path), reason))

    def __len__(self) -> int:
        return len(self._map)

    def sample_key(self, index: int) -> tuple[int, int, str]:
        """(map, tx, simulation) of ``index`` (without reading any file)."""
        return int(self._map[index]), int(self._tx[index]), self.simulations[self._sim[index]]

    def __getitem__(self, index: int) -> dict:
        size = self.image_size
        image = np.empty((1, size, size), dtype=np.float32)
        cond = np.empty((3, size, size), dtype=np.float32)
        s, map_id, tx = self._read_into(index, image, cond)
        return {"image": torch.from_numpy(image), "cond": torch.from_numpy(cond), "sim_id": s,
                "map_id": map_id, "tx": tx}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch, each sample written in place into the batch's arrays: what
        ``__getitem__`` and collation give, with one allocation per batch and no copy.
        (:class:`torch.utils.data.DataLoader` calls it; :func:`collate` passes it through.)"""
        size = self.image_size
        image = np.empty((len(indices), 1, size, size), dtype=np.float32)
        cond = np.empty((len(indices), 3, size, size), dtype=np.float32)
        keys = [self._read_into(i, image[k], cond[k]) for k, i in enumerate(indices)]
        sims, maps, txs = torch.tensor(keys, dtype=torch.int64).reshape(-1, 3).T.contiguous()
        return {"image": torch.from_numpy(image), "cond": torch.from_numpy(cond), "sim_id": sims,
                "map_id": maps, "tx": txs}

    def _read_into(self, index: int, image: np.ndarray, cond: np.ndarray) -> tuple[int, int, int]:
        """Sample ``index`` (or, with ``on_bad_file: skip``, the next readable one) into
        ``image`` (1, S, S) and ``cond`` (3, S, S); returns its (simulation index, map, tx)."""
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
            except _BadFile as exc:
                self._bad.add(j)
                if all(exc.path != p for p, _ in self.skipped):   # report each file once
                    self.skipped.append((exc.path, exc.reason))
                    self.log(f"data: skipping {exc.path}: {exc.reason} (sample {j}; the next "
                             f"readable sample is used instead, on_bad_file: skip)")
        raise DataError(f"data.root {self.root}: no readable sample left (every file was bad)")

    def sample_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(map ids, transmitter ids, simulation indices) of every sample, in index order."""
        return self._map, self._tx, self._sim

    def sample_paths(self, index: int) -> SamplePaths:
        """The files sample ``index`` is made of (without reading them)."""
        m, tx, s = int(self._map[index]), int(self._tx[index]), int(self._sim[index])
        return sample_paths(self.root, m, tx, self.simulations[s], bool(self._cars[s]))

    def _load(self, index: int, image: np.ndarray, cond: np.ndarray) -> tuple[int, int, int]:
        """Write sample ``index`` into ``image`` (gain) and ``cond`` (buildings, transmitter,
        cars-or-buildings), float32 in [-1, 1] at ``image_size``."""
        size = self.image_size
        map_id, tx, s = int(self._map[index]), int(self._tx[index]), int(self._sim[index])
        if self.cache is None:
            layers, shape, pixel = read_sample(self.sample_paths(index))
        else:                      # the file paths are only needed for files recorded as bad
            layers, shape, pixel = self.cache.read(map_id, tx, self.simulations[s], bool(self._cars[s]),
                                                   size, lambda: self.sample_paths(index))
        if pixel is None:
            raise _BadFile(self.sample_paths(index).antenna, NO_TX_PIXEL)
        targets = (image[0], cond[0], cond[2])
        if layers[0].shape == (size, size):
            for target, layer in zip(targets, layers):
                _unit_into(target, layer)
        else:
            for target, layer in zip(targets, resize_maps(_to_unit(*layers), size).numpy()):
                np.copyto(target, layer)
        ty, tx_x = pixel
        if shape != (size, size):
            ty = min(size - 1, int((ty + 0.5) * size / shape[0]))
            tx_x = min(size - 1, int((tx_x + 0.5) * size / shape[1]))
        cond[1].fill(-1.0)
        cond[1, ty, tx_x] = 1.0
        return s, map_id, tx


def collate(data: Any) -> Any:
    """DataLoader collation: a batch from :meth:`RadioMapDataset.__getitems__` as it is,
    anything else (a list of samples) as torch's ``default_collate`` makes it."""
    return data if isinstance(data, dict) else default_collate(data)


def build_datasets(data_cfg, seed: int, splits: Sequence[str] = ("train", "val"),
                   log: Log = print) -> dict[str, RadioMapDataset]:
    """Generate the synthetic data if needed, split the maps and build the requested splits
    (reading through the packed cache when ``data_cfg.cache`` is not ``off``)."""
    unknown = [s for s in splits if s not in ("train", "val", "test")]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected train, val, test")
    if data_cfg.source == "synthetic":
        from lib.synthetic import ensure_synthetic
        ensure_synthetic(data_cfg, seed, log=log)
    ids = discover_maps(data_cfg.root)
    parts = split_maps(ids, data_cfg.train_maps, data_cfg.val_maps, data_cfg.test_maps, seed)
    from lib.cache import open_configured_cache
    cache = open_configured_cache(data_cfg, log=log)
    return {name: RadioMapDataset(data_cfg.root, list(data_cfg.simulation), parts[name],
                                  data_cfg.image_size, tx_per_map=data_cfg.tx_per_map,
                                  on_bad_file=data_cfg.on_bad_file, log=log, cache=cache)
            for name in splits}


# ------------------------------------------------------------------------- batching
def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full batches each rank gets per epoch (the tail that does not fill one is dropped)."""
    return (num_samples // world_size) // batch_size


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (1 << 63)


class _TrainBatchSampler(Sampler):
    """Infinite batches of indices for one rank, starting at its batch ``start_batch``."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_batch: int,
                 rank: int, world_size: int) -> None:
        self.n, self.bs, self.seed = num_samples, batch_size, seed
        self.start, self.rank, self.world = start_batch, rank, world_size
        self.per_epoch = batches_per_epoch(num_samples, batch_size, world_size)

    def shard(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)
        return perm[self.rank::self.world][: self.n // self.world]

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start
        epoch, shard = -1, None
        while True:
            e, k = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, shard = e, self.shard(e)
            yield shard[k * self.bs:(k + 1) * self.bs].tolist()
            b += 1


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")


def train_batches(dataset: Dataset, batch_size: int, seed: int, start_batch: int = 0,
                  rank: int = 0, world_size: int = 1, num_workers: int = 0,
                  pin_memory: bool = False) -> Iterator[dict]:
    """Infinite shuffled batches for ``rank``; resumes exactly after ``start_batch`` batches.

    Epoch ``e`` is ``torch.randperm`` seeded with ``seed * 1000003 + e``; rank ``r`` takes
    ``perm[r::world_size]`` cut to ``len // world_size``; batches are ``batch_size`` with the
    last partial one dropped. The stream depends only on (dataset length, batch_size, seed,
    rank, world_size), so ``start_batch=k`` yields exactly batches k, k+1, ... of a run
    started at 0, across epoch boundaries.
    """
    _check_rank(rank, world_size)
    if batch_size < 1 or start_batch < 0:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1, start_batch ({start_batch}) >= 0")
    n = len(dataset)
    if batches_per_epoch(n, batch_size, world_size) == 0:
        raise DataError(f"training split too small: {n} samples cannot fill one batch of "
                        f"{batch_size} on each of {world_size} process(es); use more maps or "
                        f"transmitters, or a smaller data.batch_size")
    sampler = _TrainBatchSampler(n, batch_size, seed, start_batch, rank, world_size)
    # An own generator: a DataLoader iterator otherwise draws its worker seed from the global
    # RNG, and a resumed run (which creates its iterator at another point) would drift.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def eval_batches(dataset: Dataset, batch_size: int, max_batches: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0) -> Iterator[dict]:
    """Batches in index order for ``rank`` (samples ``rank, rank + world_size, ...``).

    The last partial batch is kept; at most ``max_batches`` batches (0: all), taken from a
    fixed subset spread evenly over the split. Ranks may get
    one batch more or fewer than each other when the split does not divide evenly.
    """
    _check_rank(rank, world_size)
    if batch_size < 1 or max_batches < 0:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1, max_batches ({max_batches}) >= 0")
    indices = list(range(len(dataset)))
    if max_batches and max_batches * batch_size * world_size < len(indices):
        # A fixed subset spread evenly over the split (samples are ordered by map), so a few
        # validation batches still cover many maps rather than the first one or two.
        want = max_batches * batch_size * world_size
        indices = sorted({int(i) for i in np.linspace(0, len(indices) - 1, want).round()})
    mine = indices[rank::world_size]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))   # leaves the global RNG alone
    return iter(loader)
