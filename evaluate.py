"""Evaluate the full pipeline (condition -> prior sampling -> VAE decode) on held-out maps.

    python evaluate.py --config configs/demo.yaml                   # test maps, best prior checkpoint
    python evaluate.py --config configs/m.yaml --steps 10 --sampler dpm --checkpoint latest
    python evaluate.py --config configs/m.yaml --save-predictions   # + every predicted map, to recompute
    python evaluate.py --config configs/demo.yaml --measurements 0 --measurements 2% --samples 8

Next to the model it measures, on the same maps, two baselines: the VAE round trip of the
ground truth (``vae_ceiling``: the best stage 2 can do through this VAE) and a distance-only
log-distance pathloss fit on the training maps (``distance_baseline``: what a model that
ignores buildings gets; lib/evaluation/baselines.py). Metrics on [0, 1] maps (lib/evaluation/metrics.py), both
conventions: per map, then mean ± std (RadioDiff: NMSE, RMSE, SSIM, PSNR with data range 1),
and set level (RadioUNet: ``nmse_set``, ``rmse_set``, ``rmse_db``); overall and per simulator.
The maps it is measured on must not be training maps of the VAE or the prior (the contamination
guard; ``--allow-overlap`` measures anyway and says so). Writes ``{output_dir}/eval/metrics.json``
(with a ``protocol`` entry: split, map ids, threshold, sampler, checkpoints), ``metrics.md`` and
``samples.png``. Runs in one process (a GPU when there is one).

Also in ``metrics.json`` and ``metrics.md``: every method's set-level metrics by region
(outside buildings, line of sight or not, distance bands: lib/evaluation/regions.py), in gray
levels and in dB (``data.db_range``, lib/data/units.py); with ``--measurements N`` (a model trained
with measurements; repeatable) the model at each N, with the same measured pixels for the same
seed (lib/data/measurements.py); with ``--samples K`` the metrics of the mean of K maps, those of
one map, and the calibration of their spread (lib/evaluation/uncertainty.py), and with
``--save-predictions`` their std and quantiles per pixel.
"""
from __future__ import annotations

if __name__ == "__main__":       # answer --help and honour Ctrl-C before the slow imports below
    from lib.cli import early_start, evaluate_parser
    early_start(evaluate_parser)

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Subset

from lib.cli import evaluate_parser
from lib.config import load_config
from lib.data import measurements
from lib.data.batching import eval_batches
from lib.data.dataset import build_datasets, prepare_data
from lib.data.splits import check_overlap, data_mismatch, maps_hash, protocol_warnings, split_record
from lib.data.units import db_per_unit
from lib.errors import UserError, run_cli
from lib.evaluation.baselines import fit_distance_baseline
from lib.evaluation.images import save_samples
from lib.evaluation.metrics import METRIC_NAMES, MetricAccumulator, summarize, summarize_groups
from lib.evaluation.regions import (LOS_SHARE, METRES_AT_256, REGIONS, RegionAccumulator, region_masks,
                                    unmeasured_pixels, without_measured)
from lib.evaluation.scoring import PredictionStore, score_methods
from lib.evaluation.uncertainty import QUANTILES, CalibrationAccumulator, ConformalFit, sample_stats
from lib.models.latents import decode_latents, encode_latents
from lib.models.objectives import choose_sampler, generate_maps, make_objective
from lib.models.prior import ARCHITECTURE_KEYS
from lib.numfmt import fmt
from lib.outputs import StagedFolder
from lib.progress import echo, progress
from lib.train.resume import check_compatible
from lib.train.trackers import close_trackers, log_image, log_scalars, open_trackers
from lib.train.weights import load_prior, load_prior_vae, resolve_trained

METHODS = {"model": "model (prior + VAE decode)", "vae_ceiling": "VAE round trip (ceiling)",
           "distance_baseline": "distance only (log-distance fit)"}
GRID_TITLES = {"model": "model", "vae_ceiling": "VAE round trip", "distance_baseline": "distance only"}


