"""Report on a training run: metrics.csv, summary.json, figures and report.md with findings.

    python report.py runs/demo/vae                       # a run folder of this toolkit
    python report.py logs/2025-08-15-20-41_.log logs/2025-08-16-09-02_.log   # original trainer
    python report.py logs/ --config configs/m.yaml --out reports/m

RUN is a run folder of this toolkit (``{output_dir}/vae`` or ``{output_dir}/prior``: it reads
``metrics.jsonl``, ``run.json`` and ``config.yaml``, TensorBoard events when the JSON lines are
missing), or one or more text logs of the original RadioDiff trainer (files, or a folder of
``*.log`` / ``*.txt``; a resumed run starts a new file). ``--config`` gives the config whose LR
schedule the logged LR is compared with (default: the run's ``config.yaml``, or for original
logs the config line at the top of each file, read without executing anything).

Outputs go to ``--out`` (default ``RUN/report/``; for log files the folder of the first one):
``metrics.csv`` (one row per step), ``summary.json`` (statistics, findings, skipped lines),
five PNG figures and ``report.md`` that embeds them. The findings are listed in
:mod:`lib.findings` with their rules.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lib.errors import UserError, run_cli
from lib.findings import Analysis, analyze, hours, moving_average, num, st
from lib.runlog_parse import ParsedRun, finite_or_str, load_run, resolve_inputs

MAX_PLOT_BINS = 1500        # points per curve after min/max-envelope downsampling
CSV_FORMAT = "{:.12g}"
DPI = 100
COLORS = {"main": "#1f77b4", "ma": "#d62728", "disc": "#d62728", "resume": "#555555",
          "sched": "#ff7f0e"}
FIGURES = {
    "phases": "fig1_training_phases.png",
    "components": "fig2_loss_components.png",
    "lr": "fig3_learning_rate.png",
    "validation": "fig4_validation.png",
    "dashboard": "fig5_dashboard.png",
}


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Findings and their rules: see lib/findings.py")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a run folder of this toolkit, or log files / a folder of the original trainer")
    p.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    p.add_argument("--config", default=None,
                   help="config YAML whose LR schedule the logged LR is compared with")
    p.add_argument("--no-figures", action="store_true",
                   help="write metrics.csv, summary.json and report.md only")
    return p.parse_args(argv)


def default_out(runs: list[str]) -> Path:
    kind, resolved = resolve_inputs(runs)
    if kind == "toolkit":
        return resolved[0] / "report"
    first = Path(runs[0])
    return (first if first.is_dir() else first.parent) / "report"


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


# --------------------------------------------------------------------------- plotting helpers
def envelope(x: np.ndarray, y: np.ndarray, bins: int = MAX_PLOT_BINS):
    """Downsample to ``bins`` chunks: (x mean, y min, y max, y mean); None bounds when small."""
    n = len(y)
    if n <= 2 * bins:
        return x.astype(np.float64), None, None, y
    c = math.ceil(n / bins)
    m = math.ceil(n / c)
    pad = m * c - n
    yp = np.concatenate([y, np.full(pad, np.nan)]).reshape(m, c)
    xp = np.concatenate([x.astype(np.float64), np.full(pad, np.nan)]).reshape(m, c)
    return (np.nanmean(xp, axis=1), np.nanmin(yp, axis=1), np.nanmax(yp, axis=1),
            np.nanmean(yp, axis=1))


def _stride(x: np.ndarray, y: np.ndarray, bins: int = MAX_PLOT_BINS):
    if len(x) <= 2 * bins:
        return x, y
    k = math.ceil(len(x) / (2 * bins))
    idx = np.arange(0, len(x), k)
    if idx[-1] != len(x) - 1:
        idx = np.append(idx, len(x) - 1)
    return x[idx], y[idx]


def _use_log(v: np.ndarray) -> bool:
    return len(v) > 1 and bool(np.all(v > 0)) and float(v.max()) / float(v.min()) > 50


def plot_series(ax, run: ParsedRun, analysis: Analysis, name: str, with_ma: bool = True,
                label: Optional[str] = None) -> bool:
    steps, v = run.series(name)
    if len(v) == 0:
        s_all, v_all = run.series(name, finite=False)
        msg = f"{name}: no records" if len(v_all) == 0 else f"{name}: only non-finite values"
        ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color="#888888")
        ax.set_title(name)
        return False
    x, lo, hi, mid = envelope(steps, v)
    if lo is not None:
        ax.fill_between(x, lo, hi, color=COLORS["main"], alpha=0.25, linewidth=0,
                        label=f"{label or name} (min-max per {math.ceil(len(v) / len(x))} records)")
        ax.plot(x, mid, color=COLORS["main"], linewidth=0.7, label="mean per bin")
    else:
        ax.plot(x, v, color=COLORS["main"], linewidth=0.8, marker="." if len(v) < 60 else None,
                label=label or name)
    if with_ma and len(v) >= 10:
        w = analysis.smoothing_window if len(v) >= 1000 else max(3, min(len(v) // 5, analysis.smoothing_window))
        ma = moving_average(v, w, centered=True)
        xs, ys = _stride(steps, ma)
        ax.plot(xs, ys, color=COLORS["ma"], linewidth=1.2, label=f"moving average ({w} records, centered)")
    s_all, v_all = run.series(name, finite=False)
    bad = ~np.isfinite(v_all)
    if bad.any():
        bx, _ = _stride(s_all[bad], v_all[bad], bins=100)
        ax.plot(bx, np.full(len(bx), 0.97), linestyle="none", marker="x", color="#d62728",
                markersize=5, transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"nan/inf ({int(bad.sum())} records)")
    if _use_log(v):
        ax.set_yscale("log")
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    return True


def mark_phases(ax, analysis: Analysis, labels: bool = True) -> None:
    xlim = ax.get_xlim()
    if analysis.disc_phase_start is not None:
        ax.axvline(analysis.disc_phase_start, color=COLORS["disc"], linewidth=1.0, linestyle="-",
                   label=f"disc start (step {st(analysis.disc_phase_start)})" if labels else None)
        ax.axvspan(analysis.disc_phase_start, max(xlim[1], analysis.disc_phase_start), color="#ff7f0e",
                   alpha=0.06, label="discriminator phase" if labels else None)
    labelled: set[str] = set()
    for step, kind in analysis.resume_marks:
        label = kind if labels and kind not in labelled else None
        labelled.add(kind)
        ax.axvline(step, color=COLORS["resume"], linewidth=0.9, linestyle="--", label=label)
    ax.set_xlim(*xlim)


def _finish(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": 3})   # fast zlib, small files anyway
    import matplotlib.pyplot as plt
    plt.close(fig)


# --------------------------------------------------------------------------- figures
def fig_phases(run: ParsedRun, a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt
    main = a.main_loss or next((c for c in ("rec_loss", "loss", "loss_simple", "total_loss") if run.has(c)), None)
    others = [c for c in ("total_loss", "loss_vlb", "nll_loss") if c != main and run.has(c)][:2]
    panels = ([main] if main else []) + others
    if not panels:
        panels = [None]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.4 * len(panels)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], panels):
        if name is None:
            ax.text(0.5, 0.5, "no loss columns in the log", ha="center", va="center", transform=ax.transAxes)
            continue
        plot_series(ax, run, a, name)
        mark_phases(ax, a)
        for f in a.findings:
            if f.id == "divergence" and name == a.main_loss and f.title.startswith(name):
                ax.axvline(f.steps[0], color="#2ca02c", linestyle=":", linewidth=1.4,
                           label=f"last good step ({st(f.steps[0])}) before divergence")
        if name == "total_loss" and a.disc_phase_start is not None:
            ax.set_title("total_loss (includes d_weight x disc_factor x g_loss after the disc start: "
                         "not comparable across it)", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Training phases: main losses, discriminator start and resumes")
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.75 / fig.get_figheight(),
                        bottom=0.45 / fig.get_figheight(), hspace=0.35)
    _finish(fig, path)


def fig_components(run: ParsedRun, a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt
    if run.stage == "prior" or not any(run.has(c) for c in ("rec_loss", "kl_loss")):
        names = [c for c in ("loss", "loss_simple", "loss_vlb", "total_loss", "grad_norm") if c in run.columns][:4]
    else:
        names = ["rec_loss", "kl_loss", "g_loss", "disc_loss"]
    if not names:
        names = ["rec_loss", "kl_loss", "g_loss", "disc_loss"]
    rows = math.ceil(len(names) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.6 * rows), sharex=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        if plot_series(ax, run, a, name):
            ax.legend(fontsize=7, loc="upper right")
        mark_phases(ax, a, labels=False)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("Loss components (each on its own scale), with moving averages")
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.75 / fig.get_figheight(),
                        bottom=0.45 / fig.get_figheight(), hspace=0.35, wspace=0.2)
    _finish(fig, path)


def fig_lr(run: ParsedRun, a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.5))
    steps, lr = run.series("lr")
    notes = []
    positives = []
    if len(lr):
        pos = lr > 0
        if pos.any():
            xs, ys = _stride(steps[pos], lr[pos])
            ax.plot(xs, ys, color=COLORS["main"], linewidth=1.2, marker="." if pos.sum() < 60 else None,
                    label="logged lr")
            positives.append(lr[pos])
        zeros = ~pos
        if zeros.any():
            zx, _ = _stride(steps[zeros], lr[zeros], bins=150)
            ax.plot(zx, np.full(len(zx), 0.02), linestyle="none", marker="v", color="#9467bd",
                    markersize=4, transform=ax.get_xaxis_transform(), clip_on=False,
                    label=f"logged lr = 0 ({int(zeros.sum())} records)")
            notes.append(f"{int(zeros.sum())} of {len(lr)} records log lr = 0"
                         + (f" (printed with {run.lr_decimals} decimals)" if run.lr_decimals else "")
                         + ": shown as triangles at the bottom; a log scale cannot show 0")
    else:
        notes.append("no lr column in the log")
    if run.has("lr_disc"):
        ds, dl = run.series("lr_disc")
        p = dl > 0
        if p.any():
            xs, ys = _stride(ds[p], dl[p])
            ax.plot(xs, ys, color="#2ca02c", linewidth=0.8, linestyle=":", label="logged lr_disc")
    if a.schedule is not None and len(run.steps):
        lo, hi = int(run.steps.min()), int(run.steps.max())
        if run.max_steps:
            hi = max(hi, run.max_steps)
        grid = np.unique(np.linspace(lo, hi, 800).astype(np.int64))
        exp = a.schedule.lr_at_steps(grid)
        good = exp > 0
        if good.any():
            ax.plot(grid[good], exp[good], color=COLORS["sched"], linestyle="--", linewidth=1.3,
                    label="configured schedule")
            positives.append(exp[good])
        notes.append(f"schedule: {a.schedule.description} (from {a.schedule.source})")
    else:
        notes.append("no config known: no schedule to compare with (pass --config)")
    if positives:
        allp = np.concatenate(positives)
        ax.set_yscale("log")
        ax.set_ylim(float(allp.min()) / 3, float(allp.max()) * 3)
    for step, kind in a.resume_marks:
        ax.axvline(step, color=COLORS["resume"], linewidth=0.8, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Learning rate: logged vs configured schedule (log scale)")
    note_lines = [line for n in notes for line in textwrap.wrap(n, 160)]
    fig.text(0.01, 0.01, "\n".join(note_lines), fontsize=7, va="bottom")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.12 + 0.028 * len(note_lines))
    _finish(fig, path)


def fig_validation(run: ParsedRun, a: Analysis, path: Path) -> bool:
    import matplotlib.pyplot as plt
    names = [c for c in ("val_psnr", "val_ssim", "val_nmse", "val_rmse", "val_rec_loss") if run.has(c)]
    if not names:
        return False
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s, v = run.series(name)
        if len(v):
            ax.plot(s, v, marker="o", markersize=3, linewidth=1)
            higher = name.endswith(("psnr", "ssim"))
            i = int(np.argmax(v) if higher else np.argmin(v))
            ax.plot([s[i]], [v[i]], marker="*", markersize=10, color="#2ca02c", linestyle="none")
            best = f"; best {num(v[i])} at step {st(s[i])}"
        else:
            best = ""
            ax.text(0.5, 0.5, "only non-finite values", ha="center", transform=ax.transAxes)
        mark_phases(ax, a, labels=False)
        better = "higher" if name.endswith(("psnr", "ssim")) else "lower"
        ax.set_title(f"{name[4:]} ({better} is better{best})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Validation metrics")
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.75 / fig.get_figheight(),
                        bottom=0.5 / fig.get_figheight(), hspace=0.45, wspace=0.2)
    _finish(fig, path)
    return True


def dashboard_lines(run: ParsedRun, a: Analysis) -> list[str]:
    s = a.stats
    lines = [f"source: {run.kind} ({len(run.sources)} file(s)), stage: {run.stage or 'unknown'}"]
    if s.get("last_step") is not None:
        prog = f" of {st(run.max_steps)} ({100 * s['progress']:.1f} %)" if s.get("progress") is not None else ""
        lines.append(f"steps: {st(s['first_step'])} - {st(s['last_step'])}{prog}; "
                     f"{s['train_records']} train / {s['val_records']} val records")
    lines.append(f"duration: {hours(s.get('duration_s', float('nan')))}"
                 f" (training {hours(s.get('active_s', float('nan')))}, "
                 f"between starts {hours(s.get('downtime_s', float('nan')))}); "
                 f"starts of the trainer: {len(run.segments)}")
    if s.get("steps_per_hour"):
        lines.append(f"throughput: {s['steps_per_hour']:,.0f} steps/h overall"
                     + (f", {s['steps_per_hour_last_start']:,.0f} steps/h in the last start"
                        if s.get("steps_per_hour_last_start") else ""))
    if "eta_s" in s:
        lines.append("ETA: reached max_steps" if s["eta_s"] == 0 else
                     f"ETA to step {st(run.max_steps)}: {hours(s['eta_s'])} at the last start's rate")
    lines.append(f"skipped lines: {run.skipped_total} of {run.lines_read}"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in run.skipped.items())})" if run.skipped else ""))
    return lines


def fig_dashboard(run: ParsedRun, a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(11.7, 8.3))
    gs = fig.add_gridspec(3, 2, height_ratios=[1.0, 1.1, 1.4], hspace=0.35, wspace=0.25,
                          left=0.05, right=0.97, top=0.92, bottom=0.03)
    ax_t = fig.add_subplot(gs[0, 0])
    ax_t.axis("off")
    ax_t.set_title("Run", loc="left", fontsize=11)
    ax_t.text(0, 1, "\n".join(textwrap.fill(l, 70, subsequent_indent="  ") for l in dashboard_lines(run, a)),
              va="top", fontsize=7.5, family="monospace", transform=ax_t.transAxes)
    ax_p = fig.add_subplot(gs[0, 1])
    t = run.time
    ok = np.isfinite(t)
    if ok.any():
        h = (t[ok] - t[ok].min()) / 3600
        xs, ys = _stride(h, run.steps[ok].astype(np.float64))
        ax_p.plot(xs, ys, ".", markersize=1.5)
        ax_p.set_xlabel("hours since the first record")
        ax_p.set_ylabel("step")
        if run.max_steps:
            ax_p.axhline(run.max_steps, color="#888888", linestyle=":", linewidth=0.8)
        ax_p.grid(True, alpha=0.3)
        ax_p.set_title("progress (slope = steps per hour)", fontsize=9)
    else:
        ax_p.axis("off")
        ax_p.text(0.5, 0.5, "no time stamps", ha="center", transform=ax_p.transAxes)
    ax_v = fig.add_subplot(gs[1, :])
    ax_v.axis("off")
    ax_v.set_title("Final and best values", loc="left", fontsize=11)
    rows = [f"{'column':<16} {'final':>34} {'at step':>9}   {'best':>16} {'at step':>9}"]
    for name, f in a.stats.get("final", {}).items():
        b = a.stats.get("best", {}).get(name)
        best = f"{num(b['value'])} ({b['rule']})" if b else "-"
        rows.append(f"{name:<16} {final_text(f):>34} {st(f['step']):>9}   {best:>16} "
                    f"{st(b['step']) if b else '-':>9}")
    if len(rows) > 16:
        rows = rows[:15] + [f"... {len(rows) - 15} more columns in report.md"]
    ax_v.text(0, 1, "\n".join(rows) if len(rows) > 1 else "no values", va="top", fontsize=7.5,
              family="monospace", transform=ax_v.transAxes)
    ax_f = fig.add_subplot(gs[2, :])
    ax_f.axis("off")
    ax_f.set_title(f"Findings ({len(a.findings)})", loc="left", fontsize=11)
    lines = []
    for f in a.findings[:10]:
        head = f"[{f.severity}] {f.id} ({span_text(f.steps)}): "
        body = textwrap.shorten(f.evidence, 300, placeholder=" ...")
        lines += textwrap.wrap(head + body, 150, subsequent_indent="    ")
    if len(a.findings) > 10:
        lines.append(f"... and {len(a.findings) - 10} more in report.md / summary.json")
    ax_f.text(0, 1, "\n".join(lines[:24]) or "none", va="top", fontsize=7, family="monospace",
              transform=ax_f.transAxes)
    fig.suptitle(f"Dashboard: {run_name(run) if run.sources else 'run'}", fontsize=12)
    _finish(fig, path)


def run_name(run: ParsedRun) -> str:
    """'demo/vae' for a run folder, the file names for original logs."""
    if run.kind in ("toolkit", "tensorboard") and run.sources:
        folder = Path(run.sources[0]).parent
        return f"{folder.parent.name}/{folder.name}"
    return ", ".join(Path(p).name for p in run.sources[:3]) + (" ..." if len(run.sources) > 3 else "")


def final_text(f: dict[str, Any]) -> str:
    text = num(f["value"])
    if "schedule" in f:
        text += f" (schedule {num(f['schedule'])})"
    return text


def span_text(steps: list[int]) -> str:
    a, b = steps
    return f"step {st(a)}" if a == b else f"steps {st(a)}-{st(b)}"


FIGURE_JOBS = (("phases", fig_phases), ("components", fig_components), ("lr", fig_lr),
               ("validation", fig_validation), ("dashboard", fig_dashboard))
HELPER_JOBS = ("phases", "components")      # drawn in a forked helper process when there is a core for it


def _draw(names: tuple[str, ...], run: ParsedRun, a: Analysis, out: Path) -> None:
    for name, fn in FIGURE_JOBS:
        if name in names:
            fn(run, a, out / FIGURES[name])


def make_figures(run: ParsedRun, a: Analysis, out: Path) -> list[str]:
    """Draw the figures (Agg). With a second core, the two figures with the most points are
    drawn by a forked helper process meanwhile (if it fails, here)."""
    import warnings
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported before a fork so the helper shares it)
    for name in FIGURES:
        (out / FIGURES[name]).unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # all-NaN bins, empty legends
        helper = start_helper(_draw, HELPER_JOBS, run, a, out)
        _draw(tuple(n for n, _ in FIGURE_JOBS if helper is None or n not in HELPER_JOBS), run, a, out)
        finish_helper(helper, lambda: _draw(HELPER_JOBS, run, a, out))
    return [FIGURES[n] for n, _ in FIGURE_JOBS if (out / FIGURES[n]).is_file()]


# --------------------------------------------------------------------------- helper processes
def start_helper(target, *args: Any):
    """Run ``target(*args)`` in a forked process when there is a second core (the outputs it
    writes are files); None when it cannot (one core, no fork): the caller does it itself."""
    import multiprocessing
    import os
    if (os.cpu_count() or 1) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    try:
        proc = multiprocessing.get_context("fork").Process(target=_helper_main, args=(target, *args),
                                                           daemon=True)
        proc.start()
    except OSError:
        return None
    return proc


def _helper_main(target, *args: Any) -> None:
    try:
        target(*args)
    except Exception:           # the parent does the work again and reports any error itself
        raise SystemExit(1)


def finish_helper(proc, fallback) -> None:
    """Wait for a helper; run ``fallback`` here when there was none or it failed."""
    if proc is not None:
        proc.join()
        if proc.exitcode == 0:
            return
    fallback()


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
    md.append("Generated by `report.py`. The findings list measured values; see `lib/findings.py` for "
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
        md.append(f"| {col} | {final_text(f)} | {st(f['step'])} | "
                  + (f"{num(b['value'])} ({b['rule']}) | {st(b['step'])} |" if b else "- | - |"))
    md.append("")
    md.append("## Figures")
    md.append("")
    captions = {
        FIGURES["phases"]: "Figure 1: main losses against step; the red line marks the discriminator start "
                           "(shaded after it), dashed lines mark resumes.",
        FIGURES["components"]: "Figure 2: loss components, each on its own panel, with a moving average.",
        FIGURES["lr"]: "Figure 3: logged LR and the LR of the configured schedule, log scale; logged zeros "
                       "are drawn as triangles at the bottom.",
        FIGURES["validation"]: "Figure 4: validation metrics.",
        FIGURES["dashboard"]: "Figure 5: dashboard (throughput, duration, ETA, final and best values, findings).",
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
        f"{g.source} {g.reason} steps {st(g.first_step)}-{st(g.last_step)} ({g.records} records)"
        for g in run.segments[:20]))
    md.append("- `metrics.csv`: one row per step (the later record when a resumed run logged a step "
              "twice); empty cell = not logged; `time` in unix seconds (original logs: their local "
              "time read as UTC)")
    if run.events:
        md.append("")
        md.append("## Events")
        md.append("")
        for e in run.events[:50]:
            md.append(f"- step {st(e['step'])}: {e.get('event')}: {e.get('message', '')}")
        if len(run.events) > 50:
            md.append(f"- ... {len(run.events) - 50} more in summary.json")
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:                    # e.g. `report.py RUN | head`: the outputs are written
        import os
        import sys
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    run = load_run(args.runs, args.config)
    timings["parse"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else default_out(args.runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    t1 = time.perf_counter()
    csv_helper = start_helper(write_csv, run, out / "metrics.csv")
    a = analyze(run)
    timings["analyze"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    figures = [] if args.no_figures else make_figures(run, a, out)
    timings["figures"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    finish_helper(csv_helper, lambda: write_csv(run, out / "metrics.csv"))
    timings["csv_wait"] = time.perf_counter() - t3
    write_markdown(run, a, figures, out / "report.md")
    timings["total"] = time.perf_counter() - t0
    timings["cpu_self"] = time.process_time()
    try:
        import resource
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        timings["cpu_helpers"] = ru.ru_utime + ru.ru_stime
    except ImportError:                        # not on this platform
        pass
    summary = build_summary(run, a, figures, timings)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False), encoding="utf-8")
    counts = {sev: sum(1 for f in a.findings if f.severity == sev) for sev in ("error", "warning", "info")}
    print(f"{len(run.steps)} rows from {len(run.sources)} source(s), {run.skipped_total} line(s) skipped; "
          f"findings: {counts['error']} error, {counts['warning']} warning, {counts['info']} info")
    for f in a.findings:
        print(f"  [{f.severity}] {f.id}: {f.title} ({span_text(f.steps)})")
    print(f"wrote {out / 'report.md'}, summary.json, metrics.csv and {len(figures)} figures")
    return 0


if __name__ == "__main__":
    run_cli(main)
