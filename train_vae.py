"""Stage 1: train the VAE-GAN (AutoencoderKL + PatchGAN) that compresses radio maps to a latent.

    accelerate launch train_vae.py --config configs/demo.yaml
    accelerate launch train_vae.py --config configs/m.yaml --resume latest
    python train_vae.py --config configs/m.yaml --dry-run       # schedule at its key points

Reads top to bottom: ``build_models``, ``train_step`` (one optimizer update; bench.py times it as
it is), ``train``: data, models, resume, and the loop, whose log, validation and checkpoint
triggers are the ``if`` lines at its end; then ``main``: the config, and ``train`` inside the
run's lifecycle (lib/train/run.py). Outputs go to ``{output_dir}/vae/``.
"""
from __future__ import annotations

if __name__ == "__main__":       # answer --help and honour Ctrl-C before the slow imports below
    from lib.cli import early_start, trainer_parser
    early_start(lambda: trainer_parser(__doc__.splitlines()[0]))

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

from lib.cli import trainer_parser
from lib.config import Config, load_config
from lib.data import (STAGE_FIELDS, build_datasets, eval_batches, prepare_data, protocol_warnings, split_record,
                      train_batches)
from lib.errors import run_cli
from lib.evaluation import gather_accumulator, gather_values, save_samples, score_methods
from lib.models import (PatchDiscriminator, VAEWithLogvar, build_discriminator, count_parameters, discriminator_loss,
                        frozen, generator_loss, load_perceptual, reconstruction_map)
from lib.numfmt import fmt, fmt_lr
from lib.train import (FaultPolicy, MeanTracker, Run, any_process, build_optimizer, build_scheduler, check_schedules,
                       ema_files, ema_state, ema_weights, make_ema, mean_logs, prepare_model, print_dry_run, update)

Phase = Callable[[str], ContextManager]              # bench.py passes a timer of the step's parts


@dataclass
class VAEGAN:
    """What one stage-1 update touches: ``vae`` and ``disc`` as prepared by Accelerate (DDP wrappers on
    N processes; forwards go through them), the plain modules, optimizers, schedules, EMA, perceptual net."""
    vae: torch.nn.Module
    disc: torch.nn.Module
    vae_raw: VAEWithLogvar
    disc_raw: PatchDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: Any
    sched_d: Any
    ema: Optional[EMAModel]
    perceptual: Optional[torch.nn.Module]


def build_models(cfg: Config, accelerator: Accelerator) -> VAEGAN:
    train_cfg, loss_cfg = cfg.vae.train, cfg.vae.loss
    vae = VAEWithLogvar(cfg.vae.model, cfg.data.image_size, loss_cfg.logvar_init)
    disc = build_discriminator(cfg.vae.model, loss_cfg)
    vae, disc = prepare_model(vae, train_cfg), prepare_model(disc, train_cfg)   # channels_last, compile
    opt_g = build_optimizer(vae.parameters(), train_cfg)      # the learned logvar is in it
    opt_d = build_optimizer(disc.parameters(), train_cfg)
    sched_g, sched_d = build_scheduler(opt_g, train_cfg), build_scheduler(opt_d, train_cfg)   # sets the LR
    vae, disc, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(vae, disc, opt_g, opt_d, sched_g, sched_d)
    vae_raw = accelerator.unwrap_model(vae)
    perceptual = load_perceptual(loss_cfg)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    return VAEGAN(vae, disc, vae_raw, accelerator.unwrap_model(disc), opt_g, opt_d, sched_g, sched_d,
                  make_ema(vae_raw.vae, train_cfg, accelerator.device), perceptual)


