"""Experiment config: one YAML file -> typed, validated dataclasses.

A config has the sections ``data``, ``vae``, ``prior`` plus ``output_dir`` and ``seed``.
Every key has a default here (the shipped YAML files document them); unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` with one line naming the
file, the dotted key, the value and what would be valid. ``--set KEY=VALUE`` overrides
(dotted keys, values parsed as YAML) are applied before validation.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from lib.errors import ConfigError
from lib.numfmt import fmt

SIMULATIONS = ("DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4")


# --------------------------------------------------------------------------- sections
@dataclass
class SyntheticConfig:
    """The embedded synthetic city generator (used when ``data.source: synthetic``)."""
    num_maps: int = 700          # city maps written, ids 0..num_maps-1
    tx_per_map: int = 80         # transmitters per map
    cars: bool = True            # also write png/cars and the gain/cars* simulations
    size: int = 256              # written map size in pixels (RadioMapSeer: 256)


@dataclass
class DataConfig:
    source: Literal["synthetic", "radiomapseer"] = "synthetic"
    root: str = "data/synthetic"
    simulation: list[str] = field(default_factory=lambda: ["DPM"])
    image_size: int = 256        # maps are resized to this on load when it differs
    batch_size: int = 2          # per process, per micro-batch (a stage's train.batch_size overrides it)
    num_workers: int = 0
    pin_memory: bool = False     # page-locked batches for faster host-to-GPU copies (CUDA only)
    cache: str = "off"           # off | auto | path of a cache built by `python -m lib.cache build`
    split: str = "random"        # radiounet | radiodiff | random | path to a JSON file (lib/data/splits.py)
    split_seed: int = 0          # the random split's permutation (independent of `seed`)
    train_maps: int = 500        # random split: maps for training, of which `val_maps` are held back
    val_maps: int = 20
    test_maps: int = 200
    tx_per_map: Optional[int] = None   # use the first K transmitters of each map; null: all
    cars_input: Literal["auto", True, False] = "auto"   # cars as the 3rd condition channel; auto: cars* sims
    threshold: float = 0.0       # RadioUNet's noise floor on the target gain (0: off; their protocol: 0.2)
    on_bad_file: Literal["error", "skip"] = "error"
    db_range: list[float] = field(default_factory=lambda: [-127.0, -47.0])   # dB at gray 0 and 255 (lib/data/units.py)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, v: "_Validator") -> None:
        v.check(self.image_size >= 8, "data.image_size", self.image_size, "an integer >= 8")
        v.check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        v.check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        v.check(bool(self.cache.strip()), "data.cache", self.cache,
                "off, auto, or the folder of a cache built with `python -m lib.cache build`")
        v.check(len(self.simulation) >= 1, "data.simulation", self.simulation,
                f"one or more of {list(SIMULATIONS)}")
        for sim in self.simulation:
            v.check(sim in SIMULATIONS, "data.simulation", sim, f"one of {list(SIMULATIONS)}")
        v.check(len(set(self.simulation)) == len(self.simulation), "data.simulation",
                self.simulation, "a list without repeats")
        v.check(self.split in ("radiounet", "radiodiff", "random") or self.split.endswith(".json"), "data.split",
                self.split, "radiounet, radiodiff, random, or the path of a .json file with train, val and "
                "test lists of map ids")
        v.check(0.0 <= self.threshold < 1.0, "data.threshold", self.threshold,
                "a number in [0, 1) (0: off; RadioUNet's protocol: 0.2)")
        v.check(len(self.db_range) == 2 and self.db_range[0] < self.db_range[1], "data.db_range", self.db_range,
                "[low, high]: the pathloss in dB at gray level 0 and at 255, low < high (RadioMapSeer: [-127, -47])")
        v.check(self.val_maps >= 1, "data.val_maps", self.val_maps, "an integer >= 1")
        v.check(self.train_maps > self.val_maps, "data.train_maps", self.train_maps,
                f"more than data.val_maps ({self.val_maps})")
        v.check(self.test_maps >= 1, "data.test_maps", self.test_maps, "an integer >= 1")
        if self.tx_per_map is not None:
            v.check(self.tx_per_map >= 1, "data.tx_per_map", self.tx_per_map, "null or >= 1")
        s = self.synthetic
        v.check(s.num_maps >= 1, "data.synthetic.num_maps", s.num_maps, "an integer >= 1")
        v.check(s.tx_per_map >= 1, "data.synthetic.tx_per_map", s.tx_per_map, "an integer >= 1")
        v.check(s.size >= 8, "data.synthetic.size", s.size, "an integer >= 8")
        if self.source == "synthetic" and self.split == "random":
            v.check(s.num_maps >= self.train_maps + self.test_maps, "data.synthetic.num_maps",
                    s.num_maps, f">= data.train_maps + data.test_maps "
                    f"({self.train_maps + self.test_maps})")
        if self.source == "synthetic" and not s.cars:
            for sim in self.simulation:
                v.check(not sim.startswith("cars"), "data.simulation", sim,
                        "a simulation without cars (data.synthetic.cars is false)")
            v.check(self.cars_input is not True, "data.cars_input", self.cars_input,
                    "auto or false (data.synthetic.cars is false: there are no cars maps)")


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpoint settings; shared by both stages."""
    max_steps: int = 150_000           # optimizer steps (not micro-batches, not per process)
    batch_size: Optional[int] = None   # per process and micro-batch; null: data.batch_size
    lr: float = 5e-6
    min_lr: float = 5e-7               # absolute floor of the LR (cosine/linear/polynomial)
    lr_scheduler: Literal["cosine", "linear", "polynomial", "constant",
                          "constant_with_warmup"] = "cosine"
    warmup_steps: int = 0
    lr_power: float = 1.0              # exponent of the polynomial schedule
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0             # max global grad norm before each step; 0: no clipping
    # auto: bf16 on a CUDA GPU that has it, else float32 (the CPU); lib/train/accel.py resolves it
    # (and `accelerate launch --mixed_precision`) and every run records what it used.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = 100
    val_every: int = 5000
    val_batches: int = 8               # validation batches per evaluation; 0: whole split
    checkpoint_every: int = 5000
    keep_last: int = 3                 # newest checkpoints kept (the best is kept as well)
    ema: bool = False
    ema_decay: float = 0.999
    max_nonfinite: int = 20            # consecutive non-finite steps before the run stops
    divergence_factor: float = 3.0     # smoothed loss above best x this factor ...
    divergence_window: int = 5         # ... for this many consecutive log records
    on_divergence: Literal["warn", "stop"] = "warn"
    # Speed switches (lib/train/accel.py). None changes anything on a CPU.
    tf32: bool = True                  # TF32 float32 matmuls and convolutions on Ampere+ GPUs; false:
                                       # PyTorch's defaults (TF32 convolutions, IEEE matmuls)
    channels_last: bool = False        # NHWC memory format for the convolutional models
    compile: bool = False              # torch.compile the models (the first steps compile)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"   # torch.compile's mode
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: no code generation)
    gradient_checkpointing: bool = False   # recompute activations in the backward: less memory, slower
    # Experiment trackers (Accelerate's): records and sample grids also go there (lib/train/trackers.py).
    report_to: Literal["tensorboard", "wandb", "mlflow", "comet_ml", "all"] = "tensorboard"

    def validate(self, v: "_Validator", prefix: str) -> None:
        k = prefix + "."
        v.check(self.max_steps >= 1, k + "max_steps", self.max_steps, "an integer >= 1")
        if self.batch_size is not None:
            v.check(self.batch_size >= 1, k + "batch_size", self.batch_size, "null or an integer >= 1")
        v.check(self.lr > 0, k + "lr", self.lr, "a number > 0")
        v.check(self.min_lr >= 0, k + "min_lr", self.min_lr, "a number >= 0")
        if self.lr_scheduler in ("cosine", "linear", "polynomial"):
            v.check(self.min_lr <= self.lr, k + "min_lr", self.min_lr,
                    f"a number <= {k}lr ({fmt(self.lr)})")
        v.check(self.warmup_steps >= 0, k + "warmup_steps", self.warmup_steps, "an integer >= 0")
        v.check(self.warmup_steps < self.max_steps, k + "warmup_steps", self.warmup_steps,
                f"less than {k}max_steps ({self.max_steps})")
        v.check(self.lr_power > 0, k + "lr_power", self.lr_power, "a number > 0")
        v.check(self.weight_decay >= 0, k + "weight_decay", self.weight_decay, "a number >= 0")
        v.check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                k + "adam_betas", self.adam_betas, "two numbers in [0, 1)")
        v.check(self.gradient_accumulation_steps >= 1, k + "gradient_accumulation_steps",
                self.gradient_accumulation_steps, "an integer >= 1")
        v.check(self.grad_clip >= 0, k + "grad_clip", self.grad_clip, "a number >= 0 (0: off)")
        for name in ("log_every", "val_every", "checkpoint_every", "keep_last",
                     "max_nonfinite", "divergence_window"):
            value = getattr(self, name)
            v.check(value >= 1, k + name, value, "an integer >= 1")
        v.check(self.val_batches >= 0, k + "val_batches", self.val_batches, "an integer >= 0 (0: all)")
        v.check(0 < self.ema_decay < 1, k + "ema_decay", self.ema_decay, "a number in (0, 1)")
        v.check(self.divergence_factor > 1, k + "divergence_factor", self.divergence_factor,
                "a number > 1")


