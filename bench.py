"""Benchmark a training stage: steps/s, samples/s, peak memory, the data loader alone, where the
time of a step goes, and, for stage 1, the reference trainer's step at the same config.

    python bench.py --config configs/demo.yaml --stage vae --steps 20 --json bench-demo.json
    python bench.py --config configs/m.yaml --set data.image_size=64 --batch-size 2 --stage vae --steps 5
    python bench.py --config configs/demo.yaml --stage prior --steps 20

Stage ``vae`` builds the models with ``train_vae.build_models`` and runs ``train_vae.train_step``
itself (the function the trainer's loop calls, not a copy), timing its phases: data (next
batch, to the device), forward (VAE, losses, discriminator), backward, optimizer (clip,
finiteness check, update, schedule, EMA), and logging (what the trainer's loop does after each
step: loss tracking, fault checks, the training record every ``log_every`` steps). On a GPU
every phase boundary synchronises, so GPU work is charged to the phase that queued it.

In the same process and at the same config it runs the reference trainer's step
(:mod:`lib.bench.reference_step`: RadioDiff's ``train_vae.py`` with the LDM loss, two full VAE
forwards per step, fp32, eager, PNG data) under PyTorch's default precision settings (cuDNN's
TF32 convolutions), as RadioDiff's users ran it; the toolkit's step runs under its config.

Each step's floating-point operations are counted once (``torch.utils.flop_counter``, after a
warm-up step), giving FLOPs per sample and the achieved TFLOP/s.

Both phases of a run are measured by default: before ``disc_start`` (the toolkit skips the
discriminator) and after. The headline numbers weight them as a run of ``max_steps`` does.
The two steps take turns step by step, so a change in the machine's load slows both alike.
Peak memory (RSS, and CUDA on a GPU) is measured for each step in a child process of its own.

Stage ``prior`` times ``train_unified_prior.train_step`` (phases data, encode: the frozen VAE,
forward: the diffusion loss, backward, optimizer, logging) on a randomly initialised VAE (the
timing does not depend on its weights); there is no reference for it.

Stage ``data`` measures the data loader alone (the training stream of the configured split,
batch size and workers), from the PNGs and from the packed cache, without building a model.
"""
from __future__ import annotations

if __name__ == "__main__":       # answer --help and honour Ctrl-C before the slow imports below
    from lib.cli import bench_parser, early_start
    early_start(bench_parser)

import copy
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL

import train_unified_prior
import train_vae
from lib.bench.measure import (PHASES, PhaseTimer, count_flops, machine, measure_data, peak_memory_mb, profile_steps,
                               time_steps)
from lib.bench.reference_step import ReferenceVAE
from lib.bench.suite import run_suite
from lib.cli import bench_parser
from lib.config import Config, load_config
from lib.data.batching import train_batches
from lib.data.dataset import STAGE_FIELDS, RadioMapDataset, build_datasets
from lib.errors import UserError, run_cli
from lib.models.latents import LatentCache, build_latent_cache
from lib.models.vae import build_vae
from lib.train.accel import backend_flags, make_accelerator, resolve_precision
from lib.train.faults import FaultPolicy
from lib.train.runlog import MeanTracker, RunLog
from lib.train.schedule import check_schedules


