"""The report's text: ``metrics.csv`` (one row per step), ``report.md`` and ``summary.json``,
and the lines that describe a run (shared with the dashboard figure).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from lib.numfmt import fmt, fmt_duration, fmt_step
from lib.report.findings import Analysis
from lib.report.runtable import ParsedRun, finite_or_str

CSV_FORMAT = "{:.12g}"
FIGURES = {
    "phases": "fig1_training_phases.png",
    "components": "fig2_loss_components.png",
    "lr": "fig3_learning_rate.png",
    "validation": "fig4_validation.png",
    "dashboard": "fig5_dashboard.png",
}


# --------------------------------------------------------------------------- CSV
def write_csv(run: ParsedRun, path: Path) -> None:
    """One row per step: step, time, train columns (``train/`` prefix stripped), ``val_`` columns.
    Empty cells: not logged at that step; ``nan`` / ``inf``: logged as such. Values have 12
    significant digits (exact for float32 losses and five-decimal logs; twice as fast as repr)."""
    names = run.train_columns + run.val_columns
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(["step", "time"] + names)
    cols = [list(map(str, run.steps.tolist()))]
    tstr = list(map("{:.3f}".format, run.time.tolist()))
    for i in np.nonzero(~np.isfinite(run.time))[0].tolist():
        tstr[i] = ""
    cols.append(tstr)
    fmt = CSV_FORMAT.format
    for name in names:
        strs = list(map(fmt, run.columns[name].tolist()))
        for i in np.nonzero(~run.present[name])[0].tolist():
            strs[i] = ""
        cols.append(strs)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(header.getvalue())
        if len(run.steps):
            f.write("\n".join(map(",".join, zip(*cols))))
            f.write("\n")


# --------------------------------------------------------------------------- describing a run
def dashboard_lines(run: ParsedRun, a: Analysis) -> list[str]:
    s = a.stats
    lines = [f"source: {run.kind} ({len(run.sources)} file(s)), stage: {run.stage or 'unknown'}"]
    if s.get("last_step") is not None:
        prog = f" of {fmt_step(run.max_steps)} ({100 * s['progress']:.1f} %)" if s.get("progress") is not None else ""
        lines.append(f"steps: {fmt_step(s['first_step'])} - {fmt_step(s['last_step'])}{prog}; "
                     f"{s['train_records']} train / {s['val_records']} val records")
    lines.append(f"duration: {fmt_duration(s.get('duration_s', float('nan')))}"
                 f" (training {fmt_duration(s.get('active_s', float('nan')))}, "
                 f"between starts {fmt_duration(s.get('downtime_s', float('nan')))}); "
                 f"starts of the trainer: {len(run.segments)}")
    if s.get("steps_per_hour"):
        lines.append(f"throughput: {s['steps_per_hour']:,.0f} steps/h overall"
                     + (f", {s['steps_per_hour_last_start']:,.0f} steps/h in the last start"
                        if s.get("steps_per_hour_last_start") else ""))
    if "eta_s" in s:
        lines.append("ETA: reached max_steps" if s["eta_s"] == 0 else
                     f"ETA to step {fmt_step(run.max_steps)}: {fmt_duration(s['eta_s'])} at the last start's rate")
    lines.append(f"skipped lines: {run.skipped_total} of {run.lines_read}"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in run.skipped.items())})" if run.skipped else ""))
    return lines


def run_name(run: ParsedRun) -> str:
    """'demo/vae' for a run folder, the file names for original logs."""
    if run.kind in ("toolkit", "tensorboard") and run.sources:
        folder = Path(run.sources[0]).parent
        return f"{folder.parent.name}/{folder.name}"
    return ", ".join(Path(p).name for p in run.sources[:3]) + (" ..." if len(run.sources) > 3 else "")


def final_text(f: dict[str, Any]) -> str:
    text = fmt(f["value"])
    if "schedule" in f:
        text += f" (schedule {fmt(f['schedule'])})"
    return text


def span_text(steps: list[int]) -> str:
    a, b = steps
    return f"step {fmt_step(a)}" if a == b else f"steps {fmt_step(a)}-{fmt_step(b)}"


# --------------------------------------------------------------------------- summary + markdown
def build_summary(run: ParsedRun, a: Analysis, figures: list[str], timings: dict[str, float]) -> dict[str, Any]:
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return finite_or_str(x)

    return clean({
        "run": {"kind": run.kind, "stage": run.stage, "sources": run.sources,
                "config": run.config_source or ("config line of the log" if run.original_config else None),
                "schedule": a.schedule.description if a.schedule else None,
                "disc_phase_start": a.disc_phase_start, "disc_phase_source": a.disc_phase_source,
                "lr_printed_decimals": run.lr_decimals},
        "columns": run.train_columns + run.val_columns,
        "stats": a.stats,
        "findings": [f.to_dict() for f in a.findings],
        "skipped_lines": {"total": run.skipped_total, "by_reason": run.skipped,
                          "examples": run.skipped_examples, "lines_read": run.lines_read,
                          "non_utf8_lines": run.non_utf8_lines,
                          "non_numeric_values_dropped": run.dropped_values},
        "segments": [{"index": g.index, "source": g.source, "reason": g.reason,
                      "first_step": g.first_step, "last_step": g.last_step, "records": g.records}
                     for g in run.segments],
        "events": [{k: v for k, v in e.items() if isinstance(v, (str, int, float, bool, type(None)))}
                   for e in run.events[:500]],
        "notes": run.notes,
        "figures": figures,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    })


def write_markdown(run: ParsedRun, a: Analysis, figures: list[str], path: Path) -> None:
    s = a.stats
    name = run_name(run)
    md = [f"# Training report: {name}", ""]
    md.append(f"Source: {run.kind} log ({', '.join(run.sources[:5])}); stage: {run.stage or 'unknown'}.")
    md.append("Generated by `report.py`. The findings list measured values; see `lib/report/findings.py` for "
              "the rules and thresholds.")
    md.append("")
    md.append("## Summary")
    md.append("")
    for line in dashboard_lines(run, a):
        md.append(f"- {line}")
    if a.schedule is not None:
        md.append(f"- LR schedule compared with: {a.schedule.description} (from {a.schedule.source})")
    else:
        md.append("- LR schedule: no config known (pass `--config`); the logged LR is shown as is")
    for n in run.notes:
        md.append(f"- note: {n}")
    md.append("")
    md.append(f"## Findings ({len(a.findings)})")
    md.append("")
    if not a.findings:
        md.append("None.")
    for f in a.findings:
        md.append(f"- **{f.severity}** `{f.id}` - {f.title} ({span_text(f.steps)}): {f.evidence}")
    md.append("")
    md.append("## Final and best values")
    md.append("")
    md.append("| column | final | at step | best | at step |")
    md.append("|---|---|---|---|---|")
    for col, f in s.get("final", {}).items():
        b = s.get("best", {}).get(col)
        md.append(f"| {col} | {final_text(f)} | {fmt_step(f['step'])} | "
                  + (f"{fmt(b['value'])} ({b['rule']}) | {fmt_step(b['step'])} |" if b else "- | - |"))
    md.append("")
    md.append("## Figures")
    md.append("")
    captions = {
        FIGURES["phases"]: "Figure 1: main losses against step" + (
            "; the purple line marks the discriminator start (shaded after it)" if a.disc_phase_start is not None
            else "") + "; dashed lines mark resumes; the red curve is a centered moving average.",
        FIGURES["components"]: "Figure 2: loss components, each on its own panel, with a moving average.",
        FIGURES["lr"]: "Figure 3: logged LR and the LR of the configured schedule, log scale; logged zeros "
                       "are drawn as triangles at the bottom.",
        FIGURES["validation"]: "Figure 4: validation metrics.",
        FIGURES["dashboard"]: "Figure 5: dashboard (run, progress, main loss, key validation metric, final and "
                              "best values, findings).",
    }
    for fig in figures:
        md.append(f"![{fig}]({fig})")
        md.append("")
        md.append(captions.get(fig, ""))
        md.append("")
    if not figures:
        md.append("Not drawn (--no-figures).")
    elif FIGURES["validation"] not in figures:
        md.append("No validation records in the log (no figure 4).")
        md.append("")
    md.append("## Input")
    md.append("")
    md.append(f"- lines read: {run.lines_read}; skipped: {run.skipped_total}"
              + (f" ({', '.join(f'{k}: {v}' for k, v in run.skipped.items())})" if run.skipped else ""))
    if run.non_utf8_lines:
        md.append(f"- lines with bytes that are not UTF-8: {run.non_utf8_lines} (decoded with replacement; "
                  f"used where the record was still valid)")
    if run.dropped_values:
        md.append(f"- non-numeric values inside records (ignored): {run.dropped_values}")
    for ex in run.skipped_examples:
        md.append(f"- skipped: `{ex.replace('`', chr(39))}`")
    md.append("- starts of the trainer (segments): " + "; ".join(
        f"{g.source} {g.reason} steps {fmt_step(g.first_step)}-{fmt_step(g.last_step)} ({g.records} records)"
        for g in run.segments[:20]))
    md.append("- `metrics.csv`: one row per step (the later record when a resumed run logged a step "
              "twice); empty cell = not logged; `time` in unix seconds (original logs: their local "
              "time read as UTC)")
    events = [e for e in run.events if e.get("event") != "checkpoint"]
    saved = [e["step"] for e in run.events if e.get("event") == "checkpoint"]
    if events or saved:
        md.append("")
        md.append("## Events")
        md.append("")
        if saved:
            md.append(f"- checkpoints written: {len(saved)} (steps "
                      f"{', '.join(fmt_step(s) for s in saved[:12])}{', ...' if len(saved) > 12 else ''})")
        for e in events[:50]:
            md.append(f"- step {fmt_step(e['step'])}: {e.get('event')}: {e.get('message', '')}")
        if len(events) > 50:
            md.append(f"- ... {len(events) - 50} more in summary.json")
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


