"""Stage 2: train the unified conditional latent-diffusion prior (buildings + transmitter -> radio map).

    accelerate launch train_unified_prior.py --config configs/demo.yaml     # after train_vae.py
    accelerate launch train_unified_prior.py --config configs/m.yaml --resume latest
    python train_unified_prior.py --config configs/m.yaml --dry-run        # schedule at its key points

Reads like train_vae.py: ``build_models``, ``train_step`` (bench.py times it), ``train``: the frozen
stage-1 VAE, data, models, resume, latent scale, the loop; then ``main``: the config, and ``train``
inside the run's lifecycle (lib/train/run.py). Outputs: ``{output_dir}/prior/``.
"""
from __future__ import annotations

if __name__ == "__main__":       # answer --help and honour Ctrl-C before the slow imports below
    from lib.cli import early_start, trainer_parser
    early_start(lambda: trainer_parser(__doc__.splitlines()[0], allow_overlap=True))

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel

from lib.cli import trainer_parser
from lib.config import Config, load_config
from lib.data import (STAGE_FIELDS, MeasurementSpec, build_datasets, check_overlap, data_mismatch, draw_mask,
                      eval_batches, fixed_mask, parse_spec, prepare_data, protocol_warnings, split_record,
                      train_batches, with_measurements)
from lib.errors import run_cli
from lib.evaluation import gather_accumulator, gather_values, save_samples, score_methods
from lib.models import (LatentCache, LatentPrior, LatentSource, Objective, check_diffusion, count_parameters,
                        generate_maps, make_objective, measure_latent_scale, open_latent_cache, place_vae, prior_files)
from lib.numfmt import fmt, fmt_lr
from lib.train import (FaultPolicy, MeanTracker, Run, any_process, build_optimizer, build_scheduler, check_schedules,
                       ema_files, ema_state, ema_weights, load_vae, make_ema, mean_logs, prepare_model, print_dry_run,
                       stage1_checkpoint, update)

Phase = Callable[[str], ContextManager]              # bench.py passes a timer of the step's parts


@dataclass
class Stage2:
    """What one stage-2 update touches; ``prior`` as Accelerate prepared it (DDP on N processes), ``prior_raw`` plain."""
    prior: torch.nn.Module
    prior_raw: LatentPrior
    opt: torch.optim.Optimizer
    sched: Any
    ema: Optional[EMAModel]
    vae: AutoencoderKL
    latents: LatentSource             # the frozen encoder, or the latent cache (lib/models/latents.py)
    latent_scale: float
    objective: Objective              # what the prior learns and how it samples (lib/models/objectives.py)
    measured: Optional[MeasurementSpec] = None    # prior.measurements.count (lib/data/measurements.py)


def build_models(cfg: Config, accelerator: Accelerator, vae: AutoencoderKL, downsample: int,
                 cache: Optional[LatentCache] = None) -> Stage2:
    train_cfg, objective = cfg.prior.train, make_objective(cfg.prior.diffusion)
    measured = parse_spec(cfg.prior.measurements.count)
    prior = LatentPrior(cfg.prior.model, cfg.vae.model.latent_channels, cfg.data.image_size,
                        downsample, len(cfg.data.simulation), objective.outputs, measured is not None)
    prior = prepare_model(prior, train_cfg)                # channels_last, compile
    opt = build_optimizer(prior.parameters(), train_cfg)
    sched = build_scheduler(opt, train_cfg)                # sets the LR, every step
    prior, opt, sched = accelerator.prepare(prior, opt, sched)
    prior_raw, vae = accelerator.unwrap_model(prior), place_vae(vae, accelerator.device, encoder=cache is None)
    return Stage2(prior, prior_raw, opt, sched, make_ema(prior_raw, train_cfg, accelerator.device),
                  vae, LatentSource(vae, cache, cfg.prior.posterior_sample), 1.0, objective, measured)


