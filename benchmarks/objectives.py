"""The stage-2 objectives at an equal budget: the same UNet, steps and data, one stage-1 VAE.

    python benchmarks/objectives.py --config configs/demo.yaml            # after train_vae.py
    python benchmarks/objectives.py --config configs/demo.yaml --objectives flow regression --steps 1 2

For each objective, trains the prior with ``train_unified_prior.py`` (the config's stage 2,
only ``prior.diffusion.objective`` changed; its own run folder under ``--out``), then runs
``evaluate.py`` on the test split at each number of sampling steps (those that apply: the
regression has one forward pass), and prints a Markdown table (NMSE, RMSE, SSIM, PSNR: mean
over samples; samples/s; training seconds) next to the VAE ceiling and the distance-only baseline,
and writes it with every number to ``--out/objectives.json`` and ``objectives.md``. Every run is
the real command line, in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from commands import ROOT, run  # benchmarks/commands.py

sys.path.insert(0, str(ROOT))
from lib.models.objectives import REGISTRY  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--objectives", nargs="+", default=list(REGISTRY))
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 10])
    p.add_argument("--vae-checkpoint", default=None,
                   help="stage-1 checkpoint (default: the config's output_dir, latest)")
    p.add_argument("--out", default="runs/objectives", help="run folders and the table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lib.config import load_config
    cfg = load_config(ROOT / a.config, a.set)
    vae = a.vae_checkpoint
    if vae is None:
        from lib.train.weights import resolve_trained
        vae = str(resolve_trained("vae", "latest", ROOT / cfg.output_dir if not Path(cfg.output_dir).is_absolute()
                                  else cfg.output_dir, cfg.flags, warn=lambda m: None).path)
    out = Path(a.out)
    rows, results = [], {}
    ceiling = baseline = None
    for objective in a.objectives:
        sets = [f"output_dir={out / objective}", f"prior.vae_checkpoint={vae}",
                f"prior.diffusion.objective={objective}", "prior.diffusion.sampler=null", *a.set]
        flags = [x for s in sets for x in ("--set", s)]
        train_s = run(["train_unified_prior.py", "--config", a.config, *flags])
        results[objective] = {"train_seconds": round(train_s, 1), "steps": {}}
        for steps in (a.steps if REGISTRY[objective].iterative else [1]):
            run(["evaluate.py", "--config", a.config, *flags, "--steps", str(steps), "--checkpoint", "latest"])
            m = json.loads((out / objective / "eval" / "metrics.json").read_text())
            results[objective]["steps"][steps] = {k: m["model"][k] for k in
                                                  ("nmse", "rmse", "ssim", "psnr", "nmse_set", "samples_per_sec")}
            results[objective]["steps"][steps]["evaluations"] = m["network_evaluations"]
            results[objective]["sampler"] = m["sampler"]
            ceiling, baseline = m["vae_ceiling"], m["distance_baseline"]
            r = results[objective]["steps"][steps]
            rows.append(f"| {objective} ({m['sampler']}) | {steps} | {r['evaluations']} | {r['nmse']:.4g} | "
                        f"{r['rmse']:.4g} | {r['ssim']:.4g} | {r['psnr']:.4g} | {r['samples_per_sec']:.4g} | "
                        f"{train_s:.0f} |")
            print(rows[-1], flush=True)
    for name, d in (("VAE round trip (ceiling)", ceiling), ("distance only", baseline)):
        rows.append(f"| {name} | - | - | {d['nmse']:.4g} | {d['rmse']:.4g} | {d['ssim']:.4g} | {d['psnr']:.4g} | "
                    f"{d['samples_per_sec']:.4g} | - |")
    table = "\n".join(["| objective (sampler) | steps | network evaluations | NMSE | RMSE | SSIM | PSNR (dB) | "
                       "samples/s | stage-2 training (s) |", "|---|---|---|---|---|---|---|---|---|", *rows])
    results["vae_ceiling"], results["distance_baseline"] = ceiling, baseline
    (out / "objectives.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "objectives.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
