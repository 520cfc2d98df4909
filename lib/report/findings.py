"""What went wrong (or what happened) in a training run, from its parsed log.

:func:`lib.report.analysis.analyze` turns a :class:`lib.report.runtable.ParsedRun` into findings, each with an id,
a step range and the evidence (the measured values), plus the run statistics the report
shows (duration, throughput, ETA, final and best values). Findings state values; they never
grade a run.

Finding ids and their rules (thresholds are the constants below):

- ``disc_start`` (info): ``disc_factor`` goes from 0 to > 0; range = last record with 0 ..
  first record with > 0. A warning when the configured ``disc_start`` is outside that range.
- ``resume`` (info; warning when records are missing): a new log file, a ``resume`` event or
  ``run.json`` entry, the step going back, or the step jumping by more than ``JUMP_FACTOR``
  typical log intervals; also a log that starts late (earlier logs not given).
- ``lr_display_rounding`` (warning): the LR was printed with a fixed number of decimals
  (the reference's ``{:.5f}``) and reads 0 where the configured schedule is below half a unit
  of the last decimal (5e-6 for five decimals): the LR was there, the log cannot show it.
  Without a known config, printed zeros are reported the same way, saying that no schedule
  was there to check them against.
- ``lr_not_applied`` (error): the logged LR is constant (nonzero when printed with fixed
  decimals) over at least ``MIN_RECORDS`` records while the configured schedule changes by
  more than the print resolution (or ``LR_RTOL``) over the same steps.
- ``lr_mismatch`` (warning): the logged LR differs from the schedule (beyond rounding or
  ``LR_RTOL``, at step s-1, s and s+1) at some records and neither rule above explains it.
- ``disc_inactive`` (error): after the discriminator start, no ``disc_loss`` at all, or
  ``disc_loss`` zero or flat (peak-to-peak <= ``FLAT_RTOL`` x |median|, or equal prints),
  or ``grad_norm_disc`` zero; or ``disc_factor`` still 0 past the configured ``disc_start``
  (not when ``vae.loss.disc_weight`` is 0: the GAN term is switched off on purpose).
- ``divergence`` (error): the trailing moving average (window ``smoothing_window``) of the
  main loss (rec_loss, loss, loss_simple) stays above ``factor`` x its best so far for
  ``window`` consecutive records (the run's divergence_factor / divergence_window when its
  config is known, else 3 and 5); names the step of the best value (the last good step).
  A ``divergence`` event of this toolkit's trainer is quoted (a warning on its own).
- ``nonfinite`` (error; warning when only the skipped-update counter or events show it):
  NaN/inf values per column with their steps.
- ``total_loss_across_phases`` (info): total_loss is logged before and after the
  discriminator start; after it the total includes d_weight x disc_factor x g_loss, so the
  two phases are not comparable; reconstruction is compared instead.
- ``logvar_frozen`` (warning): the learned output log-variance is the same value at every one
  of at least 10 records.
- ``no_records`` (warning): nothing could be parsed.

The report's findings about resumes and the learning rate (the rules are listed in
:mod:`lib.report.findings`): ``resume``, ``lr_display_rounding``, ``lr_not_applied``, ``lr_mismatch``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from lib.numfmt import fmt, fmt_duration, fmt_span, fmt_step
from lib.report.read_toolkit import resume_history
from lib.report.runtable import JUMP_FACTOR, ParsedRun, Schedule

ZERO_ATOL = 1e-12          # |x| below this is zero
FLAT_RTOL = 1e-4           # peak-to-peak below this x |median| is flat
MIN_RECORDS = 3            # records needed before a flat / constant / missing rule applies
LR_RTOL = 1e-4             # full-precision LR vs schedule
DIVERGENCE_FACTOR = 3.0    # used when the run's config is unknown
DIVERGENCE_WINDOW = 5
MAIN_LOSSES = ("rec_loss", "loss", "loss_simple")
LOSS_COLUMNS = ("total_loss", "rec_loss", "nll_loss", "kl_loss", "g_loss", "disc_loss",
                "loss", "loss_simple", "loss_vlb")
HIGHER_IS_BETTER = ("psnr", "ssim")
COUNT_COLUMNS = ("num_samples", "num_maps", "seconds", "steps_per_sec", "nonfinite_skipped")  # no "best"


@dataclass
class Finding:
    id: str
    title: str
    steps: list[int]
    evidence: str
    severity: str = "info"          # info | warning | error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Analysis:
    findings: list[Finding] = field(default_factory=list)
    schedule: Optional[Schedule] = None
    lr_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lr_expected: Optional[np.ndarray] = None       # schedule at lr_steps
    disc_phase_start: Optional[int] = None         # first step with the GAN term
    disc_phase_source: Optional[str] = None        # "event" | "disc_factor" | "config"
    resume_marks: list[tuple[int, str]] = field(default_factory=list)
    main_loss: Optional[str] = None
    smoothing_window: int = 5
    stats: dict[str, Any] = field(default_factory=dict)


def list_steps(steps: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(fmt_step(s) for s in steps[:limit])
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > limit else "")


# --------------------------------------------------------------------------- helpers
def moving_average(values: np.ndarray, window: int, centered: bool = False) -> np.ndarray:
    """Mean over ``window`` records: trailing (the detection rules: no look-ahead) or centered
    (the figures: no lag); windows are shorter at the ends."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(len(v))
    if centered:
        lo = np.maximum(idx - window // 2, 0)
        hi = np.minimum(idx + window - window // 2, len(v))
    else:
        lo = np.maximum(idx + 1 - window, 0)
        hi = idx + 1
    return (c[hi] - c[lo]) / (hi - lo)


def smoothing_window(n: int) -> int:
    return int(max(5, min(200, n // 100)))


def runs_of_true(mask: np.ndarray, min_len: int) -> Optional[tuple[int, int]]:
    """(start, end inclusive) of the first run of at least ``min_len`` consecutive True."""
    if len(mask) < min_len:
        return None
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    starts = np.nonzero(d == 1)[0]
    ends = np.nonzero(d == -1)[0]           # exclusive
    ok = np.nonzero(ends - starts >= min_len)[0]
    if len(ok) == 0:
        return None
    return int(starts[ok[0]]), int(ends[ok[0]] - 1)


def train_steps(run: ParsedRun) -> np.ndarray:
    """Steps of rows that hold a train record (not only validation)."""
    if not run.columns:
        return np.zeros(0, np.int64)
    mask = np.zeros(len(run.steps), dtype=bool)
    for name in run.train_columns:
        mask |= run.present[name]
    return run.steps[mask]


# --------------------------------------------------------------------------- rules
def disc_phase(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    steps, df = run.series("disc_factor")
    cfg_start = run.disc_start
    cfg_note = f" (configured disc_start = {fmt_step(cfg_start)})" if cfg_start is not None else ""
    if len(df):
        on = df > ZERO_ATOL
        if on.any():
            i = int(np.argmax(on))
            a.disc_phase_start, a.disc_phase_source = int(steps[i]), "disc_factor"
            events = [e for e in run.events if e.get("event") == "disc_start"]
            if events and int(steps[max(i - 1, 0)]) <= int(events[0]["step"]) <= int(steps[i]):
                # the trainer's event is exact; a record step is where the mean first shows it
                a.disc_phase_start, a.disc_phase_source = int(events[0]["step"]), "event"
            if i == 0:
                out.append(Finding("disc_start", "Discriminator phase already on at the first record",
                                   [int(steps[0]), int(steps[0])],
                                   f"disc_factor = {fmt(df[0])} at the first record (step {fmt_step(steps[0])})"
                                   f"{cfg_note}; the start itself is not in the log", "info"))
                return
            prev = int(steps[i - 1])
            sev, extra = "info", ""
            # the record at step s is the mean over the updates before it (this toolkit: on
            # once s > disc_start) or the state at s (the reference: on once s >= disc_start)
            if cfg_start is not None and not (prev <= cfg_start <= int(steps[i])):
                sev = "warning"
                extra = f"; this does not match the configured disc_start = {fmt_step(cfg_start)}"
            ev = f"; trainer event disc_start at step {fmt_step(events[0]['step'])}" if events else ""
            out.append(Finding("disc_start", "Discriminator start",
                               [prev, int(steps[i])],
                               f"disc_factor is 0 at step {fmt_step(prev)} and {fmt(df[i])} from step "
                               f"{fmt_step(steps[i])} on{cfg_note if not extra else ''}{extra}{ev}", sev))
            return
        gan_off = run.config is not None and run.config.vae.loss.disc_weight == 0
        if cfg_start is not None and steps[-1] >= cfg_start and run.stage != "prior" and not gan_off:
            out.append(Finding("disc_inactive", "disc_factor stays 0 past the configured disc_start",
                               [int(cfg_start), int(steps[-1])],
                               f"disc_factor is 0 at all {len(df)} records up to step {fmt_step(steps[-1])} "
                               f"although disc_start = {fmt_step(cfg_start)}: the adversarial term never "
                               f"entered the loss", "error"))
        return
    gan_off = run.config is not None and run.config.vae.loss.disc_weight == 0
    if cfg_start is not None and run.stage == "vae" and len(run.steps) and run.steps[-1] >= cfg_start \
            and not gan_off:
        a.disc_phase_start, a.disc_phase_source = int(cfg_start), "config"


def disc_inactive(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    start = a.disc_phase_start
    if start is None:
        return
    gen_steps = train_steps(run)
    post = gen_steps[gen_steps >= start]
    if len(post) < MIN_RECORDS:
        return
    source = {"event": "the trainer's disc_start event", "disc_factor": "disc_factor"}
    where = f"from step {fmt_step(start)} ({source.get(a.disc_phase_source, 'configured disc_start')})"
    d_steps, d = run.series("disc_loss", finite=False)
    keep = d_steps >= start
    d_steps, d = d_steps[keep], d[keep]
    d_fin = d[np.isfinite(d)]
    problems = []
    if len(d) == 0:
        msg = (f"no disc_loss in any of the {len(post)} train records {where} to step "
               f"{fmt_step(post[-1])}")
        if run.kind == "original":
            msg += (": the log has no discriminator lines at all after the start, so the "
                    "discriminator step never ran (in the reference trainer it runs only when "
                    "gradient_accumulate_every >= 2)")
        problems.append(msg)
    elif len(d_fin) >= MIN_RECORDS:
        med = float(np.median(d_fin))
        ptp = float(np.ptp(d_fin))
        res = 0.5 * 10.0 ** -run.lr_decimals if (run.kind == "original" and run.lr_decimals) else 0.0
        if np.all(np.abs(d_fin) <= max(ZERO_ATOL, res)):
            problems.append(f"disc_loss is 0 at all {len(d_fin)} records {where} to step {fmt_step(d_steps[-1])}")
        elif ptp <= max(FLAT_RTOL * abs(med), res, ZERO_ATOL):
            problems.append(f"disc_loss is flat at {fmt(med)} (peak-to-peak {fmt(ptp)}) over "
                            f"{len(d_fin)} records {where} to step {fmt_step(d_steps[-1])}")
    g_steps, g = run.series("grad_norm_disc")
    g = g[g_steps >= start]
    if len(g) >= MIN_RECORDS and np.all(np.abs(g) <= ZERO_ATOL):
        problems.append(f"grad_norm_disc is 0 at all {len(g)} records {where}")
    if not problems:
        return
    for name in ("logits_real", "logits_fake"):
        s, v = run.series(name)
        v = v[s >= start]
        if len(v) >= MIN_RECORDS and np.ptp(v) <= max(FLAT_RTOL * abs(float(np.median(v))), ZERO_ATOL):
            problems.append(f"{name} is constant at {fmt(float(np.median(v)))}")
    out.append(Finding("disc_inactive", "Discriminator not training after its start",
                       [int(start), int(post[-1])], "; ".join(problems), "error"))


def divergence(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    name = next((c for c in MAIN_LOSSES if run.has(c)), None)
    if name is None and run.has("total_loss"):
        _, v = run.series("total_loss")
        name = "total_loss" if len(v) and np.all(v > 0) else None
    a.main_loss = name
    train_cfg = run.train_config
    factor = train_cfg.divergence_factor if train_cfg is not None else DIVERGENCE_FACTOR
    window = train_cfg.divergence_window if train_cfg is not None else DIVERGENCE_WINDOW
    events = [e for e in run.events if e.get("event") == "divergence"]
    found = None
    if name is not None:
        steps, v = run.series(name)
        w = smoothing_window(len(v))
        a.smoothing_window = w
        if len(v) >= w + window:
            sm = moving_average(v, w)[w - 1:]
            ss = steps[w - 1:]
            best = np.minimum.accumulate(sm)
            above = (best > 0) & (sm > factor * best)
            run_ = runs_of_true(above, window)
            if run_ is not None:
                i0, i1 = run_
                j = int(np.argmin(sm[:i0 + 1]))
                last = len(sm) - 1
                found = Finding(
                    "divergence", f"{name} diverged",
                    [int(ss[j]), int(ss[i1])],
                    f"the moving average of {name} over {w} records reaches its minimum "
                    f"{fmt(sm[j])} at step {fmt_step(ss[j])} (last good step); from step {fmt_step(ss[i0])} it "
                    f"stays above {factor:g} x that ({fmt(factor * sm[j])}) for {i1 - i0 + 1} records "
                    f"(to step {fmt_step(ss[i1])}); at the last record (step {fmt_step(ss[last])}) it is "
                    f"{fmt(sm[last])}, {sm[last] / sm[j]:.3g} x the minimum", "error")
    if events:
        ev_txt = "; ".join(f"trainer event at step {fmt_step(e['step'])}: {e.get('message', '')}" for e in events[:3])
        if found is not None:
            found.evidence += f"; {ev_txt}"
        else:
            found = Finding("divergence", "Divergence reported by the trainer",
                            [int(events[0]["step"]), int(events[-1]["step"])], ev_txt, "warning")
    if found is not None:
        out.append(found)


def nonfinite(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    parts, all_steps = [], []
    for name in run.columns:
        bad = run.present[name] & ~np.isfinite(run.columns[name])
        if not bad.any():
            continue
        vals = run.columns[name][bad]
        s = run.steps[bad]
        all_steps.append(s)
        kinds = []
        if np.isnan(vals).any():
            kinds.append("nan")
        if np.isinf(vals).any():
            kinds.append("inf")
        parts.append(f"{'/'.join(kinds)} in {name} at {int(bad.sum())} record(s) (steps {list_steps(s)})")
    severity = "error" if parts else "warning"
    s_steps, skipped = run.series("nonfinite_skipped")
    if len(skipped) and skipped.max() > 0:
        first = int(np.argmax(skipped > 0))
        parts.append(f"nonfinite_skipped (updates skipped for non-finite values) reaches "
                     f"{int(skipped.max())} by step {fmt_step(s_steps[int(np.argmax(skipped))])}, first > 0 "
                     f"at step {fmt_step(s_steps[first])}")
        all_steps.append(s_steps[first:first + 1])
        all_steps.append(s_steps[int(np.argmax(skipped)):][:1])
    evs = [e for e in run.events if e.get("event") == "nonfinite"]
    if evs:
        ev_steps = np.array([e["step"] for e in evs], dtype=np.int64)
        parts.append(f"{len(evs)} nonfinite event(s) at steps {list_steps(ev_steps)}")
        all_steps.append(ev_steps)
    if not parts:
        return
    s = np.concatenate(all_steps) if all_steps else np.zeros(1, np.int64)
    out.append(Finding("nonfinite", "Non-finite values", [int(s.min()), int(s.max())],
                       "; ".join(parts), severity))


def total_across_phases(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    start = a.disc_phase_start
    if start is None or not run.has("total_loss"):
        return
    steps, tl = run.series("total_loss")
    pre, post = tl[steps < start], tl[steps >= start]
    if len(pre) == 0 or len(post) == 0:
        return
    parts = [f"total_loss median {fmt(np.median(pre))} before step {fmt_step(start)} and "
             f"{fmt(np.median(post))} from it on"]
    ds, dw = run.series("d_weight")
    gs, gl = run.series("g_loss")
    if len(dw) and len(gl):
        both = np.intersect1d(ds[ds >= start], gs)
        if len(both):
            dwv = dw[np.searchsorted(ds, both)]
            glv = gl[np.searchsorted(gs, both)]
            fs, fv = run.series("disc_factor")
            fac = fv[np.searchsorted(fs, both)] if len(fv) and np.isin(both, fs).all() else np.ones(len(both))
            term = dwv * fac * glv
            parts.append(f"after the switch it includes the adversarial term d_weight x disc_factor x "
                         f"g_loss (median d_weight {fmt(np.median(dwv))}, g_loss {fmt(np.median(glv))}, "
                         f"term {fmt(np.median(term))})")
    else:
        parts.append("after the switch it includes the adversarial term d_weight x disc_factor x g_loss")
    parts.append("so total_loss is not comparable across the switch")
    rs, rl = run.series("rec_loss")
    if len(rl) and (rs < start).any() and (rs >= start).any():
        parts.append(f"compare rec_loss instead: median {fmt(np.median(rl[rs < start]))} before, "
                     f"{fmt(np.median(rl[rs >= start]))} after")
    last_pre = int(steps[steps < start][-1])
    first_post = int(steps[steps >= start][0])
    out.append(Finding("total_loss_across_phases", "total_loss is not comparable across the discriminator start",
                       [last_pre, first_post], "; ".join(parts), "info"))


def logvar(run: ParsedRun, a: Analysis, out: list[Finding]) -> None:
    steps, v = run.series("logvar")
    if len(v) >= 10 and np.ptp(v) == 0:
        out.append(Finding("logvar_frozen", "Learned log-variance never changes",
                           [int(steps[0]), int(steps[-1])],
                           f"logvar is {fmt(v[0])} at all {len(v)} records: the learned output "
                           f"log-variance is not being updated (is it in an optimizer?)", "warning"))


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
