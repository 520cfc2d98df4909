"""A run folder that is safe: one run at a time (the lock), preemption within one step and one
checkpoint, failed starts that leave nothing behind, rejected resumes that change nothing,
damaged checkpoints skipped, and every stop explained in the run's own log. Each case runs for
both trainers where it concerns them both."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.train.faults import EXIT_PREEMPTED, EXIT_STOPPED
from tests.helpers import (ROOT, TRAINERS, checkpoint_tensors, max_abs_diff, read_records, run_injected, run_main,
                           tiny_config, trainer_config)

both = pytest.mark.parametrize("trainer", list(TRAINERS), indirect=True)


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


# ----------------------------------------------------------------------------- one run at a time
SLOW_STEPS = """
import time, lib.train.optim as optim
orig = optim.apply_updates
def apply_updates(*a, **k):
    time.sleep(0.5)
    return orig(*a, **k)
optim.apply_updates = apply_updates
"""


@both
def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, trainer, monkeypatch, capsys):
    section = f"{trainer.subdir}.train"
    cfg = trainer_config(tmp_path, trainer, **{section: {"max_steps": 40, "checkpoint_every": 2,
                                                         "val_every": 40}})
    live = run_injected(tmp_path, trainer, cfg, SLOW_STEPS, background=True)
    run_dir = tmp_path / "run" / trainer.subdir
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "step-0000002").is_dir():      # it is training
            assert live.poll() is None and time.time() < deadline, (tmp_path / "inject.py.err").read_text()[-2000:]
            time.sleep(0.2)
        before = (run_dir / "metrics.jsonl").read_bytes()
        for extra in (["--resume", "latest"], []):
            assert run_main(trainer.module, ["--config", cfg, *extra], monkeypatch) == 2
            err = last_error(capsys)
            assert f"is in use by another run (PID {live.pid} on " in err
        assert (run_dir / "metrics.jsonl").read_bytes()[:len(before)] == before   # untouched (it only grows)
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()
    # killed: its lock is stale now; a resume takes it over and says so
    assert run_main(trainer.module, ["--config", cfg, "--resume", "latest", "--until-step", "5"], monkeypatch) == 0
    assert "stale lock" in (run_dir / "train.log").read_text()


def test_two_runs_started_together_one_refuses(tmp_path, tiny_data):
    vae = TRAINERS["vae"]
    cfg = tiny_config(tmp_path, tiny_data)
    runs = [run_injected(tmp_path, vae, cfg, "", background=True, name=f"r{i}.py") for i in range(2)]
    codes = [r.wait(timeout=300) for r in runs]
    assert sorted(codes) == [0, 2], codes
    loser = codes.index(2)
    err = (tmp_path / f"r{loser}.py.err").read_text()
    assert "is in use by another run (PID" in err or "already holds a run" in err
    run_dir = tmp_path / "run" / "vae"
    records = read_records(run_dir)
    assert [r["event"] for r in records if r["split"] == "event"].count("start") == 1
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 7))   # one run's records
    assert not (run_dir / ".lock").exists()


# ----------------------------------------------------------------------------- preemption
SLOW_VALIDATION = """
import time, signal, lib.evaluation.scoring as ev
from pathlib import Path
orig = ev.timed
def timed(fn, device):
    if not Path(os.environ["SIGNAL_FILE"]).exists():
        Path(os.environ["SIGNAL_FILE"]).write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2.0)                       # a validation of 4 batches would take 8 s
    return orig(fn, device)
