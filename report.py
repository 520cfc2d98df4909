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
:mod:`lib.report.findings` with their rules.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

from lib.errors import UserError, run_cli
from lib.outputs import StagedFolder
from lib.report.analysis import analyze
from lib.report.figures import make_figures
from lib.report.forked import finish_helper, start_helper
from lib.report.read_run import load_run, resolve_inputs
from lib.report.text import FIGURES, build_summary, span_text, write_csv, write_markdown


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Findings and their rules: see lib/report/findings.py")
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


# --------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:                    # e.g. `report.py RUN | head`: the outputs are written
        import sys
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    run = load_run(args.runs, args.config)
    timings["parse"] = time.perf_counter() - t0
    if len(run.steps) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in run.skipped.items()) or "none"
        raise UserError(f"nothing could be read from {' '.join(args.runs)}: {run.lines_read} non-empty line(s), "
                        f"{run.skipped_total} skipped ({reasons}); no report written")
    final = Path(args.out) if args.out else default_out(args.runs)
    others = sorted(p.name for p in final.iterdir() if p.name not in REPORT_FILES) if final.is_dir() else []
    if others:
        raise UserError(f"--out {final} holds files that are not a report's ({', '.join(others[:3])}); "
                        f"pass an empty or new folder")
    # Written into a new folder that replaces the old report only when complete: a report that
    # fails leaves the previous one as it was, and no figure of an older report stays behind.
    with StagedFolder(final, "report") as out:
        summary, figures, a = _write_report(args, run, out, timings, t0)
    counts = {sev: sum(1 for f in a.findings if f.severity == sev) for sev in ("error", "warning", "info")}
    print(f"{len(run.steps)} rows from {len(run.sources)} source(s), {run.skipped_total} line(s) skipped; "
          f"findings: {counts['error']} error, {counts['warning']} warning, {counts['info']} info")
    for f in a.findings:
        print(f"  [{f.severity}] {f.id}: {f.title} ({span_text(f.steps)})")
    print(f"wrote {final / 'report.md'}, summary.json, metrics.csv and {len(figures)} figures")
    return 0


REPORT_FILES = {"metrics.csv", "summary.json", "report.md", *FIGURES.values()}


def _write_report(args: argparse.Namespace, run, out: Path, timings: dict[str, float], t0: float):
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
    return summary, figures, a


if __name__ == "__main__":
    run_cli(main)