@dataclass
class VAEModelConfig:
    """diffusers AutoencoderKL architecture."""
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    layers_per_block: int = 2
    latent_channels: int = 3
    norm_num_groups: int = 32
    mid_block_attention: bool = True

    def validate(self, v: "_Validator") -> None:
        v.check(len(self.block_out_channels) >= 1 and all(c >= 1 for c in self.block_out_channels),
                "vae.model.block_out_channels", self.block_out_channels, "a list of positive integers")
        for c in self.block_out_channels:
            v.check(c % self.norm_num_groups == 0, "vae.model.block_out_channels", c,
                    f"multiples of vae.model.norm_num_groups ({self.norm_num_groups})")
        v.check(self.layers_per_block >= 1, "vae.model.layers_per_block", self.layers_per_block,
                "an integer >= 1")
        v.check(self.latent_channels >= 1, "vae.model.latent_channels", self.latent_channels,
                "an integer >= 1")
        v.check(self.in_channels >= 1, "vae.model.in_channels", self.in_channels, "an integer >= 1")
        v.check(self.out_channels >= 1, "vae.model.out_channels", self.out_channels, "an integer >= 1")


@dataclass
class VAELossConfig:
    """Reconstruction + KL + adaptive-weight hinge GAN (the LDM/taming recipe)."""
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    logvar_init: float = 0.0           # initial value of the learned output log-variance
    disc_weight: float = 0.5
    disc_start: int = 50_001           # first optimizer step with the adversarial term
    disc_channels: int = 64
    disc_layers: int = 3               # strided conv layers of the PatchGAN
    perceptual_weight: float = 0.0     # off: no pretrained network can be downloaded
    perceptual_network: Optional[str] = None   # "package.module:factory" building the network
    perceptual_weights: Optional[str] = None   # its weights (.safetensors), required when on

    def validate(self, v: "_Validator", max_steps: int) -> None:
        for name in ("l1_weight", "l2_weight", "kl_weight", "disc_weight", "perceptual_weight"):
            value = getattr(self, name)
            v.check(value >= 0, f"vae.loss.{name}", value, "a number >= 0")
        v.check(self.l1_weight + self.l2_weight > 0, "vae.loss.l1_weight", self.l1_weight,
                "l1_weight + l2_weight > 0")
        v.check(self.disc_start >= 0, "vae.loss.disc_start", self.disc_start, "an integer >= 0")
        v.check(self.disc_channels >= 1, "vae.loss.disc_channels", self.disc_channels, "an integer >= 1")
        v.check(self.disc_layers >= 1, "vae.loss.disc_layers", self.disc_layers, "an integer >= 1")
        if self.perceptual_weight > 0:
            v.check(self.perceptual_network is not None, "vae.loss.perceptual_network", None,
                    "'package.module:factory' (a network such as LPIPS) when "
                    "vae.loss.perceptual_weight > 0; or set vae.loss.perceptual_weight: 0")
            v.check(self.perceptual_weights is not None, "vae.loss.perceptual_weights", None,
                    "a path to its local .safetensors weights when vae.loss.perceptual_weight > 0 "
                    "(nothing is downloaded); or set vae.loss.perceptual_weight: 0")
        if self.disc_weight > 0 and self.disc_start > max_steps:
            v.warn(f"vae.loss.disc_start = {self.disc_start} is beyond vae.train.max_steps = "
                   f"{max_steps}: the discriminator will never train")