ev.timed = timed
"""


@both
def test_sigterm_during_validation_checkpoints_within_a_step(tmp_path, trainer, monkeypatch):
    signal_file = tmp_path / "signalled"
    monkeypatch.setenv("SIGNAL_FILE", str(signal_file))
    section = f"{trainer.subdir}.train"
    cfg = trainer_config(tmp_path, trainer, **{"data": {"batch_size": 1}, section: {"val_batches": 0}})
    r = run_injected(tmp_path, trainer, cfg, SLOW_VALIDATION)
    ended = time.time()
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-2000:]
    elapsed = ended - float(signal_file.read_text())
    assert elapsed < 5.0, elapsed           # one validation batch + the checkpoint, not the validation
    run_dir = tmp_path / "run" / trainer.subdir
    events = read_records(run_dir, "event")
    assert [e["step"] for e in events if e["event"] == "preempted"] == [3]
    assert (run_dir / "checkpoints" / "step-0000003").is_dir()
    assert read_records(run_dir, "val") == []                                  # abandoned, not written
    state = json.loads((run_dir / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["val_loss"] is None


# ----------------------------------------------------------------------------- failed starts
def test_failed_starts_leave_nothing_and_the_corrected_command_starts(tmp_path, tiny_data, monkeypatch, capsys):
    import train_vae
    run_dir = tmp_path / "run"
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = data / "gain/DPM/2_1.png"                                          # a training map
    good = victim.read_bytes()
    Image.fromarray(np.zeros((34, 32), np.uint8)).save(victim)                  # the wrong size
    cases = [(["--set", f"data.root={tmp_path / 'nowhere'}", "--set", "data.source=radiomapseer"], "nowhere"),
             ([], "gain/DPM/2_1.png: size 32x34; expected 32x32"),
             (["--until-step", "-5"], None)]
    cfg = tiny_config(tmp_path, data, data={"source": "radiomapseer"})
    for extra, expected in cases:
        assert run_main(train_vae, ["--config", cfg, *extra], monkeypatch) == 2
        err = capsys.readouterr().err
        if expected:
            assert expected in err.strip().splitlines()[-1]
        else:
            assert "--until-step: -5 is not a step" in err
        assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))    # nothing behind
    victim.write_bytes(good)
    assert run_main(train_vae, ["--config", cfg], monkeypatch) == 0                 # corrected: starts


def test_ctrl_c_during_synthetic_generation_leaves_nothing(tmp_path, tiny_data):
    vae = TRAINERS["vae"]
    data = tmp_path / "syn"
    cfg = tiny_config(tmp_path, data, data={"synthetic": {"num_maps": 8, "tx_per_map": 2, "size": 32}})
    patch = """
import lib.data.synthetic as syn
orig = syn._write_map
def write(root, map_id, *a, **k):
    if map_id == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return orig(root, map_id, *a, **k)
