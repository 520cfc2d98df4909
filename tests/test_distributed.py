"""The same run on 1 or 2 processes (gloo on CPU) and in bf16: replicas stay identical, the
DDP gradient equals the single-process gradient of the concatenated batch, the LR sequence
does not depend on the number of processes."""

import pytest
import torch

from tests.helpers import (TRAINERS, checkpoint_tensors, max_abs_diff, read_records, run_injected, run_main,
                            trainer_config)

pytestmark = pytest.mark.parametrize("trainer", list(TRAINERS), indirect=True)

# Runs in every process: after each update, all replicas' parameters are gathered and compared;
# the first update's synchronised gradients are saved; posterior sampling is made deterministic
# (the mode) so that 1- and 2-process gradients see the same inputs.
PROBE = """
import torch
from accelerate.utils import gather
from pathlib import Path
OUT = Path(os.environ["PROBE_DIR"])
import lib.train.optim as optim
orig_apply, orig_clip = optim.apply_updates, optim.clip_grad_norms
state = {"n": 0}
def clip(accelerator, optimizers, max_norm):
    if state["n"] == 0 and accelerator.is_main_process:
        grads = [p.grad.detach().flatten() for g in optimizers[0].param_groups for p in g["params"]
                 if p.grad is not None]
        torch.save(torch.cat(grads), OUT / f"grad-{accelerator.num_processes}.pt")
    return orig_clip(accelerator, optimizers, max_norm)
def apply(accelerator, optimizers, schedulers, finite):
    applied = orig_apply(accelerator, optimizers, schedulers, finite)
    state["n"] += 1
    flat = torch.cat([p.detach().flatten() for o in optimizers for g in o.param_groups for p in g["params"]])
    rows = gather(flat.unsqueeze(0))
    diff = (rows - rows[0]).abs().max().item()
    with open(OUT / f"replicas-{accelerator.num_processes}-{accelerator.process_index}.txt", "a") as f:
        f.write(f"{diff}\\n")
    return applied
optim.apply_updates, optim.clip_grad_norms = apply, clip
"""
DETERMINISTIC = """
import lib.models.vae as models
orig_forward = models.VAEWithLogvar.forward
models.VAEWithLogvar.forward = lambda self, x, sample_posterior=True: orig_forward(self, x, False)
"""


def test_two_processes_match_one(tmp_path, trainer, monkeypatch):
    probe = tmp_path / "probe"
    probe.mkdir()
    monkeypatch.setenv("PROBE_DIR", str(probe))
    two = trainer_config(tmp_path, trainer, "two.yaml", output_dir=str(tmp_path / "two"))
    r = run_injected(tmp_path, trainer, two, PROBE + DETERMINISTIC, processes=2, name="two.py")
    assert r.returncode == 0, r.stderr[-3000:]
    # one process, the same global batch (2 per process x 2 = 4)
    one = trainer_config(tmp_path, trainer, "one.yaml", output_dir=str(tmp_path / "one"),
                         **{"data": {"batch_size": 4}})
    r = run_injected(tmp_path, trainer, one, PROBE + DETERMINISTIC, processes=1, name="one.py")
    assert r.returncode == 0, r.stderr[-3000:]

    for rank in (0, 1):
        diffs = [float(x) for x in (probe / f"replicas-2-{rank}.txt").read_text().split()]
        assert len(diffs) == 6 and max(diffs) == 0.0          # identical replicas after every update
    if trainer.subdir == "vae":
        # The VAE's DDP gradient equals the single-process gradient of the concatenated batch,
        # up to float32 summation order: within 1e-5 of the gradient's scale (the NLL is a
        # per-pixel sum, so entries reach ~1e3). (The prior draws its noise and timesteps per
        # process, so its gradients differ by design; its replicas are checked above.)
        g1, g2 = torch.load(probe / "grad-1.pt"), torch.load(probe / "grad-2.pt")
        assert g1.shape == g2.shape and g1.abs().max() > 0
        assert (g1 - g2).abs().max().item() <= 1e-5 * g1.abs().max().item()
    run_two, run_one = tmp_path / "two" / trainer.subdir, tmp_path / "one" / trainer.subdir
    lrs = lambda d: [(r["step"], r["lr"]) for r in read_records(d, "train")]
    assert lrs(run_two) == lrs(run_one) and len(lrs(run_two)) == 6
    # one set of outputs: every step logged once, one checkpoint per step
    steps = [r["step"] for r in read_records(run_two, "train")]
    assert steps == sorted(set(steps))
    assert sorted(p.name for p in (run_two / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    val = read_records(run_two, "val")
    assert all(v["num_samples"] == 4 for v in val)             # both processes' validation maps counted


def test_two_process_resume_equals_uninterrupted(tmp_path, trainer):
    a = trainer_config(tmp_path, trainer, "a.yaml", output_dir=str(tmp_path / "a"))
    assert run_injected(tmp_path, trainer, a, "", processes=2, name="a.py").returncode == 0
    b = trainer_config(tmp_path, trainer, "b.yaml", output_dir=str(tmp_path / "b"))
    r = run_injected(tmp_path, trainer, b, "", "--until-step", "3", processes=2, name="b1.py")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_injected(tmp_path, trainer, b, "", "--resume", "latest", processes=2, name="b2.py")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = lambda d: checkpoint_tensors(d / trainer.subdir / "checkpoints" / "step-0000006")
    assert max_abs_diff(ck(tmp_path / "a"), ck(tmp_path / "b")) <= 1e-6
    rng_files = sorted(p.name for p in (tmp_path / "b" / trainer.subdir / "checkpoints" / "step-0000006"
                                        / "accelerate").glob("random_states_*"))
    assert rng_files == ["random_states_0.pkl", "random_states_1.pkl"]     # each process's RNG


def test_bf16_follows_fp32(tmp_path, trainer, monkeypatch):
    t = f"{trainer.subdir}.train"
    fp32 = trainer_config(tmp_path, trainer, "fp32.yaml", output_dir=str(tmp_path / "fp32"))
    bf16 = trainer_config(tmp_path, trainer, "bf16.yaml", output_dir=str(tmp_path / "bf16"),
                          **{t: {"mixed_precision": "bf16"}})
    assert run_main(trainer.module, ["--config", fp32], monkeypatch) == 0
    assert run_main(trainer.module, ["--config", bf16], monkeypatch) == 0
    key = trainer.watched
    a = [r[key] for r in read_records(tmp_path / "fp32" / trainer.subdir, "train")]
    b = [r[key] for r in read_records(tmp_path / "bf16" / trainer.subdir, "train")]
    assert all(map(lambda v: v is not None and v == v and abs(v) < float("inf"), b))
    # bf16 has an 8-bit mantissa: the loss follows fp32 within 5 % over these steps
    assert b == pytest.approx(a, rel=0.05)
    weights = checkpoint_tensors(tmp_path / "bf16" / trainer.subdir / "checkpoints" / "step-0000006")
    assert all(v.dtype == torch.float32 for k, v in weights.items() if "accelerate" in k)  # fp32 master weights


def test_torchrun_without_accelerate_is_refused(tmp_path, trainer, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = trainer_config(tmp_path, trainer)
    assert run_main(trainer.module, ["--config", cfg], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "WORLD_SIZE=2" in err and "accelerate launch --multi_gpu --num_processes 2" in err
    assert not (tmp_path / "run").exists()
