"""Benchmark report.py on 150,000 logged steps x 12 metrics, in both log formats.

    python benchmarks/bench_report.py [--steps 150000] [--keep DIR]

Synthesizes, in a temporary folder, (1) a run folder of this toolkit (metrics.jsonl with
150,000 train records of 12 metrics plus validation records, config.yaml, run.json) and
(2) two text logs of the original trainer (generator + discriminator line per step, a resume
in the second file, five-decimal values, a config first line). Then runs
``python report.py`` on each as a fresh process, figures included, and prints the wall time
(Python start-up and imports included) and report.py's own stage timings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.config import load_config, save_config  # noqa: E402

METRICS = ["total_loss", "rec_loss", "nll_loss", "kl_loss", "g_loss", "disc_loss", "d_weight",
           "disc_factor", "logvar", "lr", "grad_norm", "steps_per_sec"]


def curves(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    s = np.arange(1, n + 1, dtype=np.float64)
    disc = (s >= n / 3).astype(np.float64)
    rec = 0.02 + 0.5 * np.exp(-s / (n / 20)) + 0.003 * rng.standard_normal(n) ** 2
    kl = 1.5e5 + 2e4 * (1 - np.exp(-s / (n / 10))) + 500 * rng.standard_normal(n)
    g = np.where(disc > 0, -0.4 + 0.05 * rng.standard_normal(n), 0.0)
    dw = np.where(disc > 0, 5000.0, 0.0)
    nll = rec * 65536
    lr = 5e-7 + (5e-6 - 5e-7) * 0.5 * (1 + np.cos(np.pi * s / n))
    return {"total_loss": nll + 1e-6 * kl + dw * disc * g, "rec_loss": rec, "nll_loss": nll,
            "kl_loss": kl, "g_loss": g, "disc_loss": np.where(disc > 0, 1.0 + 0.1 * rng.standard_normal(n), 0.0),
            "d_weight": dw, "disc_factor": disc, "logvar": -0.001 * s / n, "lr": lr,
            "grad_norm": np.abs(rng.standard_normal(n)) + 0.1, "steps_per_sec": 8 + rng.standard_normal(n) * 0.1,
            "logits_real": 0.1 * rng.standard_normal(n), "logits_fake": -0.1 * rng.standard_normal(n)}


def make_toolkit_run(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    run = folder / "toolkit" / "vae"
    run.mkdir(parents=True)
    cfg = load_config(None, [f"vae.train.max_steps={n}", f"vae.loss.disc_start={n // 3}",
                             "vae.train.log_every=1"])
    save_config(cfg, run / "config.yaml")
    # the LR exactly as the configured schedule says (lib.train.schedule is what the trainer uses)
    from lib.train.schedule import lr_at
    c = curves(n, rng)
    c["lr"] = np.array([lr_at(cfg.vae.train, s) for s in range(1, n + 1)])
    t0 = 1.7e9
    lines = [json.dumps({"step": 0, "split": "event", "time": t0, "event": "start", "message": "start"})]
    cols = {k: c[k].tolist() for k in METRICS}
    for i in range(n):
        rec = {"step": i + 1, "split": "train", "time": t0 + (i + 1) / 8.0}
        for k in METRICS:
            rec[k] = cols[k][i]
        lines.append(json.dumps(rec))
        if (i + 1) % 5000 == 0:
            lines.append(json.dumps({"step": i + 1, "split": "val", "time": t0 + (i + 1) / 8.0,
                                     "rec_loss": cols["rec_loss"][i], "psnr": 30 + 5 * i / n,
                                     "ssim": 0.8 + 0.1 * i / n, "nmse": 0.01, "rmse": 0.05}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "run.json").write_text(json.dumps({"stage": "vae", "command": ["train_vae.py"],
                                              "started": "2025-01-01T00:00:00", "resumes": []}))
    return run


def make_original_logs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    c = curves(n, rng)
    c["lr"] = 5e-6 * np.maximum((1 - np.arange(1, n + 1) / n) ** 0.95, 5e-7)
    logs = folder / "original"
    logs.mkdir()
    gen = ["total_loss", "kl_loss", "nll_loss", "rec_loss", "d_weight", "disc_factor", "g_loss", "logvar"]
    dis = ["disc_loss", "logits_real", "logits_fake"]
    config = ("{'model': {'lossconfig': {'disc_start': %d, 'kl_weight': 1e-06}}, 'trainer': "
              "{'lr': 5e-06, 'min_lr': 5e-07, 'train_num_steps': %d, 'log_freq': 1}}" % (n // 3, n))
    resume_at = int(n * 2 / 3)
    files = []
    for part, (lo, hi) in enumerate([(1, resume_at + 500), (resume_at - 200, n)]):
        out = [f"2025-01-0{part + 1} 00:00:00,000 {config}"]
        g_cols = {k: c[k].tolist() for k in gen + dis + ["lr"]}
        for s in range(lo, hi + 1):
            i = s - 1
            secs = int(s / 8)
            stamp = f"2025-01-0{part + 1} {secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:{secs % 60:02d},{(s * 125) % 1000:03d}"
            body = "".join(f"train/{k}: {g_cols[k][i]:.5f}, " for k in gen)
            out.append(f"{stamp} [Train Step] {s}/{n}: {body}lr: {g_cols['lr'][i]:.5f}, ")
            body = "".join(f"train/{k}: {g_cols[k][i]:.5f}, " for k in dis)
            out.append(f"{stamp} [Train Step] {s}/{n}: {body}lr: {g_cols['lr'][i]:.5f}, ")
        path = logs / f"2025-01-0{part + 1}-00-00_.log"
        path.write_text("\n".join(out) + "\n")
        files.append(path)
    return files


def run_report(args: list[str], out: Path) -> tuple[float, float, dict]:
    """-> (wall seconds, CPU seconds of report.py and its helper process, summary.json)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "report.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        raise SystemExit(f"report.py failed with exit code {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return wall, cpu, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150_000)
    p.add_argument("--keep", default=None, help="write the synthetic runs and reports here")
    p.add_argument("--repeat", type=int, default=1, help="runs per input; the fastest is reported")
    args = p.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_report_"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"synthesizing {args.steps:,} steps x {len(METRICS)} metrics in {tmp} ...")
    run = make_toolkit_run(tmp, args.steps)
    logs = make_original_logs(tmp, args.steps)
    sizes = f"metrics.jsonl {run.joinpath('metrics.jsonl').stat().st_size / 1e6:.0f} MB, " + ", ".join(
        f"{f.name} {f.stat().st_size / 1e6:.0f} MB" for f in logs)
    print(sizes)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPU(s), load average {load:.2f} before the runs")
    for label, argv, out in [("toolkit run folder (jsonl + config.yaml)", [str(run)], tmp / "report_toolkit"),
                             ("original logs (2 files, gen + disc lines)", [str(f) for f in logs], tmp / "report_original")]:
        results = [run_report(argv, out) for _ in range(max(1, args.repeat))]
        wall, cpu, summary = min(results, key=lambda r: r[0])
        t = summary["timings_s"]
        walls = ", ".join(f"{r[0]:.2f}" for r in results)
        print(f"{label}: {wall:.2f} s wall (fresh process, imports and figures included; runs: {walls}), "
              f"{cpu:.2f} s CPU ({t.get('cpu_self', float('nan')):.2f} s in report.py's own process, "
              f"{t.get('cpu_helpers', float('nan')):.2f} s in its helpers: CSV, figures); "
              f"stages: parse {t['parse']:.2f} s, analyze {t['analyze']:.2f} s, figures {t['figures']:.2f} s, "
              f"waiting for the CSV helper {t['csv_wait']:.2f} s; rows {summary['stats']['rows']:,}; "
              f"findings {[f['id'] for f in summary['findings']]}")


if __name__ == "__main__":
    main()