syn._write_map = write
"""
    r = run_injected(tmp_path, vae, cfg, patch)
    assert r.returncode == 128 + signal.SIGINT, r.stderr[-2000:]
    assert "interrupted by SIGINT" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists() and not data.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".syn")]   # no half-written dataset
    assert run_injected(tmp_path, vae, cfg, "").returncode == 0


def test_a_failure_after_the_start_is_in_the_runs_own_log(tmp_path, tiny_data, monkeypatch):
    """A crash before the first checkpoint: the log says why, and the same command starts anew
    in the folder (the failed start's files moved aside, not lost)."""
    vae = TRAINERS["vae"]
    cfg = tiny_config(tmp_path, tiny_data)
    patch = """
import lib.train.optim as optim
orig, calls = optim.apply_updates, [0]
def apply_updates(*a, **k):
    calls[0] += 1
    if calls[0] == 2:
        raise RuntimeError("simulated crash in the second update")
    return orig(*a, **k)
optim.apply_updates = apply_updates
"""
    r = run_injected(tmp_path, vae, cfg, patch)
    assert r.returncode == 1 and "simulated crash" in r.stderr
    run_dir = tmp_path / "run" / "vae"
    errors = [e for e in read_records(run_dir, "event") if e["event"] == "error"]
    assert len(errors) == 1 and "RuntimeError: simulated crash in the second update" in errors[0]["message"]
    assert "ERROR [error at step 1] RuntimeError: simulated crash" in (run_dir / "train.log").read_text()
    assert not (run_dir / ".lock").exists()
    import train_vae
    assert run_main(train_vae, ["--config", cfg], monkeypatch) == 0
    aside = list(run_dir.glob("failed-start-*"))
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").is_file()
    assert [e["event"] for e in read_records(run_dir, "event")].count("error") == 0


# ----------------------------------------------------------------------------- resumes
@both
def test_a_rejected_resume_changes_nothing(tmp_path, trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, trainer, **{f"{trainer.subdir}.train": {"max_steps": 3}})
    assert run_main(trainer.module, ["--config", cfg], monkeypatch) == 0
    run_dir = tmp_path / "run" / trainer.subdir
    snapshot = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    changes = [(trainer.shape_override, "was saved with a different model")]
    if trainer.subdir == "vae":           # the discriminator's shape is part of the model too
        changes.append(("vae.loss.disc_layers=1", "different model: vae.loss.disc_layers = 2 there, 1"))
    for override, expected in (*changes,
                               ("data.simulation=[DPM, IRT2]", "data.simulation" if trainer.subdir == "prior"
                                else "trained on other data: data.simulation")):
        assert run_main(trainer.module, ["--config", cfg, "--resume", "latest", "--set", override], monkeypatch) == 2
        assert expected in last_error(capsys)
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == snapshot   # config.yaml too


def test_a_data_change_on_resume_needs_the_flag_and_is_recorded(tmp_path, tiny_data, monkeypatch, capsys):
    import train_vae
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"max_steps": 6}})
    assert run_main(train_vae, ["--config", cfg, "--until-step", "3"], monkeypatch) == 0
    args = ["--config", cfg, "--resume", "latest", "--set", "data.threshold=0.2"]
    assert run_main(train_vae, args, monkeypatch) == 2
    err = last_error(capsys)
    assert "data.threshold = 0.0 there, 0.2 now" in err and "--allow-data-change" in err
    assert run_main(train_vae, args + ["--allow-data-change"], monkeypatch) == 0
    run_json = json.loads((tmp_path / "run" / "vae" / "run.json").read_text())
    assert run_json["resumes"][-1]["data_changes"] == {"threshold": [0.0, 0.2]}


