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
from lib.data.condition import distance_map, obstruction_map
from lib.data.dataset import build_datasets
from lib.errors import ConfigError, UserError
from lib.models.latents import encode_latents, measure_latent_scale
from lib.models.objectives import (REGISTRY, RadioDiff, Regression, choose_sampler, generate_maps, make_objective,
                                   register)
from lib.models.prior import LatentPrior
from lib.train.schedule import lr_at
from lib.train.weights import load_vae
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


def build_prior(cfg, vae, seed=0, outputs=1):
    torch.manual_seed(seed)
    return LatentPrior(cfg.prior.model, cfg.vae.model.latent_channels, cfg.data.image_size,
                       vae.downsample, len(cfg.data.simulation), outputs).eval()


def diffusion_cfg(cfg, **changes):
    from dataclasses import replace
    return replace(cfg.prior.diffusion, **changes)


def batch_of(ds, n=2):
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def test_latent_scale_gives_unit_variance(tiny):
    cfg, data, loaded = tiny
    train = data["train"]
    scale = measure_latent_scale(lambda b: encode_latents(loaded.vae, b["image"]), train, 4, 100)   # every sample
    z = encode_latents(loaded.vae, batch_of(train, len(train))["image"]) * scale
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    assert abs(1.0 / scale - 1.0) > 0.05          # the raw latents are not unit scale already
    # fewer batches: spread over the split, close to the same factor
    assert measure_latent_scale(lambda b: encode_latents(loaded.vae, b["image"]), train, 2, 2) == pytest.approx(scale, rel=0.5)


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
    maps = [generate_maps(prior, loaded.vae, 1.0, b["cond"], torch.tensor([s, s]), make_objective(cfg.prior.diffusion),
                          2, generator=gen()) for s in (0, 1)]
    assert (maps[0] - maps[1]).abs().max() > 1e-5


def test_obstruction_channel_is_the_share_of_the_path_in_buildings():
    cond = -torch.ones(1, 3, 64, 64)
    cond[0, 0, 20:30, :] = 1.0                                   # a wall across the map, rows 20-29
    cond[0, 1, 5, 5] = 1.0                                        # the transmitter above it
    m = (obstruction_map(cond)[0, 0] + 1) / 2                     # share in [0, 1]
    assert m[5, 60] == 0 and m[15, 5] == 0                        # line of sight: nothing crossed
    assert m[60, 5].item() == pytest.approx(10 / 55, abs=0.03)    # straight down: 10 of 55 px are wall
    assert m[40, 5] > m[60, 5]                                    # the same wall is a larger share of a shorter path
    assert obstruction_map(cond).shape == (1, 1, 64, 64) and obstruction_map(cond).min() >= -1


def test_distance_channel_spreads_the_transmitter_over_the_map():
    cond = -torch.ones(1, 3, 32, 32)
    cond[0, 1, 3, 5] = 1.0
    d = distance_map(cond)[0, 0]
    assert d[3, 5] == -1.0 and d.max() <= 1.0 and d[31, 31] > 0.8
    assert d[3, 10] < d[3, 20] < d[3, 31]                     # grows with the distance


SAMPLINGS = ([("ddpm", {"prediction_type": p, "sampler": sp}) for p in ("epsilon", "v_prediction", "sample")
              for sp in ("ddim", "dpm")] + [("flow", {"sampler": "euler"}), ("flow", {"sampler": "heun"}),
                                            ("radiodiff", {}), ("regression", {})])


