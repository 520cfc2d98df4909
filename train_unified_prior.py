"""Stage 2: train the unified conditional latent-diffusion prior (buildings + transmitter -> radio map).

    accelerate launch train_unified_prior.py --config configs/demo.yaml     # after train_vae.py
    accelerate launch train_unified_prior.py --config configs/m.yaml --resume latest
    python train_unified_prior.py --config configs/m.yaml --dry-run        # schedule at its key points

Reads top to bottom like train_vae.py: config, data, models, optimizer and schedule,
accelerator.prepare, resume, loop, save, with the same lib/ helpers. The frozen stage-1 VAE
(``prior.vae_checkpoint``) maps radio maps to latents, scaled to unit variance by a factor
measured on the training data at the start (and restored, not re-measured, on resume). A
diffusers UNet2DModel denoises them, conditioned on the encoded condition maps and on the
simulator as a class embedding: one model for every simulator in ``data.simulation``.
Outputs go to ``{output_dir}/prior/``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from diffusers.training_utils import EMAModel

from lib import checkpoint as ckpt
from lib.accel import prepare_model
from lib.cli import trainer_parser
from lib.config import load_config
from lib.data import build_datasets, eval_batches
from lib.errors import CheckpointError, run_cli
from lib.images import save_grid
from lib.metrics import MetricAccumulator, summarize, summarize_groups
from lib.models import count_parameters
from lib.prior import (MODEL_KEYS, LatentPrior, diffusion_loss, generate_maps, save_prior,
                       train_scheduler)
from lib.runlog import MeanTracker, update_run_json
from lib.schedule import build_scheduler
from lib.training import (BestValidation, Supervisor, all_finite, apply_updates, clip_grad_norms,
                          ema_weights, open_run, print_dry_run, restore_run, save_checkpoint, save_ema,
                          training_batches)
from lib.vae_io import encode_latents, load_vae, measure_latent_scale, resolve_vae_checkpoint

TRAIN_KEYS = ["loss", "grad_norm"]


def main() -> int:
    # ------------------------------------------------------------------ config
    args = trainer_parser(__doc__.splitlines()[0]).parse_args()
    cfg = load_config(args.config, args.set)
    tcfg, dcfg = cfg.prior.train, cfg.prior.diffusion
    if args.dry_run:
        return print_dry_run(cfg, "prior")

    run_dir = Path(cfg.output_dir) / "prior"
    ckpt_dir = run_dir / "checkpoints"
    warnings = list(cfg.warnings)      # logged once the run log exists
    resume = ckpt.resolve(args.resume, ckpt_dir, warnings.append) if args.resume else None
    # The VAE is loaded before anything is written: a resumed run keeps the VAE it was trained on.
    if resume is not None:
        vae_path = Path(resume.state["vae_checkpoint"])
        if not vae_path.is_dir():
            raise CheckpointError(f"{resume.path} was trained on the VAE checkpoint {vae_path}, "
                                  f"which is gone; the prior cannot continue without it")
    else:
        vae_path = resolve_vae_checkpoint(cfg.prior.vae_checkpoint, cfg.output_dir, args.config).path
    loaded = load_vae(vae_path, cfg)                     # frozen, eval mode; a mismatch is an error
    accelerator, log = open_run(cfg, "prior", run_dir, ckpt_dir, resume is not None, warnings)

    # ------------------------------------------------------------------ data
    with accelerator.main_process_first():      # the synthetic default is generated once
        data = build_datasets(cfg.data, cfg.seed, ("train", "val"), log=log.info)
    train_ds, val_ds = data["train"], data["val"]
    sims = list(cfg.data.simulation)                      # sim_id i is sims[i]
    log.info(f"data: {len(train_ds)} training and {len(val_ds)} validation samples of "
             f"{len(sims)} simulation(s) {sims} ({cfg.data.source}, {cfg.data.root}, "
             f"{cfg.data.image_size} px)")

    # ------------------------------------------------------------------ models
    vae = loaded.vae.to(accelerator.device)
    prior = LatentPrior(cfg.prior.model, cfg.vae.model.latent_channels, cfg.data.image_size,
                        loaded.downsample, len(sims))
    prior = prepare_model(prior, tcfg)                   # channels_last, compile
    noise_sched = train_scheduler(dcfg)
    log.info(f"VAE {vae_path}{' (EMA weights)' if loaded.ema else ''}; prior {count_parameters(prior) / 1e6:.2f}M "
             f"parameters on {prior.latent_channels}x{prior.latent_size}x{prior.latent_size} latents")

    # ------------------------------------------------------------------ optimizer and schedule
    opt = torch.optim.AdamW(prior.parameters(), lr=tcfg.lr, betas=tuple(tcfg.adam_betas),
                            weight_decay=tcfg.weight_decay)
    sched = build_scheduler(opt, tcfg)
    prior, opt, sched = accelerator.prepare(prior, opt, sched)
    prior_raw = accelerator.unwrap_model(prior)
    # EMA of the prepared (on N processes: rank-0-synchronised) weights.
    ema = EMAModel(prior_raw.parameters(), decay=tcfg.ema_decay) if tcfg.ema else None
    if ema is not None:
        ema.to(accelerator.device)
    # Same init everywhere (above), different diffusion noise and timesteps per process from here on.
    set_seed(cfg.seed + accelerator.process_index)

    # ------------------------------------------------------------------ resume
    step, batches, best_val = 0, 0, math.inf
    sup = Supervisor(accelerator, tcfg, "prior", log, ckpt_dir)   # non-finite, divergence, preemption
    resume_note = None
    if resume is not None:
        # data.simulation too: sim_id i must keep meaning the same simulator.
        state, resume_note = restore_run(accelerator, resume, cfg, "prior", MODEL_KEYS + ["data.simulation"],
                                         sup, log, {"prior": sched}, ema, prior_raw)
        step, batches = state["step"], state["batches"]
        best_val = state.get("best_val_loss") or math.inf
        latent_scale = float(state["latent_scale"])
        log.info(f"latent scale factor {latent_scale:.6g} (from the checkpoint)")
    else:
        t0 = time.perf_counter()
        latent_scale = measure_latent_scale(vae, train_ds, cfg.data.batch_size,
                                            cfg.prior.latent_scale_batches, accelerator.device)
        log.info(f"latent scale factor {latent_scale:.6g} = 1 / std of the latents of "
                 f"{min(len(train_ds), cfg.data.batch_size * cfg.prior.latent_scale_batches)} "
                 f"training samples ({time.perf_counter() - t0:.1f} s)")
    if accelerator.is_main_process:
        update_run_json(run_dir, "prior", resume_note, {"vae_checkpoint": str(vae_path),
                                                        "latent_scale": latent_scale})
    log.event("start", step, f"training to step {tcfg.max_steps}, {len(sims)} simulation(s), "
              f"{dcfg.prediction_type} prediction, {accelerator.num_processes} process(es), "
              f"mixed precision {tcfg.mixed_precision}", level="INFO")

    def validate(step: int) -> float:
        """The fixed validation maps with the EMA weights: the denoising loss (returned; it
        picks the "best" checkpoint, a smooth measure where early sample metrics are noise)
        and NMSE, RMSE, SSIM, PSNR of sampled maps, overall and NMSE per simulator.

        Noise and timesteps come from a generator seeded the same at every validation, never
        from the global RNG: a resumed run must draw the same training noise as a straight one.
        """
        gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
        acc, losses, grid = MetricAccumulator(), [], None
        with ema_weights(ema, prior_raw.parameters()), torch.no_grad():
            prior_raw.eval()
            for batch in eval_batches(val_ds, cfg.data.batch_size, tcfg.val_batches,
                                      accelerator.process_index, accelerator.num_processes):
                x, cond = batch["image"].to(accelerator.device), batch["cond"].to(accelerator.device)
                sim_id = batch["sim_id"].to(accelerator.device)
                with accelerator.autocast():
                    latents = encode_latents(vae, x).float() * latent_scale
                    losses.append(diffusion_loss(prior_raw, noise_sched, latents, cond, sim_id, gen).reshape(1))
                    pred = generate_maps(prior_raw, vae, latent_scale, cond, sim_id, dcfg, generator=gen)
                acc.update(pred, x, [sims[i] for i in sim_id.tolist()])
                if grid is None:
                    grid = (cond.cpu(), x.cpu(), pred.cpu())
            prior_raw.train()
        per_rank = gather_object([(torch.cat(losses).cpu() if losses else torch.zeros(0), acc.state())])
        values = {k: torch.cat([s["values"][k] for _, s in per_rank]) for k in acc.values()}
        groups = [g for _, s in per_rank for g in (s["groups"] or [])]
        metrics = summarize(values)
        by_sim = summarize_groups(values, groups)
        val_loss = float(torch.cat([l for l, _ in per_rank]).mean())
        log.record("val", step, {"loss": val_loss,
                                 **{k: metrics[k] for k in ("nmse", "rmse", "ssim", "psnr")},
                                 **{f"nmse_{s}": m["nmse"] for s, m in by_sim.items()},
                                 "num_maps": metrics["num_maps"]})
        if accelerator.is_main_process and grid is not None:
            cond, x, pred = grid
            save_grid(run_dir / "samples" / f"step-{step:07d}.png",
                      [("buildings+tx", cond, "cond"), ("ground truth", x, "map"),
                       ("prediction", pred, "map"), ("|error|", (pred - x).abs() / 2, "error")])
        return val_loss

    validated = BestValidation(validate, best_val)

    def save(step: int) -> None:
        val_loss = validated(step)
        if val_loss is None:
            return
        scale_info = {"latent_scale": latent_scale, "vae_checkpoint": str(vae_path), "simulations": sims}

        def write_files(folder: Path) -> None:
            save_prior(prior_raw, folder)
            if ema is not None:
                save_ema(ema, prior_raw, folder / "ema.safetensors")
            (folder / "latent_scale.json").write_text(json.dumps(scale_info, indent=1) + "\n")

        save_checkpoint(accelerator, ckpt_dir, step, cfg, {
            "stage": "prior", "batches": batches, "val_loss": val_loss,
            "best_val_loss": validated.best, **scale_info, "vae_ema": loaded.ema, **sup.state_dict(),
            "ema_step": ema.optimization_step if ema is not None else None,
        }, write_files, tcfg.keep_last, log)

    # ------------------------------------------------------------------ loop
    tracker = MeanTracker()
    data_iter = training_batches(accelerator, cfg, train_ds, batches)
    with sup.running(step, args.until_step) as cadence:
        while step < cadence.stop_at:
            # One optimizer step = gradient_accumulation_steps micro-batches.
            for _ in range(tcfg.gradient_accumulation_steps):
                batch = next(data_iter)
                batches += 1
                x = batch["image"].to(accelerator.device, non_blocking=True)
                cond = batch["cond"].to(accelerator.device, non_blocking=True)
                sim_id = batch["sim_id"].to(accelerator.device, non_blocking=True)
                with accelerator.accumulate(prior):
                    with accelerator.autocast():
                        latents = encode_latents(vae, x).float() * latent_scale   # frozen, no grad
                        loss = diffusion_loss(prior, noise_sched, latents, cond, sim_id)
                    accelerator.backward(loss)
                    tracker.add({"loss": loss})
            norms = clip_grad_norms(accelerator, [opt], tcfg.grad_clip)
            applied = apply_updates(accelerator, [opt], [sched], all_finite(accelerator, [loss] + norms))
            tracker.add({"grad_norm": norms[0]})
            if applied:
                step += 1
                if ema is not None:
                    ema.step(prior_raw.parameters())
                cadence.stepped()
            if sup.update_done(applied, step, {"loss": loss, "grad_norm": norms[0]}):
                save(step)
                break
            if applied and cadence.log_due(step) and sup.log_train(step, tracker, TRAIN_KEYS, {"lr": opt},
                                                                   cadence, watched="loss"):
                break
            if sup.periodic(step, applied, cadence, validate, save):
                break
        sup.finish(step)
    return sup.exit_code


if __name__ == "__main__":
    run_cli(main)
