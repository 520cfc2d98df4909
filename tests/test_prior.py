"""Stage 2: latent scale, simulator embedding, sampling, the trainer's schedule and resume.

The fault policy (kill -9, SIGTERM, NaN, divergence, unstepped schedule, another model's
checkpoint) is tested for this trainer in tests/test_faults.py (TRAINERS["prior"]).
"""
import json
from pathlib import Path

import pytest
import torch

import train_unified_prior
from lib.config import load_config
from lib.condition import distance_map
from lib.dataset import build_datasets
from lib.diffusion import diffusion_loss, generate_maps, sampling_scheduler, train_scheduler
from lib.prior import LatentPrior
from lib.schedule import lr_at
from lib.latents import encode_latents, measure_latent_scale
from lib.weights import load_vae
from tests.helpers import (TRAINERS, checkpoint_tensors, max_abs_diff, read_records, run_main, tiny_config,
                           tiny_prior_sections, trainer_config)


@pytest.fixture(scope="module")
def tiny(tiny_data, tmp_path_factory):
    """A config with two simulations, its datasets and the session's tiny VAE, loaded."""
    tmp = tmp_path_factory.mktemp("prior-unit")
    cfg = load_config(tiny_config(tmp, tiny_data, **tiny_prior_sections(tiny_data),
                                  **{"data": {"simulation": ["DPM", "IRT2"]}}))
    data = build_datasets(cfg.data, cfg.seed, ("train", "val"), log=lambda m: None)
    return cfg, data, load_vae(Path(cfg.prior.vae_checkpoint), cfg)


def build_prior(cfg, vae, seed=0):
    torch.manual_seed(seed)
    return LatentPrior(cfg.prior.model, cfg.vae.model.latent_channels, cfg.data.image_size,
                       vae.downsample, len(cfg.data.simulation)).eval()


def batch_of(ds, n=2):
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def test_latent_scale_gives_unit_variance(tiny):
    cfg, data, loaded = tiny
    train = data["train"]
    scale = measure_latent_scale(loaded.vae, train, 4, 100)            # every training sample
    z = encode_latents(loaded.vae, batch_of(train, len(train))["image"]) * scale
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    assert abs(1.0 / scale - 1.0) > 0.05          # the raw latents are not unit scale already
    # fewer batches: spread over the split, close to the same factor
    assert measure_latent_scale(loaded.vae, train, 2, 2) == pytest.approx(scale, rel=0.5)


def test_simulator_embedding_changes_the_prediction(tiny):
    cfg, data, loaded = tiny
    prior = build_prior(cfg, loaded)
    b = batch_of(data["train"])
    z = torch.randn(2, prior.latent_channels, prior.latent_size, prior.latent_size)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        as_dpm = prior(z, t, b["cond"], torch.tensor([0, 0]))
        as_irt2 = prior(z, t, b["cond"], torch.tensor([1, 1]))
        again = prior(z, t, b["cond"], torch.tensor([0, 0]))
    assert torch.equal(as_dpm, again)
    assert (as_dpm - as_irt2).abs().max() > 1e-4
    # and the sampled maps differ too: one model, asked for either simulator
    gen = lambda: torch.Generator().manual_seed(0)
    maps = [generate_maps(prior, loaded.vae, 1.0, b["cond"], torch.tensor([s, s]), cfg.prior.diffusion, 2,
                          generator=gen()) for s in (0, 1)]
    assert (maps[0] - maps[1]).abs().max() > 1e-5


def test_distance_channel_spreads_the_transmitter_over_the_map():
    cond = -torch.ones(1, 3, 32, 32)
    cond[0, 1, 3, 5] = 1.0
    d = distance_map(cond)[0, 0]
    assert d[3, 5] == -1.0 and d.max() <= 1.0 and d[31, 31] > 0.8
    assert d[3, 10] < d[3, 20] < d[3, 31]                     # grows with the distance


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_one_and_multi_step_sampling(tiny, sampler, prediction_type):
    cfg, data, loaded = tiny
    dcfg = type(cfg.prior.diffusion)(**{**vars(cfg.prior.diffusion), "prediction_type": prediction_type,
                                        "sampler": sampler})
    prior = build_prior(cfg, loaded)
    b = batch_of(data["val"], 3)
    rng = torch.get_rng_state()
    for steps in (1, 4):
        sched = sampling_scheduler(dcfg)
        sched.set_timesteps(steps)
        assert sched.timesteps[0] == dcfg.num_train_timesteps - 1      # starts from pure noise
        maps = generate_maps(prior, loaded.vae, 2.0, b["cond"], b["sim_id"], dcfg, steps,
                             generator=torch.Generator().manual_seed(1))
        assert maps.shape == (3, 1, cfg.data.image_size, cfg.data.image_size)
        assert torch.isfinite(maps).all() and maps.min() >= -1 and maps.max() <= 1
        again = generate_maps(prior, loaded.vae, 2.0, b["cond"], b["sim_id"], dcfg, steps,
                              generator=torch.Generator().manual_seed(1))
        assert torch.equal(maps, again)
    # the validation loss with a generator is reproducible and draws nothing from the global RNG
    latents = encode_latents(loaded.vae, b["image"])
    losses = [diffusion_loss(prior, train_scheduler(dcfg), latents, b["cond"], b["sim_id"],
                             torch.Generator().manual_seed(2)) for _ in range(2)]
    assert losses[0].item() == losses[1].item() and torch.isfinite(losses[0])
    assert torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------------- the trainer
