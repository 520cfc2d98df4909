"""Which maps are for training, validation and testing: the published protocols, a seeded
random split, or a file.

Splits are by city map, never by sample: every transmitter and simulation of a map is in
the same split, so a test map's buildings were never seen in training.

``data.split``:

- ``radiounet``: RadioUNet's standard split (``lib/loaders.py`` of RonLevie/RadioUNet; used by
  RMDM and RadioFlow). The 700 positions ``np.arange(0, 700)`` are shuffled with NumPy's legacy
  global generator after ``np.random.seed(42)``; the map id at position ``k`` is
  ``shuffled[k] + 1`` (map 0 is never used); train = positions 0..500 (501 maps), val =
  501..600 (100), test = 601..699 (99 maps).
- ``radiodiff``: RadioDiff's code (``lib/loaders.py`` of UNIC-Lab/RadioDiff): the same
  shuffle; train = positions 0..600 (601 maps), val = 600..650 (51), test = 600..699 (100).
  Position 600 is in all three: one map is both a training and a test map, and the
  validation maps are test maps (:func:`protocol_warnings`).
- ``random``: a permutation of the maps found, drawn from ``data.split_seed`` (independent of
  ``seed``): ``train_maps`` (of which ``val_maps`` are held back for validation) and
  ``test_maps``, disjoint.
- a path to a JSON file ``{"train": [...], "val": [...], "test": [...]}`` of map ids.

A protocol needs its maps to be in the folder; missing ones are a one-line error.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lib.errors import DataError

PROTOCOLS = ("radiounet", "radiodiff", "random")
SPLITS = ("train", "val", "test")
_POSITIONS = {      # inclusive position ranges in the shuffled list of 700 maps
    "radiounet": {"train": (0, 500), "val": (501, 600), "test": (601, 699)},
    "radiodiff": {"train": (0, 600), "val": (600, 650), "test": (600, 699)},
}


@dataclass
class Split:
    """The map ids of each part (sorted) and where they come from."""
    name: str                     # radiounet | radiodiff | random | the JSON file's path
    train: list[int]
    val: list[int]
    test: list[int]
    seed: int | None = None       # data.split_seed of a random split

    def maps(self, part: str) -> list[int]:
        return getattr(self, part)

    def to_dict(self) -> dict[str, Any]:
        """What ``run.json`` and every checkpoint record: the name and the id lists."""
        out: dict[str, Any] = {"name": self.name, "train": self.train, "val": self.val, "test": self.test}
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def describe(self) -> str:
        seed = f" (split_seed {self.seed})" if self.seed is not None else ""
        return f"{self.name}{seed}: {len(self.train)} train, {len(self.val)} val, {len(self.test)} test maps"


def describe_split(record: dict[str, Any]) -> str:
    """How a recorded split (``Split.to_dict``) reads in a message."""
    seed = f" (split_seed {record['seed']})" if record.get("seed") is not None else ""
    return f"{record.get('name', 'unknown')}{seed}"


def maps_hash(ids: Sequence[int]) -> str:
    """A short fingerprint of a list of map ids (order-free)."""
    return hashlib.sha1(",".join(str(i) for i in sorted(ids)).encode()).hexdigest()[:12]


def protocol_positions() -> np.ndarray:
    """The map id at each of the 700 positions of the published protocols: ``np.arange(0, 700)``
    shuffled by NumPy's legacy global generator seeded with 42, plus 1. The global NumPy state
    is left as it was."""
    state = np.random.get_state()
    try:
        ids = np.arange(0, 700, 1, dtype=np.int16)
        np.random.seed(42)
        np.random.shuffle(ids)
    finally:
        np.random.set_state(state)
    return ids.astype(np.int64) + 1


def protocol_split(name: str) -> Split:
    """The ``radiounet`` or ``radiodiff`` split (see the module docstring)."""
    ids = protocol_positions()
    parts = {part: sorted(int(i) for i in ids[a:b + 1]) for part, (a, b) in _POSITIONS[name].items()}
    return Split(name, **parts)


def random_split(map_ids: Sequence[int], train_maps: int, val_maps: int, test_maps: int, seed: int) -> Split:
    """Disjoint train/val/test map lists drawn by a permutation of ``map_ids`` seeded with
    ``seed``; ``val_maps`` of the ``train_maps`` are held back: train gets ``train_maps -
    val_maps``."""
    ids = sorted(set(int(m) for m in map_ids))
    if val_maps < 1 or train_maps <= val_maps or test_maps < 1:
        raise DataError(f"map split: need train_maps > val_maps >= 1 and test_maps >= 1 "
                        f"(got train_maps={train_maps}, val_maps={val_maps}, test_maps={test_maps})")
    need = train_maps + test_maps
    if len(ids) < need:
        raise DataError(f"not enough maps: found {len(ids)}, but data.train_maps ({train_maps}) "
                        f"+ data.test_maps ({test_maps}) = {need} are needed")
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_train = train_maps - val_maps
    return Split("random", sorted(perm[:n_train]), sorted(perm[n_train:train_maps]),
                 sorted(perm[train_maps:need]), seed=seed)


def file_split(path: Path) -> Split:
    """A split read from a JSON file ``{"train": [...], "val": [...], "test": [...]}``: lists of
    distinct non-negative integer map ids, no id in two of them."""
    where = f"data.split {path}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{where}: file not found (expected radiounet, radiodiff, random, or a JSON "
                        f"file with train, val and test lists of map ids)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: not a readable JSON file ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(raw, dict) or sorted(raw) != sorted(SPLITS):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{where}: expected exactly the keys train, val, test (found {keys})")
    parts: dict[str, list[int]] = {}
    for part in SPLITS:
        ids = raw[part]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in ids):
            raise DataError(f"{where}: '{part}' must be a list of map ids (integers >= 0)")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise DataError(f"{where}: '{part}' lists map {dup[0]} more than once ({len(dup)} duplicate id(s))")
        parts[part] = sorted(ids)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(set(parts[a]) & set(parts[b]))
        if both:
            raise DataError(f"{where}: map {both[0]} is in both '{a}' and '{b}' ({len(both)} such map(s)); "
                            f"each map belongs to one part")
    if not parts["train"] or not parts["val"]:
        raise DataError(f"{where}: 'train' and 'val' need at least one map each")
    return Split(str(path), **parts)


def make_split(data_cfg: Any, map_ids: Sequence[int]) -> Split:
    """The split ``data.split`` names, checked against the maps found in the folder: every map
    a protocol or a file needs must be there."""
    name = data_cfg.split
    if name == "random":
        return random_split(map_ids, data_cfg.train_maps, data_cfg.val_maps, data_cfg.test_maps,
                            data_cfg.split_seed)
    split = protocol_split(name) if name in PROTOCOLS else file_split(Path(name))
    found = set(int(m) for m in map_ids)
    wanted = split.train + split.val + split.test
    missing = sorted(set(wanted) - found)
    if missing:
        what = f"the {name} protocol" if name in PROTOCOLS else f"the split file {name}"
        raise DataError(f"data.split {name}: {len(missing)} of the {len(set(wanted))} maps {what} needs are "
                        f"not in {data_cfg.root} (first missing: {missing[0]}; found {len(found)} maps)")
    return split


def protocol_warnings(split: Split) -> list[str]:
    """What a run should say at its start about a split: a map in two parts (RadioDiff's
    protocol has one), validation maps that are test maps."""
    out = []
    both = sorted(set(split.train) & set(split.test))
    if both:
        out.append(f"data.split {split.name}: {len(both)} map(s) in both train and test ({', '.join(map(str, both))}), "
                   f"as in the original code; test metrics include a training map")
    val_test = sorted(set(split.val) & set(split.test))
    if val_test:
        out.append(f"data.split {split.name}: {len(val_test)} of the {len(split.val)} validation maps are test "
                   f"maps, as in the original code; do not select checkpoints by validation for a test table")
    return out


def split_record(split: Split, data_cfg: Any) -> dict[str, Any]:
    """What a run and each of its checkpoints record about their data: the split (name and map
    ids), the threshold and the cars input switch."""
    return {**split.to_dict(), "threshold": data_cfg.threshold, "cars_input": data_cfg.cars_input}


def check_overlap(maps: Sequence[int], part: str, current: dict[str, Any],
                  models: list[tuple[str, str, dict[str, Any] | None]], allow: bool) -> tuple[list[str], list[dict]]:
    """The contamination guard: ``maps`` (this run's ``part`` maps, those it is measured on)
    must not be training maps of a model it loads (``models``: (what, checkpoint, its split
    record or None)). An overlap is a one-line error, unless ``allow`` (``--allow-overlap``):
    then it is returned (for the outputs) with a warning. Returns the warnings and the
    overlaps."""
    notes, overlaps = [], []
    for what, where, record in models:
        if record is None:
            notes.append(f"{what} {where} records no split (written before splits were recorded): "
                         f"cannot check that the {part} maps were not its training maps")
            continue
        both = sorted(set(int(m) for m in maps) & set(record.get("train", [])))
        if not both:
            continue
        said = (f"{len(both)} of the {len(set(maps))} {part} maps were training maps of the {what} {where} "
                f"(its split: {describe_split(record)}; this run's: {describe_split(current)})")
        if not allow:
            raise DataError(f"{said}; use the same data.split (and data.split_seed), or pass --allow-overlap "
                            f"to measure on them anyway")
        notes.append(f"{said}; measured anyway (--allow-overlap)")
        overlaps.append({"model": what, "checkpoint": where, "maps": len(both), "first": both[:10],
                         "its_split": describe_split(record)})
    return notes, overlaps


def data_mismatch(theirs: dict[str, Any] | None, ours: dict[str, Any], what: str = "the VAE") -> list[str]:
    """Warnings when a loaded model was trained on other data conventions (threshold, cars input)."""
    if theirs is None:
        return []
    return [f"{what} was trained with data.{key} = {theirs.get(key)!r}, this run uses {ours[key]!r}"
            for key in ("threshold", "cars_input") if key in theirs and theirs.get(key) != ours[key]]