# --------------------------------------------------------------------------- the trainers' steps
class TrainerStep:
    """A trainer's own ``train_step`` on its own ``build_models``, driven as its loop drives it:
    after each update the logs go to the tracker and the fault policy, and every ``log_every``
    updates a training record is written and the schedule guard and watchdog run."""

    def __init__(self, stage: str, cfg: Config, accelerator: Accelerator, dataset: RadioMapDataset,
                 run_dir: Path, vae: Optional[AutoencoderKL] = None, cache: Optional[LatentCache] = None) -> None:
        self.stage, self.cfg, self.acc = stage, cfg, accelerator
        self.train_cfg = getattr(cfg, stage).train
        set_seed(cfg.seed)
        if stage == "vae":
            self.m = train_vae.build_models(cfg, accelerator)
            self.train_step, self.watched = train_vae.train_step, "rec_loss"
            self.lrs = {"lr": self.m.opt_g, "lr_disc": self.m.opt_d}
        else:
            self.m = train_unified_prior.build_models(cfg, accelerator, vae or random_vae(cfg),
                                                      2 ** (len(cfg.vae.model.block_out_channels) - 1), cache)
            self.train_step, self.watched = train_unified_prior.train_step, "loss"
            self.lrs = {"lr": self.m.opt}
        set_seed(cfg.seed + accelerator.process_index)
        self.data = train_batches(dataset, cfg.batch_size(stage), cfg.seed, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, num_workers=cfg.data.num_workers)
        self.log = RunLog(run_dir, accelerator.is_main_process)
        self.faults = FaultPolicy(accelerator, self.train_cfg, stage, self.log, run_dir / "checkpoints")
        self.tracker = MeanTracker()
        self.steps = 0
        self.log.start_clock(0)

    def step(self, t: "PhaseTimer", *args: Any) -> None:
        applied, logs = self.train_step(self.m, self.data, self.acc, self.cfg, *args, phase=t)
        with t("logging"):
            self.tracker.add(logs)
            self.faults.after_update(self.steps, applied, logs)
            self.steps += int(applied)
            if applied and self.steps % self.train_cfg.log_every == 0:
                record = self.log.train_record(self.steps, self.tracker, self.lrs)
                check_schedules(self.train_cfg, self.steps, self.lrs)
                self.faults.after_record(self.steps, record[self.watched], self.watched)

    def close(self) -> None:
        self.log.close()


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits."""
    return float(f"{x:.{digits}g}")


def under_flags(train_cfg: Optional[Any], step: Any, *args: Any) -> Any:
    """``step(timer, *args)`` under ``train_cfg``'s backend flags (None: PyTorch's defaults)."""
    def run(t: PhaseTimer) -> None:
        with backend_flags(train_cfg):
            step(t, *args)
    return run


def warm_and_count(steppers: dict[str, Any], device: torch.device, phases: tuple[str, ...] = PHASES["vae"]
                   ) -> dict[str, int]:
    """One untimed step of each (compiles a compiled model), then the FLOPs of the next one."""
    for step in steppers.values():
        step(PhaseTimer(device, phases))
    return {name: count_flops(step, device, phases) for name, step in steppers.items()}


def phase_weights(cfg: Config, phases: list[str]) -> dict[str, float]:
    """Fraction of a ``max_steps`` run spent in each measured phase."""
    if len(phases) == 1:
        return {phases[0]: 1.0}
    train_cfg, loss_cfg = cfg.vae.train, cfg.vae.loss
    pre = min(loss_cfg.disc_start, train_cfg.max_steps) / train_cfg.max_steps if loss_cfg.disc_weight > 0 else 1.0
    return {"pre_disc_start": pre, "post_disc_start": 1.0 - pre}


def weighted(results: dict[str, dict], weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Run-weighted seconds per step and time split."""
    sec = sum(weights[p] * results[p]["seconds_per_step"] for p in weights)
    split = {k: round(sum(weights[p] * results[p]["time_split"][k] for p in weights), 6)
             for k in list(PHASES["vae"]) + ["other"]}
    return sec, split


PHASE_DISC = {"pre_disc_start": False, "post_disc_start": True}


def memory_probe(cfg: Config, variant: str, phases: list[str], work: Path) -> dict[str, Optional[float]]:
    """Peak memory of one variant (``toolkit`` or ``reference``) over one step of each phase;
    run in a fresh process (``--memory-probe``), so that neither variant reuses memory the
    other freed."""
    accelerator = make_accelerator(cfg.vae.train, "vae.train.mixed_precision")
    device = accelerator.device
    reference = variant == "reference"
    data_cfg = replace(cfg.data, cache="off") if reference else cfg.data
    dataset = build_datasets(data_cfg, cfg.seed, ("train",), log=lambda m: None)["train"]
    model = ReferenceVAE(cfg, device, dataset) if reference else TrainerStep("vae", cfg, accelerator, dataset, work)
    for p in phases:
        model.step(PhaseTimer(device), PHASE_DISC[p])
    return peak_memory_mb(device)


