"""bench.py: runs both stages on a tiny config and writes its JSON; its stage-1 step is the
trainer's step (same losses, step by step). No timing is asserted."""
from __future__ import annotations

import json

import pytest
import torch

import bench
import train_vae
from lib.cli import bench_parser
from lib.config import load_config
from lib.data.dataset import build_datasets
from lib.errors import UserError
from lib.train.accel import make_accelerator
from tests.helpers import TINY_PRIOR, read_records, reset_accelerate, run_main, tiny_config

REQUIRED = ["steps_per_sec", "samples_per_sec", "reference_steps_per_sec", "ratio_vs_reference",
            "data_samples_per_sec", "data_samples_per_sec_png", "data_samples_per_sec_cached",
            "peak_rss_mb", "time_split", "time_share", "flops_per_sample", "tflops_per_sec"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    threads = torch.get_num_threads()
    reset_accelerate()
    yield
    reset_accelerate()
    torch.set_num_threads(threads)          # --threads 1 below: for speed on a busy machine


def test_vae_bench_writes_json(tmp_path, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data)
    out = tmp_path / "bench.json"
    assert bench.main(["--config", str(cfg), "--stage", "vae", "--steps", "2", "--warmup", "0",
                       "--data-seconds", "0.05", "--trainer-run", "3", "--threads", "1", "--no-memory", "--json", str(out),
                       "--profile", str(tmp_path / "profile.txt")]) == 0
    r = json.loads(out.read_text())
    assert all(k in r for k in REQUIRED)
    assert set(r["time_split"]) == {"data", "forward", "backward", "optimizer", "logging", "other"}
    assert set(r["phases"]) == {"pre_disc_start", "post_disc_start"}
    for phase in r["phases"].values():
        assert phase["toolkit"]["steps_per_sec"] > 0 and phase["reference"]["steps_per_sec"] > 0
        assert phase["ratio_vs_reference"] > 0
    assert r["ratio_vs_reference"] > 0 and r["data_path"] == "png"
    # FLOPs: counted per step and phase; the headline is their run-weighted mean per sample
    w, bs = r["phase_weights"], r["batch_size"]
    flops = sum(w[p] * r["phases"][p]["toolkit"]["flops_per_step"] for p in w)
    assert r["flops_per_sample"] == round(flops / bs) > 0
    assert r["tflops_per_sec"] == pytest.approx(r["flops_per_sample"] * r["samples_per_sec"] / 1e12, rel=1e-2)
    pre, post = (r["phases"][p]["toolkit"]["flops_per_step"] for p in ("pre_disc_start", "post_disc_start"))
    ref_pre = r["phases"]["pre_disc_start"]["reference"]["flops_per_step"]
    assert post > pre and ref_pre > pre            # the discriminator's passes; the reference's second VAE forward
    assert r["peak_rss_mb"] is None                   # --no-memory: no child processes (slow to start)
    t = r["trainer_run"]                     # tiny config: a validation and a checkpoint at step 3
    assert t["steps"] == 3 and t["validation_s"] > 0 and t["checkpoint_s"] > 0 and t["logging_s"] > 0
    assert 0 < t["overhead_share"] < 1
    assert "ratio" in capsys.readouterr().out
    profile = (tmp_path / "profile.txt").read_text()          # one step of each kind, its operators
    for kind in ("pre_disc_start, toolkit", "pre_disc_start, reference", "post_disc_start, toolkit"):
        assert f"=== stage 1, {kind}: one step" in profile
    assert "phase:backward" in profile and "aten::convolution_backward" in profile


def test_count_flops_equals_the_formula():
    """torch.utils.flop_counter through bench's counter: a linear layer's forward (2 B I O) and its
    backward to the weight only (2 B I O more), and a 3x3 convolution's forward."""
    from lib.bench.measure import count_flops
    lin, x = torch.nn.Linear(16, 8, bias=False), torch.randn(4, 16)
    assert count_flops(lambda t: lin(x).sum().backward(), torch.device("cpu")) == 2 * (2 * 4 * 16 * 8)
    conv, img = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert count_flops(lambda t: conv(img), torch.device("cpu")) == 2 * 2 * 5 * 8 * 8 * 3 * 3 * 3


def test_reference_step_runs_under_pytorchs_default_precision(tmp_path, tiny_data, monkeypatch):
    """The toolkit's step under its config's TF32 switch, the reference's under PyTorch's defaults
    (as RadioDiff's users ran it), taking turns in one process."""
    from lib.bench.reference_step import ReferenceVAE
    seen = {"toolkit": set(), "reference": set()}
    flags = lambda: (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)  # noqa: E731
    ref_step, tk_step = ReferenceVAE.step, bench.TrainerStep.step
    monkeypatch.setattr(ReferenceVAE, "step", lambda self, *a: (seen["reference"].add(flags()), ref_step(self, *a))[1])
    monkeypatch.setattr(bench.TrainerStep, "step", lambda self, *a: (seen["toolkit"].add(flags()), tk_step(self, *a))[1])
    before = flags()
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"tf32": True}})
    assert bench.main(["--config", str(cfg), "--stage", "vae", "--steps", "1", "--warmup", "0", "--phase", "pre",
                       "--data-seconds", "0.02", "--threads", "1", "--no-memory"]) == 0
    assert seen == {"toolkit": {("tf32", "tf32")}, "reference": {("none", "tf32")}}
    assert flags() == before                     # restored after each step


