"""Batches for training and evaluation, without accelerate's dataloader wrapping.

:func:`train_batches` is an infinite, exactly resumable stream: epoch ``e``'s order is a
permutation drawn from ``seed * 1000003 + e``, sharded disjointly over processes.
:func:`eval_batches` is a fixed order, sharded over processes. Both read whole batches in place
(:meth:`lib.data.dataset.RadioMapDataset.__getitems__`).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from lib.errors import DataError


def collate(data: Any) -> Any:
    """DataLoader collation: a batch from :meth:`RadioMapDataset.__getitems__` as it is,
    anything else (a list of samples) as torch's ``default_collate`` makes it."""
    return data if isinstance(data, dict) else default_collate(data)


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
    fixed subset spread evenly over the split. Ranks may get one batch more or fewer than
    each other when the split does not divide evenly.
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
