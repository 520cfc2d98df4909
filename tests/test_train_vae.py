"""Stage-1 trainer behaviour: LR curves, resume equality, phases, gradient flow, bad input."""
import json
import re
import shutil

import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import train_vae
from lib.config import load_config
from lib.data.dataset import build_datasets
from lib.train.schedule import lr_at
from tests.helpers import checkpoint_tensors, max_abs_diff, read_records, run_main, tiny_config


def run(monkeypatch, cfg, *extra):
    return run_main(train_vae, ["--config", cfg, *extra], monkeypatch)


@pytest.mark.parametrize("scheduler", ["cosine", "polynomial", "constant_with_warmup"])
def test_logged_lr_equals_schedule_every_step(tmp_path, tiny_data, monkeypatch, scheduler):
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"lr_scheduler": scheduler, "lr_power": 2.0,
                                                            "checkpoint_every": 6, "val_every": 6}})
    assert run(monkeypatch, cfg) == 0
    tcfg = load_config(cfg).vae.train
    recs = read_records(tmp_path / "run" / "vae", "train")
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        assert r["lr"] == pytest.approx(lr_at(tcfg, r["step"]), rel=1e-9)
        assert r["lr_disc"] == pytest.approx(lr_at(tcfg, r["step"]), rel=1e-9)
    if scheduler != "constant_with_warmup":
        assert recs[-1]["lr"] == pytest.approx(tcfg.min_lr)      # ends at the absolute floor


def test_resume_latest_equals_uninterrupted_run(tmp_path, tiny_data, monkeypatch):
    straight = tiny_config(tmp_path, tiny_data, "a.yaml", output_dir=str(tmp_path / "a"))
    assert run(monkeypatch, straight) == 0
    split = tiny_config(tmp_path, tiny_data, "b.yaml", output_dir=str(tmp_path / "b"))
    assert run(monkeypatch, split, "--until-step", "3") == 0
    assert run(monkeypatch, split, "--resume", "latest") == 0
    a, b = tmp_path / "a" / "vae", tmp_path / "b" / "vae"
    diff = max_abs_diff(checkpoint_tensors(a / "checkpoints" / "step-0000006"),
                        checkpoint_tensors(b / "checkpoints" / "step-0000006"))
    assert diff <= 1e-6
    lrs = lambda d: [(r["step"], r["lr"], r["lr_disc"]) for r in read_records(d, "train")]
    assert lrs(a) == lrs(b)
    losses = lambda d: [r["rec_loss"] for r in read_records(d, "train")]
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    events = [r["event"] for r in read_records(b, "event")]
    assert "resume" in events
    run_json = json.loads((b / "run.json").read_text())
    assert run_json["resumes"][0]["step"] == 3


def test_resume_path_into_new_output_dir(tmp_path, tiny_data, monkeypatch):
    straight = tiny_config(tmp_path, tiny_data, "a.yaml", output_dir=str(tmp_path / "a"))
    assert run(monkeypatch, straight) == 0
    step3 = tmp_path / "a" / "vae" / "checkpoints" / "step-0000003"
    other = tiny_config(tmp_path, tiny_data, "c.yaml", output_dir=str(tmp_path / "c"))
    assert run(monkeypatch, other, "--resume", step3) == 0
    diff = max_abs_diff(checkpoint_tensors(tmp_path / "a" / "vae" / "checkpoints" / "step-0000006"),
                        checkpoint_tensors(tmp_path / "c" / "vae" / "checkpoints" / "step-0000006"))
    assert diff <= 1e-6


