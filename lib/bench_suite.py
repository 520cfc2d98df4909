"""``bench.py --suite gpu``: both stages at the config's sizes (``configs/m.yaml``: 256², the
VAE at batch 2, the prior at its batch with one micro-batch per step) in four settings, fp32,
bf16, bf16 + channels_last and bf16 + channels_last + compile, each a ``bench.py`` run in a
fresh process (so compiled code and CUDA memory do not carry over) on a small synthetic
dataset made for the suite; then one table and one JSON.

Sized to finish in under 8 minutes on one recent GPU: few timed steps after a warm-up that
also absorbs ``compile``'s first steps. It needs a CUDA device and says so otherwise.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from lib.errors import UserError

SETTINGS = {
    "fp32": [],
    "bf16": ["mixed_precision=bf16"],
    "bf16 + channels_last": ["mixed_precision=bf16", "channels_last=true"],
    "bf16 + channels_last + compile": ["mixed_precision=bf16", "channels_last=true", "compile=true"],
}
STEPS = {"vae": (20, 5), "prior": (10, 4)}          # (timed, warm-up) per run
DATA = ["data.source=synthetic", "data.synthetic.num_maps=24", "data.synthetic.tx_per_map=4",
        "data.split=random", "data.train_maps=18", "data.val_maps=2", "data.test_maps=4",
        "data.cache=auto", "prior.train.gradient_accumulation_steps=1", "vae.train.gradient_accumulation_steps=1"]

Runner = Callable[[list[str]], dict[str, Any]]


def run_bench(argv: list[str]) -> dict[str, Any]:
    """``python bench.py *argv --json TMP`` in a fresh process; its JSON."""
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        out = Path(tmp) / "r.json"
        r = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "bench.py"), *argv,
                            "--json", str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"--suite gpu: bench.py {' '.join(argv)} failed: {last}")
        return json.loads(out.read_text())


def run_suite(config: str, overrides: list[str], json_out: Optional[str], runner: Runner = run_bench,
              cuda_available: Optional[bool] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (stage, setting) of the suite through ``runner``; prints and returns the table."""
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise UserError("--suite gpu needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                        "on a CPU, run bench.py --stage vae or --stage prior")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-suite-data-") as data_root:
        base = [*DATA, f"data.root={data_root}/synthetic", *overrides]
        results: dict[str, dict[str, Any]] = {}
        for stage, (steps, warmup) in STEPS.items():
            for name, keys in SETTINGS.items():
                sets = base + [f"{stage}.train.{k}" for k in keys]
                argv = ["--config", config, "--stage", stage, "--steps", str(steps), "--warmup", str(warmup),
                        "--no-memory", "--no-reference", "--data-seconds", "0.2"]
                argv += [x for s in sets for x in ("--set", s)]
                log(f"suite: {stage}, {name} ...")
                results.setdefault(stage, {})[name] = runner(argv)
    table = suite_table(results)
    out = {"config": config, "overrides": overrides, "seconds": round(time.perf_counter() - t0, 1),
           "results": results, "table": table}
    log(table)
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def suite_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per stage and setting, steps/s, samples/s, the CUDA peak, the speed-up over fp32."""
    first = next(iter(next(iter(results.values())).values()))
    lines = [f"GPU: {first.get('gpu')}; torch {first.get('torch')}", "",
             "| stage | setting | batch | image | steps/s | samples/s | CUDA peak (MB) | vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, by_setting in results.items():
        fp32 = by_setting.get("fp32", {}).get("steps_per_sec")
        for name, r in by_setting.items():
            speedup = f"{r['steps_per_sec'] / fp32:.2f}x" if fp32 else "-"
            peak = r.get("cuda_peak_mb")
            lines.append(f"| {stage} | {name} | {r['batch_size']} | {r['image_size']}² | {r['steps_per_sec']:.4g} | "
                         f"{r['samples_per_sec']:.4g} | {peak if peak is not None else '-'} | {speedup} |")
    return "\n".join(lines)
