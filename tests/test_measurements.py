"""Sparse measurements, several samples per input, region metrics and decibels (issue 24):
the measurement channels, the same measured pixels in evaluate.py and predict.py, calibration
equal to NumPy on the saved samples, region masks against a hand-made map, dB round trips, and a
model trained without measurements refusing them in one line."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import evaluate
import predict
import train_unified_prior
from lib.data import measurements as meas
from lib.data.units import db_per_unit, db_to_gray, gray_to_db, gray_to_model, unit_to_gray
from lib.errors import UserError
from lib.evaluation.regions import region_masks, without_measured
from lib.evaluation.uncertainty import CalibrationAccumulator, ConformalFit, crps
from tests.helpers import TRAINERS, run_main, trainer_config

STEPS = {"max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2, "val_every": 2}


def condition(size: int = 32, tx=(16, 4)) -> torch.Tensor:
    """A hand-made city: free everywhere, a wall over columns 14..16, the transmitter left of it."""
    cond = torch.full((1, 3, size, size), -1.0)
    cond[0, 0, :, 14:17] = 1.0
    cond[0, 2] = cond[0, 0]
    cond[0, 1, tx[0], tx[1]] = 1.0
    return cond


# --------------------------------------------------------------------------- the channels
def test_channels_hold_the_target_at_the_measured_pixels_and_zero_elsewhere():
    cond = condition().repeat(3, 1, 1, 1)
    image = torch.rand(3, 1, 32, 32) * 2 - 1
    mask = meas.fixed_mask(cond, meas.parse_amount("5%", "n"), 0, [1, 1, 2], [0, 1, 0])
    ch = meas.measurement_channels(image, mask)
    free = cond[:, :1] < 0
    assert not (mask & ~free).any()                                    # never inside a building
    assert mask.flatten(1).sum(1).tolist() == [round(0.05 * int(free[0].sum()))] * 3
    assert torch.equal(ch[:, :1][mask], image[mask]) and (ch[:, :1][~mask] == 0).all()
    assert torch.equal(ch[:, 1:], mask.float())
    assert not torch.equal(mask[0], mask[1])                           # another transmitter, other pixels
    with_zero = meas.with_measurements(cond, None, None)
    assert with_zero.shape == (3, 5, 32, 32) and (with_zero[:, 3:] == 0).all()


def test_fixed_pixels_depend_on_seed_map_and_transmitter_only_and_nest():
    cond = condition()
    small = meas.fixed_mask(cond, meas.parse_amount(10, "n"), 7, [3], [1])
    large = meas.fixed_mask(cond.repeat(2, 1, 1, 1), meas.parse_amount(40, "n"), 7, [5, 3], [0, 1])[1:]
    assert small.sum() == 10 and large.sum() == 40 and not (small & ~large).any()   # any batch; nested
    assert not torch.equal(small, meas.fixed_mask(cond, meas.parse_amount(10, "n"), 8, [3], [1]))


def test_training_draws_counts_in_the_range_from_the_global_rng():
    cond = condition().repeat(64, 1, 1, 1)
    spec = meas.parse_spec(["2", "10"])
    torch.manual_seed(0)
    a = meas.draw_mask(cond, spec)
    counts = a.flatten(1).sum(1)
    assert counts.min() >= 2 and counts.max() <= 10 and len(set(counts.tolist())) > 3
    torch.manual_seed(0)
    assert torch.equal(a, meas.draw_mask(cond, spec))
    assert str(meas.parse_spec([0, "2%"])) == "0 .. 2%" and meas.parse_spec(None) is None


@pytest.mark.parametrize("text,says", [("x", "a number of pixels"), ("150%", "at most 100%"), ("2.5", "integer"),
                                       (True, "a number of pixels")])
def test_bad_amounts_are_one_line(text, says):
    with pytest.raises(UserError, match=says):
        meas.parse_amount(text, "--measurements")


def test_correction_is_exact_at_measured_pixels_and_fades_with_distance():
    cond = condition()
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, 5, 5] = True
    truth = torch.full((1, 1, 32, 32), 0.5)
    out = meas.correct(torch.zeros(1, 1, 32, 32), meas.with_measurements(cond, truth, mask), sigma=2.0)
    assert out[0, 0, 5, 5] == 0.5 and 0 < out[0, 0, 5, 7] < 0.5 and out[0, 0, 5, 25] == 0
    assert (out[0, 0, :, 14:17] == 0).all()                      # buildings keep their prediction


def test_csv_errors_name_the_file_and_line(tmp_path):
    good = tmp_path / "m.csv"
    good.write_text("x,y,db\n3,4,-90.5\n\n5,6,-100\n")
    assert meas.read_csv(good) == ("db", [(3, 4, -90.5, None), (5, 6, -100.0, None)])
    (tmp_path / "h.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(UserError, match="expected a header x,y,gray or x,y,db"):
        meas.read_csv(tmp_path / "h.csv")
    (tmp_path / "v.csv").write_text("x,y,gray\n1,2,0.5\n1,zz,0.5\n")
    with pytest.raises(UserError, match=r"v.csv:3: expected integers x,y"):
        meas.read_csv(tmp_path / "v.csv")
    (tmp_path / "g.csv").write_text("x,y,gray\n1,2,128\n")
    with pytest.raises(UserError, match=r"g.csv:2: gray 128 is outside \[0, 1\].*divide by 255"):
        meas.read_csv(tmp_path / "g.csv")


# --------------------------------------------------------------------------- regions, units, CRPS
def test_region_masks_match_a_hand_made_map():
    masks = region_masks(condition())
    wall = torch.zeros(32, 32, dtype=torch.bool)
    wall[:, 14:17] = True
    los = torch.zeros(32, 32, dtype=torch.bool)
    los[:, :14] = True                       # everything this side of the wall sees the transmitter
    assert torch.equal(masks["outside_buildings"][0, 0], ~wall)
    assert torch.equal(masks["los"][0, 0], los) and torch.equal(masks["nlos"][0, 0], ~wall & ~los)
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    metres = ((rows - 16) ** 2 + (cols - 4) ** 2).sqrt().clamp(min=1) * 8      # 32 px: 8 m per pixel
    for name, lo, hi in (("d<32m", 0, 32), ("d32-64m", 32, 64), ("d64-128m", 64, 128), ("d>=128m", 128, math.inf)):
        assert torch.equal(masks[name][0, 0], ~wall & (metres >= lo) & (metres < hi)), name
    assert torch.equal(masks["unmeasured"], masks["outside_buildings"])      # nothing measured
    measured = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    measured[0, 0, 3, 3] = measured[0, 0, 20, 20] = measured[0, 0, 5, 15] = True    # (5, 15): in the wall
    unmeasured = without_measured(masks, measured)["unmeasured"][0, 0]
    assert torch.equal(unmeasured, ~wall & ~measured[0, 0]) and int(unmeasured.sum()) == int((~wall).sum()) - 2


def test_decibels_round_trip_the_gray_levels():
    gray = np.arange(256) / 255.0
    db = gray_to_db(gray, [-127, -47])
    assert db[0] == -127 and db[-1] == -47 and np.allclose(db_to_gray(db, [-127, -47]), gray, atol=1e-6)
    assert db_per_unit([-127, -47], 0.0) == 80 and db_per_unit([-127, -47], 0.2) == pytest.approx(64)
    for t in (0.0, 0.2):                      # gray -> model space -> the metrics' scale -> gray (above t)
        u = (gray_to_model(gray, t) + 1) / 2
        assert np.allclose(unit_to_gray(u, t)[gray >= t], gray[gray >= t], atol=1e-6)


def test_crps_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 7)), rng.random(7)
    direct = np.abs(x - y).mean(0) - np.abs(x[:, None] - x[None]).sum((0, 1)) / (2 * 25)
    assert np.allclose(crps(torch.from_numpy(x), torch.from_numpy(y)).numpy(), direct)
    assert np.allclose(crps(torch.from_numpy(x[:1]), torch.from_numpy(y)).numpy(), np.abs(x[0] - y))


def test_conformal_widening_covers_new_maps_from_an_under_dispersed_ensemble():
    torch.manual_seed(0)
    cond = condition().repeat(8, 1, 1, 1)
    free = cond[:, :1] < 0

    def draw():        # truth ~ N(0, 0.2) around the mean; the samples' spread is 10x too narrow
        mean = torch.rand(8, 1, 32, 32) * 1.2 - 0.6
        return mean + 0.02 * torch.randn(8, 8, 1, 32, 32), mean + 0.2 * torch.randn(8, 1, 32, 32)

    fit = ConformalFit(keep=10 ** 9)
    samples, truth = draw()
    fit.update(samples, truth, free)
    widen = fit.widen()
    scores = torch.cat(fit.scores[90]).sort().values
    n = scores.numel()
    assert n == int(free.sum()) and widen[90] == float(scores[math.ceil((n + 1) * 0.9) - 1])
    acc = CalibrationAccumulator()
    samples, truth = draw()                                # other maps
    acc.update(samples, truth, region_masks(cond), widen)
    c = acc.compute(80.0)["outside_buildings"]
    assert c["coverage90"] < 0.3 and 0.87 < c["coverage90_conformal"] < 0.93
    assert 0.45 < c["coverage50_conformal"] < 0.55


# --------------------------------------------------------------------------- the scripts
@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Tiny priors: ddpm with measurements, regression with measurements, ddpm without."""
    out = {}
    for name, objective, count in (("ddpm", "ddpm", [0, "10%"]), ("regression", "regression", [0, "10%"]),
                                   ("plain", "ddpm", None)):
        tmp = tmp_path_factory.mktemp(name)
        spec = replace(TRAINERS["prior"], data_root=tiny_data)
        cfg = trainer_config(tmp, spec, **{"prior.train": STEPS, "prior.diffusion": {"objective": objective},
                                           "prior.measurements": {"count": count}})
        with pytest.MonkeyPatch.context() as mp:
            assert run_main(train_unified_prior, ["--config", cfg], mp) == 0
        out[name] = (tmp, cfg)
    return out


