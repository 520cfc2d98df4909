"""lib.report.findings: every finding on a log made to contain it, and none but info on clean runs."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from report_logs import original_log, toolkit_run

from lib.report.analysis import analyze
from lib.report.findings import moving_average
from lib.report.read_run import load_run


def findings(paths, config=None):
    run = load_run([str(p) for p in paths], config)
    return analyze(run), run


def by_id(a, fid):
    return [f for f in a.findings if f.id == fid]


def only_info(a):
    return [(f.id, f.severity) for f in a.findings if f.severity != "info"]


# --------------------------------------------------------------------------- clean runs
def test_clean_toolkit_vae_run_has_only_info_findings(tmp_path):
    a, _ = findings([toolkit_run(tmp_path)])
    assert only_info(a) == []
    assert sorted(f.id for f in a.findings) == ["disc_start", "total_loss_across_phases"]
    (d,) = by_id(a, "disc_start")
    assert d.steps == [2000, 2100] and "disc_factor is 0 at step 2,000" in d.evidence
    assert "configured disc_start = 2,001" in d.evidence
    (t,) = by_id(a, "total_loss_across_phases")
    assert t.steps == [2000, 2100] and "rec_loss" in t.evidence and "d_weight" in t.evidence


def test_clean_toolkit_prior_run_has_no_findings(tmp_path):
    a, run = findings([toolkit_run(tmp_path, stage="prior")])
    assert a.findings == []
    # the rules did run: every logged LR was compared with the configured schedule ...
    steps, lr = run.series("lr")
    assert len(steps) == 50 and a.lr_expected is not None and np.allclose(a.lr_expected, lr, rtol=1e-9)
    # ... and the same run with a defect in it is not clean
    bad = toolkit_run(tmp_path / "bad", stage="prior", edit=lambda s, r: dict(r, lr=r["lr"] * 2))
    assert [f.id for f in findings([bad])[0].findings] == ["lr_mismatch"]


def test_lr_printed_as_zero_without_a_known_schedule(tmp_path):
    """The seeds' `lr: 0.00000` in a log with no config line and no --config: the LR is reported as
    a display artefact of the fixed decimals, and said to be unreadable, not zero."""
    log = original_log(tmp_path / "a.log", list(range(0, 1001, 100)), config=None, lr_fn=lambda s: 2e-6)
    a, _ = findings([log])
    assert a.schedule is None
    (z,) = by_id(a, "lr_display_rounding")
    assert z.severity == "warning" and z.steps == [0, 1000]
    assert "printed with 5 decimals and reads 0.00000 at 11 of 11 records" in z.evidence
    assert "any LR below 5e-06 prints like this" in z.evidence
    assert "No config is known to compare with (pass --config)" in z.evidence


def test_clean_resumed_toolkit_run(tmp_path):
    run = toolkit_run(tmp_path, segments=[list(range(100, 3401, 100)), list(range(3100, 5001, 100))],
                      resume_from=[3000])
    a, r = findings([run])
    assert only_info(a) == []
    (res,) = by_id(a, "resume")
    assert res.severity == "info" and res.steps == [3100, 3400]
    assert "ckpt/step-0003000" in res.evidence and "trained again" in res.evidence
    assert len(r.steps) == 50 and [s.reason for s in r.segments] == ["start", "resume event"]


def test_resume_that_lowered_the_lr_is_compared_piecewise(tmp_path):
    # the first 3,000 steps ran with lr 1e-5; the resume lowered it to the default 5e-6
    from lib.config import load_config
    from lib.train.schedule import lr_at
    old = load_config(None, ["vae.train.max_steps=5000", "vae.train.lr=1e-5"]).vae.train

    def edit(step, rec):
        if step <= 3000:
            rec["lr"] = rec["lr_disc"] = lr_at(old, step)
        return rec
    run = toolkit_run(tmp_path, segments=[list(range(100, 3001, 100)), list(range(3100, 5001, 100))],
                      resume_from=[3000], changes=[{"lr": [1e-5, 5e-6]}], edit=edit)
    a, _ = findings([run])
    assert only_info(a) == []
    assert "1 resume(s) changed it" in a.schedule.description


def test_clean_original_run_has_only_info_findings(tmp_path):
    cfg = {"model": {"lossconfig": {"disc_start": 1001}},
           "trainer": {"lr": 1e-4, "min_lr": 5e-7, "train_num_steps": 3000}}
    log = original_log(tmp_path / "a.log", list(range(0, 2501, 100)), config=cfg)
    a, _ = findings([log])
    assert only_info(a) == []
    assert sorted(f.id for f in a.findings) == ["disc_start", "total_loss_across_phases"]
    assert a.lr_expected is not None and len(a.lr_expected) == 26


# --------------------------------------------------------------------------- the original run, seeds-style
def test_original_run_without_discriminator_lines_and_rounded_lr(tmp_path):
    # the seeds' VAE run: no discriminator lines, LR below 5e-6, logvar in no optimizer
    f1 = original_log(tmp_path / "2025-01-02-10-00_.log", list(range(0, 1501, 100)), disc_lines=False,
                      frozen_logvar=True)
    f2 = original_log(tmp_path / "2025-01-03-10-00_.log", list(range(1200, 3001, 100)), disc_lines=False,
                      t0=90000, frozen_logvar=True)
    a, _ = findings([f1, f2])
    ids = {f.id: f for f in a.findings}
    assert set(ids) == {"disc_start", "resume", "lr_display_rounding", "disc_inactive",
                        "total_loss_across_phases", "logvar_frozen"}
    assert ids["disc_start"].steps == [1000, 1100]
    assert ids["resume"].steps == [1200, 1500]
    lr = ids["lr_display_rounding"]
    # step 0 prints 0.00001 (5e-6 exactly); every later step prints 0.00000
    assert lr.severity == "warning" and lr.steps == [100, 3000]
    assert "reads 0.00000 at 30 of 31 records" in lr.evidence and "below 5e-06" in lr.evidence
    assert "lr*max((1-step/3000)**0.95, min_lr)" in lr.evidence
    d = ids["disc_inactive"]
    assert d.severity == "error" and d.steps == [1100, 3000]
    assert "no disc_loss in any of the 20 train records" in d.evidence
    assert "gradient_accumulate_every" in d.evidence


def test_original_flat_zero_disc_loss(tmp_path):
    log = tmp_path / "a.log"
    original_log(log, list(range(0, 2001, 100)))
    text = log.read_text()
    text = re.sub(r"train/disc_loss: [-0-9.]+,", "train/disc_loss: 0.00000,", text)
    log.write_text(text)
    a, _ = findings([log])
    (d,) = by_id(a, "disc_inactive")
    assert d.steps == [1100, 2000] and "disc_loss is 0 at all 10 records" in d.evidence


def test_original_lr_with_our_config(tmp_path):
    # --config: the logged LR (five decimals) against lib.train.schedule.lr_at of our config
    import yaml
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"vae": {"train": {"max_steps": 3000, "lr": 1e-4, "min_lr": 1e-6},
                                                "loss": {"disc_start": 1001}}}))
    from lib.config import load_config
    from lib.train.schedule import lr_at
    tcfg = load_config(cfg_path).vae.train
    log = original_log(tmp_path / "a.log", list(range(0, 3001, 100)), config=None,
                       lr_fn=lambda s: lr_at(tcfg, s))
    a, _ = findings([log], str(cfg_path))
    assert a.schedule.source == f"--config {cfg_path}"
    assert by_id(a, "lr_mismatch") == [] and by_id(a, "lr_not_applied") == []
    (z,) = by_id(a, "lr_display_rounding")       # the cosine tail is below 5e-6
    assert z.steps[1] == 3000


# --------------------------------------------------------------------------- the unified prior run, seeds-style
def test_schedule_never_applied_and_divergence(tmp_path):
    def edit(step, rec):
        rec["lr"] = 1e-4                                  # the optimizer kept its base LR
        rec["loss"] = 6.0 * math.exp(-step / 200) + 0.06 if step <= 1500 else 0.06 + (step - 1500) * 0.004
        return rec
    run = toolkit_run(tmp_path, stage="prior", edit=edit,
                      overrides=("prior.train.lr=1e-4", "prior.train.min_lr=1e-6",
                                 "prior.train.warmup_steps=500", "prior.train.lr_scheduler=cosine"))
    a, _ = findings([run])
    (n,) = by_id(a, "lr_not_applied")
    assert n.severity == "error" and n.steps == [100, 5000]
    assert "lr is 1.000e-04 at all 50 records" in n.evidence and "configured base LR" in n.evidence
    assert "warmup 500" in n.evidence
    (d,) = by_id(a, "divergence")
    assert d.severity == "error"
    assert d.steps[0] == 1500                              # last good step: the minimum
    assert "last good step" in d.evidence and "loss" in d.evidence
    assert by_id(a, "lr_mismatch") == []


def test_lr_mismatch(tmp_path):
    run = toolkit_run(tmp_path, stage="prior", edit=lambda s, r: dict(r, lr=r["lr"] * 2))
    a, _ = findings([run])
    (m,) = by_id(a, "lr_mismatch")
    assert m.severity == "warning" and m.steps == [100, 5000]
    assert "50 of 50 records" in m.evidence and "logged/schedule ranges 2-2" in m.evidence


def test_original_constant_printed_lr_is_not_applied(tmp_path):
    cfg = {"model": {"lossconfig": {"disc_start": 10 ** 9}},
           "trainer": {"lr": 1e-4, "min_lr": 1e-3, "train_num_steps": 3000}}
    log = original_log(tmp_path / "p.log", list(range(0, 3001, 100)), config=cfg, stage="prior",
                       lr_fn=lambda s: 1e-4)
    a, r = findings([log])
    assert r.stage == "prior"
    (n,) = by_id(a, "lr_not_applied")
    assert "lr is 1.000e-04 at all 31 records" in n.evidence
    assert "**0.96" in n.evidence                       # the stage-2 trainer's power


# --------------------------------------------------------------------------- other faults
def test_nonfinite_values_and_skipped_updates(tmp_path):
    def edit(step, rec):
        if step in (1200, 1300):
            rec["rec_loss"] = float("nan")
        if step == 1300:
            rec["grad_norm"] = float("inf")
        if step >= 1300:
            rec["nonfinite_skipped"] = 2
        return rec
    a, _ = findings([toolkit_run(tmp_path, edit=edit)])
    (n,) = by_id(a, "nonfinite")
    assert n.severity == "error" and n.steps == [1200, 1300]
    assert "nan in rec_loss at 2 record(s) (steps 1,200, 1,300)" in n.evidence
    assert "inf in grad_norm at 1 record(s) (steps 1,300)" in n.evidence
    assert "nonfinite_skipped" in n.evidence and "reaches 2" in n.evidence


def test_toolkit_disc_inactive_and_logvar_frozen(tmp_path):
    def edit(step, rec):
        rec["logvar"] = 0.0
        if step > 2000:
            rec["disc_loss"], rec["grad_norm_disc"] = 0.0, 0.0
        return rec
    a, _ = findings([toolkit_run(tmp_path, edit=edit)])
    (d,) = by_id(a, "disc_inactive")
    assert d.steps == [2001, 5000]          # from the trainer's disc_start event
    assert "disc_loss is 0 at all 30 records" in d.evidence and "grad_norm_disc is 0" in d.evidence
    (lv,) = by_id(a, "logvar_frozen")
    assert lv.severity == "warning" and "0 at all 50 records" in lv.evidence


def test_disc_factor_never_switches(tmp_path):
    def edit(step, rec):
        rec["disc_factor"] = 0.0
        return rec
    a, _ = findings([toolkit_run(tmp_path, edit=edit)])
    (d,) = by_id(a, "disc_inactive")
    assert d.steps == [2001, 5000] and "disc_factor is 0 at all 50 records" in d.evidence
    assert by_id(a, "disc_start") == []


def test_gan_switched_off_is_not_an_inactive_discriminator(tmp_path):
    def edit(step, rec):
        rec["disc_factor"], rec["disc_loss"], rec["g_loss"], rec["grad_norm_disc"] = 0.0, None, None, None
        return rec
    a, _ = findings([toolkit_run(tmp_path, edit=edit, overrides=("vae.loss.disc_weight=0",))])
    assert a.findings == []


def test_step_jump_without_resume_record(tmp_path):
    run = toolkit_run(tmp_path, stage="prior",
                      segments=[list(range(100, 1001, 100)) + list(range(3000, 5001, 100))])
    a, _ = findings([run])
    (j,) = by_id(a, "resume")
    assert j.severity == "warning" and j.steps == [1000, 3000]
    assert "jumps from 1,000 to 3,000" in j.evidence


def test_log_that_starts_late(tmp_path):
    log = original_log(tmp_path / "late.log", list(range(35000, 36001, 100)),
                       config={"model": {"lossconfig": {"disc_start": 50001}},
                               "trainer": {"lr": 1e-4, "min_lr": 5e-7, "train_num_steps": 150000}})
    a, _ = findings([log])
    (res,) = by_id(a, "resume")
    assert res.steps == [35000, 35000] and res.severity == "info" and "not among the inputs" in res.evidence


def test_trainer_divergence_event_is_reported(tmp_path):
    run = toolkit_run(tmp_path, stage="prior")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4000, "split": "event", "time": 1.8e9, "event": "divergence", '
                '"message": "smoothed rec_loss 0.9 > 3 x best 0.2 (step 1000) since step 3900"}\n')
    a, _ = findings([run])
    (d,) = by_id(a, "divergence")
    assert d.steps == [4000, 4000] and "smoothed rec_loss 0.9" in d.evidence


def test_moving_average():
    v = np.arange(10, dtype=float)
    assert moving_average(v, 3).tolist() == pytest.approx([0, 0.5, 1, 2, 3, 4, 5, 6, 7, 8])
    assert moving_average(v, 3, centered=True).tolist() == pytest.approx([0.5, 1, 2, 3, 4, 5, 6, 7, 8, 8.5])
