"""Evaluate the full pipeline (condition -> prior sampling -> VAE decode) on held-out maps.

    python evaluate.py --config configs/demo.yaml                   # test maps, best prior checkpoint
    python evaluate.py --config configs/m.yaml --steps 10 --sampler dpm --checkpoint latest

Next to the model it measures, on the same maps, two baselines: the VAE round trip of the
ground truth (``vae_ceiling``: the best stage 2 can do through this VAE) and a distance-only
log-distance pathloss fit on the training maps (``distance_baseline``: what a model that
ignores buildings gets; lib/baselines.py). Metrics as in the RadioDiff paper, on [0, 1] maps
(lib/metrics.py): NMSE, RMSE, SSIM and PSNR with data range 1, mean and std over maps, overall
and per simulator. Writes ``{output_dir}/eval/metrics.json``, ``metrics.md`` (the same as
Markdown tables) and ``samples.png``. Runs in one process (a GPU when there is one).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from lib.baselines import fit_distance_baseline
from lib.batching import eval_batches
from lib.config import load_config
from lib.dataset import build_datasets
from lib.diffusion import generate_maps
from lib.errors import UserError, run_cli
from lib.evaluation import score_methods
from lib.images import save_grid
from lib.latents import decode_latents, encode_latents
from lib.metrics import METRIC_NAMES, MetricAccumulator, summarize, summarize_groups
from lib.numfmt import fmt
from lib.prior import MODEL_KEYS
from lib.resume import check_compatible
from lib.weights import load_prior, load_vae, resolve_trained

METHODS = {"model": "model (prior + VAE decode)", "vae_ceiling": "VAE round trip (ceiling)",
           "distance_baseline": "distance only (log-distance fit)"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, value parsed as YAML); repeatable")
    p.add_argument("--split", choices=("test", "val"), default="test", help="maps to evaluate on")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="sampling steps (default: prior.diffusion.num_inference_steps)")
    p.add_argument("--sampler", choices=("ddim", "dpm"), default=None,
                   help="sampler (default: prior.diffusion.sampler)")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|PATH",
                   help="stage-2 checkpoint under {output_dir}/prior/checkpoints, or a folder")
    p.add_argument("--baseline-samples", type=int, default=4000, metavar="N",
                   help="training samples (spread evenly) the distance baseline is fitted on")
    return p.parse_args()


def method_summary(acc: MetricAccumulator, seconds: float) -> dict[str, Any]:
    values, groups = acc.values(), acc.groups()
    out: dict[str, Any] = summarize(values)
    out["maps_per_sec"] = out["num_maps"] / seconds if seconds > 0 else None
    out["per_simulator"] = summarize_groups(values, groups)
    return out


def markdown(result: dict[str, Any]) -> str:
    def cell(d: dict[str, Any], k: str) -> str:
        return f"{fmt(d[k])} ± {fmt(d[k + '_std'])}"

    ck = result["checkpoints"]
    lines = [f"# Evaluation on the {result['split']} split: {result['num_maps']} maps, "
             f"simulations {', '.join(result['simulations'])}", "",
             f"Prior `{ck['prior']}` ({'EMA' if ck['prior_ema'] else 'raw'} weights), "
             f"{result['sampler']} sampler, {result['num_inference_steps']} steps, "
             f"{result['prediction_type']} prediction; VAE `{ck['vae']}`. "
             f"Metrics on [0, 1] maps, mean ± std over maps.", "",
             "| method | NMSE | RMSE | SSIM | PSNR (dB) | maps/s |", "|---|---|---|---|---|---|"]
    for key, title in METHODS.items():
        d = result[key]
        lines.append(f"| {title} | " + " | ".join(cell(d, m) for m in METRIC_NAMES) +
                     f" | {fmt(d['maps_per_sec'])} |")
    lines += ["", "Per simulator:", "", "| simulator | method | maps | NMSE | RMSE | SSIM | PSNR (dB) |",
              "|---|---|---|---|---|---|---|"]
    for sim in result["simulations"]:
        for key, title in METHODS.items():
            d = result[key]["per_simulator"][sim]
            lines.append(f"| {sim} | {title} | {d['num_maps']} | " +
                         " | ".join(cell(d, m) for m in METRIC_NAMES) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    cfg = load_config(args.config, args.set)
    dcfg = cfg.prior.diffusion
    steps = args.steps or dcfg.num_inference_steps
    if not 1 <= steps <= dcfg.num_train_timesteps:
        raise UserError(f"--steps {steps}: expected 1 .. {dcfg.num_train_timesteps}")
    if args.baseline_samples < 1:
        raise UserError(f"--baseline-samples {args.baseline_samples}: expected an integer >= 1")
    sampler = args.sampler or dcfg.sampler
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)

    # ------------------------------------------------------------------ checkpoints
    info = resolve_trained("prior", args.checkpoint, cfg.output_dir, args.config)
    check_compatible(info, cfg, MODEL_KEYS)
    state = info.state
    trained_sims = list(state["simulations"])
    unknown = [s for s in cfg.data.simulation if s not in trained_sims]
    if unknown:
        raise UserError(f"data.simulation {unknown}: the prior {info.path} was trained on "
                        f"{trained_sims} only")
    loaded = load_vae(Path(state["vae_checkpoint"]), cfg, device)
    vae, latent_scale = loaded.vae, float(state["latent_scale"])
    prior, prior_ema = load_prior(info.path, cfg, loaded.downsample, len(trained_sims), device)
    print(f"prior {info.path} ({'EMA' if prior_ema else 'raw'} weights), VAE {loaded.path}, "
          f"latent scale {latent_scale:.6g}")

    # ------------------------------------------------------------------ data and the distance fit
    data = build_datasets(cfg.data, cfg.seed, ("train", args.split))
    train_ds, eval_ds = data["train"], data[args.split]
    sims = list(cfg.data.simulation)                  # the datasets' sim_id indexes this list
    to_model_id = torch.tensor([trained_sims.index(s) for s in sims], device=device)
    n_fit = min(len(train_ds), args.baseline_samples)
    fit_idx = np.linspace(0, len(train_ds) - 1, n_fit).round().astype(int).tolist()
    t0 = time.perf_counter()
    baseline = fit_distance_baseline(eval_batches(Subset(train_ds, fit_idx), 64), sims)
    print(f"distance baseline fitted on {n_fit} training maps in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{s}: {a:.3f} {b:+.3f} log10(d px)" for s, (a, b) in sorted(baseline.lines.items())))

    # ------------------------------------------------------------------ the maps
    rng = torch.Generator().manual_seed(cfg.seed)      # the same sampling noise every evaluation
    methods = {
        "model": lambda b: generate_maps(prior, vae, latent_scale, b["cond"], to_model_id[b["sim_id"]], dcfg,
                                         steps, sampler, rng),
        "vae_ceiling": lambda b: decode_latents(vae, encode_latents(vae, b["image"])),
        "distance_baseline": lambda b: baseline.predict(b["cond"], [sims[i] for i in b["sim_id"].tolist()]),
    }
    with torch.no_grad():
        scores = score_methods(eval_batches(eval_ds, cfg.data.batch_size), methods, device, sims)
    accs, seconds = scores.accs, scores.seconds

    # ------------------------------------------------------------------ report
    result: dict[str, Any] = {
        "split": args.split, "num_maps": accs["model"].num_maps, "simulations": sims,
        "sampler": sampler, "num_inference_steps": steps, "prediction_type": dcfg.prediction_type,
        "latent_scale": latent_scale,
        "checkpoints": {"prior": str(info.path), "prior_step": info.step, "prior_ema": prior_ema,
                        "vae": str(loaded.path), "vae_ema": loaded.ema},
    }
    for k in METHODS:
        result[k] = method_summary(accs[k], seconds[k])
    result["distance_baseline"]["fit"] = {"samples": n_fit, "lines": baseline.to_dict()}
    out_dir = Path(cfg.output_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = markdown(result)
    (out_dir / "metrics.md").write_text(table, encoding="utf-8")
    if scores.first is not None:
        f = scores.first
        save_grid(out_dir / "samples.png",
                  [("buildings+tx", f["cond"], "cond"), ("ground truth", f["image"], "map")]
                  + [(k.replace("_", " "), f[k], "map") for k in METHODS]
                  + [("|model error|", (f["model"] - f["image"]).abs() / 2, "error")])
    print(table)
    print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'} and {out_dir / 'samples.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
