"""Fault injection: kill -9 mid-checkpoint, SIGTERM, NaN losses, divergence, an unstepped
schedule, a checkpoint of another model. Each test runs for every trainer in TRAINERS."""
import signal

import pytest
import torch

from lib.train.faults import EXIT_PREEMPTED, EXIT_STOPPED
from tests.helpers import (TRAINERS, checkpoint_tensors, max_abs_diff, poison_training_forward, read_records,
                           run_injected, run_main, trainer_config)

pytestmark = pytest.mark.parametrize("trainer", list(TRAINERS), indirect=True)


def final_weights(run_dir, step=6):
    return checkpoint_tensors(run_dir / "checkpoints" / f"step-{step:07d}")


def test_kill_during_checkpoint_write_then_resume(tmp_path, trainer, monkeypatch):
    ref = trainer_config(tmp_path, trainer, "ref.yaml", output_dir=str(tmp_path / "ref"))
    assert run_main(trainer.module, ["--config", ref], monkeypatch) == 0
    cfg = trainer_config(tmp_path, trainer, "k.yaml", output_dir=str(tmp_path / "k"))
    # kill -9 in the middle of writing step 6 (after the files, before the rename)
    r = run_injected(tmp_path, trainer, cfg, """
        import lib.train.checkpoint as ck
        orig = ck.commit
        def commit(tmp, state):
            if state["step"] == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(tmp, state)
        ck.commit = commit
    """)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run_dir = tmp_path / "k" / trainer.subdir
    ck_dir = run_dir / "checkpoints"
    assert (ck_dir / ".tmp-step-0000006").exists() and not (ck_dir / "step-0000006").exists()
    assert run_main(trainer.module, ["--config", cfg, "--resume", "latest"], monkeypatch) == 0
    resumed = [r for r in read_records(run_dir, "event") if r["event"] == "resume"]
    assert resumed[-1]["from_step"] == 3
    assert not (ck_dir / ".tmp-step-0000006").exists()
    assert max_abs_diff(final_weights(tmp_path / "ref" / trainer.subdir), final_weights(run_dir)) <= 1e-6


def test_sigterm_then_resume_equals_uninterrupted(tmp_path, trainer, monkeypatch):
    ref = trainer_config(tmp_path, trainer, "ref.yaml", output_dir=str(tmp_path / "ref"))
    assert run_main(trainer.module, ["--config", ref], monkeypatch) == 0
    cfg = trainer_config(tmp_path, trainer, "s.yaml", output_dir=str(tmp_path / "s"))
    # a real SIGTERM arrives while step 4's record is being written
    r = run_injected(tmp_path, trainer, cfg, """
        import lib.train.runlog as rl
        orig = rl.RunLog.record
        def record(self, split, step, values, echo=True):
            if split == "train" and step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return orig(self, split, step, values, echo)
        rl.RunLog.record = record
    """)
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-2000:]
    run_dir = tmp_path / "s" / trainer.subdir
    events = read_records(run_dir, "event")
    assert [e["step"] for e in events if e["event"] == "preempted"] == [4]
    assert (run_dir / "checkpoints" / "step-0000004").is_dir()
    assert run_main(trainer.module, ["--config", cfg, "--resume", "latest"], monkeypatch) == 0
    assert max_abs_diff(final_weights(tmp_path / "ref" / trainer.subdir), final_weights(run_dir)) <= 1e-6


