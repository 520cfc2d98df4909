"""The analysis of a training run for ``report.py``: every finding (:mod:`lib.report.findings`,
:mod:`lib.report.findings`) and the run's statistics (duration, throughput, ETA, final and
best values).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from lib.report.findings import (COUNT_COLUMNS, HIGHER_IS_BETTER, LOSS_COLUMNS, Analysis, Finding, disc_inactive,
                                  disc_phase, divergence, logvar, lr_findings, nonfinite, resume_findings,
                                  total_across_phases, train_steps)
from lib.report.read_run import schedule_for
from lib.report.runtable import ParsedRun


def run_stats(run: ParsedRun, a: Analysis) -> dict[str, Any]:
    s: dict[str, Any] = {}
    tsteps = train_steps(run)
    s["rows"] = int(len(run.steps))
    s["train_records"] = int(len(tsteps))
    s["val_records"] = int(np.any([run.present[c] for c in run.val_columns], axis=0).sum()) \
        if run.val_columns else 0
    s["first_step"] = int(tsteps[0]) if len(tsteps) else None
    s["last_step"] = int(tsteps[-1]) if len(tsteps) else None
    s["max_steps"] = run.max_steps
    if run.max_steps and s["last_step"] is not None:
        s["progress"] = s["last_step"] / run.max_steps
    t = run.time[np.isfinite(run.time)]
    segs = [g for g in run.segments if math.isfinite(g.first_time) and math.isfinite(g.last_time)]
    if len(t):
        s["duration_s"] = float(t.max() - t.min())
    if segs:
        active = sum(max(g.last_time - g.first_time, 0.0) for g in segs)
        trained = sum(max(g.last_step - g.first_step, 0) for g in segs)
        s["active_s"] = active
        s["downtime_s"] = max(s.get("duration_s", active) - active, 0.0)
        if active > 0:
            s["steps_per_hour"] = trained / active * 3600
        last = segs[-1]
        if last.last_time > last.first_time and last.last_step > last.first_step:
            s["steps_per_hour_last_start"] = (last.last_step - last.first_step) / (last.last_time - last.first_time) * 3600
    rate = s.get("steps_per_hour_last_start") or s.get("steps_per_hour")
    if run.max_steps and s["last_step"] is not None:
        remaining = run.max_steps - s["last_step"]
        if remaining <= 0:
            s["eta_s"] = 0.0
        elif rate:
            s["eta_s"] = remaining / rate * 3600
    ps, sps = run.series("steps_per_sec")
    if len(sps):
        tail = sps[-max(1, len(sps) // 10):]
        s["trainer_steps_per_sec_recent"] = float(np.median(tail))
    s["finished"] = any(e.get("event") == "end" for e in run.events) or (
        run.max_steps is not None and s["last_step"] is not None and s["last_step"] >= run.max_steps)
    final, best = {}, {}
    cols = [c for c in LOSS_COLUMNS if c in run.columns] + [c for c in ("lr",) if c in run.columns] + run.val_columns
    for c in cols:
        cs, cv = run.series(c, finite=False)
        if len(cv):
            final[c] = {"step": int(cs[-1]), "value": float(cv[-1])}
        fs, fv = run.series(c)
        if c in ("lr", "kl_loss", "g_loss", "disc_loss") or c.endswith(COUNT_COLUMNS) or len(fv) == 0:
            continue
        if c == "total_loss" and a.disc_phase_start is not None:
            continue     # not comparable across the phase switch
        higher = any(c.endswith(k) for k in HIGHER_IS_BETTER)
        i = int(np.argmax(fv) if higher else np.argmin(fv))
        best[c] = {"step": int(fs[i]), "value": float(fv[i]), "rule": "max" if higher else "min"}
    if "lr" in final and a.lr_expected is not None and len(a.lr_steps) and \
            int(a.lr_steps[-1]) == final["lr"]["step"]:
        final["lr"]["schedule"] = float(a.lr_expected[-1])
    s["final"] = final
    s["best"] = best
    return s


def analyze(run: ParsedRun) -> Analysis:
    """All findings and statistics of ``run``."""
    a = Analysis()
    out: list[Finding] = []
    if len(train_steps(run)) == 0:
        out.append(Finding("no_records", "No train records parsed", [0, 0],
                           f"{run.lines_read} non-empty line(s) read, {run.skipped_total} skipped "
                           f"({', '.join(f'{k}: {v}' for k, v in run.skipped.items()) or 'none'})",
                           "warning"))
    a.schedule = schedule_for(run)
    disc_phase(run, a, out)
    disc_inactive(run, a, out)
    resume_findings(run, a, out)
    divergence(run, a, out)
    nonfinite(run, a, out)
    total_across_phases(run, a, out)
    logvar(run, a, out)
    lr_findings(run, a, out)
    a.findings = out
    _finish(run, a)
    return a


def _finish(run: ParsedRun, a: Analysis) -> None:
    order = {"error": 0, "warning": 1, "info": 2}
    a.findings = sorted(a.findings, key=lambda f: (order.get(f.severity, 3), f.steps[0]))
    a.stats = run_stats(run, a)
