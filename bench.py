"""Benchmark a training stage: steps/s, samples/s, peak memory, the data loader alone, where the
time of a step goes, and, for stage 1, the reference trainer's step at the same config.

    python bench.py --config configs/demo.yaml --stage vae --steps 20 --json bench-demo.json
    python bench.py --config configs/m.yaml --set data.image_size=64 --batch-size 2 --stage vae --steps 5
    python bench.py --config configs/demo.yaml --stage prior --steps 20

Stage ``vae`` builds the models as ``train_vae.py`` does and runs its optimizer step through
the same lib calls, timing five phases: data (next batch, to the device), forward (VAE,
losses, discriminator), backward, optimizer (clip, finiteness check, update, schedule, EMA) and
logging (loss tracking, fault checks, the training record every ``log_every`` steps). On a GPU
every phase boundary synchronises, so GPU work is charged to the phase that queued it.

In the same process and at the same config it runs the reference trainer's step (RadioDiff's
``train_vae.py`` with the LDM loss), rebuilt from the same lib pieces: fp32, eager, PNG data;
per step a generator update (full VAE forward; the discriminator's logits and the adaptive
weight computed even before ``disc_start``, where they are multiplied by ``disc_factor = 0``;
backward; step) and a discriminator update with a second full VAE forward of the same batch;
gradient clipping after the optimizer steps, and ``.item()`` of every logged value each step.
(The discriminator's two calls are batched into one, which favours the reference slightly.)

Both phases of a run are measured by default: before ``disc_start`` (the toolkit skips the
discriminator) and after. The headline numbers weight them as a run of ``max_steps`` does.

Stage ``prior`` times ``train_unified_prior.py``'s step (frozen VAE encode, diffusion loss,
update) through lib/prior.py on a randomly initialised VAE (the timing does not depend on its
weights); there is no reference for it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from lib.accel import make_accelerator, prepare_model
from lib.config import Config, TrainConfig, load_config
from lib.data import RadioMapDataset, build_datasets, train_batches
from lib.errors import UserError, run_cli
from lib.losses import adaptive_weight, discriminator_loss, generator_loss, load_perceptual
from lib.models import VAEWithLogvar, build_discriminator, frozen
from lib.runlog import MeanTracker, RunLog
from lib.schedule import build_scheduler
from lib.training import Supervisor, all_finite, apply_updates, clip_grad_norms, train_record

PHASES = ("data", "forward", "backward", "optimizer", "logging")


# --------------------------------------------------------------------------- measuring
class PhaseTimer:
    """Wall seconds per phase of a step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] += time.perf_counter() - t0


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak-RSS counter (Linux: VmHWM via clear_refs) and the CUDA peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, Optional[float]]:
    """Peak resident set size since :func:`reset_peak_memory` (or since start where it cannot
    be reset), and the CUDA peak of allocated memory on a GPU."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss, 1), "cuda_peak_mb": None if cuda is None else round(cuda, 1)}


def time_steps(step, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step(timer)``; seconds per step,
    in total and per phase (``other``: time outside the phases)."""
    for _ in range(warmup):
        step(PhaseTimer(device))
    timer = PhaseTimer(device)
    timer.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(timer)
    timer.sync()
    total = (time.perf_counter() - t0) / steps
    split = {k: v / steps for k, v in timer.seconds.items()}
    split["other"] = max(0.0, total - sum(split.values()))
    return {"seconds_per_step": total, "steps_per_sec": 1.0 / total,
            "time_split": {k: round(v, 6) for k, v in split.items()},
            "time_share": {k: round(v / total, 4) for k, v in split.items()}}


def loader_rate(dataset: RadioMapDataset, batch_size: int, seed: int, num_workers: int,
                min_seconds: float = 1.0, min_batches: int = 5) -> float:
    """Samples per second of the training stream alone (after its first batch)."""
    stream = train_batches(dataset, batch_size, seed, num_workers=num_workers)
    next(stream)
    n, t0 = 0, time.perf_counter()
    while n < min_batches or time.perf_counter() - t0 < min_seconds:
        next(stream)
        n += 1
    return n * batch_size / (time.perf_counter() - t0)