def evaluate_run(run, monkeypatch, *args):
    tmp, cfg = run
    assert run_main(evaluate, ["--config", cfg, "--checkpoint", "latest", *args], monkeypatch) == 0
    return json.loads((tmp / "run" / "eval" / "metrics.json").read_text()), tmp / "run" / "eval"


def test_evaluate_and_predict_measure_the_same_pixels_for_the_same_seed(runs, tiny_data, monkeypatch):
    metrics, folder = evaluate_run(runs["regression"], monkeypatch, "--measurements", "20", "--save-predictions")
    assert metrics["model"]["measurements"]["amount"] == "20" and metrics["model"]["measurements"]["mean_pixels"] == 20
    with np.load(folder / "predictions.npz") as z:
        expected = {(int(m), int(t)): p for m, t, p, s in zip(z["map_id"], z["tx"], z["pred"], z["simulation"])}
    maps = [str(m) for m in metrics["protocol"]["map_ids"]]
    ckpt = metrics["checkpoints"]["prior"]
    for seed, same in ((None, True), (5, False)):
        out = runs["regression"][0] / f"pred-{seed}"
        args = ["--checkpoint", ckpt, "--root", tiny_data, "--maps", *maps, "--simulation", "DPM",
                "--measurements", "20", "--out", out] + ([] if seed is None else ["--seed", str(seed)])
        assert run_main(predict, args, monkeypatch) == 0
        diffs = [np.abs(np.load(out / "DPM" / f"{m}_{t}.npy") - p).max() for (m, t), p in expected.items()]
        assert (max(diffs) < 1e-5) if same else (min(diffs) > 1e-3), (seed, diffs)