def train_step(m: VAEGAN, data_iter: Iterator[dict], accelerator: Accelerator, cfg: Config,
               disc_active: bool, phase: Phase = lambda name: nullcontext()) -> tuple[bool, dict]:
    """One optimizer update: ``gradient_accumulation_steps`` micro-batches, each one VAE forward,
    the generator loss and its backward and, once the discriminator is active, its hinge loss
    on the same forward's detached reconstruction and its backward; then clip, check and step
    (lib/train/optim.py) and the EMA. Returns whether the update was applied (False: a non-finite
    loss or gradient, nothing changed) and the losses and gradient norms (detached)."""
    loss_cfg, train_cfg = cfg.vae.loss, cfg.vae.train
    logs = []
    for _ in range(train_cfg.gradient_accumulation_steps):
        with phase("data"):
            x = next(data_iter)["image"].to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(m.vae, m.disc):
            with phase("forward"), accelerator.autocast():
                rec, kl = m.vae(x)
                # The discriminator is called unwrapped and frozen: this backward puts no
                # gradient into it (it is trained by its own loss below).
                with frozen(m.disc_raw):
                    g = generator_loss(x, rec, kl, m.vae_raw.logvar, loss_cfg, disc_active, m.disc_raw,
                                       m.vae_raw.last_layer, m.perceptual)
            with phase("backward"):
                accelerator.backward(g.total)
            micro = dict(g.logs)
            if disc_active:
                with phase("forward"), accelerator.autocast():
                    d_loss, d_logs = discriminator_loss(m.disc, x, rec)     # rec is detached inside
                with phase("backward"):
                    accelerator.backward(d_loss)
                micro.update(d_logs)
            logs.append(micro)
    with phase("optimizer"):
        # Accelerate has synchronised the gradients. Before disc_start only the generator steps;
        # the discriminator's schedule follows the step count all the same.
        logs = mean_logs(logs)
        result = update(accelerator, [m.opt_g, m.opt_d] if disc_active else [m.opt_g],
                        [m.sched_g, m.sched_d], train_cfg.grad_clip, list(logs.values()))
        if result.applied and m.ema is not None:
            m.ema.step(m.vae_raw.vae.parameters())
    logs["grad_norm"] = result.grad_norms[0]
    if disc_active:
        logs["grad_norm_disc"] = result.grad_norms[1]
    return result.applied, logs


