"""evaluate.py and the distance-only baseline: exact output keys, baselines on the same maps,
a fit that recovers a known pathloss line."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train_unified_prior
from lib.baselines import DistanceBaseline, fit_distance_baseline
from lib.condition import log_distance
from lib.config import load_config
from lib.batching import eval_batches
from lib.dataset import build_datasets
from lib.metrics import MetricAccumulator
from lib.latents import decode_latents, encode_latents
from lib.weights import load_vae
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
    assert set(m) == {"split", "num_maps", "simulations", "sampler", "num_inference_steps", "prediction_type",
                      "latent_scale", "checkpoints", "model", "vae_ceiling", "distance_baseline"}
    assert (m["split"], m["sampler"], m["num_inference_steps"], m["simulations"]) == ("test", "dpm", 1, SIMS)
    assert set(m["checkpoints"]) == {"prior", "prior_step", "prior_ema", "vae", "vae_ema"}
    assert m["checkpoints"]["prior"].endswith("prior/checkpoints/step-0000002") and m["checkpoints"]["prior_ema"]
    assert m["checkpoints"]["vae"] == load_config(cfg).prior.vae_checkpoint
    for method in ("model", "vae_ceiling", "distance_baseline"):
        d = m[method]
        extra = {"fit"} if method == "distance_baseline" else set()
        assert set(d) == METRICS | {"num_maps", "maps_per_sec", "per_simulator"} | extra
        assert d["num_maps"] == m["num_maps"] and d["maps_per_sec"] > 0
        assert all(math.isfinite(d[k]) for k in METRICS)
        assert set(d["per_simulator"]) == set(SIMS)
        assert sum(s["num_maps"] for s in d["per_simulator"].values()) == m["num_maps"]
    table = (out / "metrics.md").read_text()
    assert "| method | NMSE | RMSE | SSIM | PSNR (dB) | maps/s |" in table
    assert all(t in table for t in evaluate.METHODS.values())
    assert (out / "samples.png").is_file()


def test_baselines_are_computed_on_the_same_maps(evaluated):
    cfg_path, m, _ = evaluated
    cfg = load_config(cfg_path)
    data = build_datasets(cfg.data, cfg.seed, ("train", "test"), log=lambda s: None)
    assert m["num_maps"] == len(data["test"]) == 2 * 2 * len(SIMS)    # maps x transmitters x simulations
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
    assert line.startswith("error: no stage-2 checkpoint") and "train_unified_prior.py" in line


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
