"""The report's findings about resumes and the learning rate (the rules are listed in
:mod:`lib.findings`): ``resume``, ``lr_display_rounding``, ``lr_not_applied``, ``lr_mismatch``.
"""
from __future__ import annotations

import math

import numpy as np

from lib.findings import LR_RTOL, MIN_RECORDS, ZERO_ATOL, Analysis, Finding
from lib.numfmt import fmt, fmt_duration, fmt_span, fmt_step
from lib.read_toolkit import resume_history
from lib.runtable import JUMP_FACTOR, ParsedRun


def resume_findings(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    history = resume_history(run)
    matched: set[int] = set()
    med = run.median_interval or 0.0
    preempted = [e for e in run.events if e.get("event") == "preempted"]
    segs = run.segments
    if segs and med and segs[0].first_step > JUMP_FACTOR * med:
        s0 = segs[0]
        out.append(Finding("resume", "Log starts after step 0",
                           [s0.first_step, s0.first_step],
                           f"the first train record ({s0.source}) is at step {fmt_step(s0.first_step)}, "
                           f"{s0.first_step / med:.0f} typical intervals ({fmt(med)} steps) after "
                           f"step 0: the run was resumed from a checkpoint, and the logs before it "
                           f"are not among the inputs", "info"))
        a.resume_marks.append((s0.first_step, "start of log"))
    for prev, seg in zip(segs, segs[1:]):
        parts = []
        severity = "info"
        if seg.reason == "new log file":
            parts.append(f"{seg.source} starts at step {fmt_step(seg.first_step)}; the previous file "
                         f"({prev.source}) ended at step {fmt_step(prev.last_step)}")
        elif seg.reason == "resume event":
            info = seg.info
            parts.append(f"resume event: {info.get('message') or 'resumed'}"
                         if info.get("message") else
                         f"resume event from {info.get('from_checkpoint')}")
        elif seg.reason == "step went back":
            parts.append(f"in {seg.source} the step goes back from {fmt_step(prev.last_step)} to "
                         f"{fmt_step(seg.first_step)}")
        elif seg.reason == "step jump":
            parts.append(f"in {seg.source} the step jumps from {fmt_step(prev.last_step)} to "
                         f"{fmt_step(seg.first_step)} ({(seg.first_step - prev.last_step) / med:.0f} typical "
                         f"intervals of {fmt(med)} steps)")
        if seg.first_step <= prev.last_step:
            parts.append(f"steps {fmt_step(seg.first_step)}-{fmt_step(prev.last_step)} were trained again from "
                         f"a checkpoint; the table keeps the later records")
        elif med and seg.first_step - prev.last_step > JUMP_FACTOR * med:
            parts.append(f"no records between steps {fmt_step(prev.last_step)} and {fmt_step(seg.first_step)}")
            severity = "warning"
        if math.isfinite(prev.last_time) and math.isfinite(seg.first_time):
            gap = seg.first_time - prev.last_time
            if gap >= 0:
                parts.append(f"{fmt_duration(gap)} between the last record before and the first after")
        for p in preempted:
            if prev.first_step <= p["step"] <= prev.last_step + max(med, 1):
                parts.append(f"preempted at step {fmt_step(p['step'])}")
        for h in history:
            if h["step"] not in matched and abs(h["step"] - seg.first_step) <= max(med, 1) * 1.5:
                matched.add(h["step"])
                desc = f"{h['source']}: resumed at step {fmt_step(h['step'])} from {h.get('from_checkpoint')}"
                if h.get("changes"):
                    desc += f", changed {h['changes']}"
                parts.append(desc)
        lo, hi = sorted((seg.first_step, prev.last_step))
        title = {"new log file": "Resume (new log file)", "resume event": "Resume",
                 "step went back": "Resume (step went back)",
                 "step jump": "Step jump (records missing or unrecorded resume)"}[seg.reason]
        if seg.reason == "step jump":
            severity = "warning"
        out.append(Finding("resume", title, [lo, hi], "; ".join(parts), severity))
        a.resume_marks.append((seg.first_step, "resume" if seg.reason != "step jump" else "step jump"))
    for h in history:
        if h["step"] in matched:
            continue
        desc = f"{h['source']} records a resume at step {fmt_step(h['step'])} from {h.get('from_checkpoint')}"
        if h.get("changes"):
            desc += f" that changed {h['changes']}"
        desc += " (no train records after it in the log)" if not any(
            s.first_step >= h["step"] for s in segs[1:]) else ""
        out.append(Finding("resume", "Resume", [h["step"], h["step"]], desc, "info"))
        a.resume_marks.append((h["step"], "resume"))


def lr_findings(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    sched = a.schedule
    steps, lr = run.series("lr")
    if len(lr) == 0:
        return
    a.lr_steps = steps
    dec = run.lr_decimals
    zeros = np.abs(lr) <= ZERO_ATOL
    if sched is None:
        if dec is not None and zeros.any():
            zs = steps[zeros]
            out.append(Finding(
                "lr_display_rounding", "LR printed as 0 (fixed decimals)", [int(zs[0]), int(zs[-1])],
                f"lr is printed with {dec} decimals and reads {0:.{dec}f} at {int(zeros.sum())} of "
                f"{len(lr)} records ({fmt_span(int(zs[0]), int(zs[-1]))}); any LR below "
                f"{0.5 * 10 ** -dec:.0e} prints like this. No config is known to compare with "
                f"(pass --config), so the real LR cannot be read from this log", "warning"))
        return
    exp = sched.lr_at_steps(steps)
    a.lr_expected = exp
    if dec is not None:
        tol = 0.5 * 10.0 ** -dec * (1 + 1e-6) + 1e-15
        consistent = np.abs(lr - exp) <= tol
    else:
        consistent = np.abs(lr - exp) <= LR_RTOL * np.abs(exp) + 1e-15
    if not consistent.all():        # allow the LR of the step before / after (logging convention)
        bad = np.nonzero(~consistent)[0]
        for off in (-1, 1):
            e2 = sched.lr_at_steps(steps[bad] + off)
            ok = (np.abs(lr[bad] - e2) <= (tol if dec is not None else LR_RTOL * np.abs(e2) + 1e-15))
            consistent[bad[ok]] = True
            bad = bad[~ok]
    explained = np.zeros(len(lr), dtype=bool)

    # display rounding: zeros the schedule explains
    if dec is not None and sched.decaying:
        zr = zeros & consistent & (exp > 0)
        if zr.any():
            zs = steps[zr]
            i0, i1 = np.nonzero(zr)[0][[0, -1]]
            out.append(Finding(
                "lr_display_rounding", "LR printed as 0: display rounding", [int(zs[0]), int(zs[-1])],
                f"lr reads {0:.{dec}f} at {int(zr.sum())} of {len(lr)} records "
                f"({fmt_span(int(zs[0]), int(zs[-1]))}); the configured schedule ({sched.description}; "
                f"from {sched.source}) gives {fmt(exp[i0])} at step {fmt_step(steps[i0])} and "
                f"{fmt(exp[i1])} at step {fmt_step(steps[i1])}, below {0.5 * 10 ** -dec:.0e}, which "
                f"'{{:.{dec}f}}' prints as {0:.{dec}f}: the LR was applied, the log cannot show it "
                f"(figure 3 plots the schedule)", "warning"))
            explained |= zr

    # a schedule that was never applied: constant logged LR while the schedule moves
    if len(lr) >= MIN_RECORDS and sched.decaying:
        ptp = float(np.ptp(lr))
        const = (ptp == 0.0 and abs(lr[0]) > ZERO_ATOL) if dec is not None else (
            ptp <= 1e-9 * max(abs(float(lr[0])), 1e-300))
        if dec is not None:
            moves = len(np.unique(np.round(exp, dec))) > 1
        else:
            lo, hi = float(np.min(exp)), float(np.max(exp))
            moves = hi - lo > LR_RTOL * max(abs(hi), 1e-300)
        if const and moves and not consistent.all():
            bad = np.nonzero(~consistent)[0]
            j_lo, j_hi = int(np.argmin(exp)), int(np.argmax(exp))
            base = ""
            if run.train_config is not None and math.isclose(float(lr[0]), run.train_config.lr, rel_tol=1e-6):
                base = " (the configured base LR: the optimizer kept its initial value)"
            out.append(Finding(
                "lr_not_applied", "LR constant: the configured schedule was not applied",
                [int(steps[bad[0]]), int(steps[bad[-1]])],
                f"lr is {fmt(lr[0])} at all {len(lr)} records ({fmt_span(int(steps[0]), int(steps[-1]))}){base}; "
                f"the configured schedule ({sched.description}; from {sched.source}) says "
                f"{fmt(exp[0])} at step {fmt_step(steps[0])}, {fmt(exp[j_hi])} at step {fmt_step(steps[j_hi])} and "
                f"{fmt(exp[j_lo])} at step {fmt_step(steps[j_lo])}; {len(bad)} records differ from it", "error"))
            explained |= ~consistent

    rest = ~consistent & ~explained
    if rest.any():
        idx = np.nonzero(rest)[0]
        i = idx[0]
        ratio = lr[idx] / np.where(exp[idx] == 0, np.nan, exp[idx])
        ratio_txt = ""
        if np.isfinite(ratio).any():
            ratio_txt = (f"; logged/schedule ranges {fmt(np.nanmin(ratio))}-{fmt(np.nanmax(ratio))}")
        out.append(Finding(
            "lr_mismatch", "Logged LR differs from the configured schedule",
            [int(steps[idx[0]]), int(steps[idx[-1]])],
            f"lr differs from the schedule ({sched.description}; from {sched.source}) at {len(idx)} of "
            f"{len(lr)} records, first at step {fmt_step(steps[i])}: logged {fmt(lr[i])}, schedule "
            f"{fmt(exp[i])}{ratio_txt}", "warning"))
