"""benchmarks/demo_pipeline.py: the README's demo tables are its output, so its numbers must
be the numbers the runs wrote."""
import json
import re
import subprocess
import sys

from tests.helpers import ROOT, TINY_PRIOR, tiny_config


def test_demo_pipeline_prints_the_numbers_the_runs_wrote(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, prior=dict(TINY_PRIOR))
    out = tmp_path / "pipeline"
    r = subprocess.run([sys.executable, "benchmarks/demo_pipeline.py", "--config", str(cfg), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "demo_table.md").read_text()
    assert table in r.stdout
    assert (out / "data" / "synthetic.json").is_file()          # the data was generated anew, under --out
    usual = tmp_path / "run"                                     # the config's output_dir, as a user types it
    for command in ("train_vae.py", "train_unified_prior.py", "evaluate.py", f"report.py {usual}/vae",
                    f"report.py {usual}/prior"):
        assert re.search(rf"\| `python {re.escape(command)}[^|]*` \| \d+ \|", table), command
    val = [json.loads(line) for line in (out / "vae" / "metrics.jsonl").read_text().splitlines()]
    val = [v for v in val if v["split"] == "val"][-1]
    assert f"(step {val['step']}, {val['num_samples']} samples): PSNR {val['psnr']:.4g} dB" in table
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    row = next(line for line in table.splitlines() if line.startswith("| model"))
    assert row.split(" | ")[1] == f"{ev['model']['nmse']:.4g} ± {ev['model']['nmse_std']:.4g}"
    assert row.split(" | ")[5] == f"{ev['model']['per_simulator']['DPM']['nmse']:.4g}"
    assert f"{ev['num_samples']} samples" in table and "Machine: " in table
    # the generated data's statistics next to the published maps' ranges
    stats = next(line for line in table.splitlines() if line.startswith("| share above 0.5"))
    assert stats.split(" | ")[1] == "0.02-0.06" and "synthetic DPM" in table
    again = subprocess.run([sys.executable, "benchmarks/demo_pipeline.py", "--config", str(cfg), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr             # nothing is overwritten


def test_the_spread_table_is_each_numbers_mean_and_sample_std():
    """--seeds N: every number per seed and its mean ± sample standard deviation over the seeds."""
    import importlib
    import statistics
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        demo = importlib.import_module("demo_pipeline")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def run(seed, nmse):
        ev = {k: {"nmse": nmse + i, "psnr": 20.0 + seed} for i, k in enumerate(("model", "vae_ceiling", "distance_baseline"))}
        return {"seed": seed, "vae_val": {"psnr": 25.0 + seed, "ssim": 0.8, "nmse": 0.04 * (seed + 1)},
                "prior_val": {"nmse": 0.1}, "evaluation": ev,
                "seconds": {"train_vae.py": 90.0 + seed, "train_unified_prior.py": 50.0, "evaluate.py": 9.0}}
    runs = [run(0, 0.10), run(1, 0.12), run(2, 0.17)]
    lines = demo.spread_table(runs)
    assert lines[0] == "| quantity | seed 0 | seed 1 | seed 2 | mean ± std |"
    row = next(line for line in lines if line.startswith("| test NMSE, model |"))
    values = [0.10, 0.12, 0.17]
    assert row == (f"| test NMSE, model | 0.1 | 0.12 | 0.17 | {statistics.mean(values):.4g} ± "
                   f"{statistics.stdev(values):.2g} |")
    assert len(lines) == 2 + len(demo.SPREAD)
