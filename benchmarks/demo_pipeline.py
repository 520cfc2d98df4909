"""The README's demo pipeline, end to end, and the README's demo tables from its output.

    python benchmarks/demo_pipeline.py                        # minutes on a 2-core CPU
    python benchmarks/demo_pipeline.py --out /tmp/demo --config configs/demo.yaml
    python benchmarks/demo_pipeline.py --seeds 3              # three seeds: each number's spread

Runs the commands of the README on ``configs/demo.yaml`` in fresh processes, with the
synthetic data generated anew under ``--out`` (so its time is part of stage 1, as on a fresh
clone): ``train_vae.py``, ``train_unified_prior.py``, ``evaluate.py``, then ``report.py`` on both
runs. Then prints, and writes to
``--out/demo_table.md`` with every number in ``demo.json``: the machine and date, the wall
time of each command, stage 1's last validation, and the evaluation table (test split:
the model, the VAE ceiling and the distance-only baseline), and the generated data's statistics
next to the published RadioMapSeer maps' (lib/data/map_stats.py). The README's tables are this
output, pasted. ``--out`` must not exist (nothing is overwritten).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml
from commands import ROOT, run  # benchmarks/commands.py


def machine() -> str:
    sys.path.insert(0, str(ROOT))
    from lib.bench.measure import machine as facts
    m = facts()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else m["cpus"]
    return (f"{m['cpu']}, {cores} cores available, torch {m['torch']} ({m['torch_threads']} threads), "
            f"Python {platform.python_version()}; commit {commit}; {datetime.date.today().isoformat()}")


def last_record(path: Path, split: str) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split][-1]


def rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.4g}"


def cell(d: dict, k: str) -> str:
    return f"{d[k]:.4g} ± {d[k + '_std']:.4g}"


def run_seed(config: str, out: Path, data: Path, seed: Optional[int]) -> dict:
    """The README's commands in fresh processes into ``out`` (data under ``data``); their times and
    numbers. ``seed``: ``--set seed=K`` (None: the config's)."""
    flags = ["--config", config, "--set", f"output_dir={out}", "--set", f"data.root={data}"]
    flags += ["--set", f"seed={seed}"] if seed is not None else []
    seconds = {}
    for script in ("train_vae.py", "train_unified_prior.py", "evaluate.py"):
        print(f"running {script}{'' if seed is None else f' (seed {seed})'} ...", flush=True)
        seconds[script] = run([script, *flags], log=out / "logs" / f"{Path(script).stem}.log")
        print(f"  {seconds[script]:.0f} s", flush=True)
    for stage in ("vae", "prior"):
        seconds[f"report.py {stage}"] = run(["report.py", str(out / stage)], log=out / "logs" / f"report_{stage}.log")
    return {"seconds": seconds, "vae_val": last_record(out / "vae" / "metrics.jsonl", "val"),
            "prior_val": last_record(out / "prior" / "metrics.jsonl", "val"),
            "evaluation": json.loads((out / "eval" / "metrics.json").read_text())}


SPREAD = [("stage 1: last validation PSNR (dB)", lambda r: r["vae_val"]["psnr"]),
          ("stage 1: last validation SSIM", lambda r: r["vae_val"]["ssim"]),
          ("stage 1: last validation NMSE", lambda r: r["vae_val"]["nmse"]),
          ("stage 2: last validation NMSE", lambda r: r["prior_val"]["nmse"]),
          ("test NMSE, model", lambda r: r["evaluation"]["model"]["nmse"]),
          ("test PSNR (dB), model", lambda r: r["evaluation"]["model"]["psnr"]),
          ("test NMSE, VAE round trip (ceiling)", lambda r: r["evaluation"]["vae_ceiling"]["nmse"]),
          ("test NMSE, distance only", lambda r: r["evaluation"]["distance_baseline"]["nmse"]),
          ("train_vae.py wall time (s)", lambda r: r["seconds"]["train_vae.py"]),
          ("train_unified_prior.py wall time (s)", lambda r: r["seconds"]["train_unified_prior.py"]),
          ("evaluate.py wall time (s)", lambda r: r["seconds"]["evaluate.py"])]


def spread_table(runs: list[dict]) -> list[str]:
    """Per seed, and mean ± sample standard deviation over the seeds."""
    lines = ["| quantity | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean ± std |",
             "|---|" + "---|" * (len(runs) + 1)]
    for label, get in SPREAD:
        values = [float(get(r)) for r in runs]
        lines.append(f"| {label} | " + " | ".join(f"{v:.4g}" for v in values) +
                     f" | {statistics.mean(values):.4g} ± {statistics.stdev(values):.2g} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--out", default="runs/demo-pipeline", help="run folders, data, logs and the tables")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run the pipeline N times, seeds 0..N-1 (model init, data order, noise; the same data and "
                        "split), into --out/seed-K, and add a table of each number's spread")
    a = p.parse_args()
    out = Path(a.out).resolve()
    if out.exists():
        sys.exit(f"--out {out} exists; pass a new folder (nothing is overwritten)")
    if a.seeds < 1:
        sys.exit(f"--seeds {a.seeds}: expected an integer >= 1")
    if a.seeds == 1:
        runs = [dict(run_seed(a.config, out, out / "data", None), seed=None)]
    else:
        runs = [dict(run_seed(a.config, out / f"seed-{k}", out / "data", k), seed=k) for k in range(a.seeds)]
    first = runs[0]
    seconds, vae_val, prior_val, ev = first["seconds"], first["vae_val"], first["prior_val"], first["evaluation"]
    sims = ev["simulations"]
    sys.path.insert(0, str(ROOT))
    from lib.data.map_stats import LABELS, REAL_RANGES, map_statistics
    usual_dir = (yaml.safe_load((ROOT / a.config).read_text()) or {}).get("output_dir", "OUTPUT_DIR")
    lines = [f"Machine: {machine()}.", ""]
    if len(runs) > 1:
        lines += [f"The pipeline with seeds 0-{len(runs) - 1} (the same data and split; the seed sets the "
                  f"initialisation, the data order and the noise):", "", *spread_table(runs), "",
                  "Seed 0 in detail:", ""]
    lines += ["| command | wall time (s) |", "|---|---|",
              *(f"| `python {s} --config {a.config}` | {t:.0f} |" for s, t in seconds.items() if s.endswith(".py")),
              *(f"| `python report.py {usual_dir}/{s.split()[1]}` | {t:.0f} |"
                for s, t in seconds.items() if s.startswith("report.py")), "",
              f"Stage 1, last validation (step {vae_val['step']}, {vae_val['num_samples']} samples): "
              f"PSNR {vae_val['psnr']:.4g} dB, SSIM {vae_val['ssim']:.4g}, NMSE {vae_val['nmse']:.4g}. "
              f"Stage 2, last validation (step {prior_val['step']}): NMSE {prior_val['nmse']:.4g}.", "",
              f"Evaluation: {ev['split']} split, {ev['protocol']['maps']} maps, {ev['num_samples']} samples "
              f"(simulations {', '.join(sims)}), objective {ev['objective']}, {ev['sampler']} sampler, "
              f"{ev['num_inference_steps']} step{'' if ev['num_inference_steps'] == 1 else 's'}, "
              f"{'EMA' if ev['checkpoints']['prior_ema'] else 'raw'} weights:", "",
              "| method | NMSE | RMSE | SSIM | PSNR (dB) | " + " | ".join(f"NMSE {s}" for s in sims) + " | samples/s |",
              "|---|---|---|---|---|" + "---|" * len(sims) + "---|"]
    for key, title in (("model", "model (prior + VAE decode)"), ("vae_ceiling", "VAE round trip (ceiling)"),
                       ("distance_baseline", "distance only (log-distance fit)")):
        d = ev[key]
        lines.append(f"| {title} | " + " | ".join(cell(d, k) for k in ("nmse", "rmse", "ssim", "psnr")) + " | "
                     + " | ".join(f"{d['per_simulator'][s]['nmse']:.4g}" for s in sims)
                     + f" | {rate(d['samples_per_sec'])} |")
    lines += ["", f"The synthetic data ({out / 'data'}), `python -m lib.synthetic stats`: median over the gain maps "
              f"(10th-90th percentile), next to the range over four published RadioMapSeer IRT4 maps:", "",
              "| statistic (outside buildings) | RadioMapSeer | " + " | ".join(f"synthetic {s}" for s in sims) + " |",
              "|---|---|" + "---|" * len(sims)]
    stats = {s: map_statistics(out / "data", s).summary() for s in sims}
    for key, label in LABELS.items():
        lo, hi = REAL_RANGES[key]
        lines.append(f"| {label} | {lo:.2f}-{hi:.2f} | " + " | ".join(
            f"{stats[s][key]['median']:.3f} ({stats[s][key]['p10']:.3f}-{stats[s][key]['p90']:.3f})" for s in sims) + " |")
    table = "\n".join(lines) + "\n"
    (out / "demo_table.md").write_text(table)
    (out / "demo.json").write_text(json.dumps({"machine": machine(), "seconds": seconds, "vae_val": vae_val,
                                               "prior_val": prior_val, "evaluation": ev, "runs": runs}, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