def measure_data(cfg: Config, log) -> tuple[dict[str, Any], dict[str, RadioMapDataset]]:
    """Loader samples/s on the PNG path and on the cached path (the configured cache, or one
    built in a temporary folder when ``data.cache`` is off). Returns the numbers and the
    training split as configured and on the PNG path (the reference reads PNGs)."""
    png = build_datasets(replace(cfg.data, cache="off"), cfg.seed, ("train",), log=log)["train"]
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        cached_cfg = cfg.data if cfg.data.cache != "off" else replace(cfg.data, cache=str(Path(tmp) / "packed"))
        if cfg.data.cache == "off":
            from lib.cache import build
            build(cfg.data.root, cfg.data.simulation, cached_cfg.cache, log=log)
        cached = build_datasets(cached_cfg, cfg.seed, ("train",), log=log)["train"]
        args = (cfg.data.batch_size, cfg.seed, cfg.data.num_workers)
        rate_png, rate_cached = loader_rate(png, *args), loader_rate(cached, *args)
    uses_cache = cfg.data.cache != "off"
    out = {"data_samples_per_sec": round(rate_cached if uses_cache else rate_png, 2),
           "data_samples_per_sec_png": round(rate_png, 2),
           "data_samples_per_sec_cached": round(rate_cached, 2),
           "cache_speedup": round(rate_cached / rate_png, 2),
           "data_path": "cached" if uses_cache else "png"}
    return out, {"configured": cached if uses_cache else png, "png": png}


# --------------------------------------------------------------------------- stage 1
def adamw(params, tcfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), weight_decay=tcfg.weight_decay)


class ToolkitVAE:
    """``train_vae.py``'s models and optimizer step, through the same lib calls in the same order
    (tests/test_bench.py checks that its losses equal the trainer's)."""

    def __init__(self, cfg: Config, accelerator: Accelerator, dataset: RadioMapDataset, run_dir: Path) -> None:
        from diffusers.training_utils import EMAModel
        self.cfg, self.acc = cfg, accelerator
        tcfg, lcfg = cfg.vae.train, cfg.vae.loss
        set_seed(cfg.seed)
        gen = VAEWithLogvar(cfg.vae.model, cfg.data.image_size, lcfg.logvar_init)
        disc = build_discriminator(cfg.vae.model, lcfg)
        self.perceptual = load_perceptual(lcfg)
        gen, disc = prepare_model(gen, tcfg), prepare_model(disc, tcfg)
        opt_g, opt_d = adamw(gen.parameters(), tcfg), adamw(disc.parameters(), tcfg)
        sched_g, sched_d = build_scheduler(opt_g, tcfg), build_scheduler(opt_d, tcfg)
        (self.gen, self.disc, self.opt_g, self.opt_d, self.sched_g,
         self.sched_d) = accelerator.prepare(gen, disc, opt_g, opt_d, sched_g, sched_d)
        self.gen_raw, self.disc_raw = accelerator.unwrap_model(self.gen), accelerator.unwrap_model(self.disc)
        self.ema = EMAModel(self.gen_raw.vae.parameters(), decay=tcfg.ema_decay) if tcfg.ema else None
        if self.ema is not None:
            self.ema.to(accelerator.device)
        set_seed(cfg.seed + accelerator.process_index)
        if self.perceptual is not None:
            self.perceptual.to(accelerator.device)
        self.data = train_batches(dataset, cfg.data.batch_size, cfg.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=cfg.data.pin_memory)
        self.log = RunLog(run_dir, accelerator.is_main_process)
        self.sup = Supervisor(accelerator, tcfg, "vae", self.log, run_dir / "checkpoints")
        self.tracker = MeanTracker()
        self.steps = 0

    def step(self, t: PhaseTimer, disc_active: bool) -> None:
        from train_vae import TRAIN_KEYS
        acc, tcfg, lcfg = self.acc, self.cfg.vae.train, self.cfg.vae.loss
        for _ in range(tcfg.gradient_accumulation_steps):
            with t("data"):
                x = next(self.data)["image"].to(acc.device, non_blocking=True)
            with acc.accumulate(self.gen, self.disc):
                with t("forward"), acc.autocast():
                    rec, kl = self.gen(x)
                    with frozen(self.disc_raw):
                        g = generator_loss(x, rec, kl, self.gen_raw.logvar, lcfg, disc_active,
                                           self.disc_raw, self.gen_raw.last_layer, self.perceptual)
                with t("backward"):
                    acc.backward(g.total)
                logs, losses = dict(g.logs), [g.total]
                if disc_active:
                    with t("forward"), acc.autocast():
                        d_loss, d_logs = discriminator_loss(self.disc, x, rec)
                    with t("backward"):
                        acc.backward(d_loss)
                    logs.update(d_logs)
                    losses.append(d_loss)
                with t("logging"):
                    self.tracker.add(logs)
        with t("optimizer"):
            opts = [self.opt_g, self.opt_d] if disc_active else [self.opt_g]
            norms = clip_grad_norms(acc, opts, tcfg.grad_clip)
            finite = all_finite(acc, losses + norms)
            if disc_active:
                applied = apply_updates(acc, opts, [self.sched_g, self.sched_d], finite)
            else:
                self.opt_d.zero_grad(set_to_none=True)
                applied = apply_updates(acc, opts, [self.sched_g], finite)
                if applied:
                    self.sched_d.step()
            if applied and self.ema is not None:
                self.ema.step(self.gen_raw.vae.parameters())
        self.steps += int(applied)
        with t("logging"):
            self.tracker.add({"grad_norm": norms[0], "grad_norm_disc": norms[1] if disc_active else None})
            self.sup.update_done(applied, self.steps, dict(zip(["total_loss", "disc_loss"], losses)) |
                                 dict(zip(["grad_norm", "grad_norm_disc"], norms)))
            if applied and self.steps % tcfg.log_every == 0:
                lrs = {"lr": self.opt_g, "lr_disc": self.opt_d}
                rec = self.log.record("train", self.steps, train_record(acc, self.tracker, TRAIN_KEYS, lrs, 0.0),
                                      echo=False)
                self.sup.record_done(self.steps, rec["rec_loss"], "rec_loss", lrs)

    def close(self) -> None:
        self.log.close()