def test_measurements_change_the_maps_and_a_table_over_amounts(runs, monkeypatch):
    metrics, folder = evaluate_run(runs["regression"], monkeypatch, "--measurements", "0", "--measurements", "10%")
    assert list(metrics["methods"])[:2] == ["model", "model@10%"]
    assert metrics["model"]["measurements"]["mean_pixels"] == 0 and metrics["model@10%"]["measurements"]["mean_pixels"] > 0
    assert metrics["model"]["nmse"] != metrics["model@10%"]["nmse"]
    table = (folder / "metrics.md").read_text()
    assert "| measurements | pixels per map |" in table and "| 10% |" in table and "| unmeasured |" in table
    # "unmeasured": outside buildings without the method's measured pixels, where the correction
    # gives the measured value (no error): the same squared error over fewer pixels
    for key in ("model", "distance_baseline"):
        assert metrics[key]["regions"]["unmeasured"] == metrics[key]["regions"]["outside_buildings"]
    r, n = metrics["model@10%"]["regions"], metrics["num_samples"]
    given = metrics["model@10%"]["measurements"]["mean_pixels"] * n
    assert r["unmeasured"]["pixels"] == r["outside_buildings"]["pixels"] - given
    sq = {k: r[k]["rmse_set"] ** 2 * r[k]["pixels"] for k in ("unmeasured", "outside_buildings")}
    assert sq["unmeasured"] == pytest.approx(sq["outside_buildings"], rel=1e-6)
    assert r["unmeasured"]["rmse_db"] > r["outside_buildings"]["rmse_db"]
    assert metrics["model"]["samples"] == {"requested": 1, "drawn": 1, "deterministic": True}