def train_step(m: Stage2, data_iter: Iterator[dict], accelerator: Accelerator, cfg: Config,
               phase: Phase = lambda name: nullcontext()) -> tuple[bool, dict]:
    """One optimizer update: ``gradient_accumulation_steps`` micro-batches, their latents from the
    frozen VAE or the latent cache (scaled), noised and denoised by the prior given the condition
    (lib/models/objectives.py), backward; then clip, check, step (lib/train/optim.py) and the EMA. Returns
    whether the update was applied and the loss and gradient norm (detached)."""
    train_cfg, device = cfg.prior.train, accelerator.device
    logs = []
    for _ in range(train_cfg.gradient_accumulation_steps):
        with phase("data"):
            batch = next(data_iter)
            cond = batch["cond"].to(device, non_blocking=True)   # buildings, transmitter, cars
            sim_id = batch["sim_id"].to(device, non_blocking=True)
            if m.measured is not None:      # + measured pixels of the target, drawn afresh
                cond = with_measurements(cond, batch["image"].to(device, non_blocking=True),
                                                      draw_mask(cond, m.measured))
        with accelerator.accumulate(m.prior):
            with phase("encode"), accelerator.autocast():
                latents = m.latents(batch, "train", device) * m.latent_scale     # frozen, no grad
            with phase("forward"), accelerator.autocast():
                loss = m.objective.loss(m.prior, latents, cond, sim_id)
            with phase("backward"):
                accelerator.backward(loss)
            logs.append({"loss": loss.detach()})
    with phase("optimizer"):
        logs = mean_logs(logs)
        result = update(accelerator, [m.opt], [m.sched], train_cfg.grad_clip, [logs["loss"]])
        if result.applied and m.ema is not None:
            m.ema.step(m.prior_raw.parameters())
    logs["grad_norm"] = result.grad_norms[0]
    return result.applied, logs


