"""evaluate.py and the distance-only baseline: exact output keys, baselines on the same maps,
a fit that recovers a known pathloss line."""
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_unified_prior
from lib.config import load_config
from lib.data.batching import eval_batches
from lib.data.condition import log_distance
from lib.data.dataset import build_datasets
from lib.evaluation.baselines import DistanceBaseline, fit_distance_baseline
from lib.evaluation.metrics import MetricAccumulator
from lib.models.latents import decode_latents, encode_latents
from lib.train.weights import load_vae
from tests.helpers import TRAINERS, run_main, trainer_config

SIMS = ["DPM", "IRT2"]
METRICS = {"nmse", "rmse", "ssim", "psnr", "nmse_std", "rmse_std", "ssim_std", "psnr_std"}


@pytest.fixture(scope="module")
def evaluated(tiny_data, tmp_path_factory):
    """A tiny prior (2 steps, two simulations) and one evaluate.py run on its test maps."""
    tmp = tmp_path_factory.mktemp("eval")
    spec = replace(TRAINERS["prior"], data_root=tiny_data)
    cfg = trainer_config(tmp, spec, **{"data": {"simulation": SIMS},
                                       "prior.train": {"max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                                       "val_every": 2}})
    with pytest.MonkeyPatch.context() as mp:
        assert run_main(train_unified_prior, ["--config", cfg], mp) == 0
        assert run_main(evaluate, ["--config", cfg, "--steps", "1", "--sampler", "dpm"], mp) == 0
    out = tmp / "run" / "eval"
    return cfg, json.loads((out / "metrics.json").read_text()), out


def test_metrics_json_has_the_documented_keys(evaluated):
    cfg, m, out = evaluated
    assert set(m) == {"split", "num_samples", "simulations", "objective", "sampler", "num_inference_steps",
                      "network_evaluations", "prediction_type", "latent_scale", "checkpoints", "model",
                      "vae_ceiling", "distance_baseline", "protocol", "methods"}
    assert (m["split"], m["sampler"], m["num_inference_steps"], m["simulations"]) == ("test", "dpm", 1, SIMS)
    assert set(m["checkpoints"]) == {"prior", "prior_step", "prior_ema", "vae", "vae_step", "vae_ema"}
    p = m["protocol"]
    assert (p["split"], p["part"], p["threshold"], p["steps"], p["sampler"]) == ("random", "test", 0.0, 1, "dpm")
    assert p["maps"] == len(p["map_ids"]) == 2 and p["ms_per_sample"] > 0 and p["allow_overlap"] == []
    assert m["checkpoints"]["prior"].endswith("prior/checkpoints/step-0000002") and m["checkpoints"]["prior_ema"]
    assert m["checkpoints"]["vae"] == load_config(cfg).prior.vae_checkpoint
    for method in ("model", "vae_ceiling", "distance_baseline"):
        d = m[method]
        extra = {"fit"} if method == "distance_baseline" else {"measurements", "samples"} if method == "model" else set()
        assert set(d) == METRICS | {"num_samples", "samples_per_sec", "ms_per_sample", "per_simulator", "nmse_set", "rmse_set",
                                    "rmse_db", "regions"} | extra
        assert d["num_samples"] == m["num_samples"] and d["samples_per_sec"] > 0
        assert all(math.isfinite(d[k]) for k in METRICS)
        assert set(d["per_simulator"]) == set(SIMS)
        assert sum(s["num_samples"] for s in d["per_simulator"].values()) == m["num_samples"]
    table = (out / "metrics.md").read_text()
    assert "| method | NMSE | RMSE | SSIM | PSNR (dB) | NMSE_set | RMSE_set | RMSE (dB) | samples/s |" in table
    assert all(t in table for t in evaluate.METHODS.values())
    assert (out / "samples.png").is_file()


def test_baselines_are_computed_on_the_same_maps(evaluated):
    cfg_path, m, _ = evaluated
    cfg = load_config(cfg_path)
    data = build_datasets(cfg.data, cfg.seed, ("train", "test"), log=lambda s: None)
    assert m["num_samples"] == len(data["test"]) == 2 * 2 * len(SIMS)    # maps x transmitters x simulations
    fit = fit_distance_baseline(eval_batches(data["train"], 4), SIMS)
    vae = load_vae(Path(m["checkpoints"]["vae"]), cfg).vae
    dist, ceiling = MetricAccumulator(), MetricAccumulator()
    for b in eval_batches(data["test"], 3):
        dist.update(fit.predict(b["cond"], [SIMS[i] for i in b["sim_id"]]), b["image"])
        ceiling.update(decode_latents(vae, encode_latents(vae, b["image"])), b["image"])
    for name, acc in (("distance_baseline", dist), ("vae_ceiling", ceiling)):
        mine = acc.compute()
        for k in METRICS:
            assert m[name][k] == pytest.approx(mine[k], rel=1e-5, abs=1e-9), (name, k)


def test_missing_prior_checkpoint_is_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, replace(TRAINERS["prior"], data_root=tiny_data))
    assert run_main(evaluate, ["--config", cfg], monkeypatch) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --checkpoint best: no complete stage-2 checkpoint") and "train_unified_prior.py" in line


# ----------------------------------------------------------------------------- distance baseline
def synthetic_batch(lines: dict[str, tuple[float, float]], size: int = 32) -> tuple[dict, list[str]]:
    """Maps whose gain is exactly intercept + slope * log10(d), one per simulation and transmitter."""
    sims, conds, images, ids = list(lines), [], [], []
    for k, (ty, tx) in enumerate([(3, 5), (20, 28), (16, 16)]):
        for s, sim in enumerate(sims):
            cond = -torch.ones(3, size, size)
            cond[1, ty, tx] = 1.0
            gain = (lines[sim][0] + lines[sim][1] * log_distance(cond[None])[0]).clamp(0, 1)
            conds.append(cond)
            images.append((gain * 2 - 1).float())
            ids.append(s)
    return {"cond": torch.stack(conds), "image": torch.stack(images), "sim_id": torch.tensor(ids)}, sims


def test_distance_fit_recovers_a_known_pathloss_line():
    lines = {"DPM": (0.9, -0.3), "IRT2": (0.8, -0.15)}          # gain stays inside [0, 1] at 32 px
    batch, sims = synthetic_batch(lines)
    fit = fit_distance_baseline([batch], sims)
    for sim, (a, b) in lines.items():
        assert fit.lines[sim] == pytest.approx((a, b), abs=1e-5)
    pred = fit.predict(batch["cond"], [sims[i] for i in batch["sim_id"]])
    assert (pred - batch["image"]).abs().max() < 1e-4
    assert pred.shape == batch["image"].shape


def test_distance_baseline_ignores_buildings_and_clamps():
    fit = DistanceBaseline({"DPM": (1.5, -1.0)})               # above 1 near the transmitter
    cond = -torch.ones(2, 3, 16, 16)
    cond[:, 1, 8, 8] = 1.0
    cond[1, 0] = 1.0                                           # map 2: buildings everywhere
    pred = fit.predict(cond, ["DPM", "DPM"])
    assert torch.equal(pred[0], pred[1])                       # buildings change nothing
    assert pred.max() == 1.0 and pred.min() >= -1.0
    d = log_distance(cond)[0, 0]
    assert d[8, 8] == 0 and d[8, 9] == 0 and d[8, 11] == pytest.approx(np.log10(3))
    with pytest.raises(ValueError, match="IRT2"):
        fit.predict(cond, ["DPM", "IRT2"])


# ----------------------------------------------------------------------------- protocols
def test_predictions_npz_recomputes_every_number(evaluated, monkeypatch):
    """--save-predictions writes exactly the arrays the metrics were computed on: the per-map
    means and the set-level numbers of metrics.json follow from predictions.npz with NumPy."""
    cfg, m, out = evaluated
    assert run_main(evaluate, ["--config", cfg, "--steps", "1", "--sampler", "dpm", "--save-predictions"],
                    monkeypatch) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["model"]["nmse"] == pytest.approx(m["model"]["nmse"], rel=1e-12)     # the same run again
    with np.load(out / "predictions.npz") as z:
        pred, target = z["pred"].astype(np.float64), z["target"].astype(np.float64)
        keys = list(zip(z["map_id"].tolist(), z["tx"].tolist(), z["simulation"].tolist()))
    assert pred.shape == target.shape == (m["num_samples"], 32, 32) and pred.min() >= 0 and pred.max() <= 1
    err = ((pred - target) ** 2).reshape(len(pred), -1)
    t2 = (target ** 2).reshape(len(pred), -1)
    assert again["model"]["nmse"] == pytest.approx(np.mean(err.sum(1) / t2.sum(1)), rel=1e-5)
    assert again["model"]["rmse"] == pytest.approx(np.mean(np.sqrt(err.mean(1))), rel=1e-5)
    assert again["model"]["nmse_set"] == pytest.approx(err.sum() / t2.sum(), rel=1e-5)
    assert again["model"]["rmse_set"] == pytest.approx(np.sqrt(err.mean()), rel=1e-5)
    assert again["model"]["rmse_db"] == pytest.approx(80 * again["model"]["rmse_set"], rel=1e-12)
    for map_id, tx, sim in keys:
        png = np.asarray(Image.open(out / "predictions" / sim / f"{map_id}_{tx}.png"))
        i = keys.index((map_id, tx, sim))
        assert png.dtype == np.uint8 and np.abs(png / 255.0 - pred[i]).max() <= 0.5 / 255 + 1e-6


def test_evaluate_refuses_maps_a_model_trained_on(evaluated, monkeypatch, capsys):
    cfg, _, out = evaluated
    before = (out / "metrics.json").read_bytes()
    # split_seed 3 puts a training map of split_seed 0 (the models') into the test maps
    assert run_main(evaluate, ["--config", cfg, "--steps", "1", "--set", "data.split_seed=3"], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of the 2 test maps were training maps of the VAE checkpoint" in err and "--allow-overlap" in err
    assert (out / "metrics.json").read_bytes() == before
    assert run_main(evaluate, ["--config", cfg, "--steps", "1", "--set", "data.split_seed=3", "--allow-overlap"],
                    monkeypatch) == 0
    p = json.loads((out / "metrics.json").read_text())["protocol"]
    assert [o["model"] for o in p["allow_overlap"]] == ["VAE checkpoint", "prior checkpoint"]
    assert "--allow-overlap" in (out / "metrics.md").read_text()


def test_prior_checkpoint_vae_carries_the_scaling_factor(evaluated):
    from diffusers import AutoencoderKL
    _, m, _ = evaluated
    folder = Path(m["checkpoints"]["prior"])
    state = json.loads((folder / "trainer_state.json").read_text())
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    assert vae.config.scaling_factor == pytest.approx(state["latent_scale"], rel=1e-12) != 0.18215
    assert state["split"]["name"] == "random" and state["vae_step"] == 3


SLOW_EVALUATION = """
import time, lib.evaluation.scoring as ev
orig = ev.PredictionStore.add
def add(self, *a, **k):
    orig(self, *a, **k)
    print("batch written", flush=True)
    time.sleep(1.0)
ev.PredictionStore.add = add
"""


def copy_of(evaluated, tmp_path):
    """The evaluated run folder copied, and the command-line flags that point at the copy."""
    import shutil
    cfg, _, out = evaluated
    shutil.copytree(out.parent, tmp_path / "run")
    return cfg, tmp_path / "run" / "eval", ["--set", f"output_dir={tmp_path / 'run'}"]


def slow_evaluation(tmp_path, cfg, flags):
    from types import SimpleNamespace

    from tests.helpers import run_injected
    proc = run_injected(tmp_path, SimpleNamespace(module_name="evaluate"), cfg, SLOW_EVALUATION, "--steps", "1",
                        "--save-predictions", "--set", "data.batch_size=2", *flags, name="slow_eval.py",
                        background=True)
    out_file = tmp_path / "slow_eval.py.out"
    deadline = time.time() + 120
    while "batch written" not in (out_file.read_text() if out_file.exists() else "") and proc.poll() is None:
        assert time.time() < deadline, "the evaluation did not start"
        time.sleep(0.1)
    return proc


def test_two_evaluations_into_one_folder_one_is_refused(evaluated, tmp_path, monkeypatch, capsys):
    """A second evaluation into the folder of a running one stops at once with one line; the
    first finishes, and its outputs are all its own (the metrics follow from its predictions)."""
    cfg, out, flags = copy_of(evaluated, tmp_path)
    first = slow_evaluation(tmp_path, cfg, flags)
    assert run_main(evaluate, ["--config", cfg, "--steps", "1", *flags], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out.parent} is in use by another evaluation (PID {first.pid} on ")
    assert first.wait(timeout=300) == 0, (tmp_path / "slow_eval.py.err").read_text()[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    with np.load(out / "predictions.npz") as z:
        err2 = ((z["pred"].astype(np.float64) - z["target"]) ** 2).reshape(len(z["pred"]), -1)
        t2 = (z["target"].astype(np.float64) ** 2).reshape(len(z["pred"]), -1)
    assert m["model"]["nmse"] == pytest.approx(np.mean(err2.sum(1) / t2.sum(1)), rel=1e-5)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".eval")) == []


def test_sigterm_during_an_evaluation_keeps_the_old_one_whole(evaluated, tmp_path):
    """SIGTERM while a new evaluation writes its predictions: the earlier evaluation's files are
    all there and unchanged, and nothing of the new one is left behind."""
    import signal
    cfg, out, flags = copy_of(evaluated, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = slow_evaluation(tmp_path, cfg, flags)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in (tmp_path / "slow_eval.py.err").read_text()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_evaluation_scalars_and_grid_reach_the_tracker(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, _, out = evaluated
    m = json.loads((out / "metrics.json").read_text())        # the latest evaluation's (the folder is replaced whole)
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    step = m["checkpoints"]["prior_step"]
    assert [(e.step, e.value) for e in acc.Scalars("eval/model/nmse")] == [(step, pytest.approx(m["model"]["nmse"]))]
    assert [e.step for e in acc.Images("eval/samples")] == [step]