@dataclass
class VAEConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class PriorModelConfig:
    """diffusers UNet2DModel over the VAE latent plus a condition encoder."""
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    layers_per_block: int = 2
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    norm_num_groups: int = 32
    attention_head_dim: int = 64       # channels per attention head (attention levels, mid block)
    cond_channels: int = 64            # width of the condition encoder
    distance_channel: bool = True      # also give the encoder log-distance to the transmitter
    obstruction_channel: bool = True   # ... and the share of the direct path inside buildings

    def validate(self, v: "_Validator") -> None:
        v.check(len(self.block_out_channels) >= 1, "prior.model.block_out_channels",
                self.block_out_channels, "a non-empty list of positive integers")
        v.check(len(self.attention_levels) == len(self.block_out_channels),
                "prior.model.attention_levels", self.attention_levels,
                f"a list of {len(self.block_out_channels)} booleans (one per block)")
        for c in self.block_out_channels:
            v.check(c >= 1 and c % self.norm_num_groups == 0, "prior.model.block_out_channels", c,
                    f"multiples of prior.model.norm_num_groups ({self.norm_num_groups})")
        v.check(self.layers_per_block >= 1, "prior.model.layers_per_block", self.layers_per_block,
                "an integer >= 1")
        v.check(self.attention_head_dim >= 1, "prior.model.attention_head_dim",
                self.attention_head_dim, "an integer >= 1")
        attended = [c for c, a in zip(self.block_out_channels, self.attention_levels) if a]
        for c in attended + self.block_out_channels[-1:]:      # the mid block always attends
            v.check(c % self.attention_head_dim == 0, "prior.model.attention_head_dim",
                    self.attention_head_dim, f"a divisor of the attending blocks' channels ({c})")
        v.check(self.cond_channels >= 1, "prior.model.cond_channels", self.cond_channels,
                "an integer >= 1")