def train(run: Run, args: Any) -> int:
    cfg, accelerator, start = run.cfg, run.accelerator, run.start     # start: messages until the log opens
    train_cfg, diffusion_cfg, run_dir = cfg.prior.train, cfg.prior.diffusion, run.dir

    # ------------------------------------------------------------------ the frozen stage-1 VAE, data
    vae_info = stage1_checkpoint(cfg, run.resume, start.warning)   # a resumed run keeps its VAE
    loaded = load_vae(vae_info.path, cfg)                 # frozen, eval mode; a mismatch is an error
    with accelerator.main_process_first():      # the synthetic default is generated once
        split = prepare_data(cfg.data, cfg.seed, start.info)
        data = build_datasets(cfg.data, cfg.seed, ("train", "val"), start.info, split)
    train_ds, val_ds, sims = data["train"], data["val"], list(cfg.data.simulation)   # sim_id i is sims[i]
    split_info = split_record(split, cfg.data)
    # The contamination guard: validation maps must not be maps the VAE was trained on.
    notes, overlaps = check_overlap(split.val, "validation", split_info, [("VAE checkpoint", str(vae_info.path),
                                    vae_info.state.get("split"))], args.allow_overlap)
    for warning in protocol_warnings(split) + notes + data_mismatch(vae_info.state.get("split"), split_info):
        start.warning(warning)
    start.info(f"data: split {split.describe()}; {len(train_ds)} training and {len(val_ds)} validation samples "
               f"of {', '.join(sims)} ({cfg.data.source}, {cfg.data.root}, {cfg.data.image_size} px)")
    with accelerator.main_process_first():      # the latent cache: built once, by the main process
        cache = open_latent_cache(cfg, loaded.vae.to(accelerator.device), data, accelerator.device,
                                  accelerator.is_main_process, start.info)
    if cache is not None and cfg.prior.measurements.count is None:
        train_ds = train_ds.with_fields(STAGE_FIELDS["prior-cached"])   # the latents are cache rows
    log = run.open()                             # the run folder, its log and config.yaml

    # ------------------------------------------------------------------ models, optimizer, schedule
    m = build_models(cfg, accelerator, loaded.vae, loaded.downsample, cache)
    set_seed(cfg.seed + accelerator.process_index)   # same init everywhere, own noise and timesteps per process
    log.info(f"VAE {vae_info.path} (step {vae_info.step}{', EMA weights' if loaded.ema else ''}); prior "
             f"{count_parameters(m.prior_raw) / 1e6:.2f}M parameters on {m.prior_raw.latent_shape} latents")

    # ------------------------------------------------------------------ resume, latent scale
    faults = FaultPolicy(accelerator, train_cfg, "prior", log, run.ckpt_dir)   # non-finite, divergence, signals
    state, resume_note = run.restore({"prior": m.sched}, m.ema, m.prior_raw)     # {} when fresh
    step, batches_done, best_val = state.get("step", 0), state.get("batches", 0), state.get("best_val_loss") or math.inf
    faults.load_state_dict(state)
    if state:
        m.latent_scale = float(state["latent_scale"])
        log.info(f"latent scale factor {m.latent_scale:.6g} (from the checkpoint)")
    else:
        m.latent_scale = measure_latent_scale(lambda b: m.latents(b, "train", accelerator.device, sample=False),
                                              train_ds, cfg.batch_size("prior"), cfg.prior.latent_scale_batches,
                                              log.info if accelerator.is_main_process else None)   # + a bar
    m.vae.register_to_config(scaling_factor=m.latent_scale)   # in the VAE copy each checkpoint holds
    scale_info = {"latent_scale": m.latent_scale, "vae_checkpoint": str(vae_info.path), "vae_step": vae_info.step,
                  "vae_ema": loaded.ema, "vae_split": vae_info.state.get("split"), "simulations": sims}
    run.write_run_json(resume_note, **scale_info, split=split_info, allow_overlap=overlaps)
    log.event("start", step, f"training to step {train_cfg.max_steps}, {len(sims)} simulation(s), "
              f"objective {diffusion_cfg.objective}, {accelerator.num_processes} process(es), "
              f"{accelerator.precision.describe()}", level="INFO", precision=accelerator.precision.to_dict())

    def validate(step: int) -> Optional[float]:
        """Validation with the EMA weights: the denoising loss (returned: it picks the "best" checkpoint; None
        when a preemption abandoned it) and the metrics of sampled maps, with noise from a fixed generator."""
        nonlocal best_val
        t0, losses = time.perf_counter(), []
        rng = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
        measured_cfg = cfg.prior.measurements

        def sample(batch: dict) -> torch.Tensor:
            cond = batch["cond"]
            if m.measured is not None:         # the most the training draws, the same pixels every time
                mask = fixed_mask(cond, m.measured.high, cfg.seed, batch["map_id"].tolist(),
                                               batch["tx"].tolist())
                cond = with_measurements(cond, batch["image"], mask)
            with accelerator.autocast():
                latents = m.latents(batch, "val", accelerator.device, sample=False) * m.latent_scale
                losses.append(m.objective.loss(m.prior_raw, latents, cond, batch["sim_id"], rng))
                return generate_maps(m.prior_raw, m.vae, m.latent_scale, cond, batch["sim_id"], m.objective,
                                     generator=rng, correct_sigma=measured_cfg.sigma if measured_cfg.correct else None)

        with ema_weights(m.ema, m.prior_raw.parameters()), torch.no_grad():
            m.prior_raw.eval()
            scores = score_methods(eval_batches(val_ds, cfg.batch_size("prior"), train_cfg.val_batches,
                                                accelerator.process_index, accelerator.num_processes),
                                   {"prediction": sample}, accelerator.device, sims,
                                   stop=lambda: faults.preemption.requested)
            m.prior_raw.train()
        if any_process(accelerator, scores.stopped):
            return None
        acc = gather_accumulator(accelerator, scores.accs["prediction"])
        metrics, by_sim = acc.compute(), acc.compute_groups()
        val_loss = float(gather_values(accelerator, torch.stack(losses).cpu()).mean())
        best_val = min(best_val, val_loss)
        log.record("val", step, {"loss": val_loss, **{k: metrics[k] for k in ("nmse", "rmse", "ssim", "psnr")},
                                 **{f"nmse_{s}": v["nmse"] for s, v in by_sim.items()},
                                 "num_samples": metrics["num_samples"], "seconds": time.perf_counter() - t0})
        if accelerator.is_main_process and scores.first is not None:      # the grid, also to the trackers
            log.image("samples", save_samples(run_dir / "samples" / f"step-{step:07d}.png", scores.first,
                                              {"prediction": "prediction"}, sims, cfg.data.threshold), step)
        return val_loss

    def save(step: int, val_loss: Optional[float]) -> None:
        """``checkpoints/step-N`` (lib/train/checkpoint.py) and the VAE it decodes with (``vae/``, with its
        scaling factor)."""
        files = {**prior_files(m.prior_raw), **ema_files(m.ema, m.prior_raw), "vae": m.vae,
                 "latent_scale.json": scale_info}
        run.save_checkpoint(step, {
            "stage": "prior", "batches": batches_done, "val_loss": val_loss, "best_val_loss": best_val,
            **scale_info, "split": split_info, "allow_overlap": overlaps, **faults.state_dict(), **ema_state(m.ema),
        }, files)

    # ------------------------------------------------------------------ loop
    stop_at = min(train_cfg.max_steps, args.until_step or train_cfg.max_steps)      # --until-step
    data_iter = train_batches(train_ds, cfg.batch_size("prior"), cfg.seed, start_batch=batches_done,
                              rank=accelerator.process_index, world_size=accelerator.num_processes,
                              num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory)
    reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    tracker, lrs = MeanTracker(), {"lr": m.opt}
    log.start_clock(step)
    with faults.signals(), run.progress(step) as bar:
        while step < stop_at and not faults.stopping:     # SIGTERM/SIGINT: finish the step, checkpoint, exit 3
            applied, logs = train_step(m, data_iter, accelerator, cfg)
            batches_done += train_cfg.gradient_accumulation_steps
            tracker.add(logs)
            faults.after_update(step, applied, logs)       # a skipped update; stops after max_nonfinite
            if applied:
                step += 1
                bar.update(1)
            if applied and (step % train_cfg.log_every == 0 or step == stop_at):
                record = log.train_record(step, tracker, lrs, reduce, {"nonfinite_skipped": faults.nonfinite.total},
                                          echo=bar.disable)        # no bar (not a terminal): the line instead
                check_schedules(train_cfg, step, lrs)      # the schedule guard: LR == lr_at(step)
                bar.set_postfix_str(f"loss {fmt(record['loss'])} lr {fmt_lr(record['lr'])}")
                faults.after_record(step, record["loss"], "loss")   # the divergence watchdog
            checkpoint_due = applied and (step % train_cfg.checkpoint_every == 0 or step == stop_at)
            validation_due = applied and step % train_cfg.val_every == 0
            val_loss = validate(step) if (checkpoint_due or validation_due) and not faults.stopping else None
            faults.check_preemption(step)                  # a signal in the step or the validation
            if faults.stopping or checkpoint_due:
                save(step, val_loss)
    run.close(step, faults.exit_code)
    return faults.exit_code


def main() -> int:
    args = trainer_parser(__doc__.splitlines()[0], allow_overlap=True).parse_args()
    cfg = load_config(args.config, args.set)
    check_diffusion(cfg.prior.diffusion)             # the objective and its sampler, from their registry
    parse_spec(cfg.prior.measurements.count)      # the measurements, if any
    if args.dry_run:
        vae = stage1_checkpoint(cfg) if args.resume is None else None     # a resumed prior keeps its own
        return print_dry_run(cfg, "prior", args.resume is not None,
                             notes=[("stage-1 VAE", f"{vae.path} (step {vae.step})" if vae else "the resumed run's")])
    with Run(cfg, "prior", args) as run:         # accelerator, lock, seed, --resume; the error record
        return train(run, args)


if __name__ == "__main__":
    run_cli(main)