@pytest.fixture
def prior_trainer(tiny_data):
    from dataclasses import replace
    return replace(TRAINERS["prior"], data_root=tiny_data)


def run(monkeypatch, cfg, *extra):
    return run_main(train_unified_prior, ["--config", cfg, *extra], monkeypatch)


def test_lr_every_step_and_resume_equals_straight_run(tmp_path, prior_trainer, monkeypatch):
    two_sims = {"data": {"simulation": ["DPM", "IRT2"]}}
    straight = trainer_config(tmp_path, prior_trainer, "a.yaml", output_dir=str(tmp_path / "a"), **two_sims)
    assert run(monkeypatch, straight) == 0
    a = tmp_path / "a" / "prior"
    tcfg = load_config(straight).prior.train
    recs = read_records(a, "train")
    assert [r["step"] for r in recs] == list(range(1, tcfg.max_steps + 1))
    for r in recs:
        assert r["lr"] == pytest.approx(lr_at(tcfg, r["step"]), rel=1e-9)
        assert r["steps_per_sec"] > 0 and r["loss"] > 0
    assert recs[-1]["lr"] == pytest.approx(tcfg.min_lr)
    val = read_records(a, "val")
    assert {"loss", "nmse", "rmse", "ssim", "psnr", "nmse_DPM", "nmse_IRT2"} <= set(val[0])

    split = trainer_config(tmp_path, prior_trainer, "b.yaml", output_dir=str(tmp_path / "b"), **two_sims)
    assert run(monkeypatch, split, "--until-step", "3") == 0
    assert run(monkeypatch, split, "--resume", "latest") == 0
    b = tmp_path / "b" / "prior"
    log = (b / "train.log").read_text()                     # restored with the checkpoint, not re-measured
    assert log.count("= 1 / std of the latents of") == 1 and log.count("(from the checkpoint)") == 1
    assert log.index("= 1 / std of the latents of") < log.index("(from the checkpoint)")
    final = lambda d: checkpoint_tensors(d / "checkpoints" / "step-0000006")
    assert max_abs_diff(final(a), final(b)) <= 1e-6
    lrs = lambda d: [(r["step"], r["lr"]) for r in read_records(d, "train")]
    assert lrs(a) == lrs(b)
    losses = lambda d: [r["loss"] for r in read_records(d, "train")]
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    states = [json.loads((d / "checkpoints" / "step-0000006" / "trainer_state.json").read_text()) for d in (a, b)]
    assert states[0]["latent_scale"] == states[1]["latent_scale"] > 0
    assert states[0]["simulations"] == ["DPM", "IRT2"]

    # the checkpoint layout: diffusers UNet, condition encoder, EMA, scale, accelerate state
    c = a / "checkpoints" / "step-0000006"
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "cond_encoder.safetensors",
              "ema.safetensors", "latent_scale.json", "accelerate", "config.yaml", "trainer_state.json"):
        assert (c / f).exists(), f
    assert json.loads((c / "latent_scale.json").read_text())["latent_scale"] == states[0]["latent_scale"]
    from diffusers import UNet2DModel
    assert UNet2DModel.from_pretrained(c / "unet").config.num_class_embeds == 2
    for f in ("metrics.jsonl", "run.json", "config.yaml", "train.log", "tb", "samples/step-0000006.png"):
        assert (a / f).exists(), f


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


def test_missing_vae_checkpoint_is_one_line(tmp_path, prior_trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, prior_trainer, **{"prior": {"vae_checkpoint": "best"}})
    assert run(monkeypatch, cfg) == 2
    line = error_line(capsys)
    assert "no stage-1 VAE checkpoint" in line and "train_vae.py" in line and str(tmp_path / "run") in line
    assert not (tmp_path / "run" / "prior").exists()         # nothing written
    cfg = trainer_config(tmp_path, prior_trainer, **{"prior": {"vae_checkpoint": str(tmp_path / "nope")}})
    assert run(monkeypatch, cfg) == 2
    assert "nope" in error_line(capsys)


def test_vae_of_another_shape_is_one_line(tmp_path, prior_trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, prior_trainer, **{"vae.model": {"latent_channels": 3}})
    assert run(monkeypatch, cfg) == 2
    line = error_line(capsys)
    assert "do not match" in line and "vae.model" in line and "shape" in line


def test_dry_run_prints_key_points(tmp_path, prior_trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, prior_trainer, **{"prior.train": {"max_steps": 100, "warmup_steps": 10}})
    assert run(monkeypatch, cfg, "--dry-run") == 0
    out = capsys.readouterr().out
    for label in ("(start)", "(end of warmup)", "(25%)", "(50%)", "(75%)", "(100%)"):
        assert label in out
    assert "lr 1.000e-04  (100%)" in out and "prior:" in out
    assert not (tmp_path / "run").exists()


def test_prior_refuses_validation_maps_the_vae_trained_on(tmp_path, prior_trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, prior_trainer, **{"data": {"split_seed": 1},
                                                    "prior.train": {"max_steps": 1, "warmup_steps": 0}})
    assert run(monkeypatch, cfg) == 2
    err = error_line(capsys)
    assert "2 of the 2 validation maps were training maps of the VAE checkpoint" in err and "--allow-overlap" in err
    assert not (tmp_path / "run" / "prior").exists()         # nothing written
    assert run(monkeypatch, cfg, "--allow-overlap") == 0
    run_json = json.loads((tmp_path / "run" / "prior" / "run.json").read_text())
    assert run_json["allow_overlap"][0]["maps"] == 2 and run_json["split"]["seed"] == 1
    assert run_json["vae_step"] == 3