def test_resume_with_new_lr_rebases_schedule(tmp_path, tiny_data, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_data)
    assert run(monkeypatch, cfg, "--until-step", "3") == 0
    assert run(monkeypatch, cfg, "--resume", "latest", "--set", "vae.train.lr=5e-4") == 0
    new = load_config(cfg, ["vae.train.lr=5e-4"]).vae.train
    recs = [r for r in read_records(tmp_path / "run" / "vae", "train") if r["step"] > 3]
    assert [r["lr"] for r in recs] == pytest.approx([lr_at(new, r["step"]) for r in recs], rel=1e-9)
    run_json = json.loads((tmp_path / "run" / "vae" / "run.json").read_text())
    assert run_json["resumes"][-1]["changes"] == {"lr": [1e-3, 5e-4]}
    assert "schedule changed" in (tmp_path / "run" / "vae" / "train.log").read_text()


def test_discriminator_phases_and_logvar(tmp_path, tiny_data, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"checkpoint_every": 1, "val_every": 1}})
    assert run(monkeypatch, cfg) == 0
    ck = tmp_path / "run" / "vae" / "checkpoints"
    disc = [load_file(str(ck / f"step-{s:07d}" / "discriminator.safetensors")) for s in range(1, 7)]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    # disc_start = 3: updates 1-3 leave it alone, every update from the 4th changes it
    assert same(disc[0], disc[1]) and same(disc[1], disc[2])
    assert not same(disc[2], disc[3]) and not same(disc[3], disc[4]) and not same(disc[4], disc[5])
    recs = read_records(tmp_path / "run" / "vae", "train")
    for r in recs:
        active = r["step"] > 3
        assert r["disc_factor"] == (1.0 if active else 0.0)
        assert ("disc_loss" in r) == active and ("g_loss" in r) == active      # logged once it exists
        if active:
            assert r["d_weight"] > 0 and r["logits_real"] is not None
    # train.log: one line per record, only the values present, every LR in one format, and a
    # header line where the discriminator's columns begin
    lines = (tmp_path / "run" / "vae" / "train.log").read_text().splitlines()
    train = [line for line in lines if " INFO [train " in line]
    assert len(train) == len(recs) == 6
    for line, r in zip(train, recs):
        assert "None" not in line and "n/a" not in line and ": " not in line.split("] ", 1)[1]
        lrs = re.findall(r"\blr(?:_disc)?=(\S+)", line)
        assert len(lrs) == 2 and all(re.fullmatch(r"\d\.\d{3}e[-+]\d\d", v) for v in lrs), line
        assert ("g_loss=" in line) == (r["step"] > 3)
        assert set(re.findall(r"(\w+)=", line)) == set(r) - {"step", "split", "time"}
    header = next(i for i, line in enumerate(lines) if "[disc_start at step 3]" in line)
    assert "g_loss" in lines[header] and lines.index(train[2]) < header < lines.index(train[3])
    # logvar is trained (the reference left it out of every optimizer)
    assert recs[-1]["logvar"] != 0.0
    # the VAE checkpoint loads with plain diffusers
    vae = AutoencoderKL.from_pretrained(ck / "step-0000006" / "vae")
    assert vae.config.latent_channels == 2


def test_train_step_trains_the_discriminator_after_disc_start_only_and_the_logvar_always(tmp_path, tiny_data):
    """One update of train_step before and one after disc_start: the learned log-variance is in
    the generator's optimizer and moves in both; the discriminator moves only once it is active
    (the reference's gradient_accumulate_every: 1 never updated it); the generator and
    discriminator schedules advance once per update either way."""
    from lib.data.batching import train_batches
    from lib.train.accel import make_accelerator
    from tests.helpers import reset_accelerate
    reset_accelerate()
    cfg = load_config(tiny_config(tmp_path, tiny_data, **{"vae.train": {"warmup_steps": 0}}))   # LR > 0 at once
    acc = make_accelerator(cfg.vae.train)
    m = train_vae.build_models(cfg, acc)
    assert any(p is m.vae_raw.logvar for g in m.opt_g.param_groups for p in g["params"])
    batches = train_batches(build_datasets(cfg.data, 0, ("train",), lambda s: None)["train"], 2, 0)
    snapshot = lambda: ([p.detach().clone() for p in m.disc_raw.parameters()], m.vae_raw.logvar.item())  # noqa: E731
    for disc_active in (False, True):
        disc_before, logvar_before = snapshot()
        applied, logs = train_vae.train_step(m, batches, acc, cfg, disc_active)
        disc_after, logvar_after = snapshot()
        assert applied and logvar_after != logvar_before
        moved = any(not torch.equal(a, b) for a, b in zip(disc_before, disc_after))
        assert moved == disc_active, f"disc_active={disc_active}"
        assert ("disc_loss" in logs) == disc_active and ("grad_norm_disc" in logs) == disc_active
    assert m.sched_g.scheduler.last_epoch == m.sched_d.scheduler.last_epoch == 2
    reset_accelerate()