def probe_memory(argv: list[str], variant: str) -> dict[str, Optional[float]]:
    """:func:`memory_probe` in a child process started with this script's ``argv``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", variant]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe of the {variant} step failed: {last}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_vae(cfg: Config, steps: int, warmup: int, phases: list[str], reference: bool,
              work: Path, log, data_seconds: float = 0.5, probe_argv: Optional[list[str]] = None,
              profile_path: Optional[Path] = None) -> dict[str, Any]:
    """Stage 1: the loader alone, then the toolkit and the reference step taking turns; peak
    memory from child processes (``probe_argv``: this run's arguments; None: not measured)."""
    variants_used = ["toolkit"] + (["reference"] if reference else [])
    memory = {v: probe_memory(probe_argv, v) if probe_argv is not None
              else {"peak_rss_mb": None, "cuda_peak_mb": None} for v in variants_used}
    accelerator = make_accelerator(cfg.vae.train, "vae.train.mixed_precision")
    device = accelerator.device
    data, datasets = measure_data(cfg, log, data_seconds, STAGE_FIELDS["vae"])     # stage 1 reads the gain maps
    variants: dict[str, Any] = {"toolkit": TrainerStep("vae", cfg, accelerator,
                                                       datasets["configured"].with_fields(STAGE_FIELDS["vae"]),
                                                       work / "toolkit")}
    if reference:
        variants["reference"] = ReferenceVAE(cfg, device, datasets["png"])
    flags = {"toolkit": cfg.vae.train, "reference": None}        # None: PyTorch's default precision settings
    out: dict[str, Any] = {"phases": {}}
    for p in phases:
        steppers = {name: under_flags(flags[name], v.step, PHASE_DISC[p]) for name, v in variants.items()}
        flops = warm_and_count(steppers, device)
        res = out["phases"][p] = time_steps(steppers, steps, warmup, device)
        for name in steppers:
            res[name]["flops_per_step"] = flops[name]
        if profile_path:
            profile_steps(steppers, device, profile_path, title=f"stage 1, {p}, ")
        if reference:
            res["ratio_vs_reference"] = round(res["reference"]["seconds_per_step"]
                                              / res["toolkit"]["seconds_per_step"], 3)
    variants["toolkit"].close()
    if probe_argv is None and not reference:
        memory["toolkit"] = peak_memory_mb(device)       # no probes: this process's peak (the toolkit only)

    weights = phase_weights(cfg, phases)
    sec, split = weighted({p: out["phases"][p]["toolkit"] for p in phases}, weights)
    bs = cfg.batch_size("vae") * cfg.vae.train.gradient_accumulation_steps
    flops = sum(weights[p] * out["phases"][p]["toolkit"]["flops_per_step"] for p in phases)
    out.update({"steps_per_sec": round(1 / sec, 4), "samples_per_sec": round(bs / sec, 3),
                "flops_per_sample": round(flops / bs), "tflops_per_sec": sig(flops / sec / 1e12),
                "time_split": split, "time_share": {k: round(v / sec, 4) for k, v in split.items()},
                "phase_weights": weights, **data, **memory["toolkit"]})
    out["data_share_of_step"] = out["time_share"]["data"]
    if reference:
        ref_sec, ref_split = weighted({p: out["phases"][p]["reference"] for p in phases}, weights)
        ref_flops = sum(weights[p] * out["phases"][p]["reference"]["flops_per_step"] for p in phases)
        out.update({"reference_steps_per_sec": round(1 / ref_sec, 4),
                    "reference_samples_per_sec": round(cfg.batch_size("vae") / ref_sec, 3),
                    "reference_flops_per_sample": round(ref_flops / cfg.batch_size("vae")),
                    "reference_tflops_per_sec": sig(ref_flops / ref_sec / 1e12),
                    "reference_time_split": ref_split,
                    "ratio_vs_reference": round(ref_sec / sec, 3),
                    "reference_peak_rss_mb": memory["reference"]["peak_rss_mb"],
                    "reference_cuda_peak_mb": memory["reference"]["cuda_peak_mb"],
                    "reference": "RadioDiff train_vae.py step: two full VAE forwards, fp32 under PyTorch's "
                                 "default precision settings, PNG data"})
    else:
        out.update({"reference_steps_per_sec": None, "ratio_vs_reference": None, "reference": "skipped"})
    return out


def trainer_overhead(config: str, overrides: list[str], until_step: int, work: Path) -> dict[str, Any]:
    """Run ``train_vae.py`` in this process for ``until_step`` steps (into a temporary
    output_dir) and read from its records what its loop spent outside the training steps: the
    seconds of every validation (``val`` records), of every checkpoint write (``checkpoint``
    events) and of writing records and events (the closing event's ``logging_seconds``)."""
    out_dir = work / "trainer-run"
    argv = sys.argv
    sys.argv = ["train_vae.py", "--config", config, "--until-step", str(until_step),
                "--set", f"output_dir={out_dir}"] + [x for o in overrides for x in ("--set", o)]
    try:
        code = train_vae.main()
    finally:
        sys.argv = argv
    if code:
        raise UserError(f"--trainer-run: train_vae.py stopped with exit code {code}")
    records = [json.loads(line) for line in (out_dir / "vae" / "metrics.jsonl").read_text().splitlines()]
    events = {r["event"]: r for r in records if r["split"] == "event"}
    closing = events.get("paused", events.get("end"))
    total = closing["time"] - events["start"]["time"]
    validation = sum(r["seconds"] for r in records if r["split"] == "val")
    checkpoint = sum(r["seconds"] for r in records if r.get("event") == "checkpoint")
    logging = closing["logging_seconds"]
    out = {"steps": until_step, "total_s": round(total, 3), "validation_s": round(validation, 3),
           "checkpoint_s": round(checkpoint, 3), "logging_s": round(logging, 3)}
    out["overhead_share"] = round((validation + checkpoint + logging) / total, 4)
    out["steps_per_sec_with_overhead"] = round(until_step / total, 4)
    return out


# --------------------------------------------------------------------------- stage 2
def random_vae(cfg: Config) -> AutoencoderKL:
    """A randomly initialised frozen VAE of ``cfg.vae.model`` (the timing does not depend on its weights)."""
    return build_vae(cfg.vae.model, cfg.data.image_size).requires_grad_(False).eval()


def bench_prior(cfg: Config, steps: int, warmup: int, work: Path, log,
                data_seconds: float = 0.5, profile_path: Optional[Path] = None) -> dict[str, Any]:
    """Stage 2 on the encoder (a frozen VAE encodes every batch) and on the latent cache
    (lib/models/latents.py, built here from the same VAE), taking turns step by step."""
    accelerator = make_accelerator(cfg.prior.train, "prior.train.mixed_precision")
    device = accelerator.device
    data, datasets = measure_data(cfg, log, data_seconds)
    vae = random_vae(cfg).to(device)
    t0 = time.perf_counter()
    cache = build_latent_cache(work / "latents", vae, {"train": datasets["configured"]}, {},
                               cfg.batch_size("prior"), device)
    build_s = time.perf_counter() - t0
    # Each its own VAE: with the cache the trainer moves the unused encoder off the device.
    variants = {"encoder": TrainerStep("prior", cfg, accelerator, datasets["configured"], work / "a", vae),
                "cache": TrainerStep("prior", cfg, accelerator, datasets["configured"].with_fields(
                    STAGE_FIELDS["prior-cached"] if cfg.prior.measurements.count is None else STAGE_FIELDS["prior"]),
                    work / "b", copy.deepcopy(vae), cache)}
    steppers = {k: under_flags(cfg.prior.train, v.step) for k, v in variants.items()}
    flops = warm_and_count(steppers, device, PHASES["prior"])
    res = time_steps(steppers, steps, warmup, device, PHASES["prior"])
    if profile_path:
        profile_steps({k: v.step for k, v in variants.items()}, device, profile_path, PHASES["prior"],
                      "stage 2, latents from the ")
    for v in variants.values():
        v.close()
    bs = cfg.batch_size("prior") * cfg.prior.train.gradient_accumulation_steps
    name = "cache" if cfg.prior.latent_cache != "off" else "encoder"
    main = res[name]
    return {"steps_per_sec": round(main["steps_per_sec"], 4), "samples_per_sec": round(bs * main["steps_per_sec"], 3),
            "flops_per_sample": round(flops[name] / bs),
            "tflops_per_sec": sig(flops[name] * main["steps_per_sec"] / 1e12),
            "time_split": main["time_split"], "time_share": main["time_share"],
            "data_share_of_step": main["time_share"]["data"], **data, **peak_memory_mb(device),
            "latent_cache": {name: {"steps_per_sec": round(r["steps_per_sec"], 4), "time_split": r["time_split"],
                                    "time_share": r["time_share"]} for name, r in res.items()},
            "latent_cache_speedup": round(res["cache"]["steps_per_sec"] / res["encoder"]["steps_per_sec"], 3),
            "latent_cache_build_s": round(build_s, 3), "latent_cache_samples": len(datasets["configured"]),
            "reference_steps_per_sec": None, "ratio_vs_reference": None,
            "reference": "none for stage 2: only the stage-1 reference step is rebuilt"}


# --------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    p = bench_parser()
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if (a.stage is None) == (a.suite is None):
        p.error("pass one of --stage vae|prior|data and --suite gpu")
    if a.suite == "gpu":
        run_suite(a.config, list(a.set), a.json)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = list(a.set) + ([f"data.batch_size={a.batch_size}"] if a.batch_size else []) + (
        [f"{a.stage}.train.batch_size={a.batch_size}"] if a.batch_size and a.stage != "data" else [])
    cfg = load_config(a.config, overrides)
    phases = {"pre": ["pre_disc_start"], "post": ["post_disc_start"],
              "both": ["pre_disc_start", "post_disc_start"]}[a.phase]
    if a.memory_probe:
        with tempfile.TemporaryDirectory(prefix="bench-probe-") as work:
            print(json.dumps(memory_probe(cfg, a.memory_probe, phases, Path(work))))
        return 0
    probe_argv = None if a.no_memory else (
        ["--config", a.config, "--stage", a.stage, "--phase", a.phase] + [x for o in overrides for x in ("--set", o)]
        + (["--threads", str(a.threads)] if a.threads else []))
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    profile = Path(a.profile) if a.profile else None
    if profile:
        profile.write_text("", encoding="utf-8")
    info = {"stage": a.stage, "config": a.config, "overrides": overrides, **machine(),
            "batch_size": cfg.batch_size(a.stage) if a.stage != "data" else cfg.data.batch_size,
            "image_size": cfg.data.image_size, "steps": a.steps,
            "warmup": a.warmup}
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        if a.stage == "data":
            res, _ = measure_data(cfg, log, a.data_seconds, by_stage=True)
        elif a.stage == "vae":
            info.update(switches(cfg.vae.train, "vae"))
            res = bench_vae(cfg, a.steps, a.warmup, phases, not a.no_reference, Path(work), log,
                            a.data_seconds, probe_argv, profile)
            if a.trainer_run:
                res["trainer_run"] = trainer_overhead(a.config, overrides, a.trainer_run, Path(work))
        else:
            info.update(switches(cfg.prior.train, "prior"))
            res = bench_prior(cfg, a.steps, a.warmup, Path(work), log, a.data_seconds, profile)
    result = {**info, **res}
    print(summary(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def switches(train_cfg: Any, stage: str) -> dict[str, Any]:
    """The speed switches of a benchmarked stage; ``mixed_precision`` as resolved (auto -> bf16 | no)."""
    out = {k: getattr(train_cfg, k) for k in ("tf32", "channels_last", "compile", "compile_mode",
                                              "gradient_checkpointing")}
    out["mixed_precision"] = resolve_precision(train_cfg, f"{stage}.train.mixed_precision").mixed_precision
    return out


def memory_text(rss: Optional[float], cuda: Optional[float]) -> str:
    return ((f", peak RSS {rss:.0f} MB" if rss is not None else "")
            + (f", CUDA peak {cuda:.0f} MB" if cuda is not None else ""))


def summary(r: dict[str, Any]) -> str:
    lines = [f"{r['stage']}: {r['config']} {' '.join(r['overrides'])}".rstrip(),
             f"  {r['cpu']}, {r['torch_threads']} torch threads, torch {r['torch']}"
             f"{', ' + r['gpu'] if r['gpu'] else ''}; batch {r['batch_size']}, {r['image_size']} px; "
             f"load average {r['load_average']}"]
    loader = (f"  data loader alone: PNG {r['data_samples_per_sec_png']:.4g} samples/s, cached "
              f"{r['data_samples_per_sec_cached']:.4g} samples/s ({r['cache_speedup']:.2f}x); "
              f"this config reads {r['data_path']}")
    if r["stage"] == "data":
        return "\n".join(lines + [loader] + [f"  {stage} reads {' + '.join(v['fields'])}: PNG {v['png']:.4g} "
                                              f"samples/s, cached {v['cached']:.4g} samples/s"
                                              for stage, v in r["data_by_stage"].items()])
    lines.append(f"  toolkit    {r['steps_per_sec']:.4g} steps/s, {r['samples_per_sec']:.4g} samples/s, "
                 f"{r['flops_per_sample'] / 1e9:.4g} GFLOP per sample, {r['tflops_per_sec']:.4g} TFLOP/s"
                 + memory_text(r.get("peak_rss_mb"), r.get("cuda_peak_mb")))
    if r.get("reference_steps_per_sec"):
        lines.append(f"  reference  {r['reference_steps_per_sec']:.4g} steps/s, {r['reference_flops_per_sample'] / 1e9:.4g} "
                     f"GFLOP per sample, {r['reference_tflops_per_sec']:.4g} TFLOP/s"
                     + memory_text(r.get("reference_peak_rss_mb"), r.get("reference_cuda_peak_mb"))
                     + f"  ->  ratio {r['ratio_vs_reference']:.3f}x")
        for p, v in r["phases"].items():
            lines.append(f"    {p}: toolkit {v['toolkit']['steps_per_sec']:.4g} steps/s, reference "
                         f"{v['reference']['steps_per_sec']:.4g} steps/s, ratio {v['ratio_vs_reference']:.3f}x")
    else:
        lines.append(f"  reference  {r['reference']}")
    for name, v in r.get("latent_cache", {}).items():
        sp = v["time_split"]
        lines.append(f"  latents from the {name:<7} {v['steps_per_sec']:.4g} steps/s: encode {sp['encode']:.3g} s, "
                     f"denoiser {sp['forward'] + sp['backward']:.3g} s (forward {sp['forward']:.3g} + backward "
                     f"{sp['backward']:.3g}), optimizer {sp['optimizer']:.3g} s, data {sp['data']:.3g} s per step")
    if r.get("latent_cache"):
        lines.append(f"  latent cache: {r['latent_cache_speedup']:.3f}x the steps/s of encoding every batch (built from "
                     f"{r['latent_cache_samples']} samples in {r['latent_cache_build_s']:.1f} s)")
    share = r["time_share"]
    lines.append("  time split " + ", ".join(f"{k} {100 * share[k]:.1f}%" for k in share))
    lines.append(loader)
    if r.get("trainer_run"):
        t = r["trainer_run"]
        lines.append(f"  train_vae.py, {t['steps']} steps in {t['total_s']:.1f} s: validation "
                     f"{t['validation_s']:.2f} s, checkpoints {t['checkpoint_s']:.2f} s, training records "
                     f"{t['logging_s']:.2f} s = {100 * t['overhead_share']:.1f}% of the time")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
