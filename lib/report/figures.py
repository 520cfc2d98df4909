"""The report's figures (matplotlib, Agg): training phases, loss components, learning rate
against the configured schedule, validation metrics, and a dashboard. Long runs are drawn as
min/max envelopes (at most ``MAX_PLOT_BINS`` points per curve).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np

from lib.numfmt import fmt, fmt_step
from lib.progress import progress
from lib.report.findings import LOSS_COLUMNS, Analysis, moving_average
from lib.report.forked import finish_helper, start_helper
from lib.report.runtable import ParsedRun
from lib.report.text import FIGURES, dashboard_lines, final_text, run_name, span_text

MAX_PLOT_BINS = 1500        # points per curve after min/max-envelope downsampling
DPI = 100
COLORS = {"main": "#1f77b4", "ma": "#d62728", "disc": "#9467bd", "resume": "#555555",
          "sched": "#ff7f0e", "best": "#2ca02c"}


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
                   label=f"disc start (step {fmt_step(analysis.disc_phase_start)})" if labels else None)
        ax.axvspan(analysis.disc_phase_start, max(xlim[1], analysis.disc_phase_start), color=COLORS["disc"],
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
                           label=f"last good step ({fmt_step(f.steps[0])}) before divergence")
        if name == "total_loss" and a.disc_phase_start is not None:
            ax.set_title("total_loss (includes d_weight x disc_factor x g_loss after the disc start: "
                         "not comparable across it)", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Training phases: main losses, discriminator start and resumes" if a.disc_phase_start is not None
                 else "Training: main losses and resumes")
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


def lr_curves(ax, run: ParsedRun, a: Analysis) -> list[str]:
    """Logged LR (zeros as triangles at the bottom), lr_disc and the configured schedule on a
    log scale; returns notes for the reader."""
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
            ax.plot(zx, np.full(len(zx), 0.02), linestyle="none", marker="v", color="#8c564b",
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
            ax.plot(xs, ys, color=COLORS["best"], linewidth=0.8, linestyle=":", label="logged lr_disc")
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
    ax.grid(True, alpha=0.3, which="both")
    return notes


def fig_lr(run: ParsedRun, a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.5))
    notes = lr_curves(ax, run, a)
    ax.set_ylabel("learning rate")
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
            ax.plot([s[i]], [v[i]], marker="*", markersize=10, color=COLORS["best"], linestyle="none")
            best = f"; best {fmt(v[i])} at step {fmt_step(s[i])}"
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


def _text_panel(ax, title: str, lines: list[str], fontsize: float = 7.5) -> None:
    ax.axis("off")
    ax.set_title(title, loc="left", fontsize=11)
    ax.text(0, 1, "\n".join(lines) or "none", va="top", fontsize=fontsize, family="monospace",
            transform=ax.transAxes)


def _progress(ax, run: ParsedRun) -> None:
    t = run.time
    ok = np.isfinite(t)
    if not ok.any():
        ax.axis("off")
        ax.text(0.5, 0.5, "no time stamps", ha="center", transform=ax.transAxes)
        return
    h = (t[ok] - t[ok].min()) / 3600
    xs, ys = _stride(h, run.steps[ok].astype(np.float64))
    ax.plot(xs, ys, ".", markersize=2, color=COLORS["main"])
    ax.set_xlabel("hours since the first record")
    ax.set_ylabel("step")
    if run.max_steps:
        ax.axhline(run.max_steps, color="#888888", linestyle=":", linewidth=0.8, label="max_steps")
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3)
    ax.set_title("progress (slope = steps per hour)", fontsize=10)


def _value_rows(a: Analysis, limit: int) -> list[str]:
    rows = [f"{'column':<16} {'final':>30} {'at step':>8}  {'best':>16} {'at step':>8}"]
    for name, f in a.stats.get("final", {}).items():
        b = a.stats.get("best", {}).get(name)
        best = f"{fmt(b['value'])} ({b['rule']})" if b else "-"
        rows.append(f"{name:<16} {final_text(f):>30} {fmt_step(f['step']):>8}  {best:>16} "
                    f"{fmt_step(b['step']) if b else '-':>8}")
    if len(rows) > limit:
        rows = rows[:limit - 1] + [f"... {len(rows) - limit + 1} more columns in report.md"]
    return rows if len(rows) > 1 else []


def _finding_lines(a: Analysis, width: int, limit: int) -> list[str]:
    """Whole findings (never cut inside one), as many as fit in ``limit`` lines."""
    lines: list[str] = []
    for k, f in enumerate(a.findings):
        block = textwrap.wrap(f"[{f.severity}] {f.id} ({span_text(f.steps)}): {f.evidence}", width,
                              subsequent_indent="    ")
        if len(lines) + len(block) > limit - (k + 1 < len(a.findings)):
            lines.append(f"... {len(a.findings) - k} more finding(s) in report.md / summary.json")
            break
        lines += block
    return lines


def fig_dashboard(run: ParsedRun, a: Analysis, path: Path) -> None:
    """One page (A4 landscape): the run, its progress, the main loss and the key validation
    metric, final and best values, and the findings."""
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(11.7, 8.3))
    gs = fig.add_gridspec(4, 2, height_ratios=[0.75, 1.5, 1.45, 0.9], hspace=0.55, wspace=0.16,
                          left=0.06, right=0.98, top=0.93, bottom=0.02)
    _text_panel(fig.add_subplot(gs[0, 0]), "Run",
                [textwrap.fill(line, 78, subsequent_indent="  ") for line in dashboard_lines(run, a)])
    _progress(fig.add_subplot(gs[0, 1]), run)
    ax_l = fig.add_subplot(gs[1, 0])
    main = a.main_loss or next((c for c in LOSS_COLUMNS if run.has(c)), None)
    if main and plot_series(ax_l, run, a, main):
        mark_phases(ax_l, a)
        ax_l.legend(fontsize=7, loc="upper right")
        ax_l.set_title(f"{main} (main loss)", fontsize=10)
    else:
        ax_l.axis("off")
        ax_l.text(0.5, 0.5, "no loss columns in the log", ha="center", transform=ax_l.transAxes)
    ax_r = fig.add_subplot(gs[1, 1])
    key = next((c for c in ("val_nmse", "val_loss", "val_rec_loss", "val_psnr") if run.has(c)), None)
    if key:
        steps, v = run.series(key)
        ax_r.plot(steps, v, marker="o", markersize=3, linewidth=1, color=COLORS["main"])
        best = a.stats.get("best", {}).get(key)
        if best:
            ax_r.plot([best["step"]], [best["value"]], marker="*", markersize=11, color=COLORS["best"],
                      linestyle="none", label=f"best {fmt(best['value'])} at step {fmt_step(best['step'])}")
            ax_r.legend(fontsize=7, loc="upper right")
        mark_phases(ax_r, a, labels=False)
        ax_r.grid(True, alpha=0.3)
        ax_r.set_xlabel("step")
        ax_r.set_title(f"validation {key[4:]}", fontsize=10)
    else:
        ax_r.axis("off")
        ax_r.text(0.5, 0.5, "no validation records", ha="center", transform=ax_r.transAxes)
    _text_panel(fig.add_subplot(gs[2, 0]), "Final and best values", _value_rows(a, 19), 6.8)
    ax_lr = fig.add_subplot(gs[2, 1])
    lr_curves(ax_lr, run, a)
    ax_lr.legend(fontsize=7, loc="best")
    ax_lr.set_title("learning rate: logged vs configured (log scale)", fontsize=10)
    _text_panel(fig.add_subplot(gs[3, :]), f"Findings ({len(a.findings)})", _finding_lines(a, 165, 11), 7)
    fig.suptitle(f"Dashboard: {run_name(run) if run.sources else 'run'}", fontsize=13)
    _finish(fig, path)


FIGURE_JOBS = (("phases", fig_phases), ("components", fig_components), ("lr", fig_lr),
               ("validation", fig_validation), ("dashboard", fig_dashboard))
HELPER_JOBS = ("phases", "components")      # drawn in a forked helper process when there is a core for it


def _draw(names: tuple[str, ...], run: ParsedRun, a: Analysis, out: Path, bar=None) -> None:
    for name, fn in FIGURE_JOBS:
        if name in names:
            fn(run, a, out / FIGURES[name])
            if bar is not None:
                bar.update(1)


def make_figures(run: ParsedRun, a: Analysis, out: Path) -> list[str]:
    """Draw the figures (Agg). With a second core, the two figures with the most points are
    drawn by a forked helper process meanwhile (if it fails, here)."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (imported before a fork so the helper shares it)
    for name in FIGURES:
        (out / FIGURES[name]).unlink(missing_ok=True)
    with warnings.catch_warnings(), progress(len(FIGURE_JOBS), desc="figures", unit="figure") as bar:
        warnings.simplefilter("ignore")       # all-NaN bins, empty legends
        helper = start_helper(_draw, HELPER_JOBS, run, a, out)
        _draw(tuple(n for n, _ in FIGURE_JOBS if helper is None or n not in HELPER_JOBS), run, a, out, bar)
        finish_helper(helper, lambda: _draw(HELPER_JOBS, run, a, out))
        bar.update(len(FIGURE_JOBS) - bar.n)   # the helper's
    return [FIGURES[n] for n, _ in FIGURE_JOBS if (out / FIGURES[n]).is_file()]