def test_checkpoint_layout_and_rotation(tmp_path, tiny_data, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"max_steps": 12, "checkpoint_every": 3,
                                                            "keep_last": 2, "log_every": 4}})
    assert run(monkeypatch, cfg) == 0
    run_dir = tmp_path / "run" / "vae"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    states = {n: json.loads((run_dir / "checkpoints" / n / "trainer_state.json").read_text()) for n in names}
    best = min(states, key=lambda n: states[n]["val_loss"])
    assert {"step-0000009", "step-0000012", best} == set(names)
    c = run_dir / "checkpoints" / "step-0000012"
    for f in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "discriminator.safetensors",
              "accelerate", "config.yaml", "trainer_state.json"):
        assert (c / f).exists(), f
    for f in ("metrics.jsonl", "run.json", "config.yaml", "train.log", "tb", "samples/step-0000012.png"):
        assert (run_dir / f).exists(), f
    assert any((run_dir / "tb").iterdir())
    log = (run_dir / "train.log").read_text()
    assert "lr=0.00000" not in log and "lr=1.000e-04" in log     # significant digits
    val = read_records(run_dir, "val")
    assert {"rec_loss", "psnr", "ssim", "nmse", "rmse"} <= set(val[0])


def test_gradient_clipping_bounds_the_norm(tmp_path, tiny_data, monkeypatch):
    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        norm = orig(params, max_norm, *a, **k)
        after = torch.norm(torch.stack([p.grad.norm() for p in params]))
        seen.append((float(norm), float(after), max_norm))
        return norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"grad_clip": 1e-3, "max_steps": 4,
                                                            "checkpoint_every": 4, "val_every": 4}})
    assert run(monkeypatch, cfg) == 0
    assert seen and all(m == 1e-3 for _, _, m in seen)
    assert all(before > 1e-3 for before, _, _ in seen)          # clipping had something to do
    assert all(after <= 1e-3 * (1 + 1e-4) for _, after, _ in seen)
    recs = read_records(tmp_path / "run" / "vae", "train")
    assert all(r["grad_norm"] > 1e-3 for r in recs)             # the log shows the pre-clip norm


# ----------------------------------------------------------------------------- bad input
def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


def test_missing_dataset_folder(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tmp_path / "nowhere", **{"data": {"source": "radiomapseer"}})
    assert run(monkeypatch, cfg) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and "nowhere" in line


