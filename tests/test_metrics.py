"""Radio-map metrics: definitions on the [0, 1] scale, clamps, accumulation, merging."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lib.evaluation.metrics import (METRIC_NAMES, NMSE_EPS, PSNR_MAX_DB, SUM_NAMES, MetricAccumulator,
                                     per_map_metrics, summarize, summarize_groups, to_unit)


def _rand_maps(b: int, seed: int, c: int = 1, h: int = 32, w: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


def test_to_unit_maps_and_clamps():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert torch.allclose(to_unit(x), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_perfect_prediction():
    target = _rand_maps(4, seed=0)
    m = per_map_metrics(target.clone(), target)
    assert set(m) == set(METRIC_NAMES) | set(SUM_NAMES)
    for v in m.values():
        assert v.shape == (4,) and v.dtype == torch.float64 and v.device.type == "cpu"
    assert torch.all(m["nmse"] == 0)
    assert torch.all(m["rmse"] == 0)
    assert torch.allclose(m["ssim"], torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.all(m["psnr"] == PSNR_MAX_DB)  # inf in theory, clamped


def test_constant_offset_matches_hand_computation():
    # target on the [0, 1] scale in [0.1, 0.8]; prediction 0.1 higher, so nothing is clamped
    g = torch.Generator().manual_seed(1)
    target_unit = 0.1 + 0.7 * torch.rand(3, 1, 32, 32, generator=g, dtype=torch.float64)
    delta = 0.1
    target = target_unit * 2 - 1
    pred = (target_unit + delta) * 2 - 1
    m = per_map_metrics(pred, target)

    n = 32 * 32
    t = target_unit.numpy().reshape(3, -1)
    expected_nmse = n * delta**2 / ((t**2).sum(axis=1) + NMSE_EPS)
    assert np.allclose(m["rmse"].numpy(), delta, rtol=1e-9)
    # 20 dB; torchmetrics turns ln into log10 with a float32 constant, hence rtol 1e-6
    assert np.allclose(m["psnr"].numpy(), 10 * math.log10(1 / delta**2), rtol=1e-6)
    assert np.allclose(m["nmse"].numpy(), expected_nmse, rtol=1e-9)


def test_model_space_conversion_extremes():
    # pred -1 everywhere (0 on the unit scale) vs target +1 (1): error 1 at every pixel
    pred = -torch.ones(2, 1, 32, 32)
    target = torch.ones(2, 1, 32, 32)
    m = per_map_metrics(pred, target)
    assert torch.allclose(m["rmse"], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(m["psnr"], torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(m["nmse"], torch.ones(2, dtype=torch.float64), rtol=1e-9)
    # values outside [-1, 1] are clamped before scoring
    m2 = per_map_metrics(pred * 5, target * 5)
    for k in METRIC_NAMES:
        assert torch.allclose(m2[k], m[k])


def test_ssim_of_constant_maps_is_the_luminance_term():
    # constant maps have zero variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    a, b = 0.25, 0.75
    pred = torch.full((1, 1, 32, 32), a * 2 - 1)
    target = torch.full((1, 1, 32, 32), b * 2 - 1)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert per_map_metrics(pred, target)["ssim"].item() == pytest.approx(expected, rel=1e-9)


def test_all_zero_target_stays_finite():
    target = -torch.ones(2, 1, 32, 32)  # 0 on the unit scale: sum(t^2) == 0
    perfect = per_map_metrics(target.clone(), target)
    assert torch.all(perfect["nmse"] == 0)
    off = per_map_metrics(target + 0.2, target)
    assert torch.all(torch.isfinite(off["nmse"])) and torch.all(off["nmse"] > 1e6)


@pytest.mark.parametrize("shape", [(2, 1, 5, 5), (2, 1, 3, 7), (1, 1, 1, 1), (2, 3, 16, 16)])
def test_small_and_multichannel_maps(shape):
    target = _rand_maps(shape[0], seed=2, c=shape[1], h=shape[2], w=shape[3])
    m = per_map_metrics(target, target)
    assert torch.allclose(m["ssim"], torch.ones(shape[0], dtype=torch.float64), atol=1e-12)
    other = per_map_metrics(_rand_maps(shape[0], seed=3, c=shape[1], h=shape[2], w=shape[3]), target)
    for v in other.values():
        assert v.shape == (shape[0],) and torch.all(torch.isfinite(v))


def test_empty_batch_gives_empty_values():
    # e.g. a process that got no maps in the last evaluation batch
    acc = MetricAccumulator()
    acc.update(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8), groups=[])
    assert len(acc) == 0 and all(v.shape == (0,) for v in acc.values().values())
    pred, target = _batches(seed=10)[0]
    acc.update(pred, target)  # no groups after an empty grouped batch: fine, nothing grouped yet
    assert acc.groups() is None and len(acc) == pred.shape[0]


def test_low_precision_inputs_are_scored_in_float64():
    target = _rand_maps(2, seed=4)
    m = per_map_metrics(target.half(), target.half())
    assert m["rmse"].dtype == torch.float64 and torch.all(m["rmse"] == 0)


@pytest.mark.parametrize(
    "pred_shape,target_shape",
    [((2, 1, 8, 8), (2, 1, 8, 9)), ((1, 8, 8), (1, 8, 8)), ((1, 1, 0, 8), (1, 1, 0, 8))],
)
def test_bad_shapes_raise(pred_shape, target_shape):
    with pytest.raises(ValueError):
        per_map_metrics(torch.zeros(pred_shape), torch.zeros(target_shape))


# ------------------------------------------------------------------ accumulation
def _batches(seed: int, sizes=(3, 5, 2)):
    out = []
    for i, b in enumerate(sizes):
        target = _rand_maps(b, seed=seed * 100 + 2 * i)
        pred = (target + 0.3 * _rand_maps(b, seed=seed * 100 + 2 * i + 1)).clamp(-1, 1)
        out.append((pred, target))
    return out


def test_accumulator_mean_and_population_std_match_numpy():
    acc = MetricAccumulator()
    per_map = {k: [] for k in METRIC_NAMES}
    for pred, target in _batches(seed=5):
        returned = acc.update(pred, target)
        for k in METRIC_NAMES:
            per_map[k].append(per_map_metrics(pred, target)[k].numpy())
            assert torch.equal(returned[k], per_map_metrics(pred, target)[k])
    res = acc.compute()
    assert res["num_samples"] == 10 and len(acc) == 10
    for k in METRIC_NAMES:
        v = np.concatenate(per_map[k])
        assert res[k] == pytest.approx(np.mean(v), rel=1e-12)
        assert res[f"{k}_std"] == pytest.approx(np.std(v, ddof=0), rel=1e-9, abs=1e-15)
        assert np.array_equal(acc.values()[k].numpy(), v)
    assert set(res) == set(METRIC_NAMES) | {f"{k}_std" for k in METRIC_NAMES} | {"num_samples", "nmse_set", "rmse_set"}


def test_set_level_metrics_equal_a_direct_computation():
    """nmse_set and rmse_set sum over every pixel of the set (RadioUNet's convention); the mean of
    per-map RMSEs (RadioDiff's) reads lower whenever the maps' errors differ."""
    acc = MetricAccumulator()
    preds, targets = [], []
    for pred, target in _batches(seed=9):
        acc.update(pred, target)
        preds.append(to_unit(pred.double()).numpy())
        targets.append(to_unit(target.double()).numpy())
    p, t = np.concatenate(preds), np.concatenate(targets)
    res = acc.compute()
    assert res["nmse_set"] == pytest.approx(((p - t) ** 2).sum() / (t ** 2).sum(), rel=1e-12)
    assert res["rmse_set"] == pytest.approx(np.sqrt(((p - t) ** 2).mean()), rel=1e-12)
    assert res["rmse_set"] > res["rmse"]


def test_groups_split_correctly():
    acc = MetricAccumulator()
    groups_all: list[str] = []
    for i, (pred, target) in enumerate(_batches(seed=6)):
        groups = ["IRT2" if (i + j) % 3 == 0 else "DPM" for j in range(pred.shape[0])]
        groups_all += groups
        acc.update(pred, target, groups=groups)
    assert acc.groups() == groups_all
    per_group = acc.compute_groups()
    assert list(per_group) == ["DPM", "IRT2"]
    values = acc.values()
    for g, res in per_group.items():
        mask = np.array([x == g for x in groups_all])
        assert res["num_samples"] == mask.sum()
        for k in METRIC_NAMES:
            v = values[k].numpy()[mask]
            assert res[k] == pytest.approx(np.mean(v), rel=1e-12)
            assert res[f"{k}_std"] == pytest.approx(np.std(v), rel=1e-9, abs=1e-15)
    assert sum(r["num_samples"] for r in per_group.values()) == acc.compute()["num_samples"]


def test_groups_must_be_given_always_or_never():
    (p1, t1), (p2, t2), _ = _batches(seed=7)
    acc = MetricAccumulator()
    acc.update(p1, t1, groups=["a"] * p1.shape[0])
    with pytest.raises(ValueError):
        acc.update(p2, t2)
    acc2 = MetricAccumulator()
    acc2.update(p1, t1)
    with pytest.raises(ValueError):
        acc2.update(p2, t2, groups=["a"] * p2.shape[0])
    with pytest.raises(ValueError):
        MetricAccumulator().update(p1, t1, groups=["a"])  # wrong count
    assert MetricAccumulator().compute_groups() == {}


def test_summarize_of_two_processes_equals_one_accumulator():
    batches = _batches(seed=8, sizes=(4, 3, 5, 2))
    groups = [[f"g{(i + j) % 2}" for j in range(p.shape[0])] for i, (p, _) in enumerate(batches)]
    whole = MetricAccumulator()
    rank0, rank1 = MetricAccumulator(), MetricAccumulator()
    for i, (pred, target) in enumerate(batches):
        whole.update(pred, target, groups[i])
        (rank0 if i % 2 == 0 else rank1).update(pred, target, groups[i])

    # what the trainer does after gathering: concatenate per-map tensors and group lists
    v0, v1 = rank0.values(), rank1.values()
    gathered = {k: torch.cat([v0[k], v1[k]]) for k in METRIC_NAMES + SUM_NAMES}
    gathered_groups = rank0.groups() + rank1.groups()
    expected, expected_groups = whole.compute(), whole.compute_groups()
    for got in (
        summarize(gathered),
        MetricAccumulator.from_state(rank0.state()).merge(rank1).compute(),
    ):
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-12)
    got_groups = summarize_groups(gathered, gathered_groups)
    assert got_groups.keys() == expected_groups.keys()
    for g in expected_groups:
        for k, v in expected_groups[g].items():
            assert got_groups[g][k] == pytest.approx(v, rel=1e-12)


def test_empty_accumulator_and_reset():
    acc = MetricAccumulator()
    res = acc.compute()
    assert res["num_samples"] == 0 and all(math.isnan(res[k]) for k in METRIC_NAMES)
    assert len(MetricAccumulator.from_state(acc.state())) == 0
    pred, target = _batches(seed=9)[0]
    acc.update(pred, target)
    assert len(acc.merge(MetricAccumulator())) == pred.shape[0]
    acc.reset()
    assert len(acc) == 0 and acc.values()["rmse"].numel() == 0


def test_summarize_rejects_inconsistent_values():
    with pytest.raises(ValueError):
        summarize({"nmse": torch.zeros(2), "rmse": torch.zeros(2), "ssim": torch.zeros(2)})
    with pytest.raises(ValueError):
        summarize({k: torch.zeros(3 if k == "psnr" else 2) for k in METRIC_NAMES})