def train(run: Run, args: Any) -> int:
    cfg, accelerator, start = run.cfg, run.accelerator, run.start     # start: messages until the log opens
    train_cfg, loss_cfg, run_dir = cfg.vae.train, cfg.vae.loss, run.dir

    # ------------------------------------------------------------------ data
    with accelerator.main_process_first():      # the synthetic default is generated once
        split = prepare_data(cfg.data, cfg.seed, start.info)
        data = build_datasets(cfg.data, cfg.seed, ("train", "val"), start.info, split, STAGE_FIELDS["vae"])
    train_ds, val_ds = data["train"], data["val"]
    start.info(f"data: split {split.describe()}; {len(train_ds)} training and {len(val_ds)} validation "
               f"samples ({cfg.data.source}, {cfg.data.root}, {cfg.data.image_size} px)")
    for warning in protocol_warnings(split):
        start.warning(warning)
    log = run.open()                             # the run folder, its log and config.yaml

    # ------------------------------------------------------------------ models, optimizers, schedules
    m = build_models(cfg, accelerator)
    set_seed(cfg.seed + accelerator.process_index)   # same init everywhere, own posterior noise per process
    log.info(f"VAE {count_parameters(m.vae_raw.vae) / 1e6:.2f}M parameters, "
             f"discriminator {count_parameters(m.disc_raw) / 1e6:.2f}M")

    # ------------------------------------------------------------------ resume
    faults = FaultPolicy(accelerator, train_cfg, "vae", log, run.ckpt_dir)   # non-finite, divergence, signals
    state, resume_note = run.restore({"g": m.sched_g, "d": m.sched_d}, m.ema, m.vae_raw.vae)   # {} when fresh
    step, batches_done, best_val = state.get("step", 0), state.get("batches", 0), state.get("best_val_loss") or math.inf
    faults.load_state_dict(state)
    run.write_run_json(resume_note, split=split_record(split, cfg.data))
    log.event("start", step, f"training to step {train_cfg.max_steps}, disc_start {loss_cfg.disc_start}, "
              f"{accelerator.num_processes} process(es), {accelerator.precision.describe()}",
              level="INFO", precision=accelerator.precision.to_dict())

    def validate(step: int) -> Optional[float]:
        """Reconstruction loss and metrics of the held-back maps (EMA weights when enabled);
        None when a preemption signal abandoned it."""
        nonlocal best_val
        t0, rec_losses = time.perf_counter(), []

        def reconstruct(batch: dict) -> torch.Tensor:
            with accelerator.autocast():
                rec, _ = m.vae_raw(batch["image"], sample_posterior=False)
            rec = rec.float().clamp(-1, 1)
            rec_losses.append(reconstruction_map(batch["image"], rec, loss_cfg).mean(dim=(1, 2, 3)).cpu())
            return rec

        with ema_weights(m.ema, m.vae_raw.vae.parameters()), torch.no_grad():
            m.vae_raw.eval()
            scores = score_methods(eval_batches(val_ds, cfg.batch_size("vae"), train_cfg.val_batches,
                                                accelerator.process_index, accelerator.num_processes),
                                   {"reconstruction": reconstruct}, accelerator.device, val_ds.simulations,
                                   stop=lambda: faults.preemption.requested)
            m.vae_raw.train()
        if any_process(accelerator, scores.stopped):
            return None
        metrics = gather_accumulator(accelerator, scores.accs["reconstruction"]).compute()
        val_loss = float(gather_values(accelerator, torch.cat(rec_losses)).mean())
        best_val = min(best_val, val_loss)
        log.record("val", step, {"rec_loss": val_loss, **{k: metrics[k] for k in ("psnr", "ssim", "nmse", "rmse")},
                                 "num_samples": metrics["num_samples"], "seconds": time.perf_counter() - t0})
        if accelerator.is_main_process and scores.first is not None:      # the grid, also to the trackers
            log.image("samples", save_samples(run_dir / "samples" / f"step-{step:07d}.png", scores.first, {
                "reconstruction": "reconstruction"}, val_ds.simulations, cfg.data.threshold, truth="input",
                condition=False), step)
        return val_loss

    def save(step: int, val_loss: Optional[float]) -> None:
        """Everything needed to continue, as ``checkpoints/step-N`` (lib/train/checkpoint.py)."""
        files = {"vae": m.vae_raw.vae, "discriminator.safetensors": m.disc_raw, **ema_files(m.ema, m.vae_raw.vae)}
        run.save_checkpoint(step, {
            "stage": "vae", "batches": batches_done, "val_loss": val_loss, "best_val_loss": best_val,
            "split": split_record(split, cfg.data), **faults.state_dict(), **ema_state(m.ema),
        }, files)

    # ------------------------------------------------------------------ loop
    stop_at = min(train_cfg.max_steps, args.until_step or train_cfg.max_steps)      # --until-step
    data_iter = train_batches(train_ds, cfg.batch_size("vae"), cfg.seed, start_batch=batches_done,
                              rank=accelerator.process_index, world_size=accelerator.num_processes,
                              num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory)
    reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    tracker, lrs = MeanTracker(), {"lr": m.opt_g, "lr_disc": m.opt_d}
    disc_started = step > loss_cfg.disc_start
    log.start_clock(step)
    with faults.signals(), run.progress(step) as bar:
        while step < stop_at and not faults.stopping:     # SIGTERM/SIGINT: finish the step, checkpoint, exit 3
            disc_active = step >= loss_cfg.disc_start and loss_cfg.disc_weight > 0
            if disc_active and not disc_started:
                log.event("disc_start", step, "discriminator starts training (disc_factor 0 -> 1); from here on the "
                          "records add g_loss, d_weight, disc_loss, logits_real, logits_fake", level="INFO")
                disc_started = True
            applied, logs = train_step(m, data_iter, accelerator, cfg, disc_active)
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
                bar.set_postfix_str(f"rec_loss {fmt(record['rec_loss'])} lr {fmt_lr(record['lr'])}")
                faults.after_record(step, record["rec_loss"], "rec_loss")   # the divergence watchdog
            checkpoint_due = applied and (step % train_cfg.checkpoint_every == 0 or step == stop_at)
            validation_due = applied and step % train_cfg.val_every == 0
            val_loss = validate(step) if (checkpoint_due or validation_due) and not faults.stopping else None
            faults.check_preemption(step)                  # a signal in the step or the validation
            if faults.stopping or checkpoint_due:
                save(step, val_loss)
    run.close(step, faults.exit_code)
    return faults.exit_code


def main() -> int:
    args = trainer_parser(__doc__.splitlines()[0]).parse_args()
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        return print_dry_run(cfg, "vae", args.resume is not None, {"disc_start": cfg.vae.loss.disc_start})
    with Run(cfg, "vae", args) as run:           # accelerator, lock, seed, --resume; the error record
        return train(run, args)


if __name__ == "__main__":
    run_cli(main)