@pytest.mark.parametrize("objective,changes", SAMPLINGS, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_one_and_multi_step_sampling(tiny, objective, changes):
    cfg, data, loaded = tiny
    dcfg = diffusion_cfg(cfg, objective=objective, **changes)
    obj = make_objective(dcfg)
    prior = build_prior(cfg, loaded, outputs=obj.outputs)
    b = batch_of(data["val"], 3)
    rng = torch.get_rng_state()
    if objective == "ddpm":
        sched = obj.sampling_scheduler()
        sched.set_timesteps(1)
        assert sched.timesteps[0] == dcfg.num_train_timesteps - 1      # one step starts from pure noise
    for steps in (1, 4):
        maps = generate_maps(prior, loaded.vae, 2.0, b["cond"], b["sim_id"], obj, steps,
                             generator=torch.Generator().manual_seed(1))
        assert maps.shape == (3, 1, cfg.data.image_size, cfg.data.image_size)
        assert torch.isfinite(maps).all() and maps.min() >= -1 and maps.max() <= 1
        again = generate_maps(prior, loaded.vae, 2.0, b["cond"], b["sim_id"], obj, steps,
                              generator=torch.Generator().manual_seed(1))
        assert torch.equal(maps, again)
    # the validation loss with a generator is reproducible and draws nothing from the global RNG
    latents = encode_latents(loaded.vae, b["image"])
    losses = [obj.loss(prior, latents, b["cond"], b["sim_id"], torch.Generator().manual_seed(2)) for _ in range(2)]
    assert losses[0].item() == losses[1].item() and torch.isfinite(losses[0])
    assert torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------------- the objectives' equations
class Oracle(torch.nn.Module):
    """A network that knows the clean latent x0: given x_t and t it returns the true target of
    its objective (exactly what a perfect model would), so a sampler must return x0."""

    def __init__(self, x0: torch.Tensor, objective: str) -> None:
        super().__init__()
        self.x0, self.objective = x0, objective
        self.latent_channels, self.latent_size = x0.shape[1], x0.shape[-1]
        self.calls = 0

    def encode_cond(self, cond):
        return cond

    def denoise(self, x, t, features, sim_id):
        self.calls += 1
        t = (t.double() / 1000.0).view(-1, 1, 1, 1)
        x, x0 = x.double(), self.x0.double()
        if self.objective == "radiodiff":                 # x_t = (1 - t) x0 + sqrt(t) eps
            eps = (x - (1 - t) * x0) / t.sqrt()
            return torch.cat([-x0, eps], dim=1).float()
        return ((x - x0) / t).float()                     # flow: x_t = (1 - t) x0 + t eps, v = eps - x0

    def forward(self, x, t, cond, sim_id):
        return self.denoise(x, t, cond, sim_id)


@pytest.mark.parametrize("objective", ["radiodiff", "flow"])
def test_forward_process_and_reconstruction_are_exact_inverses(objective):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64) * 0.999 + 1e-3
    tt = t.view(-1, 1, 1, 1)
    if objective == "radiodiff":
        x_t = RadioDiff.forward_process(x0, t, eps)
        assert torch.allclose(x_t, (1 - tt) * x0 + tt.sqrt() * eps, atol=1e-12)     # x0 + C t + sqrt(t) eps
        assert torch.allclose(RadioDiff.reconstruct(x_t, t, -x0, eps), x0, atol=1e-12)
        assert torch.allclose(RadioDiff.forward_process(x0, torch.ones(4, dtype=torch.float64), eps), eps)
    else:
        x_t = (1 - tt) * x0 + tt * eps
        assert torch.allclose(x_t - tt * (eps - x0), x0, atol=1e-12)                 # one Euler step to t = 0


@pytest.mark.parametrize("objective,sampler", [("radiodiff", None), ("flow", "euler"), ("flow", "heun")])
@pytest.mark.parametrize("steps", [1, 4])
def test_an_oracle_network_makes_the_sampler_return_x0(tiny, objective, sampler, steps):
    cfg, _, _ = tiny
    x0 = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    oracle = Oracle(x0, objective)
    obj = make_objective(diffusion_cfg(cfg, objective=objective, sampler=sampler))
    out = obj.sample(oracle, torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), steps,
                     generator=torch.Generator().manual_seed(4))
    assert (out - x0).abs().max() < 1e-5
    assert oracle.calls == obj.evaluations(steps, sampler)


def test_radiodiff_loss_weights_and_l1_variant(tiny):
    """The loss is w1 |C^ - C|^2 + w2 |eps^ - eps|^2 with w1 = 2 e^(1-t), w2 = e^sqrt(t); its
    L1+L2 variant halves the sum of both kinds: checked against a direct computation."""
    cfg, _, _ = tiny
    x0 = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(5))

    class Constant(torch.nn.Module):             # predicts C^ = 0.5, eps^ = -0.25 everywhere
        def forward(self, x, t, cond, sim_id):
            self.t = t / 1000.0
            return torch.cat([torch.full_like(x, 0.5), torch.full_like(x, -0.25)], dim=1)

    net = Constant()
    for loss_type, weighting in (("l2", True), ("l1_l2", True), ("l2", False)):
        obj = make_objective(diffusion_cfg(cfg, objective="radiodiff", radiodiff_loss=loss_type,
                                           radiodiff_weighting=weighting))
        g = torch.Generator().manual_seed(6)
        loss = obj.loss(net, x0, None, None, g)
        g = torch.Generator().manual_seed(6)
        eps = torch.randn(x0.shape, generator=g)
        t = 1e-4 + (1 - 1e-4) * torch.rand(3, generator=g)
        assert torch.allclose(net.t, t)
        w1, w2 = (2 * torch.exp(1 - t), torch.exp(t.sqrt())) if weighting else (torch.ones(3), torch.ones(3))
        c_err, e_err = 0.5 + x0, -0.25 - eps
        expected = w1 * (c_err ** 2).mean((1, 2, 3)) + w2 * (e_err ** 2).mean((1, 2, 3))
        if loss_type == "l1_l2":
            expected = 0.5 * (expected + w1 * c_err.abs().mean((1, 2, 3)) + w2 * e_err.abs().mean((1, 2, 3)))
        assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-6)


class Echo(torch.nn.Module):
    """A "network" whose C^ and eps^ are fixed functions of its input x_t, so that the loss and
    the sampler depend on the forward process and on every update by hand-checkable amounts."""
    latent_channels, latent_size = 2, 4

    def encode_cond(self, cond):
        return cond

    def denoise(self, x, t, features, sim_id):
        self.seen_t = t / 1000.0
        return torch.cat([0.5 * x, -0.25 * x + 0.1], dim=1)

    def forward(self, x, t, cond, sim_id):
        return self.denoise(x, t, cond, sim_id)