@both
def test_a_checkpoint_damaged_in_place_is_skipped(tmp_path, trainer, monkeypatch, capsys):
    cfg = trainer_config(tmp_path, trainer)
    assert run_main(trainer.module, ["--config", cfg, "--until-step", "6"], monkeypatch) == 0
    ck_dir = tmp_path / "run" / trainer.subdir / "checkpoints"
    victim = sorted((ck_dir / "step-0000006").rglob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-2:] = bytes([data[-2] ^ 0xFF, data[-1] ^ 0xFF])     # a weight's bytes: same size, still readable
    victim.write_bytes(bytes(data))
    from safetensors.torch import load_file
    assert load_file(str(victim))                              # only the manifest can tell
    assert run_main(trainer.module, ["--config", cfg, "--resume", "latest", "--set",
                                     f"{trainer.subdir}.train.max_steps=7"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step-0000006" in err
    resumed = [r for r in read_records(tmp_path / "run" / trainer.subdir, "event") if r["event"] == "resume"]
    assert resumed[-1]["from_step"] == 3


# ----------------------------------------------------------------------------- requeue
@pytest.mark.parametrize("trainer", ["vae", "prior"], indirect=True)
def test_a_requeued_job_can_always_pass_resume_latest(tmp_path, trainer, monkeypatch):
    """A cluster job script that always passes --resume latest: its first start (no checkpoint
    yet) starts a fresh run and says so; killed (kill -9) before its first checkpoint, the
    requeued start does the same, and the run ends as an uninterrupted one."""
    ref = trainer_config(tmp_path, trainer, "ref.yaml", output_dir=str(tmp_path / "ref"))
    assert run_main(trainer.module, ["--config", ref], monkeypatch) == 0
    cfg = trainer_config(tmp_path, trainer, "q.yaml", output_dir=str(tmp_path / "q"))
    r = run_injected(tmp_path, trainer, cfg, """
        import lib.train.optim as optim
        orig, calls = optim.apply_updates, [0]
        def apply_updates(*a, **k):
            calls[0] += 1
            if calls[0] == 2:                      # the second update: before the first checkpoint
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(*a, **k)
        optim.apply_updates = apply_updates
    """, "--resume", "latest")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run_dir = tmp_path / "q" / trainer.subdir
    assert "--resume latest: no checkpoint under" in (run_dir / "train.log").read_text()
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").glob("step-*"))
    assert run_main(trainer.module, ["--config", cfg, "--resume", "latest"], monkeypatch) == 0
    assert "starting a fresh run" in (run_dir / "train.log").read_text()
    assert not [e for e in read_records(run_dir, "event") if e["event"] == "resume"]
    assert len(list(run_dir.glob("failed-start-*"))) == 1          # the killed start's files, moved aside
    final = lambda d: checkpoint_tensors(d / "checkpoints" / "step-0000006")    # noqa: E731
    assert max_abs_diff(final(tmp_path / "ref" / trainer.subdir), final(run_dir)) <= 1e-6
    # best, or a checkpoint folder, still has to exist
    assert run_main(trainer.module, ["--config", trainer_config(tmp_path, trainer, "n.yaml", output_dir=str(
        tmp_path / "n")), "--resume", "best"], monkeypatch) == 2


@pytest.mark.parametrize("trainer", ["vae", "prior"], indirect=True)
def test_nonfinite_weights_are_never_checkpointed_and_the_advised_resume_works(tmp_path, trainer, monkeypatch):
    """An update that leaves an infinite weight (a far too high LR does that): every later loss is
    NaN, the run stops, and no checkpoint holds those weights, so the advice it prints (lower the
    LR, then --resume latest) continues from the last finite one."""
    from lib.train import optim

    orig, calls = optim.apply_updates, [0]

    def apply_updates(accelerator, optimizers, schedulers, finite):
        applied = orig(accelerator, optimizers, schedulers, finite)
        calls[0] += 1
        if calls[0] == 4:
            with torch.no_grad():
                optimizers[0].param_groups[0]["params"][0].mul_(float("inf"))
        return applied
    section = f"{trainer.subdir}.train"
    cfg = trainer_config(tmp_path, trainer, **{section: {"max_nonfinite": 2}})    # (stage 2: its VAE first)
    monkeypatch.setattr(optim, "apply_updates", apply_updates)
    assert run_main(trainer.module, ["--config", cfg], monkeypatch) == EXIT_STOPPED
    run_dir = tmp_path / "run" / trainer.subdir
    events = {e["event"]: e for e in read_records(run_dir, "event")}
    assert events["stopped"]["step"] == 4 and "--resume latest" in events["stopped"]["message"]
    skipped = events["checkpoint_skipped"]
    assert skipped["step"] == 4 and skipped["kept"].endswith("step-0000003") and "non-finite weights" in skipped["message"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000003"]
    monkeypatch.setattr(optim, "apply_updates", orig)
    assert run_main(trainer.module, ["--config", cfg, "--resume", "latest", "--set", f"{section}.lr=5e-4"],
                    monkeypatch) == 0
    assert [e for e in read_records(run_dir, "event") if e["event"] == "resume"][-1]["from_step"] == 3
    weights = checkpoint_tensors(run_dir / "checkpoints" / "step-0000006")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_earlier_ones_stand(tmp_path, tiny_data, monkeypatch, capsys):
    import errno

    import lib.train.checkpoint as ck
    import train_vae
    orig = ck.write_file

    def write_file(folder, name, obj):
        if folder.name.endswith("step-0000006"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(folder, name, obj)
    monkeypatch.setattr(ck, "write_file", write_file)
    cfg = tiny_config(tmp_path, tiny_data)
    assert run_main(train_vae, ["--config", cfg], monkeypatch) == 2
    ck_dir = tmp_path / "run" / "vae" / "checkpoints"
    import re
    assert re.fullmatch(rf"error: cannot write checkpoint step-0000006 in {re.escape(str(ck_dir))} \(No space left on "
                        r"device; \d+ MiB free\); the checkpoints already there are intact \(newest: step-0000003\): "
                        r"make room, then continue with --resume latest", last_error(capsys))
    assert sorted(p.name for p in ck_dir.iterdir()) == ["step-0000003"]
    assert [e["event"] for e in read_records(tmp_path / "run" / "vae", "event")][-1] == "error"
    monkeypatch.setattr(ck, "write_file", orig)
    assert run_main(train_vae, ["--config", cfg, "--resume", "latest"], monkeypatch) == 0


def test_an_output_folder_that_cannot_be_made_or_written_is_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    """output_dir under a file, or a folder that cannot be written: one line for a run and for
    --dry-run alike, nothing written."""
    import lib.train.run
    import train_vae
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = tiny_config(tmp_path, tiny_data, output_dir=str(blocker / "run"))
    for extra in ([], ["--dry-run"]):
        assert run_main(train_vae, ["--config", cfg, *extra], monkeypatch) == 2
        assert last_error(capsys) == (f"error: output_dir: {blocker} is a file, not a folder; the run folder "
                                      f"{blocker / 'run' / 'vae'} cannot be made there (pass --set output_dir=NEW_DIR)")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = lib.train.run.os.access
    monkeypatch.setattr(lib.train.run.os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    cfg = tiny_config(tmp_path, tiny_data, "ro.yaml", output_dir=str(read_only))
    for extra in ([], ["--dry-run"]):
        assert run_main(train_vae, ["--config", cfg, *extra], monkeypatch) == 2
        assert last_error(capsys) == (f"error: output_dir: {read_only} is not writable, so the run folder "
                                      f"{read_only / 'vae'} cannot be made (pass --set output_dir=NEW_DIR)")
    assert list(read_only.iterdir()) == []


# ----------------------------------------------------------------------------- misreadings
def test_misreadings_are_one_line_errors(tmp_path, tiny_data, monkeypatch, capsys):
    import evaluate
    import train_vae
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert run_main(train_vae, ["--config", empty], monkeypatch) == 2
    assert "the file is empty" in last_error(capsys)
    cfg = tiny_config(tmp_path, tiny_data)
    assert run_main(train_vae, ["--config", cfg, "--until-step", "0"], monkeypatch) == 2
    assert "--until-step: 0 is not a step" in capsys.readouterr().err
    assert run_main(evaluate, ["--config", cfg, "--steps", "0"], monkeypatch) == 2
    assert "--steps 0: expected 1 .. 1000" in last_error(capsys)
    assert run_main(train_vae, ["--config", cfg, "--set", "data.image_size=36"], monkeypatch) == 2
    assert "data.image_size = 36 is invalid; expected a multiple of" in last_error(capsys)
    assert not (tmp_path / "run").exists()


def test_help_is_quick_and_ctrl_c_is_honoured_while_starting(tmp_path, tiny_data):
    for script in ("train_vae.py", "train_unified_prior.py", "evaluate.py", "bench.py", "report.py"):
        r = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
        assert not {"torch", "diffusers", "accelerate"} & imported, script
    # started in the background, SIGINT is inherited as ignored; it still stops the start
    cfg = tiny_config(tmp_path, tiny_data)
    proc = subprocess.Popen([sys.executable, "train_vae.py", "--config", str(cfg)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "interrupted by SIGINT" in err
    assert not (tmp_path / "run").exists()