@dataclass
class DiffusionConfig:
    """What the prior learns and how it samples (lib/models/objectives.py, which checks the
    objective and its sampler against its registry)."""
    objective: str = "ddpm"            # lib/models/objectives.py REGISTRY: ddpm | radiodiff | flow | regression
    num_train_timesteps: int = 1000    # ddpm: the discrete noise schedule
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"   # ddpm
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"          # ddpm
    sampler: Optional[str] = None      # null: the objective's default (ddpm: ddim | dpm; flow: euler | heun)
    num_inference_steps: int = 50      # sampling steps (regression: one forward pass whatever this says)
    radiodiff_weighting: bool = True   # radiodiff: w1 = 2 e^(1-t), w2 = e^sqrt(t) (false: 1 and 1)
    radiodiff_loss: Literal["l2", "l1_l2"] = "l1_l2"   # radiodiff: squared errors, or (L2 + L1) / 2 as RadioDiff
    time_eps: float = 1e-4             # radiodiff: t ~ U(time_eps, 1)

    def validate(self, v: "_Validator") -> None:
        v.check(self.num_train_timesteps >= 2, "prior.diffusion.num_train_timesteps",
                self.num_train_timesteps, "an integer >= 2")
        v.check(1 <= self.num_inference_steps <= self.num_train_timesteps,
                "prior.diffusion.num_inference_steps", self.num_inference_steps,
                f"an integer in [1, {self.num_train_timesteps}]")
        v.check(0 < self.time_eps < 1, "prior.diffusion.time_eps", self.time_eps, "a number in (0, 1)")


