"""The stage-2 objectives at an equal budget: the same UNet, steps and data, one stage-1 VAE.

    python benchmarks/objectives.py --config configs/demo.yaml            # after train_vae.py
    python benchmarks/objectives.py --config configs/demo.yaml --objectives flow regression --steps 1 2
    python benchmarks/objectives.py --config configs/demo.yaml --steps 1 --set 'prior.measurements.count=[0, "2%"]' \
        --measurements 0 0.5% 2% --samples 8                          # sparse measurements, calibration

For each objective, trains the prior with ``train_unified_prior.py`` (the config's stage 2,
only ``prior.diffusion.objective`` changed; its own run folder under ``--out``), then runs
``evaluate.py`` on the test split at each number of sampling steps (those that apply: the
regression has one forward pass), and prints a Markdown table (NMSE, RMSE, SSIM, PSNR: mean
over samples; samples/s; training seconds) next to the VAE ceiling and the distance-only baseline,
and writes it with every number to ``--out/objectives.json`` and ``objectives.md``. Every run is
the real command line, in a fresh process. With ``--measurements`` (a prior trained with them:
``prior.measurements.count`` in ``--set``) each evaluation gives the model at every amount, one row
each; with ``--samples K`` the model's maps are the mean of K draws, and a second table gives the
calibration of their spread (outside buildings, where nothing was measured) and the NMSE of a single draw.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from commands import ROOT, run  # benchmarks/commands.py

sys.path.insert(0, str(ROOT))
from lib.models.objectives import REGISTRY  # noqa: E402


def g(x, spec: str = ".3g") -> str:
    """A number, or n/a for a region without pixels."""
    return "n/a" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--objectives", nargs="+", default=list(REGISTRY))
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 10])
    p.add_argument("--vae-checkpoint", default=None,
                   help="stage-1 checkpoint (default: the config's output_dir, latest)")
    p.add_argument("--out", default="runs/objectives", help="run folders and the table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--measurements", nargs="+", default=[], metavar="N",
                   help="evaluate.py --measurements at each of these amounts (200, 1%%)")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="evaluate.py --samples K")
    p.add_argument("--conformal", action="store_true", help="evaluate.py --conformal (with --samples K)")
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
    rows, calib_rows, results = [], [], {}
    ceiling = baseline = None
    eval_flags = [x for n in a.measurements for x in ("--measurements", n)] + ["--samples", str(a.samples)]
    for objective in a.objectives:
        sets = [f"output_dir={out / objective}", f"prior.vae_checkpoint={vae}",
                f"prior.diffusion.objective={objective}", "prior.diffusion.sampler=null", *a.set]
        flags = [x for s in sets for x in ("--set", s)]
        train_s = run(["train_unified_prior.py", "--config", a.config, *flags])
        results[objective] = {"train_seconds": round(train_s, 1), "steps": {}}
        for steps in (a.steps if REGISTRY[objective].iterative else [1]):
            run(["evaluate.py", "--config", a.config, *flags, "--steps", str(steps), "--checkpoint", "latest",
                 *eval_flags, *(["--conformal"] if a.conformal and REGISTRY[objective].stochastic else [])])
            m = json.loads((out / objective / "eval" / "metrics.json").read_text())
            results[objective]["sampler"] = m["sampler"]
            ceiling, baseline = m["vae_ceiling"], m["distance_baseline"]
            for key in [k for k in m["methods"] if k.startswith("model")]:
                d = m[key]
                amount = d["measurements"]["amount"]
                r = {k: d[k] for k in ("nmse", "rmse", "ssim", "psnr", "nmse_set", "rmse_db", "samples_per_sec")}
                r.update(evaluations=m["network_evaluations"], measurements=amount,
                         outside_buildings_rmse_db=d["regions"]["outside_buildings"]["rmse_db"],
                         unmeasured_rmse_db=d["regions"]["unmeasured"]["rmse_db"],
                         unmeasured_nmse_set=d["regions"]["unmeasured"]["nmse_set"],
                         nlos_rmse_db=d["regions"]["nlos"]["rmse_db"], los_rmse_db=d["regions"]["los"]["rmse_db"])
                if "calibration" in d:
                    c = d["calibration"]["unmeasured"]
                    r.update(single_nmse=d["single_sample"]["nmse"], coverage50=c["coverage50"],
                             coverage90=c["coverage90"], crps_db=c["crps_db"], mean_std_db=c["mean_std_db"],
                             coverage50_conformal=c["coverage50_conformal"],
                             coverage90_conformal=c["coverage90_conformal"])
                    conf = (f" {r['coverage50_conformal']:.3f} | {r['coverage90_conformal']:.3f} |"
                            if a.conformal else "")
                    calib_rows.append(f"| {objective} ({m['sampler']}) | {steps} | {amount} | {r['single_nmse']:.4g} | "
                                      f"{r['nmse']:.4g} | {r['coverage50']:.3f} | {r['coverage90']:.3f} | "
                                      f"{r['crps_db']:.3g} | {r['mean_std_db']:.3g} |{conf}")
                results[objective]["steps"].setdefault(steps, {})[amount] = r
                rows.append(f"| {objective} ({m['sampler']}) | {steps} | {r['evaluations']} | {amount} | "
                            f"{r['nmse']:.4g} | {r['rmse']:.4g} | {r['ssim']:.4g} | {r['psnr']:.4g} | "
                            f"{g(r['outside_buildings_rmse_db'])} | {g(r['unmeasured_rmse_db'])} | "
                            f"{g(r['los_rmse_db'])} | {g(r['nlos_rmse_db'])} | "
                            f"{r['samples_per_sec']:.4g} | {train_s:.0f} |")
                print(rows[-1], flush=True)
    for name, d in (("VAE round trip (ceiling)", ceiling), ("distance only", baseline)):
        rg = d["regions"]
        rows.append(f"| {name} | - | - | - | {d['nmse']:.4g} | {d['rmse']:.4g} | {d['ssim']:.4g} | {d['psnr']:.4g} | "
                    f"{g(rg['outside_buildings']['rmse_db'])} | {g(rg['unmeasured']['rmse_db'])} | "
                    f"{g(rg['los']['rmse_db'])} | "
                    f"{g(rg['nlos']['rmse_db'])} | {d['samples_per_sec']:.4g} | - |")
    table = "\n".join(["| objective (sampler) | steps | network evaluations | measurements | NMSE | RMSE | SSIM | "
                       "PSNR (dB) | RMSE outside buildings (dB) | unmeasured (dB) | LOS (dB) | NLOS (dB) | samples/s | "
                       "stage-2 training (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    if calib_rows:
        table += "\n\n" + "\n".join([f"| objective (sampler) | steps | measurements | NMSE one map | NMSE mean of "
                                      f"{a.samples} | coverage 50 % | coverage 90 % | CRPS (dB) | mean std (dB) |"
                                      + (" conformal coverage 50 % | conformal coverage 90 % |" if a.conformal else ""),
                                      "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if a.conformal else ""),
                                      *calib_rows])
    results["vae_ceiling"], results["distance_baseline"] = ceiling, baseline
    (out / "objectives.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "objectives.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