class ReferenceVAE:
    """The reference trainer's step (see the module docstring), fp32 and eager."""

    def __init__(self, cfg: Config, device: torch.device, dataset: RadioMapDataset) -> None:
        self.cfg, self.device = cfg, device
        tcfg, lcfg = cfg.vae.train, cfg.vae.loss
        set_seed(cfg.seed)
        self.gen = VAEWithLogvar(cfg.vae.model, cfg.data.image_size, lcfg.logvar_init).to(device)
        self.disc = build_discriminator(cfg.vae.model, lcfg).to(device)
        self.perceptual = load_perceptual(lcfg)
        if self.perceptual is not None:
            self.perceptual.to(device)
        # the reference's generator optimizer held the VAE only (its logvar stayed 0)
        self.opt_g, self.opt_d = adamw(self.gen.vae.parameters(), tcfg), adamw(self.disc.parameters(), tcfg)
        self.sched_g, self.sched_d = build_scheduler(self.opt_g, tcfg), build_scheduler(self.opt_d, tcfg)
        self.params = list(self.gen.parameters()) + list(self.disc.parameters())
        self.data = train_batches(dataset, cfg.data.batch_size, cfg.seed, num_workers=cfg.data.num_workers)

    def step(self, t: PhaseTimer, disc_factor: float) -> None:
        lcfg = self.cfg.vae.loss
        with t("data"):
            x = next(self.data)["image"].to(self.device)
        # generator update
        with t("forward"):
            rec, kl = self.gen(x)
            base = generator_loss(x, rec, kl, self.gen.logvar, lcfg, False, perceptual=self.perceptual)
            g_loss = -self.disc(rec).mean()             # the discriminator is not frozen here
            # base.total = nll + kl_weight * kl; the KL has no gradient at the decoder's last
            # layer, so this is the reference's adaptive weight of the NLL.
            d_weight = adaptive_weight(base.total, g_loss, self.gen.last_layer, lcfg.disc_weight)
            total = base.total + d_weight * disc_factor * g_loss
        with t("logging"):
            total.item()
        with t("optimizer"):
            self.opt_g.zero_grad()
            self.opt_d.zero_grad()
        with t("backward"):
            total.backward()
        with t("optimizer"):
            self.opt_g.step()
        # discriminator update: a second full VAE forward of the same batch
        with t("forward"):
            rec, _ = self.gen(x)
            d_loss, d_logs = discriminator_loss(self.disc, x, rec)
            d_loss = disc_factor * d_loss
        with t("logging"):
            d_loss.item()
        with t("optimizer"):
            self.opt_d.zero_grad()
        with t("backward"):
            d_loss.backward()
        with t("optimizer"):
            self.opt_d.step()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)     # after the steps: no effect
            self.sched_g.step()
            self.sched_d.step()
        with t("logging"):
            for v in list(base.logs.values()) + list(d_logs.values()) + [d_weight, g_loss]:
                if v is not None:
                    float(v)