def test_prior_variants_each_have_their_own_vae(tmp_path, tiny_data):
    """With the latent cache the trainer moves the frozen encoder off the device; the variant that
    encodes every batch must keep its own on the device (sharing one VAE broke bf16 on CUDA)."""
    prior = {k: v for k, v in TINY_PRIOR.items() if k in ("model", "diffusion")}
    cfg = load_config(tiny_config(tmp_path, tiny_data, prior=prior))
    acc = make_accelerator(cfg.prior.train)
    calls = []
    real = bench.TrainerStep.__init__

    def spy(self, stage, cfg, accelerator, dataset, run_dir, vae=None, cache=None):
        real(self, stage, cfg, accelerator, dataset, run_dir, vae, cache)
        calls.append((self.m.vae, cache))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.TrainerStep, "__init__", spy)
        mp.setattr(bench, "time_steps", lambda steppers, *a, **k: {n: {"steps_per_sec": 1.0, "time_split": {
            "data": 0, "encode": 0, "forward": 0, "backward": 0, "optimizer": 0}, "time_share": {"data": 0}}
            for n in steppers})
        bench.bench_prior(cfg, 1, 0, tmp_path / "work", lambda m: None, 0.02)
    (enc_vae, no_cache), (cache_vae, cache) = calls
    assert no_cache is None and cache is not None and enc_vae is not cache_vae
    assert all(p.device == acc.device for p in enc_vae.encoder.parameters())


