"""report.py: parsing both log formats, the CSV, outputs, robust input, the CLI errors."""
from __future__ import annotations

import ast
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from report_logs import ORIG_CONFIG, orig_line, original_log, stamp, toolkit_run

import report
from lib.report.read_original import parse_config_line
from lib.report.read_run import load_run

ROOT = Path(__file__).resolve().parent.parent
PRAISE = ("excellent", "successful", "production-ready", "outstanding", "perfect", "state-of-the-art")


def read_csv(path: Path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def run_report(tmp_path: Path, *args: str, figures: bool = False) -> tuple[dict, Path]:
    out = tmp_path / "report_out"
    assert report.main([*args, "--out", str(out)] + ([] if figures else ["--no-figures"])) == 0
    return json.loads((out / "summary.json").read_text()), out


# --------------------------------------------------------------------------- original logs
def test_original_logs_merge_generator_and_discriminator_lines(tmp_path):
    log = tmp_path / "a.log"
    lines = [f"{stamp(0)} {ORIG_CONFIG!r}",
             orig_line(1100, 3000, {"train/total_loss": 1234.56789, "train/rec_loss": 0.01234,
                                    "train/disc_factor": 1.0, "lr": 0.0}, 10),
             orig_line(1100, 3000, {"train/disc_loss": 0.98765, "train/logits_real": 0.5,
                                    "train/logits_fake": -0.5, "lr": 0.0}, 10),
             orig_line(1200, 3000, {"train/total_loss": 1000.0, "train/rec_loss": 0.01,
                                    "train/disc_factor": 1.0, "lr": 0.0}, 20)]
    log.write_text("\n".join(lines) + "\n")
    summary, out = run_report(tmp_path, str(log))
    rows = read_csv(out / "metrics.csv")
    assert list(rows) == [1100, 1200]
    r = rows[1100]
    assert (r["total_loss"], r["rec_loss"], r["disc_loss"], r["logits_fake"]) == \
        ("1234.56789", "0.01234", "0.98765", "-0.5")
    assert rows[1200]["disc_loss"] == ""                 # not logged at that step: empty
    assert "train/total_loss" not in r                   # prefix stripped
    assert summary["skipped_lines"]["total"] == 0
    assert summary["run"]["lr_printed_decimals"] == 5
    assert summary["stats"]["max_steps"] == 3000


def test_original_resume_in_second_file_keeps_later_records(tmp_path):
    f1 = original_log(tmp_path / "2025-01-02-10-00_.log", list(range(0, 1501, 100)))
    f2 = original_log(tmp_path / "2025-01-03-09-00_.log", list(range(1200, 2001, 100)), t0=80000)
    # pass them in the wrong order: files are ordered by their first time stamp
    summary, out = run_report(tmp_path, str(f2), str(f1))
    rows = read_csv(out / "metrics.csv")
    assert sorted(rows) == list(range(0, 2001, 100))
    assert [s["reason"] for s in summary["segments"]] == ["start", "new log file"]
    res = [f for f in summary["findings"] if f["id"] == "resume"]
    assert len(res) == 1 and res[0]["steps"] == [1200, 1500] and res[0]["severity"] == "info"
    assert "2025-01-03-09-00_.log starts at step 1,200" in res[0]["evidence"]
    # a redone step's row comes from the later file: step 1,300 is its 2nd line (t0 80,000 s
    # + 20 s), step 1,100 the 12th line of the first file (120 s)
    assert float(rows[1300]["time"]) - float(rows[1100]["time"]) == pytest.approx(79900)


def test_folder_of_logs_and_default_out(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    original_log(logs / "x.log", list(range(0, 501, 100)))
    (logs / "notes.md").write_text("ignored: not *.log / *.txt")
    assert report.main([str(logs), "--no-figures"]) == 0
    assert (logs / "report" / "report.md").is_file()


def test_config_line_is_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    evil = "{'trainer': {'lr': __import__('os').system('touch %s')}}" % marker
    assert parse_config_line(evil) is None
    log = original_log(tmp_path / "evil.log", list(range(0, 501, 100)), config_text=evil)
    summary, _ = run_report(tmp_path, str(log))
    assert not marker.exists()
    assert summary["skipped_lines"]["by_reason"] == {"config line not readable as a literal": 1}
    assert summary["run"]["schedule"] is None


def test_no_eval_exec_in_report_code():
    for path in ("report.py", "lib/report/runtable.py", "lib/report/read_original.py", "lib/report/read_toolkit.py", "lib/report/read_run.py",
                 "lib/report/findings.py", "lib/report/findings.py", "lib/report/analysis.py", "lib/report/text.py",
                 "lib/report/figures.py"):
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "compile", "__import__"), (path, node.lineno)


def test_robust_original_log(tmp_path):
    log = tmp_path / "messy.log"
    good = [orig_line(s, 3000, {"train/rec_loss": 0.1, "train/kl_loss": 5.0, "lr": 0.0001}, s)
            for s in (100, 200, 300)]
    parts = [
        f"{stamp(0)} {ORIG_CONFIG!r}".encode(),
        good[0].encode(),
        b"Epoch 3: 100%|##########| 50/50 [00:01<00:00, 30.1it/s]",           # unrelated
        b"\x00\x01\x02\xff\xfe binary \x00 garbage \x89PNG",                   # binary
        "2025-01-02 10:00:01,000 caf\xe9 latin-1 bytes".encode("latin-1"),    # non-UTF-8, unrelated
        b"",                                                                   # empty: not counted
        good[1].encode(),
        orig_line(250, 3000, {"train/rec_loss": 0.1, "lr": 0.0001}, 1).replace("0.10000", "0.1\xff").encode("latin-1"),
        b"2025-01-02 10:00:02,000 [Train Step] 260/3000: train/rec_loss: nan, train/kl_loss: inf, lr: 0.00010, ",
        b"2025-01-02 10:00:03,000 [Train Step] 270/3000: train/rec_loss: 0.1, lr: oops, ",   # bad value
        good[2].encode(),
        b"2025-01-02 10:00:04,000 [Train Step] 400/3000: train/rec_loss: 0.12",            # truncated
    ]
    log.write_bytes(b"\n".join(parts))
    summary, out = run_report(tmp_path, str(log), figures=True)      # figures with nan/inf too
    sk = summary["skipped_lines"]
    assert sk["by_reason"] == {"unrelated text": 2, "binary": 1, "malformed record": 2, "truncated record": 1}
    assert sk["total"] == 6 and sk["non_utf8_lines"] == 3 and sk["lines_read"] == 11
    rows = read_csv(out / "metrics.csv")
    assert sorted(rows) == [100, 200, 260, 300]
    assert rows[260]["rec_loss"] == "nan" and rows[260]["kl_loss"] == "inf"
    nf = [f for f in summary["findings"] if f["id"] == "nonfinite"]
    assert nf and nf[0]["steps"] == [260, 260] and "rec_loss" in nf[0]["evidence"]
    md = (out / "report.md").read_text()
    assert "skipped: 6" in md


def test_nothing_readable_is_an_error_and_keeps_the_old_report(tmp_path):
    """Empty or garbage input: one-line error (exit 2 from the command line), no report, and a
    report already in --out stays as it was; a new report replaces an old one whole."""
    from lib.errors import UserError
    out = tmp_path / "report_out"
    log = original_log(tmp_path / "good.log", list(range(0, 501, 100)))
    assert report.main([str(log), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "fig1_training_phases.png" in before
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 40)
    for bad in (empty, garbage):
        with pytest.raises(UserError, match=r"nothing could be read from .*no report written"):
            report.main([str(bad), "--out", str(out)])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert report.main([str(log), "--out", str(out), "--no-figures"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "report.md", "summary.json"]   # no stale figure
    assert not list(tmp_path.glob(".report_out*"))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that are not a report's"):
        report.main([str(log), "--out", str(out)])
    assert (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- this toolkit
def test_toolkit_run_outputs(tmp_path):
    run = toolkit_run(tmp_path)
    assert report.main([str(run)]) == 0
    out = run / "report"
    for name in ("metrics.csv", "summary.json", "report.md", "fig1_training_phases.png",
                 "fig2_loss_components.png", "fig3_learning_rate.png", "fig4_validation.png",
                 "fig5_dashboard.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    for fig in ("fig1_training_phases.png", "fig5_dashboard.png"):
        assert f"]({fig})" in md
    summary = json.loads((out / "summary.json").read_text())
    text = (md + json.dumps(summary)).lower()
    assert not [w for w in PRAISE if w in text]
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 50
    assert float(rows[1000]["val_psnr"]) == 21.0 and rows[100]["val_psnr"] == ""
    assert rows[100]["g_loss"] == "" and float(rows[2100]["g_loss"]) < 0   # null before disc start
    st = summary["stats"]
    assert st["first_step"] == 100 and st["last_step"] == 5000 and st["max_steps"] == 5000
    assert st["steps_per_hour"] == pytest.approx(4900 / (49 * 50) * 3600)
    assert st["eta_s"] == 0.0
    assert st["best"]["val_psnr"] == {"step": 5000, "value": 25.0, "rule": "max"}
    assert summary["run"]["schedule"].startswith("cosine")


def test_disc_start_from_the_event_no_best_for_counts_and_stage_wording(tmp_path):
    summary, out = run_report(tmp_path / "v", str(toolkit_run(tmp_path / "v")), figures=True)
    assert summary["run"]["disc_phase_start"] == 2001 and summary["run"]["disc_phase_source"] == "event"
    st = summary["stats"]
    for count in ("val_num_samples", "val_seconds"):
        assert count in st["final"] and count not in st["best"]        # a count is not "better"
    assert "val_nmse" in st["best"]
    md = (out / "report.md").read_text()
    assert "purple line marks the discriminator start" in md
    summary, out = run_report(tmp_path / "p", str(toolkit_run(tmp_path / "p", stage="prior")), figures=True)
    md = (out / "report.md").read_text()
    assert summary["run"]["disc_phase_start"] is None and "discriminator" not in md.lower()


def test_toolkit_jsonl_robust(tmp_path):
    run = toolkit_run(tmp_path, stage="prior")
    p = run / "metrics.jsonl"
    text = p.read_text()
    extra = ('{"step": 5100, "split": "train", "time": 1.8e9, "loss": NaN, "lr": Infinity}\n'
             '{"step": 5200, "split": "train", "time": 1.8e9, "loss": nan, "lr": 1e-5}\n'   # not JSON
             'not json at all\n'
             '[1, 2, 3]\n'
             '{"step": "x", "split": "train"}\n'
             '{"step": 5300, "split": "train", "loss": "high", "lr": 1e-5}\n'
             '{"step": 5400, "split": "train", "time": 1.8e9, "loss": 0.')
    p.write_text(text + extra)
    r = load_run([str(run)])
    assert r.skipped == {"malformed record": 3, "truncated record": 1}
    assert r.dropped_values == 1
    assert list(r.steps[-3:]) == [5100, 5200, 5300]
    assert math.isnan(r.columns["loss"][-3]) and math.isinf(r.columns["lr"][-3])
    assert math.isnan(r.columns["loss"][-2]) and r.present["loss"][-2]
    assert not r.present["loss"][-1]                      # "high" is not a number


def test_tensorboard_fallback(tmp_path):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    run = tmp_path / "out" / "prior"
    (run / "tb").mkdir(parents=True)
    w = EventFileWriter(str(run / "tb"))
    for s in range(100, 1001, 100):
        vals = [Summary.Value(tag="train/loss", simple_value=1.0 / s),
                Summary.Value(tag="train/lr", simple_value=1e-4)]
        if s % 500 == 0:
            vals.append(Summary.Value(tag="val/psnr", simple_value=20.0 + s / 100))
        w.add_event(Event(wall_time=1.7e9 + s, step=s, summary=Summary(value=vals)))
    w.close()
    summary, out = run_report(tmp_path, str(run))
    assert summary["run"]["kind"] == "tensorboard" and summary["run"]["stage"] == "prior"
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 10 and float(rows[500]["val_psnr"]) == 25.0
    assert float(rows[200]["loss"]) == pytest.approx(1 / 200, rel=1e-6)


def test_output_folder_of_a_stage_parent(tmp_path):
    run = toolkit_run(tmp_path, stage="prior")
    r = load_run([str(run.parent)])                      # {output_dir}: the one stage in it
    assert r.stage == "prior" and len(r.steps) == 50


# --------------------------------------------------------------------------- CLI errors
def test_nonexistent_run_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "report.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: RUN path not found: ") and "Traceback" not in proc.stderr


def test_bad_config_option_is_a_user_error(tmp_path):
    from lib.errors import UserError
    log = original_log(tmp_path / "a.log", [0, 100])
    with pytest.raises(UserError, match="config file not found"):
        report.main([str(log), "--config", str(tmp_path / "missing.yaml")])


def test_parallel_parse_of_original_logs_equals_sequential(tmp_path, monkeypatch):
    import numpy as np

    import lib.report.read_original as rp
    # 41 lines: the halves split the generator and discriminator lines of step 2,000
    f1 = original_log(tmp_path / "a.log", list(range(1100, 3001, 100)))
    f2 = original_log(tmp_path / "b.log", list(range(2500, 3001, 100)), t0=90000)
    seq = load_run([str(f1), str(f2)])
    monkeypatch.setattr(rp, "PARALLEL_MIN_LINES", 10)
    par = load_run([str(f1), str(f2)])
    assert par.steps.tolist() == seq.steps.tolist() == list(range(1100, 3001, 100))
    assert sorted(par.columns) == sorted(seq.columns)
    for name in seq.columns:
        assert np.array_equal(par.columns[name], seq.columns[name], equal_nan=True), name
        assert np.array_equal(par.present[name], seq.present[name]), name
    assert np.array_equal(par.time, seq.time)
    assert [(s.reason, s.first_step, s.last_step) for s in par.segments] == \
        [(s.reason, s.first_step, s.last_step) for s in seq.segments]
    assert par.skipped == seq.skipped and par.lr_decimals == seq.lr_decimals == 5


def test_ambiguous_inputs_are_one_line_errors(tmp_path):
    from lib.errors import UserError
    toolkit_run(tmp_path, stage="vae")
    toolkit_run(tmp_path / "x", stage="prior")
    (tmp_path / "out" / "prior").symlink_to(tmp_path / "x" / "out" / "prior")
    with pytest.raises(UserError, match="holds several stages; pass one of"):
        load_run([str(tmp_path / "out")])
    log = original_log(tmp_path / "a.log", [0, 100])
    with pytest.raises(UserError, match="is a run folder of this toolkit: report on it alone"):
        load_run([str(log), str(tmp_path / "out" / "vae")])
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl, run.json or tb/"):
        load_run([str(empty)])


def test_lr_mismatch_reaches_the_figures_and_the_report(tmp_path):
    run = toolkit_run(tmp_path, stage="prior", edit=lambda s, r: dict(r, lr=r["lr"] * 2))
    summary, out = run_report(tmp_path, str(run), figures=True)
    assert [f["id"] for f in summary["findings"]] == ["lr_mismatch"]
    assert "fig3_learning_rate.png" in summary["figures"] and "lr_mismatch" in (out / "report.md").read_text()


def test_an_overlong_line_and_an_impossible_step_are_skipped_not_fatal(tmp_path):
    """A line of several MiB is counted and skipped without being read whole (report.py once used
    7.8 GB on one 253 MB line); a step beyond any run's (2^64) is skipped, not an overflow."""
    from lib.report.runtable import MAX_LINE
    run = toolkit_run(tmp_path, stage="prior")
    p = run / "metrics.jsonl"
    long_line = '{"step": 5100, "split": "train", "loss": 1.0, "pad": "' + "x" * (3 * MAX_LINE) + '"}\n'
    with open(p, "a") as f:
        f.write(long_line + '{"step": 18446744073709551616, "split": "train", "loss": 1.0, "lr": 1e-5}\n'
                + f'{{"step": {2 ** 62 + 5}, "split": "train", "loss": 1.0, "lr": 1e-5}}\n'
                + '{"step": 5200, "split": "train", "time": 1.8e9, "loss": 0.5, "lr": 1e-5}\n')
    r = load_run([str(run)])
    assert r.skipped == {"line longer than 1 MiB": 1, "malformed record": 1, "step out of range": 1}
    assert list(r.steps[-2:]) == [5000, 5200]
    log = original_log(tmp_path / "o.log", list(range(0, 501, 100)))
    with open(log, "a") as f:
        f.write(orig_line(99999999999999999999999, 3000, {"loss": 1.0, "lr": 1e-5}, 9.0) + "\n")
    assert load_run([str(log)]).skipped == {"step out of range": 1}