def phase_weights(cfg: Config, phases: list[str]) -> dict[str, float]:
    """Fraction of a ``max_steps`` run spent in each measured phase."""
    if len(phases) == 1:
        return {phases[0]: 1.0}
    tcfg, lcfg = cfg.vae.train, cfg.vae.loss
    pre = min(lcfg.disc_start, tcfg.max_steps) / tcfg.max_steps if lcfg.disc_weight > 0 else 1.0
    return {"pre_disc_start": pre, "post_disc_start": 1.0 - pre}


def weighted(results: dict[str, dict], weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Run-weighted seconds per step and time split."""
    sec = sum(weights[p] * results[p]["seconds_per_step"] for p in weights)
    split = {k: round(sum(weights[p] * results[p]["time_split"][k] for p in weights), 6)
             for k in list(PHASES) + ["other"]}
    return sec, split


def bench_vae(cfg: Config, steps: int, warmup: int, phases: list[str], reference: bool,
              work: Path, log) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.vae.train)
    device = accelerator.device
    data, datasets = measure_data(cfg, log)
    flags = {"pre_disc_start": False, "post_disc_start": True}
    out: dict[str, Any] = {"phases": {p: {} for p in phases}}

    reset_peak_memory(device)
    tk = ToolkitVAE(cfg, accelerator, datasets["configured"], work / "toolkit")
    for p in phases:
        out["phases"][p]["toolkit"] = time_steps(lambda t: tk.step(t, flags[p]), steps, warmup, device)
    tk.close()
    mem = peak_memory_mb(device)
    del tk
    gc.collect()

    if reference:
        reset_peak_memory(device)
        ref = ReferenceVAE(cfg, device, datasets["png"])
        for p in phases:
            out["phases"][p]["reference"] = time_steps(lambda t: ref.step(t, float(flags[p])), steps,
                                                       warmup, device)
            out["phases"][p]["ratio_vs_reference"] = round(
                out["phases"][p]["reference"]["seconds_per_step"]
                / out["phases"][p]["toolkit"]["seconds_per_step"], 3)
        ref_mem = peak_memory_mb(device)
        del ref
        gc.collect()

    weights = phase_weights(cfg, phases)
    sec, split = weighted({p: out["phases"][p]["toolkit"] for p in phases}, weights)
    bs = cfg.data.batch_size * cfg.vae.train.gradient_accumulation_steps
    out.update({"steps_per_sec": round(1 / sec, 4), "samples_per_sec": round(bs / sec, 3),
                "time_split": split, "time_share": {k: round(v / sec, 4) for k, v in split.items()},
                "phase_weights": weights, **data, **mem})
    out["data_share_of_step"] = out["time_share"]["data"]
    if reference:
        ref_sec, ref_split = weighted({p: out["phases"][p]["reference"] for p in phases}, weights)
        out.update({"reference_steps_per_sec": round(1 / ref_sec, 4),
                    "reference_samples_per_sec": round(cfg.data.batch_size / ref_sec, 3),
                    "reference_time_split": ref_split,
                    "ratio_vs_reference": round(ref_sec / sec, 3),
                    "reference_peak_rss_mb": ref_mem["peak_rss_mb"],
                    "reference_cuda_peak_mb": ref_mem["cuda_peak_mb"],
                    "reference": "RadioDiff train_vae.py step: two full VAE forwards, fp32, PNG data"})
    else:
        out.update({"reference_steps_per_sec": None, "ratio_vs_reference": None, "reference": "skipped"})
    return out


# --------------------------------------------------------------------------- stage 2
class ToolkitPrior:
    """``train_unified_prior.py``'s models and optimizer step through lib/prior.py."""

    def __init__(self, cfg: Config, accelerator: Accelerator, dataset: RadioMapDataset, run_dir: Path) -> None:
        from diffusers.training_utils import EMAModel

        from lib.models import build_vae
        from lib.prior import LatentPrior, train_scheduler
        from lib.vae_io import LoadedVAE
        self.cfg, self.acc = cfg, accelerator
        tcfg = cfg.prior.train
        set_seed(cfg.seed)
        loaded = LoadedVAE(build_vae(cfg.vae.model, cfg.data.image_size), Path("."), False)
        self.vae = loaded.vae.requires_grad_(False).eval().to(accelerator.device)
        prior = LatentPrior(cfg.prior.model, cfg.vae.model.latent_channels, cfg.data.image_size,
                            loaded.downsample, len(cfg.data.simulation))
        prior = prepare_model(prior, tcfg)
        opt = adamw(prior.parameters(), tcfg)
        self.prior, self.opt, self.sched = accelerator.prepare(prior, opt, build_scheduler(opt, tcfg))
        self.prior_raw = accelerator.unwrap_model(self.prior)
        self.ema = EMAModel(self.prior_raw.parameters(), decay=tcfg.ema_decay) if tcfg.ema else None
        if self.ema is not None:
            self.ema.to(accelerator.device)
        set_seed(cfg.seed + accelerator.process_index)
        self.noise = train_scheduler(cfg.prior.diffusion)
        self.latent_scale = 1.0              # measured on real latents in the trainer; timing-neutral
        self.data = train_batches(dataset, cfg.data.batch_size, cfg.seed, num_workers=cfg.data.num_workers,
                                  pin_memory=cfg.data.pin_memory)
        self.log = RunLog(run_dir, accelerator.is_main_process)
        self.sup = Supervisor(accelerator, tcfg, "prior", self.log, run_dir / "checkpoints")
        self.tracker = MeanTracker()
        self.steps = 0

    def step(self, t: PhaseTimer) -> None:
        from lib.prior import diffusion_loss
        from lib.vae_io import encode_latents
        acc, tcfg, dev = self.acc, self.cfg.prior.train, self.acc.device
        for _ in range(tcfg.gradient_accumulation_steps):
            with t("data"):
                batch = next(self.data)
                x, cond = batch["image"].to(dev, non_blocking=True), batch["cond"].to(dev, non_blocking=True)
                sim_id = batch["sim_id"].to(dev, non_blocking=True)
            with acc.accumulate(self.prior):
                with t("forward"), acc.autocast():
                    latents = encode_latents(self.vae, x).float() * self.latent_scale
                    loss = diffusion_loss(self.prior, self.noise, latents, cond, sim_id)
                with t("backward"):
                    acc.backward(loss)
                with t("logging"):
                    self.tracker.add({"loss": loss})
        with t("optimizer"):
            norms = clip_grad_norms(acc, [self.opt], tcfg.grad_clip)
            applied = apply_updates(acc, [self.opt], [self.sched], all_finite(acc, [loss] + norms))
            if applied and self.ema is not None:
                self.ema.step(self.prior_raw.parameters())
        self.steps += int(applied)
        with t("logging"):
            self.tracker.add({"grad_norm": norms[0]})
            self.sup.update_done(applied, self.steps, {"loss": loss, "grad_norm": norms[0]})
            if applied and self.steps % tcfg.log_every == 0:
                rec = self.log.record("train", self.steps, train_record(
                    acc, self.tracker, ["loss", "grad_norm"], {"lr": self.opt}, 0.0), echo=False)
                self.sup.record_done(self.steps, rec["loss"], "loss", {"lr": self.opt})

    def close(self) -> None:
        self.log.close()


def bench_prior(cfg: Config, steps: int, warmup: int, work: Path, log) -> dict[str, Any]:
    try:
        import lib.prior  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--stage prior: lib/prior.py is not importable yet ({exc})") from None
    accelerator = make_accelerator(cfg.prior.train)
    device = accelerator.device
    data, datasets = measure_data(cfg, log)
    reset_peak_memory(device)
    tk = ToolkitPrior(cfg, accelerator, datasets["configured"], work / "prior")
    res = time_steps(tk.step, steps, warmup, device)
    tk.close()
    bs = cfg.data.batch_size * cfg.prior.train.gradient_accumulation_steps
    return {"steps_per_sec": round(res["steps_per_sec"], 4),
            "samples_per_sec": round(bs * res["steps_per_sec"], 3),
            "time_split": res["time_split"], "time_share": res["time_share"],
            "data_share_of_step": res["time_share"]["data"], **data, **peak_memory_mb(device),
            "reference_steps_per_sec": None, "ratio_vs_reference": None,
            "reference": "none for stage 2: only the stage-1 reference step is rebuilt"}


# --------------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set data.image_size=64")
    p.add_argument("--stage", choices=["vae", "prior"], required=True)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size for this benchmark")
    p.add_argument("--phase", choices=["pre", "post", "both"], default="both",
                   help="vae: before disc_start, after it, or both (default)")
    p.add_argument("--no-reference", action="store_true", help="vae: skip the reference step")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results here")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    overrides = list(a.set) + ([f"data.batch_size={a.batch_size}"] if a.batch_size else [])
    cfg = load_config(a.config, overrides)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    info = {"stage": a.stage, "config": a.config, "overrides": overrides, **machine(),
            "batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size, "steps": a.steps,
            "warmup": a.warmup}
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        if a.stage == "vae":
            phases = {"pre": ["pre_disc_start"], "post": ["post_disc_start"],
                      "both": ["pre_disc_start", "post_disc_start"]}[a.phase]
            tcfg = cfg.vae.train
            info.update({k: getattr(tcfg, k) for k in ("mixed_precision", "tf32", "channels_last", "compile")})
            res = bench_vae(cfg, a.steps, a.warmup, phases, not a.no_reference, Path(work), log)
        else:
            tcfg = cfg.prior.train
            info.update({k: getattr(tcfg, k) for k in ("mixed_precision", "tf32", "channels_last", "compile")})
            res = bench_prior(cfg, a.steps, a.warmup, Path(work), log)
    result = {**info, **res}
    print(summary(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def summary(r: dict[str, Any]) -> str:
    lines = [f"{r['stage']}: {r['config']} {' '.join(r['overrides'])}".rstrip(),
             f"  {r['cpu']}, {r['torch_threads']} torch threads, torch {r['torch']}"
             f"{', ' + r['gpu'] if r['gpu'] else ''}; batch {r['batch_size']}, {r['image_size']} px; "
             f"load average {r['load_average']}",
             f"  toolkit    {r['steps_per_sec']:.4g} steps/s, {r['samples_per_sec']:.4g} samples/s, "
             f"peak RSS {r['peak_rss_mb']:.0f} MB"
             + (f", CUDA peak {r['cuda_peak_mb']:.0f} MB" if r.get("cuda_peak_mb") else "")]
    if r.get("reference_steps_per_sec"):
        lines.append(f"  reference  {r['reference_steps_per_sec']:.4g} steps/s, peak RSS "
                     f"{r['reference_peak_rss_mb']:.0f} MB  ->  ratio {r['ratio_vs_reference']:.3f}x")
        for p, v in r["phases"].items():
            lines.append(f"    {p}: toolkit {v['toolkit']['steps_per_sec']:.4g} steps/s, reference "
                         f"{v['reference']['steps_per_sec']:.4g} steps/s, ratio {v['ratio_vs_reference']:.3f}x")
    else:
        lines.append(f"  reference  {r['reference']}")
    share = r["time_share"]
    lines.append("  time split " + ", ".join(f"{k} {100 * share[k]:.1f}%" for k in share))
    lines.append(f"  data loader alone: PNG {r['data_samples_per_sec_png']:.4g} samples/s, cached "
                 f"{r['data_samples_per_sec_cached']:.4g} samples/s ({r['cache_speedup']:.2f}x); "
                 f"this config reads {r['data_path']}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