def test_radiodiff_loss_and_sampler_equal_a_hand_computation(tiny):
    """RadioDiff's objective for a fixed tiny input, step by step by hand: the forward process
    x_t = x0 - x0 t + sqrt(t) eps (C = -x0), the loss on C and eps, and two sampler steps
    x <- x + s x0^ - (s / sqrt(t)) eps^ + sqrt(s (t - s) / t) z, returning x0^ at the last."""
    cfg, _, _ = tiny
    obj = make_objective(diffusion_cfg(cfg, objective="radiodiff", radiodiff_loss="l2", radiodiff_weighting=True))
    net, x0 = Echo(), torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    loss = obj.loss(net, x0, None, None, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    eps = torch.randn(x0.shape, generator=g)
    t = 1e-4 + (1 - 1e-4) * torch.rand(2, generator=g)
    tt = t.view(-1, 1, 1, 1)
    x_t = x0 - x0 * tt + tt.sqrt() * eps
    c_hat, eps_hat = 0.5 * x_t, -0.25 * x_t + 0.1
    per_sample = lambda e: (e ** 2).mean((1, 2, 3))      # noqa: E731
    expected = 2 * torch.exp(1 - t) * per_sample(c_hat + x0) + torch.exp(t.sqrt()) * per_sample(eps_hat - eps)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-6)

    out = obj.sample(net, torch.zeros(2, 3, 8, 8), None, 2, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, 4, 4, generator=g)                 # the start, t = 1
    c, e = 0.5 * x, -0.25 * x + 0.1
    x0_hat = x - c * 1.0 - 1.0 * e
    x = x + 0.5 * x0_hat - (0.5 / 1.0) * e + (0.5 * 0.5 / 1.0) ** 0.5 * torch.randn(2, 2, 4, 4, generator=g)
    c, e = 0.5 * x, -0.25 * x + 0.1                           # t = 0.5, the last step
    expected = x - c * 0.5 - 0.5 ** 0.5 * e
    assert torch.allclose(net.seen_t, torch.full((2,), 0.5))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


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
    assert run(monkeypatch, cfg, "--set", "seed=3") == 2
    line = error_line(capsys)
    assert "no complete stage-1 VAE checkpoint" in line and str(tmp_path / "run") in line
    assert f"run `python train_vae.py --config {cfg} --set seed=3` first" in line     # the user's own flags
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


# ----------------------------------------------------------------------------- the registry
def test_the_registry_checks_objectives_and_samplers_in_one_line(tiny):
    cfg = tiny[0]
    with pytest.raises(ConfigError) as err:
        make_objective(diffusion_cfg(cfg, objective="score"))
    assert "prior.diffusion.objective: 'score' is not an objective; expected one of ddpm, radiodiff, flow, " \
           "regression" in str(err.value)
    with pytest.raises(ConfigError) as err:
        make_objective(diffusion_cfg(cfg, objective="flow", sampler="ddim"))
    assert "prior.diffusion.sampler: 'ddim' is not a sampler of objective flow; expected null or euler or heun" \
        in str(err.value)
    assert choose_sampler(diffusion_cfg(cfg, objective="flow", sampler=None), None) == "euler"
    assert choose_sampler(diffusion_cfg(cfg, objective="ddpm", sampler="ddim"), "dpm") == "dpm"
    with pytest.raises(UserError, match="--sampler heun: objective ddpm samples with ddim or dpm"):
        choose_sampler(diffusion_cfg(cfg, objective="ddpm"), "heun")


def test_a_new_objective_is_one_registered_class(tiny, monkeypatch):
    """What "adding an objective touches one file" means: a class registered under its name is
    accepted by the config check and the samplers, and gives the prior its outputs, its loss and
    its samples."""
    cfg, data, vae = tiny
    monkeypatch.setattr("lib.models.objectives.REGISTRY", dict(REGISTRY))

    @register
    class Halved(Regression):
        name, samplers = "halved", ("half",)

        def sample(self, prior, cond, sim_id, steps, sampler=None, generator=None):
            return super().sample(prior, cond, sim_id, steps, sampler, generator) / 2

    dcfg = diffusion_cfg(cfg, objective="halved")
    objective = make_objective(dcfg)
    assert isinstance(objective, Halved) and choose_sampler(dcfg, None) == "half"
    prior, batch = build_prior(cfg, vae, outputs=objective.outputs), batch_of(data["train"])
    latents = encode_latents(vae.vae, batch["image"])
    assert torch.isfinite(objective.loss(prior, latents, batch["cond"], batch["sim_id"]))
    reference = make_objective(diffusion_cfg(cfg, objective="regression"))
    with torch.no_grad():
        torch.testing.assert_close(objective.sample(prior, batch["cond"], batch["sim_id"], 1),
                                   reference.sample(prior, batch["cond"], batch["sim_id"], 1) / 2)
    import lib.models.objectives as objectives
    assert "halved" in objectives.REGISTRY
