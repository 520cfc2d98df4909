"""Stage 1: train the VAE-GAN (AutoencoderKL + PatchGAN) that compresses radio maps to a latent.

    accelerate launch train_vae.py --config configs/demo.yaml
    accelerate launch train_vae.py --config configs/m.yaml --resume latest
    python train_vae.py --config configs/m.yaml --dry-run       # schedule at its key points

Reads top to bottom: config, data, models, optimizers and schedules, accelerator.prepare,
resume, loop, save. Shared pieces live in lib/. Outputs go to ``{output_dir}/vae/``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from lib import checkpoint as ckpt
from lib.accel import prepare_model
from lib.cli import trainer_parser
from lib.config import load_config
from lib.data import build_datasets, eval_batches
from lib.errors import run_cli
from lib.images import save_grid
from lib.losses import discriminator_loss, generator_loss, load_perceptual, reconstruction_map
from lib.metrics import MetricAccumulator, summarize
from lib.models import VAEWithLogvar, build_discriminator, count_parameters, frozen
from lib.runlog import MeanTracker, update_run_json
from lib.schedule import build_scheduler
from lib.training import (BestValidation, Supervisor, all_finite, apply_updates, clip_grad_norms,
                          ema_weights, open_run, print_dry_run, restore_run, save_checkpoint, save_ema,
                          training_batches)

TRAIN_KEYS = ["total_loss", "rec_loss", "nll_loss", "kl_loss", "g_loss", "disc_loss", "d_weight",
              "disc_factor", "logvar", "logits_real", "logits_fake", "grad_norm", "grad_norm_disc"]


def main() -> int:
    # ------------------------------------------------------------------ config
    args = trainer_parser(__doc__.splitlines()[0]).parse_args()
    cfg = load_config(args.config, args.set)
    tcfg, lcfg = cfg.vae.train, cfg.vae.loss
    if args.dry_run:
        return print_dry_run(cfg, "vae", {"disc_start": lcfg.disc_start})

    run_dir = Path(cfg.output_dir) / "vae"
    ckpt_dir = run_dir / "checkpoints"
    warnings = list(cfg.warnings)      # logged once the run log exists
    resume = ckpt.resolve(args.resume, ckpt_dir, warnings.append) if args.resume else None
    accelerator, log = open_run(cfg, "vae", run_dir, ckpt_dir, resume is not None, warnings)

    # ------------------------------------------------------------------ data
    with accelerator.main_process_first():      # the synthetic default is generated once
        data = build_datasets(cfg.data, cfg.seed, ("train", "val"), log=log.info)
    train_ds, val_ds = data["train"], data["val"]
    log.info(f"data: {len(train_ds)} training and {len(val_ds)} validation samples "
             f"({cfg.data.source}, {cfg.data.root}, {cfg.data.image_size} px)")

    # ------------------------------------------------------------------ models
    gen = VAEWithLogvar(cfg.vae.model, cfg.data.image_size, lcfg.logvar_init)
    disc = build_discriminator(cfg.vae.model, lcfg)
    perceptual = load_perceptual(lcfg)
    gen, disc = prepare_model(gen, tcfg), prepare_model(disc, tcfg)   # channels_last, compile
    log.info(f"VAE {count_parameters(gen.vae) / 1e6:.2f}M parameters, "
             f"discriminator {count_parameters(disc) / 1e6:.2f}M")

    # ------------------------------------------------------------------ optimizers and schedules
    def adamw(params):
        return torch.optim.AdamW(params, lr=tcfg.lr, betas=tuple(tcfg.adam_betas),
                                 weight_decay=tcfg.weight_decay)
    opt_g, opt_d = adamw(gen.parameters()), adamw(disc.parameters())   # logvar is in opt_g
    sched_g, sched_d = build_scheduler(opt_g, tcfg), build_scheduler(opt_d, tcfg)

    gen, disc, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(gen, disc, opt_g, opt_d, sched_g, sched_d)
    gen_raw, disc_raw = accelerator.unwrap_model(gen), accelerator.unwrap_model(disc)
    # EMA of the prepared (on N processes: rank-0-synchronised) weights.
    ema = EMAModel(gen_raw.vae.parameters(), decay=tcfg.ema_decay) if tcfg.ema else None
    if ema is not None:
        ema.to(accelerator.device)
    # Same init everywhere (above), different posterior noise per process (from here on).
    set_seed(cfg.seed + accelerator.process_index)
    if perceptual is not None:
        perceptual.to(accelerator.device)

    # ------------------------------------------------------------------ resume
    step, batches, best_val = 0, 0, math.inf
    sup = Supervisor(accelerator, tcfg, "vae", log, ckpt_dir)   # non-finite, divergence, preemption
    resume_note = None
    if resume is not None:
        state, resume_note = restore_run(accelerator, resume, cfg, "vae", ["vae.model", "data.image_size"],
                                         sup, log, {"g": sched_g, "d": sched_d}, ema, gen_raw.vae)
        step, batches = state["step"], state["batches"]
        best_val = state.get("best_val_loss") or math.inf
    if accelerator.is_main_process:
        update_run_json(run_dir, "vae", resume_note)
    log.event("start", step, f"training to step {tcfg.max_steps}, disc_start {lcfg.disc_start}, "
              f"{accelerator.num_processes} process(es), mixed precision {tcfg.mixed_precision}",
              level="INFO")

    def validate(step: int) -> float:
        """Validation loss and metrics on the held-back maps (EMA weights when enabled)."""
        acc, rec_losses, grid = MetricAccumulator(), [], None
        with ema_weights(ema, gen_raw.vae.parameters()), torch.no_grad():
            gen_raw.eval()
            for batch in eval_batches(val_ds, cfg.data.batch_size, tcfg.val_batches,
                                      accelerator.process_index, accelerator.num_processes):
                x = batch["image"].to(accelerator.device)
                with accelerator.autocast():
                    rec, _ = gen_raw(x, sample_posterior=False)
                rec = rec.float().clamp(-1, 1)
                rec_losses.append(reconstruction_map(x, rec, lcfg).mean(dim=(1, 2, 3)).cpu())
                acc.update(rec, x)
                if grid is None:
                    grid = (x.cpu(), rec.cpu())
            gen_raw.train()
        # Per-map values from every process, then one summary (gather_object: ranks may hold
        # different numbers of maps).
        per_rank = gather_object([(torch.cat(rec_losses) if rec_losses else torch.zeros(0), acc.values())])
        rec_all = torch.cat([r for r, _ in per_rank])
        metrics = summarize({k: torch.cat([v[k] for _, v in per_rank]) for k in per_rank[0][1]})
        val_loss = float(rec_all.mean())
        log.record("val", step, {"rec_loss": val_loss, **{k: metrics[k] for k in
                                 ("psnr", "ssim", "nmse", "rmse")}, "num_maps": int(rec_all.numel())})
        if accelerator.is_main_process and grid is not None:
            x, rec = grid
            save_grid(run_dir / "samples" / f"step-{step:07d}.png",
                      [("input", x, "map"), ("reconstruction", rec, "map"),
                       ("|error|", (rec - x).abs() / 2, "error")])
        return val_loss

    validated = BestValidation(validate, best_val)

    def save(step: int) -> None:
        val_loss = validated(step)
        if val_loss is None:
            return

        def write_files(folder: Path) -> None:
            gen_raw.vae.save_pretrained(folder / "vae", safe_serialization=True)
            save_file({k: v.contiguous() for k, v in disc_raw.state_dict().items()},
                      str(folder / "discriminator.safetensors"))
            if ema is not None:
                save_ema(ema, gen_raw.vae, folder / "ema.safetensors")

        save_checkpoint(accelerator, ckpt_dir, step, cfg, {
            "stage": "vae", "batches": batches, "val_loss": val_loss, "best_val_loss": validated.best,
            **sup.state_dict(),
            "ema_step": ema.optimization_step if ema is not None else None,
        }, write_files, tcfg.keep_last, log)

    # ------------------------------------------------------------------ loop
    tracker = MeanTracker()
    data_iter = training_batches(accelerator, cfg, train_ds, batches)
    disc_started_logged = step > lcfg.disc_start
    with sup.running(step, args.until_step) as cadence:
        while step < cadence.stop_at:
            disc_active = step >= lcfg.disc_start and lcfg.disc_weight > 0
            if disc_active and not disc_started_logged:
                log.event("disc_start", step, "discriminator starts training (disc_factor 0 -> 1)", level="INFO")
                disc_started_logged = True
            # One optimizer step = gradient_accumulation_steps micro-batches.
            for _ in range(tcfg.gradient_accumulation_steps):
                batch = next(data_iter)
                batches += 1
                x = batch["image"].to(accelerator.device, non_blocking=True)
                with accelerator.accumulate(gen, disc):
                    with accelerator.autocast():
                        rec, kl = gen(x)          # the one VAE forward of this micro-batch
                        # Generator: the discriminator is called unwrapped and frozen, so this
                        # backward puts no gradient into it (it is trained by its own loss below).
                        with frozen(disc_raw):
                            g = generator_loss(x, rec, kl, gen_raw.logvar, lcfg, disc_active,
                                               disc_raw, gen_raw.last_layer, perceptual)
                    accelerator.backward(g.total)
                    logs = dict(g.logs)
                    if disc_active:
                        with accelerator.autocast():
                            d_loss, d_logs = discriminator_loss(disc, x, rec)   # rec is detached inside
                        accelerator.backward(d_loss)
                        logs.update(d_logs)
                        losses = [g.total, d_loss]
                    else:
                        losses = [g.total]
                    tracker.add(logs)
            # accelerate has synchronised the gradients: clip, check, update (all or nothing).
            norms = clip_grad_norms(accelerator, [opt_g, opt_d] if disc_active else [opt_g], tcfg.grad_clip)
            finite = all_finite(accelerator, losses + norms)
            if disc_active:
                applied = apply_updates(accelerator, [opt_g, opt_d], [sched_g, sched_d], finite)
            else:
                opt_d.zero_grad(set_to_none=True)
                applied = apply_updates(accelerator, [opt_g], [sched_g], finite)
                if applied:
                    sched_d.step()            # the discriminator's LR follows the same curve
            tracker.add({"grad_norm": norms[0], "grad_norm_disc": norms[1] if disc_active else None})
            if applied:
                step += 1
                if ema is not None:
                    ema.step(gen_raw.vae.parameters())
                cadence.stepped()
            if sup.update_done(applied, step, dict(zip(["total_loss", "disc_loss"], losses)) |
                               dict(zip(["grad_norm", "grad_norm_disc"], norms))):
                save(step)
                break
            # The watchdog follows rec_loss: total_loss jumps at disc_start by design.
            if applied and cadence.log_due(step) and sup.log_train(
                    step, tracker, TRAIN_KEYS, {"lr": opt_g, "lr_disc": opt_d}, cadence, watched="rec_loss"):
                break
            if sup.periodic(step, applied, cadence, validate, save):
                break
        sup.finish(step)
    return sup.exit_code


if __name__ == "__main__":
    run_cli(main)