def test_corrupt_png_is_named(tmp_path, tiny_data, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for victim in (data / "gain" / "DPM").iterdir():
        victim.write_bytes(victim.read_bytes()[:60])          # truncated mid-file
    cfg = tiny_config(tmp_path, data, **{"data": {"source": "radiomapseer"}})
    assert run(monkeypatch, cfg) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and "gain/DPM/" in line and ".png" in line
    assert not (tmp_path / "run" / "vae" / "checkpoints").exists()


def test_a_png_cut_after_its_header_in_a_loader_worker_is_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    """A file whose header reads (so the checks before the start pass) but whose pixels end early,
    decoded in a DataLoader worker process (m.yaml's loader): one line naming the file."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for victim in (data / "gain" / "DPM").iterdir():          # the first training batch meets one
        raw = victim.read_bytes()
        victim.write_bytes(raw[: len(raw) * 2 // 3])
    cfg = tiny_config(tmp_path, data, **{"data": {"source": "radiomapseer", "num_workers": 2, "cache": "off"}})
    assert run(monkeypatch, cfg) == 2
    line = error_line(capsys)
    assert re.fullmatch(rf"error: {re.escape(str(data))}/gain/DPM/\d+_\d\.png: corrupt or truncated PNG \(.*\)", line), line


@pytest.mark.parametrize("override,expected", [
    ("vae.train.lrr=1", "unknown key 'vae.train.lrr'"),
    ("vae.train.lr=-1e-4", "vae.train.lr = -0.0001 is invalid"),
    ("data.batch_size=two", "data.batch_size = 'two' has the wrong type"),
])
def test_bad_config_values(tmp_path, tiny_data, monkeypatch, capsys, override, expected):
    cfg = tiny_config(tmp_path, tiny_data)
    assert run(monkeypatch, cfg, "--set", override) == 2
    line = error_line(capsys)
    assert expected in line and str(cfg) in line
    assert not (tmp_path / "run").exists()


def test_missing_resume_path_touches_nothing(tmp_path, tiny_data, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"max_steps": 3}})
    assert run(monkeypatch, cfg) == 0
    ck = tmp_path / "run" / "vae" / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ck.rglob("*")}
    assert run(monkeypatch, cfg, "--resume", tmp_path / "nope") == 2
    assert "--resume" in error_line(capsys) and "nope" in capsys.readouterr().err + str(tmp_path / "nope")
    assert {p: p.stat().st_mtime_ns for p in ck.rglob("*")} == before


def test_second_run_into_existing_folder_refuses(tmp_path, tiny_data, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"max_steps": 3}})
    assert run(monkeypatch, cfg) == 0
    metrics = (tmp_path / "run" / "vae" / "metrics.jsonl").read_text()
    assert run(monkeypatch, cfg) == 2
    line = error_line(capsys)
    assert "already holds a run" in line and "--resume latest" in line
    assert (tmp_path / "run" / "vae" / "metrics.jsonl").read_text() == metrics


def test_dry_run_prints_key_points(tmp_path, tiny_data, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"max_steps": 100, "warmup_steps": 10},
                                              "vae.loss": {"disc_start": 40}})
    assert run(monkeypatch, cfg, "--dry-run") == 0
    out = capsys.readouterr().out
    for label in ("(start)", "(end of warmup)", "(disc_start)", "(25%)", "(50%)", "(75%)", "(100%)"):
        assert label in out
    assert "lr 1.000e-04  (100%)" in out
    # the whole resolved config, the data found, where the outputs go; nothing written
    resolved = yaml.safe_load(out.split("# resolved config", 1)[1].split("\n", 1)[1].split("# data", 1)[0])
    assert resolved == load_config(cfg).to_dict()
    sizes = {part: len(ds) for part, ds in build_datasets(load_config(cfg).data, 0, ("train", "val", "test"),
                                                             lambda m: None).items()}
    table = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.startswith(("train ", "val ", "test "))}
    for part, n in sizes.items():
        assert int(table[part, "DPM"][-1]) == n and int(table[part, "DPM"][2]) == {"train": 4, "val": 2, "test": 2}[part]
        assert table[part, "DPM"][3] == "2"                  # transmitters per map
    for where in ("checkpoints  " + str(tmp_path / "run" / "vae" / "checkpoints"), str(tmp_path / "run" / "vae" / "train.log")):
        assert where in out
    assert not (tmp_path / "run").exists()


def test_dry_run_fails_like_a_run_on_a_missing_data_root(tmp_path, tiny_data, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tmp_path / "nowhere", data={"source": "radiomapseer"})
    assert run(monkeypatch, cfg, "--dry-run") == 2
    line = error_line(capsys)
    assert f"data.root {tmp_path / 'nowhere'}: folder not found" in line
    assert run(monkeypatch, cfg) == 2 and error_line(capsys) == line      # the same line as a real start
    assert not (tmp_path / "run").exists() and not (tmp_path / "nowhere").exists()
