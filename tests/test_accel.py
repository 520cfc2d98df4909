"""lib.train.accel: the precision a run trains in (auto, the launcher's flag, recorded), the TF32
switch (never slower than PyTorch's defaults), channels_last, compile and gradient
checkpointing (the same training, checkpoints interchangeable, exact resume)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import train_vae
from lib.config import PriorModelConfig, TrainConfig, VAEModelConfig, load_config
from lib.errors import ConfigError, UserError
from lib.models.prior import LatentPrior
from lib.models.vae import VAEWithLogvar
from lib.train.accel import DEFAULT_PRECISION, apply_backend_flags, backend_flags, prepare_model, resolve_precision
from tests.helpers import (TRAINERS, checkpoint_tensors, max_abs_diff, read_records, run_main, tiny_config,
                           trainer_config)


def fp32_precision() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.fixture(autouse=True)
def keep_backend_flags():
    before = fp32_precision()
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("name", ["configs/demo.yaml", "configs/m.yaml", "configs/m_cars.yaml"])
def test_shipped_configs_take_the_fast_path_on_a_gpu_and_change_nothing_on_a_cpu(name):
    cfg = load_config(name)
    for stage, tcfg in (("vae", cfg.vae.train), ("prior", cfg.prior.train)):
        assert (tcfg.mixed_precision, tcfg.tf32, tcfg.compile, tcfg.gradient_checkpointing) == ("auto", True, False, False)
        # m.yaml's stage 1 runs channels_last: measured faster, same results to float rounding
        assert tcfg.channels_last == (stage == "vae" and name != "configs/demo.yaml")
        key = f"{stage}.train.mixed_precision"
        cpu = resolve_precision(tcfg, key, env={}, cuda=False)
        assert (cpu.mixed_precision, cpu.tf32, cpu.device) == ("no", False, "cpu")
        gpu = resolve_precision(tcfg, key, env={}, cuda=True, bf16_supported=True)
        assert (gpu.mixed_precision, gpu.tf32) == ("bf16", True) and "supports bf16" in gpu.chosen_by
        old = resolve_precision(tcfg, key, env={}, cuda=True, bf16_supported=False)     # e.g. a V100
        assert old.mixed_precision == "no" and "has no bf16" in old.chosen_by
    assert TrainConfig().mixed_precision == "auto" and TrainConfig().tf32 is True


@pytest.mark.parametrize("setting, launcher, cuda, expected, why", [
    ("auto", None, False, "no", "auto; no GPU"),
    ("auto", "no", True, "bf16", "supports bf16"),           # a launcher's "no" is its default, not a choice
    ("auto", "bf16", False, "bf16", "accelerate launch --mixed_precision bf16"),
    ("auto", "fp16", True, "fp16", "accelerate launch --mixed_precision fp16"),
    ("bf16", "bf16", True, "bf16", "vae.train.mixed_precision: bf16"),
    ("no", "no", True, "no", "vae.train.mixed_precision: no"),
    ("bf16", None, False, "bf16", "vae.train.mixed_precision: bf16"),
])
def test_precision_from_the_config_and_the_launcher(setting, launcher, cuda, expected, why):
    env = {} if launcher is None else {"ACCELERATE_MIXED_PRECISION": launcher}
    p = resolve_precision(TrainConfig(mixed_precision=setting), "vae.train.mixed_precision", env=env, cuda=cuda,
                          bf16_supported=True)
    assert p.mixed_precision == expected and why in p.chosen_by


def test_disagreements_and_impossible_precisions_are_one_line_errors():
    key = "vae.train.mixed_precision"
    with pytest.raises(UserError, match=r"^accelerate launch --mixed_precision bf16 disagrees with "
                                        r"vae.train.mixed_precision = 'no'; drop the launcher's flag, or pass --set "
                                        r"vae.train.mixed_precision=auto \(the launcher's choice wins\) or --set "
                                        r"vae.train.mixed_precision=bf16$"):
        resolve_precision(TrainConfig(mixed_precision="no"), key, env={"ACCELERATE_MIXED_PRECISION": "bf16"}, cuda=True)
    with pytest.raises(UserError, match=r"disagrees with vae.train.mixed_precision = 'fp16'"):
        resolve_precision(TrainConfig(mixed_precision="fp16"), key, env={"ACCELERATE_MIXED_PRECISION": "bf16"}, cuda=True)
    with pytest.raises(UserError, match=r"^vae.train.mixed_precision = 'fp16' needs a CUDA GPU"):
        resolve_precision(TrainConfig(mixed_precision="fp16"), key, env={}, cuda=False)
    with pytest.raises(UserError, match=r"--mixed_precision fp8: not supported"):
        resolve_precision(TrainConfig(), key, env={"ACCELERATE_MIXED_PRECISION": "fp8"}, cuda=True)


def test_unquoted_no_is_the_value_no(tmp_path, tiny_data):
    """YAML reads an unquoted ``no`` as false; where ``no`` is a value it means ``no``."""
    cfg = load_config(tiny_config(tmp_path, tiny_data), ["vae.train.mixed_precision=no", "prior.train.mixed_precision=false"])
    assert cfg.vae.train.mixed_precision == "no" and cfg.prior.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"vae.train.mixed_precision = True is invalid; expected one of 'auto', 'no'"):
        load_config(tiny_config(tmp_path, tiny_data), ["vae.train.mixed_precision=yes"])


def test_the_launchers_precision_is_used_and_recorded(tmp_path, tiny_data, monkeypatch, capsys):
    """`accelerate launch --mixed_precision bf16` with mixed_precision: auto trains in bf16 and says
    so; with an explicit other value the run refuses in one line before writing anything."""
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"max_steps": 2, "warmup_steps": 0, "checkpoint_every": 2,
                                                            "val_every": 2}})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert run_main(train_vae, ["--config", cfg], monkeypatch) == 0
    run = tmp_path / "run" / "vae"
    precision = json.loads((run / "run.json").read_text())["precision"]
    assert precision["mixed_precision"] == "bf16" and "accelerate launch --mixed_precision bf16" in precision["chosen_by"]
    start = [r for r in read_records(run, "event") if r["event"] == "start"][0]
    assert start["precision"] == precision and "bf16 autocast on cpu" in start["message"]

    capsys.readouterr()
    other = tiny_config(tmp_path, tiny_data, "other.yaml", output_dir=str(tmp_path / "other"),
                        **{"vae.train": {"mixed_precision": "no"}})
    assert run_main(train_vae, ["--config", other], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disagrees with vae.train.mixed_precision = 'no'" in err[0]
    assert not (tmp_path / "other").exists()


def test_dry_run_shows_the_resolved_precision(tmp_path, tiny_data, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tiny_data)
    assert run_main(train_vae, ["--config", cfg, "--dry-run"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "# precision\nfloat32 on cpu (vae.train.mixed_precision: auto; no GPU)" in out


# ----------------------------------------------------------------------------- TF32
def test_tf32_switch_never_goes_below_pytorchs_defaults():
    apply_backend_flags(TrainConfig(tf32=True))
    assert fp32_precision() == ("tf32", "tf32")
    apply_backend_flags(TrainConfig(tf32=False))          # PyTorch's defaults: TF32 convolutions, IEEE matmuls
    assert fp32_precision() == (DEFAULT_PRECISION["matmul"], DEFAULT_PRECISION["conv"]) == ("none", "tf32")
    apply_backend_flags(TrainConfig(tf32=True))
    with backend_flags(None):                             # bench.py's reference step
        assert fp32_precision() == ("none", "tf32")
    assert fp32_precision() == ("tf32", "tf32")


# ----------------------------------------------------------------------------- model switches
TINY_VAE = VAEModelConfig(block_out_channels=[8, 16], norm_num_groups=8, layers_per_block=1, latent_channels=2)
TINY_UNET = PriorModelConfig(block_out_channels=[16, 32], layers_per_block=1, attention_levels=[False, True],
                             norm_num_groups=8, attention_head_dim=8, cond_channels=8)


def test_prepare_model_keeps_the_module_and_its_state_dict_keys():
    plain = VAEWithLogvar(TINY_VAE, 32)
    keys = list(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    expected = plain.vae.decode(plain.vae.encode(x).latent_dist.mode()).sample

    out = prepare_model(plain, TrainConfig(channels_last=True))
    assert out is plain and list(out.state_dict()) == keys
    conv = out.vae.encoder.down_blocks[0].resnets[0].conv1.weight      # 8 -> 8 channels
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    got = out.vae.decode(out.vae.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    compiled = prepare_model(out, TrainConfig(compile=True))      # in place, compiled lazily
    assert compiled is plain and list(compiled.state_dict()) == keys
    assert compiled._compiled_call_impl is not None
    with pytest.raises(ConfigError, match=r"vae.train.compile_backend = 'nope' is not a torch.compile backend"):
        prepare_model(VAEWithLogvar(TINY_VAE, 32), TrainConfig(compile=True, compile_backend="nope"), "vae.train")


def grads_of(module: torch.nn.Module, loss_fn) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    loss_fn(module).backward()
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("which", ["vae", "prior"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(which):
    torch.manual_seed(0)
    if which == "vae":
        net, x = VAEWithLogvar(TINY_VAE, 32), torch.randn(2, 1, 32, 32)
        loss = lambda m: m(x, sample_posterior=False)[0].pow(2).mean()     # noqa: E731
        inner = lambda m: m.vae                                            # noqa: E731
    else:
        net = LatentPrior(TINY_UNET, 2, 32, 2, 1)
        z, cond = torch.randn(2, 2, 16, 16), torch.rand(2, 3, 32, 32) * 2 - 1
        loss = lambda m: m(z, torch.tensor([10, 500]), cond, torch.tensor([0, 0])).pow(2).mean()   # noqa: E731
        inner = lambda m: m.unet                                           # noqa: E731
    plain = grads_of(net, loss)
    recomputed = []
    prepare_model(net, TrainConfig(gradient_checkpointing=True))
    assert inner(net).is_gradient_checkpointing
    from diffusers.models.resnet import ResnetBlock2D
    first = next(m for m in inner(net).modules() if isinstance(m, ResnetBlock2D))
    first.register_forward_pre_hook(lambda *a: recomputed.append(1))    # (recomputing may stop early)
    checkpointed = grads_of(net, loss)
    assert len(recomputed) >= 2              # the block ran again in the backward pass
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match=r"prior.train.gradient_checkpointing: Linear has no diffusers model"):
        prepare_model(torch.nn.Linear(2, 2), TrainConfig(gradient_checkpointing=True), "prior.train")


# ----------------------------------------------------------------------------- trainers
def test_trainer_with_channels_last_runs_and_resumes_exactly(tmp_path, tiny_data, monkeypatch):
    """Both phases (disc_start 3) with channels_last weights and their optimizer
    (lib.train.optim.ChannelsLastAdamW); stopped at step 3 and resumed, the same as straight through."""
    def config(name):
        return tiny_config(tmp_path, tiny_data, f"{name}.yaml", output_dir=str(tmp_path / name),
                           **{"vae.train": {"channels_last": True, "checkpoint_every": 3, "val_every": 3}})
    assert run_main(train_vae, ["--config", config("a")], monkeypatch) == 0
    recs = read_records(tmp_path / "a" / "vae", "train")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and all(r["rec_loss"] > 0 for r in recs)
    assert run_main(train_vae, ["--config", config("b"), "--until-step", "3"], monkeypatch) == 0
    assert run_main(train_vae, ["--config", config("b"), "--resume", "latest"], monkeypatch) == 0
    last = lambda name: checkpoint_tensors(tmp_path / name / "vae" / "checkpoints" / "step-0000006")
    assert max_abs_diff(last("a"), last("b")) <= 1e-6


GRAPH_CALLS = {"n": 0}


def _counted(backend: str):
    """torch.compile's ``backend`` (aot_eager: graph capture and AOT autograd without code
    generation; eager: graph capture only), counting the calls of the graphs it compiled."""
    def compile_fn(gm, example_inputs, **kwargs):
        from torch._dynamo.backends.registry import lookup_backend
        compiled = lookup_backend(backend)(gm, example_inputs, **kwargs)

        def run(*args):
            GRAPH_CALLS["n"] += 1
            return compiled(*args)
        return run
    return compile_fn


def _register_counted_backends() -> None:
    from torch._dynamo import list_backends
    from torch._dynamo.backends.registry import register_backend
    for backend in ("aot_eager", "eager"):
        if f"{backend}_counted" not in list_backends(exclude_tags=()):
            register_backend(_counted(backend), name=f"{backend}_counted")


COMPILE = {"compile": True, "compile_backend": "aot_eager_counted", "checkpoint_every": 2, "val_every": 2,
           "max_steps": 4, "warmup_steps": 1}


@pytest.mark.parametrize("stage", ["vae", "prior"])
def test_compiled_trainer_passes_disc_start_validates_and_resumes_exactly(stage, tmp_path, tiny_data, monkeypatch):
    """compile (aot_eager: torch.compile's graph capture and compiled autograd, without code
    generation) through disc_start at step 2 (the adaptive weight's gradients once crashed a compiled
    backward there), validation and checkpoints; stopped at step 2 and resumed, the same as straight
    through."""
    import torch._dynamo
    _register_counted_backends()
    torch._dynamo.reset()
    spec = dataclasses.replace(TRAINERS[stage], data_root=tiny_data)
    sections = {f"{stage}.train": COMPILE, **({"vae.loss": {"disc_start": 2}} if stage == "vae" else {})}

    def config(name):
        return trainer_config(tmp_path, spec, f"{name}.yaml", output_dir=str(tmp_path / name),
                              **sections)
    runs = []
    for name, argvs in (("a", [[]]), ("b", [["--until-step", "2"], ["--resume", "latest"]])):
        for extra in argvs:
            before = GRAPH_CALLS["n"]             # (later runs reuse the graphs compiled by the first)
            assert run_main(spec.module, ["--config", config(name), *extra], monkeypatch) == 0
            runs.append(GRAPH_CALLS["n"] - before)
    assert all(n > 0 for n in runs)               # compiled graphs ran in every run
    recs = read_records(tmp_path / "a" / stage, "train")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r[spec.watched] > 0 for r in recs)
    if stage == "vae":
        assert recs[2]["d_weight"] > 0 and recs[2]["disc_loss"] > 0          # the GAN phase trained
    last = lambda name: checkpoint_tensors(tmp_path / name / stage / "checkpoints" / "step-0000004")
    assert max_abs_diff(last("a"), last("b")) <= 1e-6
    val = lambda name: [r[spec.watched] for r in read_records(tmp_path / name / stage, "val")]   # noqa: E731
    assert len(val("a")) == 2 and val("a") == val("b")


def test_every_objective_compiles_to_the_same_loss_gradients_and_samples():
    """Every objective's loss, gradients and samples through the compiled prior (graph capture,
    ``eager`` backend: each objective calls the UNet its own way) equal the plain prior's."""
    import copy

    import torch._dynamo

    from lib.config import DiffusionConfig
    from lib.models.objectives import REGISTRY, make_objective
    cond, latents, sim = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 2, 16, 16), torch.tensor([0, 1])
    _register_counted_backends()
    torch._dynamo.reset()
    for name in REGISTRY:
        objective = make_objective(DiffusionConfig(objective=name, num_inference_steps=2))
        torch.manual_seed(0)
        eager = LatentPrior(TINY_UNET, 2, 32, 2, 2, objective.outputs)
        compiled = prepare_model(copy.deepcopy(eager), TrainConfig(compile=True, compile_backend="eager_counted"))
        out = {}
        for label, net in (("eager", eager), ("compiled", compiled)):
            before = GRAPH_CALLS["n"]
            loss = objective.loss(net, latents, cond, sim, torch.Generator().manual_seed(1))
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
            with torch.no_grad():
                net.eval()
                sample = objective.sample(net, cond, sim, 2, generator=torch.Generator().manual_seed(2))
            out[label] = (loss.detach(), grads, sample)
            assert (GRAPH_CALLS["n"] > before) == (label == "compiled"), name
        for a, b in zip(out["eager"], out["compiled"]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