def _prior_train_defaults() -> TrainConfig:
    # The original RadioDiff run's stage-2 settings: AdamW 1e-4, wd 1e-3, warmup 20K, cosine to 450K.
    return TrainConfig(max_steps=450_000, lr=1e-4, min_lr=1e-6, lr_scheduler="cosine",
                       warmup_steps=20_000, weight_decay=1e-3, adam_betas=[0.9, 0.999],
                       ema=True, ema_decay=0.9999)


@dataclass
class MeasurementConfig:
    """Sparse measurements as a condition (lib/data/measurements.py)."""
    count: Optional[list[str]] = None  # null: off | N pixels | "1%" of those outside buildings | [low, high]
    correct: bool = True               # let the measurements correct the decoded map
    sigma: float = 2.0                 # the correction's Gaussian, px at data.image_size

    def validate(self, v: "_Validator") -> None:       # count: lib.data.measurements.parse_spec, at start
        v.check(self.sigma > 0, "prior.measurements.sigma", self.sigma, "a number of pixels > 0")


@dataclass
class PriorConfig:
    vae_checkpoint: str = "latest"     # latest | best (after disc_start) | path to a checkpoint folder
    latent_scale_batches: int = 32     # training batches the latent scale factor is measured on
    latent_cache: str = "auto"         # auto | off | PATH: the frozen VAE's latents, encoded once (lib/models/latents.py)
    posterior_sample: bool = False     # train on posterior samples mean + std * eps (false: the posterior mean)
    measurements: MeasurementConfig = field(default_factory=MeasurementConfig)
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=_prior_train_defaults)


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    # Not config keys: where the config came from and the warnings validation raised.
    source_path: str = field(default="<defaults>", metadata={"internal": True})
    warnings: list[str] = field(default_factory=list, metadata={"internal": True})
    flags: str = field(default="", metadata={"internal": True})   # the user's --config / --set, for hints

    def validate(self) -> None:
        v = _Validator(self.source_path)
        v.check(bool(self.output_dir), "output_dir", self.output_dir, "a non-empty path")
        self.data.validate(v)
        self.vae.model.validate(v)
        self.vae.loss.validate(v, self.vae.train.max_steps)
        self.vae.train.validate(v, "vae.train")
        v.check(bool(self.prior.vae_checkpoint), "prior.vae_checkpoint", self.prior.vae_checkpoint,
                "best, latest or a path to a stage-1 checkpoint folder")
        v.check(self.prior.latent_scale_batches >= 1, "prior.latent_scale_batches",
                self.prior.latent_scale_batches, "an integer >= 1")
        v.check(bool(self.prior.latent_cache.strip()), "prior.latent_cache", self.prior.latent_cache,
                "auto, off, or a folder for the cache")
        self.prior.model.validate(v)
        self.prior.measurements.validate(v)
        # Both models halve the maps: the VAE once per level after the first, the prior's UNet
        # (and its condition encoder) the latent again.
        vae_halvings = len(self.vae.model.block_out_channels) - 1
        prior_halvings = len(self.prior.model.block_out_channels) - 1
        divisor = 2 ** (vae_halvings + prior_halvings)
        v.check(self.data.image_size % divisor == 0, "data.image_size", self.data.image_size,
                f"a multiple of {divisor} (the VAE halves the maps {vae_halvings} time(s), the prior's UNet "
                f"its latent {prior_halvings} more)")
        self.prior.diffusion.validate(v)
        self.prior.train.validate(v, "prior.train")
        self.warnings = v.warnings

    def batch_size(self, stage: str) -> int:
        """The per-process micro-batch of ``stage`` (``vae`` or ``prior``)."""
        return getattr(self, stage).train.batch_size or self.data.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.yaml`` in a run folder holds)."""
        return _to_plain(self)


# --------------------------------------------------------------------------- loading
class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.warnings: list[str] = []

    def check(self, ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{self.source}: {key} = {value!r} is invalid; expected {expected}")

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.source}: {message}")


def _is_internal(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("internal"))


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name))
                for f in dataclasses.fields(obj) if not _is_internal(f)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(tp))
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _describe(inner[0]) + " or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# String keys for which ``off`` is a value (YAML reads an unquoted off as false: accepted as "off").
OFF_KEYS = ("data.cache", "prior.latent_cache")


def _convert(tp: Any, value: Any, key: str, source: str, default: Any = None) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected {_describe(tp)}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, source, default)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key, source)
    if isinstance(value, bool):               # YAML reads unquoted off / on / no / yes as booleans
        words = ("on", "yes", "true") if value else ("off", "no", "false")
        if key in OFF_KEYS and not value:
            value = "off"
        elif origin is Literal and value not in typing.get_args(tp):
            value = next((w for w in words if w in typing.get_args(tp)), value)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise ConfigError(f"{source}: {key} = {value!r} is invalid; expected {_describe(tp)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            if item_tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return [str(value)]     # `simulation: DPM` means `[DPM]`, `count: 200` `[200]`
            raise bad()
        return [_convert(item_tp, x, f"{key}[{i}]", source) for i, x in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)       # 1.5e5 in YAML is a float
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):      # PyYAML reads 5e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):    # .inf / .nan: every weight would become NaN
            raise ConfigError(f"{source}: {key} = {value!r} is invalid; expected a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, bool):     # YAML reads off/on/no/yes unquoted as booleans
            raise ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected a string "
                              f"(quote it: \"off\", not off)")
        if not isinstance(value, (str, int, float)):
            raise bad()
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, raw: dict, prefix: str, source: str, base: Any = None) -> Any:
    """``cls`` from the keys in ``raw``; the others keep their values in ``base`` (the field's
    own default when None). A section given in part keeps its owner's defaults for the rest:
    ``prior: {train: {lr: 2e-4}}`` keeps the prior's max_steps and warmup, not TrainConfig's."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not _is_internal(f)}
    if base is None:
        base = cls()
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint} "
                              f"(valid keys here: {', '.join(fields)})")
        kwargs[name] = _convert(hints[name], value, key, source, getattr(base, name))
    return dataclasses.replace(base, **kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"vae.train.lr=1e-5"`` -> ``(["vae", "train", "lr"], 1e-05)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set vae.train.lr=1e-5")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected a dotted key such as vae.train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value {raw!r} is not valid YAML") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def _merge(base: dict, child: dict) -> dict:
    """``child``'s keys over ``base``'s, section by section (a value replaces a value; lists whole)."""
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; a ``base: OTHER.yaml`` key (relative to the file's folder) is
    read first and this file's keys go over it, section by section."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass an existing YAML file, e.g. configs/demo.yaml)"
                          if not seen else f"{seen[-1]}: base = {str(p)!r}: file not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if loaded is None:
        raise ConfigError(f"{p}: the file is empty; a config needs the sections data, vae and prior "
                          f"(copy configs/demo.yaml or configs/m.yaml)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping with sections data, vae, prior")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{p}: base = {base!r} is invalid; expected the path of another config file")
    base_path = (p.parent / base).resolve()
    if base_path in seen or base_path == p.resolve():
        chain = " -> ".join(str(x) for x in (*seen, p.resolve(), base_path))
        raise ConfigError(f"{p}: base files form a cycle ({chain})")
    return _merge(read_yaml(base_path, (*seen, p.resolve())), loaded)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None; ``base:`` inheritance, see
    :func:`read_yaml`), apply ``--set`` overrides, and return the validated :class:`Config`."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = read_yaml(Path(path))
    if overrides:
        raw = apply_overrides(raw, list(overrides))
        source += " (with --set)"
    cfg = _build(Config, raw, "", source)
    cfg.source_path = source
    cfg.flags = " ".join(shlex.quote(a) for a in (["--config", str(path)] if path is not None else []) +
                         [x for o in overrides or [] for x in ("--set", o)])
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
