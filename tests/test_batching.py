"""lib.data.batching: the training stream resumes exactly, shards disjointly, and leaves the global
RNG alone; evaluation batches are a fixed order."""
from __future__ import annotations

import pytest
import torch

from lib.data.batching import batches_per_epoch, eval_batches, train_batches
from lib.data.dataset import RadioMapDataset
from lib.errors import DataError
from tests.helpers import batch_keys as keys
from tests.helpers import dataset as ds


@pytest.fixture(scope="module")
def small(city) -> RadioMapDataset:
    """18 samples: 6 maps x 3 transmitters x DPM."""
    return ds(city, size=8)


def take(it, n: int) -> list[list[tuple]]:
    return [keys(next(it)) for _ in range(n)]


def test_batches_per_epoch():
    assert batches_per_epoch(18, 4, 1) == 4
    assert batches_per_epoch(18, 4, 2) == 2
    assert batches_per_epoch(18, 3, 2) == 3
    assert batches_per_epoch(3, 4, 1) == 0


def test_train_batches_resume_exactly_across_epochs(small):
    full = take(train_batches(small, 4, seed=5), 10)           # 4 batches per epoch
    for k in (1, 4, 6):
        assert take(train_batches(small, 4, seed=5, start_batch=k), 10 - k) == full[k:]
    assert take(train_batches(small, 4, seed=5), 10) == full   # deterministic
    assert take(train_batches(small, 4, seed=6), 10) != full


def test_train_epochs_are_permutations_that_differ(small):
    batches = take(train_batches(small, 4, seed=0), 8)
    e0 = [k for b in batches[:4] for k in b]
    e1 = [k for b in batches[4:] for k in b]
    assert len(set(e0)) == len(e0) == 16 and len(set(e1)) == 16   # no repeats inside an epoch
    assert e0 != e1
    batch = next(train_batches(small, 4, seed=0))
    assert batch["image"].shape == (4, 1, 8, 8) and batch["cond"].shape == (4, 3, 8, 8)
    assert batch["map_id"].dtype == torch.int64


def test_train_ranks_are_disjoint_and_cover_the_epoch(small):
    per_rank = [take(train_batches(small, 3, seed=2, rank=r, world_size=2), 3) for r in (0, 1)]
    seen = [[k for b in batches for k in b] for batches in per_rank]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == len(small) == 18
    # resuming one rank lands on the same batches
    assert take(train_batches(small, 3, seed=2, start_batch=2, rank=1, world_size=2), 1) == per_rank[1][2:]


def test_train_batches_with_workers_match(small):
    assert take(train_batches(small, 4, seed=3, num_workers=2), 5) == take(train_batches(small, 4, seed=3), 5)


def test_batching_leaves_the_global_rng_alone(small):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(train_batches(small, 4, seed=1, start_batch=7))
    list(eval_batches(small, 4))
    assert torch.equal(torch.rand(3), expected)


def test_train_batches_too_small(small):
    with pytest.raises(DataError, match="18 samples cannot fill one batch of 10 on each of 2"):
        train_batches(small, 10, seed=0, world_size=2)


def test_eval_batches_fixed_order_sharded(small):
    order = [small.sample_key(i) for i in range(len(small))]
    flat = lambda bs: [k for b in bs for k in b]  # noqa: E731
    as_keys = lambda ks: [(m, t, small.simulations[s]) for m, t, s in ks]  # noqa: E731
    one = [keys(b) for b in eval_batches(small, 4)]
    assert [len(b) for b in one] == [4, 4, 4, 4, 2]            # last partial batch kept
    assert as_keys(flat(one)) == order
    assert [keys(b) for b in eval_batches(small, 4)] == one
    assert len(list(eval_batches(small, 4, max_batches=2))) == 2
    ranks = [flat(keys(b) for b in eval_batches(small, 4, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(ranks, [])) == sorted(flat(one))
    assert as_keys(ranks[1]) == order[1::3]


