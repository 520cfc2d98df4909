"""Which maps are for training, validation and testing.

Splits are by city map, never by sample: every transmitter and simulation of a map is in
the same split, so a test map's buildings were never seen in training.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lib.errors import DataError


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
