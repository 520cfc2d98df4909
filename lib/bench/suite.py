"""``bench.py --suite gpu``: both stages at the config's sizes (``configs/m.yaml``: 256², the
VAE at batch 2, the prior at batch 66 with the latent cache, one micro-batch per step) in the
settings that answer the speed questions, each a ``bench.py`` run in a fresh process (so
compiled code and CUDA memory do not carry over) on a small synthetic dataset made for the
suite; then one table and one JSON.

Stage 1: float32 under PyTorch's defaults, float32 with TF32, bf16, bf16 + channels_last (with
the reference step beside it, in the same process), bf16 + channels_last + compile, and the
larger batches. Stage 2: float32 under PyTorch's defaults, bf16, bf16 + channels_last, bf16 +
compile, and bf16 with gradient checkpointing (its CUDA peak against a 24 GB card).

Few timed steps after a warm-up that also absorbs ``compile``'s first steps, so that it fits in
the few minutes a GPU check has (it has not run on a GPU yet). It needs a CUDA device and says
so otherwise.
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

# (stage, setting name) -> the stage's train keys (``{stage}.train.KEY=VALUE``) and bench.py flags
FP32 = ["mixed_precision=no", "tf32=false"]
BF16 = ["mixed_precision=bf16"]
RUNS: dict[tuple[str, str], tuple[list[str], list[str]]] = {
    ("vae", "fp32, PyTorch defaults"): (FP32, []),
    ("vae", "fp32 + TF32"): (["mixed_precision=no", "tf32=true"], []),
    ("vae", "bf16"): (BF16, []),
    ("vae", "bf16 + channels_last"): (BF16 + ["channels_last=true"], ["--reference"]),
    ("vae", "bf16 + channels_last + compile"): (BF16 + ["channels_last=true", "compile=true"], []),
    ("vae", "bf16 + channels_last, batch 8"): (BF16 + ["channels_last=true"], ["--batch-size", "8"]),
    ("vae", "bf16 + channels_last, batch 32"): (BF16 + ["channels_last=true"], ["--batch-size", "32"]),
    ("prior", "fp32, PyTorch defaults"): (FP32, []),
    ("prior", "bf16"): (BF16, []),
    ("prior", "bf16 + channels_last"): (BF16 + ["channels_last=true"], []),
    ("prior", "bf16 + compile"): (BF16 + ["compile=true"], []),
    ("prior", "bf16 + gradient checkpointing"): (BF16 + ["gradient_checkpointing=true"], []),
}
STEPS = {"vae": (12, 4), "prior": (8, 3)}          # (timed, warm-up) per run
DATA = ["data.source=synthetic", "data.synthetic.num_maps=24", "data.synthetic.tx_per_map=4",
        "data.split=random", "data.train_maps=18", "data.val_maps=2", "data.test_maps=4",
        "data.cache=auto", "prior.latent_cache=auto", "prior.train.gradient_accumulation_steps=1",
        "vae.train.gradient_accumulation_steps=1"]

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


def suite_argv(config: str, base: list[str], stage: str, keys: list[str], flags: list[str]) -> list[str]:
    """bench.py's arguments for one run of the suite."""
    steps, warmup = STEPS[stage]
    argv = ["--config", config, "--stage", stage, "--steps", str(steps), "--warmup", str(warmup),
            "--no-memory", "--data-seconds", "0.2", *flags]
    if "--reference" in argv:
        argv.remove("--reference")
    elif stage == "vae":
        argv.append("--no-reference")
    sets = base + [f"{stage}.train.{k}" for k in keys]
    return argv + [x for s in sets for x in ("--set", s)]


def run_suite(config: str, overrides: list[str], json_out: Optional[str], runner: Runner = run_bench,
              cuda_available: Optional[bool] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (stage, setting) of the suite through ``runner``; prints and returns the table.
    A run that fails is a row saying so; the others still run."""
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise UserError("--suite gpu needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                        "on a CPU, run bench.py --stage vae or --stage prior")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-suite-data-") as data_root:
        base = [*DATA, f"data.root={data_root}/synthetic", f"output_dir={data_root}/runs", *overrides]
        results: dict[str, dict[str, Any]] = {}
        for (stage, name), (keys, flags) in RUNS.items():
            log(f"suite: {stage}, {name} ...")
            try:
                results.setdefault(stage, {})[name] = runner(suite_argv(config, base, stage, keys, flags))
            except UserError as exc:
                results.setdefault(stage, {})[name] = {"error": str(exc)}
                log(f"suite: {stage}, {name}: {exc}")
    table = suite_table(results)
    failed = [f"{stage}, {name}" for stage, rows in results.items() for name, r in rows.items() if "error" in r]
    out = {"config": config, "overrides": overrides, "seconds": round(time.perf_counter() - t0, 1),
           "results": results, "table": table, "failed": failed}
    log(table)
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def suite_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per stage and setting, steps/s, samples/s, TFLOP/s, the CUDA peak, the
    speed-up over float32 under PyTorch's defaults, and the reference ratio where measured."""
    ok = [r for rows in results.values() for r in rows.values() if "error" not in r]
    first = ok[0] if ok else {}
    lines = [f"GPU: {first.get('gpu')}; torch {first.get('torch')}", "",
             "| stage | setting | batch | image | steps/s | samples/s | TFLOP/s | CUDA peak (MB) | vs fp32 | vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, by_setting in results.items():
        fp32 = by_setting.get("fp32, PyTorch defaults", {}).get("steps_per_sec")
        for name, r in by_setting.items():
            if "error" in r:
                lines.append(f"| {stage} | {name} | - | - | failed: {r['error'][:120]} | | | | | |")
                continue
            speedup = f"{r['steps_per_sec'] / fp32:.2f}x" if fp32 and r["batch_size"] == by_setting[
                "fp32, PyTorch defaults"]["batch_size"] else "-"
            peak = r.get("cuda_peak_mb")
            ref = r.get("ratio_vs_reference")
            lines.append(f"| {stage} | {name} | {r['batch_size']} | {r['image_size']}² | {r['steps_per_sec']:.4g} | "
                         f"{r['samples_per_sec']:.4g} | {r.get('tflops_per_sec', 0):.3g} | "
                         f"{peak if peak is not None else '-'} | {speedup} | {f'{ref:.2f}x' if ref else '-'} |")
    return "\n".join(lines)