def method_summary(acc: MetricAccumulator, seconds: float, db_factor: float) -> dict[str, Any]:
    """A method's metrics: mean and std over samples, set level, per simulator."""
    values, groups = acc.values(), acc.groups()
    out: dict[str, Any] = summarize(values)
    out["rmse_db"] = db_factor * out["rmse_set"]
    out["samples_per_sec"] = out["num_samples"] / seconds if seconds > 0 else None
    out["ms_per_sample"] = 1000 * seconds / out["num_samples"] if out["num_samples"] else None
    out["per_simulator"] = summarize_groups(values, groups)
    for d in out["per_simulator"].values():
        d["rmse_db"] = db_factor * d["rmse_set"]
    return out


def markdown(result: dict[str, Any]) -> str:
    def cell(d: dict[str, Any], k: str) -> str:
        return f"{fmt(d[k])} ± {fmt(d[k + '_std'])}"

    ck, pr, methods = result["checkpoints"], result["protocol"], result["methods"]
    lines = [f"# Evaluation on the {result['split']} split: {result['num_samples']} samples "
             f"({result['protocol']['maps']} maps x transmitters x simulations {', '.join(result['simulations'])})", "",
             f"Split `{pr['split']}` ({pr['maps']} {result['split']} maps), threshold {pr['threshold']:g}; "
             f"prior `{ck['prior']}` ({'EMA' if ck['prior_ema'] else 'raw'} weights), "
             f"objective {result['objective']}, {result['sampler']} sampler, {result['num_inference_steps']} steps "
             f"({result['network_evaluations']} network evaluations); VAE `{ck['vae']}`. Metrics on [0, 1] gray levels: "
             f"mean ± std over samples (RadioDiff's convention), and set level over every pixel "
             f"(RadioUNet's: NMSE_set, RMSE_set; RMSE in dB = {pr['rmse_db_factor']:g} x RMSE_set, "
             f"data.db_range {pr['db_range']}).", "",
             "| method | NMSE | RMSE | SSIM | PSNR (dB) | NMSE_set | RMSE_set | RMSE (dB) | samples/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, title in methods.items():
        d = result[key]
        lines.append(f"| {title} | " + " | ".join(cell(d, m) for m in METRIC_NAMES) +
                     f" | {fmt(d['nmse_set'])} | {fmt(d['rmse_set'])} | {fmt(d['rmse_db'])} | {fmt(d['samples_per_sec'])} |")
    models = [k for k in methods if "measurements" in result[k]]
    if pr["measurements"]:
        lines += ["", f"Measurements: pixels outside buildings, fixed per sample by seed {pr['measurement_seed']}; "
                  f"the model at each amount (mean measured pixels per map):", "",
                  "| measurements | pixels per map | NMSE | RMSE (dB) set | outside buildings RMSE (dB) | "
                  "unmeasured RMSE (dB) (NMSE_set) |", "|---|---|---|---|---|---|"]
        for k in models:
            d, r = result[k], result[k]["regions"]
            lines.append(f"| {d['measurements']['amount']} | {fmt(d['measurements']['mean_pixels'])} | "
                         f"{cell(d, 'nmse')} | {fmt(d['rmse_db'])} | {fmt(r['outside_buildings']['rmse_db'])} | "
                         f"{fmt(r['unmeasured']['rmse_db'])} ({fmt(r['unmeasured']['nmse_set'])}) |")
    sampled = [k for k in models if result[k]["samples"]["drawn"] > 1]
    if sampled or pr["samples"] > 1:
        lines += ["", f"Samples: {pr['samples']} maps per input, scored by their mean; calibration outside buildings "
                  f"where nothing was measured (share of true pixels inside the samples' central 50 % / 90 % "
                  f"intervals; CRPS, lower is better):", ""]
        if not sampled:
            lines.append(f"objective {result['objective']} is deterministic: one map per input, no calibration.")
        else:
            conformal = pr.get("conformal")
            lines += ["| method | NMSE one map | NMSE mean of K | coverage 50 % | coverage 90 % | CRPS (dB) | mean std (dB) |"
                      + (" conformal: widening 50 % / 90 % (dB) | coverage 50 % | coverage 90 % |" if conformal else ""),
                      "|---|---|---|---|---|---|---|" + ("---|---|---|" if conformal else "")]
            for k in sampled:
                d, c = result[k], result[k]["calibration"]["unmeasured"]
                row = (f"| {methods[k]} | {cell(d['single_sample'], 'nmse')} | {cell(d, 'nmse')} | "
                       f"{fmt(c['coverage50'])} | {fmt(c['coverage90'])} | {fmt(c['crps_db'])} | {fmt(c['mean_std_db'])} |")
                if conformal:
                    w = d["conformal"]
                    row += (f" {fmt(w['widen50_db'])} / {fmt(w['widen90_db'])} | {fmt(c['coverage50_conformal'])} | "
                            f"{fmt(c['coverage90_conformal'])} |")
                lines.append(row)
            if conformal:
                lines += ["", "Conformal: the intervals widened by conformalized quantile regression fitted on the "
                          "validation maps (lib/evaluation/uncertainty.py), measured on these."]
    lines += ["", "By region (set level over the region's pixels; LOS: less than "
              f"{pr['regions']['los_share']:g} of the direct path in buildings; distances at "
              f"{pr['regions']['metres_at_256']:g} m per 256 px): RMSE in dB (NMSE_set)", "",
              "| region | share of pixels | " + " | ".join(methods.values()) + " |",
              "|---|---|" + "---|" * len(methods)]
    for region in REGIONS:
        first = result[next(iter(methods))]["regions"][region]
        lines.append(f"| {region} | {fmt(first['share'])} | " + " | ".join(
            f"{fmt(result[k]['regions'][region]['rmse_db'])} ({fmt(result[k]['regions'][region]['nmse_set'])})"
            for k in methods) + " |")
    lines += ["", "Per simulator:", "",
              "| simulator | method | samples | NMSE | RMSE | SSIM | PSNR (dB) | NMSE_set | RMSE_set |",
              "|---|---|---|---|---|---|---|---|---|"]
    for sim in result["simulations"]:
        for key, title in methods.items():
            d = result[key]["per_simulator"][sim]
            lines.append(f"| {sim} | {title} | {d['num_samples']} | " +
                         " | ".join(cell(d, m) for m in METRIC_NAMES) + f" | {fmt(d['nmse_set'])} | {fmt(d['rmse_set'])} |")
    if pr["allow_overlap"]:
        lines += ["", "**Measured on maps a model was trained on (--allow-overlap):** " +
                  "; ".join(f"{o['maps']} maps of the {o['model']}" for o in pr["allow_overlap"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = evaluate_parser().parse_args()
    cfg = load_config(args.config, args.set)
    dcfg = cfg.prior.diffusion
    steps = dcfg.num_inference_steps if args.steps is None else args.steps
    if not 1 <= steps <= dcfg.num_train_timesteps:
        raise UserError(f"--steps {steps}: expected 1 .. {dcfg.num_train_timesteps}")
    for flag, value in (("--baseline-samples", args.baseline_samples), ("--max-maps", args.max_maps)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: expected an integer >= 1")
    objective = make_objective(dcfg)
    sampler = choose_sampler(dcfg, args.sampler)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)

    # ------------------------------------------------------------------ checkpoints
    info = resolve_trained("prior", args.checkpoint, cfg.output_dir, cfg.flags)
    saved = check_compatible(info, cfg, ARCHITECTURE_KEYS)
    state = info.state
    trained_measurements = (saved.get("prior") or {}).get("measurements") or {}
    trained_count = trained_measurements.get("count")
    amounts = [measurements.parse_amount(a, "--measurements") for a in args.measurements]
    if amounts and trained_count is None:
        raise UserError(f"--measurements {args.measurements[0]}: the prior {info.path} was trained without "
                        f"measurements (prior.measurements.count: null); only a prior trained with them takes them")
    if trained_count is not None and not amounts:
        amounts = [measurements.Amount(0, False)]
        echo(f"the prior was trained with measurements ({trained_count}); evaluating it with none "
             f"(--measurements N for others)")
    trained_sims = list(state["simulations"])
    unknown = [s for s in cfg.data.simulation if s not in trained_sims]
    if unknown:
        raise UserError(f"data.simulation {unknown}: the prior {info.path} was trained on "
                        f"{trained_sims} only")
    loaded = load_prior_vae(info, cfg, device)
    vae, latent_scale = loaded.vae, float(state["latent_scale"])
    prior, prior_ema = load_prior(info.path, cfg, loaded.downsample, len(trained_sims), device,
                                  measurements=trained_count is not None)

    # ------------------------------------------------------------------ the maps, the guard
    split = prepare_data(cfg.data, cfg.seed, echo)
    record = split_record(split, cfg.data)
    part_maps = split.maps(args.split)
    if args.max_maps is not None and args.max_maps < len(part_maps):
        part_maps = [part_maps[int(i)] for i in np.linspace(0, len(part_maps) - 1, args.max_maps).round()]
        echo(f"--max-maps {args.max_maps}: evaluating {len(part_maps)} of the {len(split.maps(args.split))} "
             f"{args.split} maps, spread evenly over them")
        split = dataclasses.replace(split, **{args.split: part_maps})
    notes, overlaps = check_overlap(part_maps, args.split, record, [
        ("VAE checkpoint", state["vae_checkpoint"], state.get("vae_split")),
        ("prior checkpoint", str(info.path), state.get("split"))], args.allow_overlap)
    for warning in protocol_warnings(split) + notes + data_mismatch(state.get("split"), record, "the prior"):
        echo(f"WARNING: {warning}")
    echo(f"prior {info.path} ({'EMA' if prior_ema else 'raw'} weights), VAE {state['vae_checkpoint']}"
         f"{' (its copy in the prior checkpoint)' if loaded.path == info.path else ''}, latent scale {latent_scale:.6g}")

    # ------------------------------------------------------------------ data and the distance fit
    if args.save_samples and (not args.save_predictions or args.samples < 2):
        raise UserError("--save-samples saves the K drawn maps with --save-predictions and --samples K (K >= 2)")
    if args.conformal and not objective.stochastic:
        raise UserError(f"--conformal: objective {dcfg.objective} draws the same map every time; there is no "
                        f"spread to calibrate")
    if args.conformal and (args.samples < 2 or args.split != "test"):
        raise UserError("--conformal fits the intervals on the validation maps and measures them on the test maps: "
                        "it needs --samples K (K >= 2) and --split test")
    data = build_datasets(cfg.data, cfg.seed, ("train", args.split, "val") if args.conformal
                          else ("train", args.split), echo, split)
    train_ds, eval_ds = data["train"], data[args.split]
    sims = list(cfg.data.simulation)                  # the datasets' sim_id indexes this list
    to_model_id = torch.tensor([trained_sims.index(s) for s in sims], device=device)
    n_fit = min(len(train_ds), args.baseline_samples)
    fit_idx = np.linspace(0, len(train_ds) - 1, n_fit).round().astype(int).tolist()
    t0 = time.perf_counter()
    baseline = fit_distance_baseline(eval_batches(Subset(train_ds, fit_idx), 64), sims)
    echo(f"distance baseline fitted on {n_fit} training samples in {time.perf_counter() - t0:.1f} s: "
         + ", ".join(f"{s}: {a:.3f} {b:+.3f} log10(d px)" for s, (a, b) in sorted(baseline.lines.items())))

    # ------------------------------------------------------------------ the predictions
    # The model once per measurement amount ("model" the first), K maps per input; the
    # baselines once. Written into a staging folder that replaces {output_dir}/eval only when
    # complete; one evaluation at a time into it (lib/outputs.py).
    models = {("model" if i == 0 else f"model@{a}"): a for i, a in enumerate(amounts or [None])}
    drawn = args.samples if objective.stochastic else 1
    if drawn < args.samples:
        echo(f"--samples {args.samples}: objective {dcfg.objective} is deterministic; one map per input")
    # the correction as the checkpoint was trained and validated with (predict.py does the same)
    sigma = float(trained_measurements.get("sigma", 2.0)) if trained_measurements.get("correct", True) else None
    method_titles = {**{k: METHODS["model"] + ("" if a is None else f", {a} measured") for k, a in models.items()},
                     **{k: METHODS[k] for k in ("vae_ceiling", "distance_baseline")}}
    out_dir = Path(cfg.output_dir) / "eval"
    with StagedFolder(out_dir, "evaluation") as work:
        extra = {}
        if drawn > 1:
            extra = {"std": (), **{f"q{round(q * 100):02d}": () for q in QUANTILES},
                     **({"samples": (drawn,)} if args.save_samples else {})}
        store = PredictionStore(work, len(eval_ds), cfg.data.image_size, extra) if args.save_predictions else None
        rng = torch.Generator().manual_seed(cfg.seed)      # the same sampling noise every evaluation
        draws: dict[str, torch.Tensor] = {}                # each model's K maps of the current batch
        measured = dict.fromkeys(models, 0.0)              # measured pixels, summed over the samples
        given: dict[str, Optional[torch.Tensor]] = dict.fromkeys(models)   # each model's measured pixels, this batch

        def model(key: str, amount: Any):
            def run(b: dict) -> torch.Tensor:
                cond = b["cond"]
                if amount is not None:
                    mask = measurements.fixed_mask(cond, amount, cfg.seed, b["map_id"].tolist(), b["tx"].tolist())
                    measured[key] += float(mask.sum())
                    given[key] = mask
                    cond = measurements.with_measurements(cond, b["image"], mask)
                ids = to_model_id[b["sim_id"]]
                draws[key] = torch.stack([generate_maps(prior, vae, latent_scale, cond, ids, objective, steps, sampler,
                                                        rng, sigma) for _ in range(drawn)])
                return draws[key].mean(dim=0)
            return run

        methods = {
            **{key: model(key, a) for key, a in models.items()},
            "vae_ceiling": lambda b: decode_latents(vae, encode_latents(vae, b["image"])),
            "distance_baseline": lambda b: baseline.predict(b["cond"], [sims[i] for i in b["sim_id"].tolist()]),
        }
        widen: dict[str, dict[int, float]] = {}
        fits: dict[str, ConformalFit] = {}
        if args.conformal and drawn > 1:       # fitted on the validation maps, with noise of its own
            main_rng, rng = rng, torch.Generator().manual_seed(cfg.seed + 1)
            fits = {k: ConformalFit(seed=cfg.seed) for k in models}
            with torch.no_grad(), progress(len(data["val"]), desc="conformal fit on val", unit="sample") as bar:
                for batch in eval_batches(data["val"], cfg.batch_size("prior")):
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    free = batch["cond"][:, :1] < 0
                    for k in models:          # fitted where the measurements do not give the answer
                        methods[k](batch)
                        fits[k].update(draws[k], batch["image"], unmeasured_pixels(free, given[k]))
                    bar.update(len(batch["image"]))
            widen = {k: f.widen() for k, f in fits.items()}
            rng = main_rng
            measured = dict.fromkeys(models, 0.0)
            echo("conformal widening on the validation maps (gray levels): " + "; ".join(
                f"{k}: 50 % {w[50]:.4g}, 90 % {w[90]:.4g}" for k, w in widen.items()))
        regions = {k: RegionAccumulator() for k in methods}
        single = {k: MetricAccumulator() for k in models}
        calibration = {k: CalibrationAccumulator() for k in models}
        batch_size = cfg.batch_size("prior")
        with torch.no_grad(), progress(len(eval_ds), desc=f"evaluate {args.split}", unit="sample") as bar:
            def after(batch: dict, preds: dict) -> None:
                names = [sims[i] for i in batch["sim_id"].tolist()]
                masks = region_masks(batch["cond"])
                for k, pred in preds.items():
                    regions[k].update(pred, batch["image"], without_measured(masks, given.get(k)))
                for k in models:
                    if drawn > 1:
                        single[k].update(draws[k][0], batch["image"], names)
                        calibration[k].update(draws[k], batch["image"], without_measured(masks, given[k]),
                                              widen.get(k))
                if store is not None:
                    more = {}
                    if drawn > 1:
                        stats = sample_stats(draws["model"])
                        more = {k: stats[k] for k in extra if k != "samples"}
                        if args.save_samples:
                            more["samples"] = ((draws["model"].float() + 1) / 2).clamp(0, 1)[:, :, 0].transpose(0, 1)
                    store.add(preds["model"], batch["image"], batch["map_id"].tolist(), batch["tx"].tolist(),
                              names, more)
                bar.update(len(batch["image"]))
            scores = score_methods(eval_batches(eval_ds, batch_size), methods, device, sims, after)

        # ------------------------------------------------------------------ report
        db_factor = db_per_unit(cfg.data.db_range, cfg.data.threshold)
        result: dict[str, Any] = {
            "split": args.split, "num_samples": scores.accs["model"].num_samples, "simulations": sims,
            "objective": dcfg.objective, "sampler": sampler, "num_inference_steps": steps,
            "network_evaluations": objective.evaluations(steps, sampler), "prediction_type": dcfg.prediction_type,
            "latent_scale": latent_scale, "methods": method_titles,
            "checkpoints": {"prior": str(info.path), "prior_step": info.step, "prior_ema": prior_ema,
                            "vae": state["vae_checkpoint"], "vae_step": state.get("vae_step"), "vae_ema": loaded.ema},
        }
        for k in methods:
            result[k] = method_summary(scores.accs[k], scores.seconds[k], db_factor)
            result[k]["regions"] = regions[k].compute(db_factor)
        for k, a in models.items():
            n = max(1, result[k]["num_samples"])
            result[k]["measurements"] = {"amount": "none" if a is None else str(a), "mean_pixels": measured[k] / n}
            result[k]["samples"] = {"requested": args.samples, "drawn": drawn,
                                    "deterministic": not objective.stochastic}
            if drawn > 1:
                result[k]["single_sample"] = method_summary(single[k], 0.0, db_factor)
                result[k]["calibration"] = calibration[k].compute(db_factor)
            if k in widen:
                result[k]["conformal"] = {"fitted_on": "val", "samples": len(data["val"]), "pixels": fits[k].pixels,
                                          **{f"widen{p}": w for p, w in widen[k].items()},
                                          **{f"widen{p}_db": w * db_factor for p, w in widen[k].items()}}
        result["distance_baseline"]["fit"] = {"samples": n_fit, "lines": baseline.to_dict()}
        result["protocol"] = {
            "split": split.name, "split_seed": split.seed, "part": args.split, "maps": len(part_maps),
            "map_ids": part_maps, "map_ids_hash": maps_hash(part_maps), "max_maps": args.max_maps,
            "threshold": cfg.data.threshold, "cars_input": cfg.data.cars_input, "simulations": sims,
            "objective": dcfg.objective, "sampler": sampler, "steps": steps,
            "network_evaluations": result["network_evaluations"], "ms_per_sample": result["model"]["ms_per_sample"],
            "rmse_db_factor": db_factor, "db_range": list(cfg.data.db_range), "allow_overlap": overlaps,
            "measurements": [str(a) for a in amounts], "measurement_seed": cfg.seed,
            "measurement_correction_sigma": sigma if amounts else None, "samples": args.samples,
            "conformal": args.conformal,
            "regions": {"los_share": LOS_SHARE, "metres_at_256": METRES_AT_256},
            "conventions": {"mean": "per map (map x transmitter x simulation), then mean and std over them",
                            "set": "nmse_set = sum (pred - target)^2 / sum target^2 and rmse_set = sqrt(mean "
                                   "(pred - target)^2), over every pixel of the set",
                            "rmse_db": "(data.db_range high - low) dB per gray level x (1 - threshold) x rmse_set",
                            "samples": "with K > 1 the model's maps are the mean of K draws (its seconds: all K); "
                                       "single_sample: the first draw; calibration per region on the [0, 1] scale"},
        }
        (work / "metrics.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        table = markdown(result)
        (work / "metrics.md").write_text(table, encoding="utf-8")
        written = ["metrics.json", "metrics.md"]
        if scores.first is not None:
            save_samples(work / "samples.png", scores.first, {GRID_TITLES[k]: k for k in GRID_TITLES}, sims,
                         cfg.data.threshold)
            written.append("samples.png")
        if store is not None:
            written += [store.close().name, "predictions"]
        trackers = open_trackers(cfg.prior.train.report_to, "prior.train.report_to", work, "radiodiff-eval",
                                 cfg.to_dict(), run_name=f"{Path(cfg.output_dir).name}/eval")
        log_scalars(trackers, {f"eval/{k}/{m}": result[k][m] for k in methods for m in METRIC_NAMES}, info.step)
        if "samples.png" in written:
            log_image(trackers, "eval/samples", work / "samples.png", info.step)
        close_trackers(trackers)                   # TensorBoard: {output_dir}/eval/tb
    print(table)
    print("wrote " + ", ".join(str(out_dir / name) for name in written))
    return 0


if __name__ == "__main__":
    run_cli(main)