def test_calibration_equals_numpy_on_the_saved_samples(runs, monkeypatch):
    metrics, folder = evaluate_run(runs["ddpm"], monkeypatch, "--measurements", "5%", "--samples", "4",
                                   "--save-predictions", "--save-samples", "--conformal")
    with np.load(folder / "predictions.npz") as z:
        samples, target, pred, std = z["samples"].astype(np.float64), z["target"].astype(np.float64), z["pred"], z["std"]
        q = {k: z[k] for k in ("q05", "q25", "q75", "q95")}
    assert samples.shape[1] == 4 and np.allclose(samples.mean(1), pred, atol=1e-6)
    assert np.allclose(samples.std(1), std, atol=1e-6)
    lo, hi = np.quantile(samples, [0.05, 0.95], axis=1)
    assert np.allclose(lo, q["q05"], atol=1e-6) and np.allclose(hi, q["q95"], atol=1e-6)
    c = metrics["model"]["calibration"]["all"]
    assert c["coverage90"] == pytest.approx(((target >= lo) & (target <= hi)).mean(), abs=1e-6)
    q25, q75 = np.quantile(samples, [0.25, 0.75], axis=1)
    assert c["coverage50"] == pytest.approx(((target >= q25) & (target <= q75)).mean(), abs=1e-6)
    pairwise = np.abs(samples[:, :, None] - samples[:, None]).sum((1, 2)) / (2 * 16)
    assert c["crps"] == pytest.approx((np.abs(samples - target[:, None]).mean(1) - pairwise).mean(), rel=1e-6)
    assert c["crps_db"] == pytest.approx(80 * c["crps"])
    w = metrics["model"]["conformal"]                      # fitted on the validation maps, measured here
    assert w["fitted_on"] == "val" and w["pixels"] > 0 and w["widen90_db"] == pytest.approx(80 * w["widen90"])
    widened = (target >= lo - w["widen90"] - 1e-7) & (target <= hi + w["widen90"] + 1e-7)
    assert c["coverage90_conformal"] == pytest.approx(widened.mean(), abs=2e-3)
    single = metrics["model"]["single_sample"]
    assert single["nmse"] != metrics["model"]["nmse"]
    assert "coverage 90 %" in (folder / "metrics.md").read_text()
    assert (folder / "predictions").rglob("*_std.png")


def test_regression_reports_itself_deterministic(runs, monkeypatch, capsys):
    metrics, folder = evaluate_run(runs["regression"], monkeypatch, "--samples", "4")
    assert metrics["model"]["samples"] == {"requested": 4, "drawn": 1, "deterministic": True}
    assert "calibration" not in metrics["model"] and "is deterministic" in (folder / "metrics.md").read_text()


def test_a_model_trained_without_measurements_refuses_them_in_one_line(runs, tiny_data, monkeypatch, capsys):
    tmp, cfg = runs["plain"]
    assert run_main(evaluate, ["--config", cfg, "--checkpoint", "latest", "--measurements", "10"], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--measurements 10" in err[0] and "trained without measurements" in err[0]
    ckpt = next((tmp / "run" / "prior" / "checkpoints").iterdir())
    (tmp / "m.csv").write_text("x,y,gray\n1,1,0.5\n")
    args = ["--checkpoint", ckpt, "--buildings", tiny_data / "png" / "buildings_complete" / "1.png", "--tx", "3,3",
            "--simulation", "DPM", "--measurements", tmp / "m.csv", "--out", tmp / "o"]
    assert run_main(predict, args, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained without measurements" in err[0]


def test_predict_with_a_csv_samples_and_decibels(runs, tiny_data, monkeypatch):
    tmp, _ = runs["ddpm"]
    ckpt = next((tmp / "run" / "prior" / "checkpoints").iterdir())
    (tmp / "m.csv").write_text("x,y,db\n2,2,-60\n20,3,-80\n")
    base = ["--checkpoint", ckpt, "--buildings", tiny_data / "png" / "buildings_complete" / "1.png", "--tx", "3,3",
            "--simulation", "DPM", "--measurements", tmp / "m.csv", "--samples", "3"]
    assert run_main(predict, base + ["--out", tmp / "gray"], monkeypatch) == 0
    assert run_main(predict, base + ["--out", tmp / "db", "--units", "db"], monkeypatch) == 0
    gray, db = np.load(tmp / "gray" / "DPM" / "1_0.npy"), np.load(tmp / "db" / "DPM" / "1_0.npy")
    assert np.allclose(db, gray_to_db(gray, [-127, -47]), atol=1e-4)
    assert gray[2, 2] == pytest.approx(float(db_to_gray(-60, [-127, -47])), abs=1e-6)   # measured: kept
    city = np.asarray(__import__("PIL.Image").Image.open(tiny_data / "png" / "buildings_complete" / "1.png"))
    y, x = np.argwhere(city > 127)[0]
    (tmp / "in.csv").write_text(f"x,y,gray\n{x},{y},0.5\n")
    args = base[:base.index("--measurements") + 1] + [tmp / "in.csv", "--out", tmp / "no"]
    assert run_main(predict, args, monkeypatch) == 2
    with np.load(tmp / "db" / "DPM" / "1_0_uncertainty.npz") as z:
        assert set(z.files) >= {"std", "q05", "q25", "q75", "q95"} and (z["q95"] >= z["q05"]).all()
    assert (tmp / "gray" / "DPM" / "1_0_std.png").is_file()