def test_prior_bench_has_no_reference(tmp_path, tiny_data):
    prior = {k: v for k, v in TINY_PRIOR.items() if k in ("model", "diffusion")}
    cfg = tiny_config(tmp_path, tiny_data, prior=prior, data={"cache": "auto"})
    out = tmp_path / "prior.json"
    assert bench.main(["--config", str(cfg), "--stage", "prior", "--steps", "2", "--warmup", "0",
                       "--batch-size", "4", "--data-seconds", "0.05", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert all(k in r for k in REQUIRED)
    assert r["reference_steps_per_sec"] is None and r["ratio_vs_reference"] is None
    assert r["batch_size"] == 4 and r["data_path"] == "cached"
    # with and without the latent cache, each with its time split, and the ratio of the two
    enc, cached = r["latent_cache"]["encoder"], r["latent_cache"]["cache"]
    assert r["latent_cache_speedup"] == pytest.approx(cached["steps_per_sec"] / enc["steps_per_sec"], rel=1e-2)
    assert enc["time_split"]["encode"] > 0 and cached["time_split"]["encode"] < enc["time_split"]["encode"]
    assert r["steps_per_sec"] == cached["steps_per_sec"]          # the configured path (latent_cache: auto)
    assert r["latent_cache_samples"] == len(build_datasets(load_config(cfg, ["data.batch_size=4"]).data, 0,
                                                              ("train",), lambda m: None)["train"])


def test_bench_step_is_the_trainers_step(tmp_path, tiny_data, monkeypatch):
    """bench.py drives the trainers' own train_step on their own build_models: three steps (the
    discriminator starts at the second) give the same losses and gradient norms as train_vae.py."""
    torch.set_num_threads(1)                  # both runs alike; restored by the fixture
    cfg_path = tiny_config(tmp_path, tiny_data, **{"vae.loss": {"disc_start": 1},
                                                   "vae.train": {"max_steps": 3, "log_every": 1}})
    assert run_main(train_vae, ["--config", cfg_path], monkeypatch) == 0
    trained = read_records(tmp_path / "run" / "vae", "train")

    reset_accelerate()
    cfg = load_config(cfg_path)
    acc = make_accelerator(cfg.vae.train)
    ds = build_datasets(cfg.data, cfg.seed, ("train",), log=lambda m: None)["train"]
    tk = bench.TrainerStep("vae", cfg, acc, ds, tmp_path / "bench-run")
    assert tk.train_step is train_vae.train_step
    for k in range(3):
        tk.step(bench.PhaseTimer(acc.device), k >= cfg.vae.loss.disc_start)
    tk.close()
    timed = read_records(tmp_path / "bench-run", "train")
    keys = ["total_loss", "rec_loss", "kl_loss", "disc_loss", "d_weight", "grad_norm", "grad_norm_disc"]
    assert [r["step"] for r in timed] == [r["step"] for r in trained] == [1, 2, 3]
    assert [[r.get(k) for k in keys] for r in timed] == [[r.get(k) for k in keys] for r in trained]
    assert "disc_loss" not in trained[0] and trained[1]["disc_loss"] is not None


@pytest.mark.parametrize("variant", ["toolkit", "reference"])
def test_memory_probe(tmp_path, tiny_data, variant):
    """What bench.py runs in a child process per variant for its peak memory."""
    torch.set_num_threads(1)
    cfg = load_config(tiny_config(tmp_path, tiny_data))
    mem = bench.memory_probe(cfg, variant, ["pre_disc_start", "post_disc_start"], tmp_path / "probe")
    # the process's peak resident set (run in-process here; bench.py runs it in a child of its own)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
    assert mem["peak_rss_mb"] == pytest.approx(hwm, abs=1.0) and mem["cuda_peak_mb"] is None


def test_peak_memory_is_the_high_water_mark():
    import resource
    block = torch.ones(32 * 2**20 // 4)                    # touched memory: the resident set includes it
    rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
    peak = bench.peak_memory_mb(torch.device("cpu"))["peak_rss_mb"]
    del block
    assert peak >= rss - 0.05 and peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, abs=1.0)


def test_data_stage_measures_the_loader_alone(tmp_path, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data)
    out = tmp_path / "data.json"
    assert bench.main(["--config", str(cfg), "--stage", "data", "--data-seconds", "0.05",
                       "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["data_samples_per_sec_png"] > 0 and r["data_samples_per_sec_cached"] > 0
    assert r["cache_speedup"] == pytest.approx(r["data_samples_per_sec_cached"] / r["data_samples_per_sec_png"], rel=0.01)
    assert "steps_per_sec" not in r and r["data_path"] == "png"
    assert "data loader alone: PNG" in capsys.readouterr().out


def test_gpu_suite_says_it_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"--suite gpu needs a CUDA GPU and none is visible"):
        bench.main(["--config", "configs/m.yaml", "--suite", "gpu"])
    with pytest.raises(SystemExit):
        bench.main(["--config", "configs/m.yaml", "--suite", "gpu", "--stage", "vae"])   # one or the other


def test_gpu_suite_runs_every_stage_and_setting_and_tabulates_them(tmp_path):
    from lib.bench.suite import RUNS, run_suite
    calls = []

    def fake(argv):
        calls.append(argv)
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        load_config(argv[argv.index("--config") + 1], sets)                  # every run's config is valid
        bench_parser().parse_args(argv + ["--json", "x.json"])                # and so are its arguments
        stage = argv[argv.index("--stage") + 1]
        fast = 2.0 if f"{stage}.train.compile=true" in sets else 1.0
        return {"gpu": "Fake GPU", "torch": "2.13.0", "batch_size": 2, "image_size": 256, "steps_per_sec": fast,
                "samples_per_sec": 2 * fast, "cuda_peak_mb": 123.0}

    out = run_suite("configs/m.yaml", [], str(tmp_path / "suite.json"), runner=fake, cuda_available=True,
                    log=lambda m: None)
    assert len(calls) == len(RUNS)
    rows = [line for line in out["table"].splitlines() if line.startswith(("| vae", "| prior"))]
    assert len(rows) == len(RUNS) and sum("| 2.00x |" in r for r in rows) == 2 and "Fake GPU" in out["table"]
    assert json.loads((tmp_path / "suite.json").read_text())["results"]["prior"]["bf16"]["steps_per_sec"] == 1.0
    bf16 = next(c for c in calls if "prior" in c and "prior.train.mixed_precision=bf16" in c)
    assert "vae.train.mixed_precision=bf16" not in bf16          # each stage's own switches
    fp32 = next(c for c in calls if "prior" in c and "prior.train.tf32=false" in c)
    assert "prior.train.mixed_precision=no" in fp32               # float32 under PyTorch's defaults
    with_ref = [c for c in calls if "--no-reference" not in c and "vae" in c]
    assert len(with_ref) == 1 and "vae.train.channels_last=true" in with_ref[0]   # the reference beside bf16
    assert ["--batch-size", "32"] == next(c[i:i + 2] for c in calls for i in range(len(c)) if c[i:i + 2] == ["--batch-size", "32"])


def test_gpu_suite_reports_a_failed_run_and_goes_on(tmp_path):
    from lib.bench.suite import RUNS, run_suite

    def fake(argv):
        if "vae.train.compile=true" in argv:
            raise UserError("--suite gpu: bench.py ... failed: RuntimeError: boom")
        return {"gpu": "Fake GPU", "torch": "x", "batch_size": 2, "image_size": 256, "steps_per_sec": 1.0,
                "samples_per_sec": 2.0, "cuda_peak_mb": None}
    out = run_suite("configs/m.yaml", [], None, runner=fake, cuda_available=True, log=lambda m: None)
    assert out["failed"] == ["vae, bf16 + channels_last + compile"]
    assert sum(len(v) for v in out["results"].values()) == len(RUNS)
    assert "| vae | bf16 + channels_last + compile | - | - | failed: --suite gpu: bench.py ... failed: RuntimeError: boom" in out["table"]