def test_nan_loss_skips_update_and_logs(tmp_path, trainer, monkeypatch):
    from lib.train import optim

    snapshots = []
    poison_training_forward(monkeypatch, trainer, lambda n: n == 3)   # the 3rd micro-batch's loss is NaN
    orig_apply = optim.apply_updates

    def spy(accelerator, optimizers, schedulers, finite):
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        lrs = [o.param_groups[0]["lr"] for o in optimizers]
        applied = orig_apply(accelerator, optimizers, schedulers, finite)
        same = all(torch.equal(a, p) for a, p in zip(before, params))
        snapshots.append((applied, same, lrs == [o.param_groups[0]["lr"] for o in optimizers], lrs[0]))
        return applied
    monkeypatch.setattr(optim, "apply_updates", spy)
    cfg = trainer_config(tmp_path, trainer)
    assert run_main(trainer.module, ["--config", cfg], monkeypatch) == 0
    assert [s[0] for s in snapshots] == [True, True, False, True, True, True, True]
    applied, same, lr_same, _ = snapshots[2]
    assert same and lr_same                        # no weight change, no schedule change
    assert all(not s[1] for s in snapshots if s[0] and s[3] > 0)   # (warmup starts at LR 0)
    run_dir = tmp_path / "run" / trainer.subdir
    bad = [e for e in read_records(run_dir, "event") if e["event"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["step"] == 2 and bad[0]["terms"]
    assert read_records(run_dir, "train")[-1]["nonfinite_skipped"] == 1


def test_persistent_nan_stops_with_checkpoint(tmp_path, trainer, monkeypatch, capsys):
    poison_training_forward(monkeypatch, trainer, lambda n: n > 2)
    cfg = trainer_config(tmp_path, trainer, **{f"{trainer.subdir}.train": {"max_nonfinite": 3}})
    assert run_main(trainer.module, ["--config", cfg], monkeypatch) == EXIT_STOPPED
    run_dir = tmp_path / "run" / trainer.subdir
    stopped = [e for e in read_records(run_dir, "event") if e["event"] == "stopped"]
    assert stopped and "lower" in stopped[0]["message"] and "bf16" in stopped[0]["message"]
    assert (run_dir / "checkpoints" / "step-0000002").is_dir()     # the last good state


def test_lr_spike_divergence_is_detected_and_stops(tmp_path, trainer, monkeypatch):
    t = f"{trainer.subdir}.train"
    cfg = trainer_config(tmp_path, trainer, **{t: {"max_steps": 14, "lr_scheduler": "constant",
                                                   "warmup_steps": 0, "divergence_window": 2,
                                                   "divergence_factor": 2.0, "on_divergence": "stop"}})
    assert run_main(trainer.module, ["--config", cfg, "--until-step", "6"], monkeypatch) == 0
    code = run_main(trainer.module, ["--config", cfg, "--resume", "latest", "--set", f"{t}.lr={trainer.spike_lr}"],
                    monkeypatch)
    assert code == EXIT_STOPPED
    run_dir = tmp_path / "run" / trainer.subdir
    div = [e for e in read_records(run_dir, "event") if e["event"] == "divergence"]
    # a record at step s measures the loss before update s, so the spike shows from step 8 on
    assert len(div) == 1 and div[0]["began"] >= 8 and div[0]["best_step"] < div[0]["began"]
    assert div[0]["best_checkpoint"].endswith("step-0000006")
    assert (tmp_path / div[0]["best_checkpoint"] / "KEEP").exists()     # never rotated away
    stopped = [e for e in read_records(run_dir, "event") if e["event"] == "stopped"]
    assert "--resume" in stopped[0]["message"] and "lr=" in stopped[0]["message"]


def test_unstepped_schedule_is_caught_by_the_guard(tmp_path, trainer, monkeypatch, capsys):
    from lib.train import optim

    orig = optim.apply_updates
    # the seeds' unified-prior bug: optimizers step, the schedule never does
    monkeypatch.setattr(optim, "apply_updates", lambda acc, opts, scheds, finite: orig(acc, opts, [], finite))
    cfg = trainer_config(tmp_path, trainer)
    assert run_main(trainer.module, ["--config", cfg], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: schedule guard:") and "at step 1" in err and "stepped exactly once" in err


def test_resume_from_another_model_shape_is_one_line(tmp_path, trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, trainer, **{f"{trainer.subdir}.train": {"max_steps": 3}})
    assert run_main(trainer.module, ["--config", cfg], monkeypatch) == 0
    code = run_main(trainer.module, ["--config", cfg, "--resume", "latest", "--set", trainer.shape_override],
                    monkeypatch)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was saved with a different model" in err and trainer.shape_override.split("=")[0] in err


def test_corrupt_latest_checkpoint_is_skipped(tmp_path, trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, trainer)
    assert run_main(trainer.module, ["--config", cfg, "--until-step", "6"], monkeypatch) == 0
    ck_dir = tmp_path / "run" / trainer.subdir / "checkpoints"
    victim = sorted((ck_dir / "step-0000006").rglob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert run_main(trainer.module, ["--config", cfg, "--resume", "latest"], monkeypatch) == 0
    out = capsys.readouterr().err
    assert "skipping incomplete checkpoint" in out and "step-0000006" in out
    resumed = [r for r in read_records(tmp_path / "run" / trainer.subdir, "event") if r["event"] == "resume"]
    assert resumed[-1]["from_step"] == 3
