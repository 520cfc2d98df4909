"""Stage-2 model and diffusion: a conditional latent prior over the stage-1 VAE latents.

- :class:`ConditionEncoder`: a small conv net that brings the condition maps (buildings,
  transmitter, cars-or-buildings; (3, S, S) in [-1, 1]), plus with ``distance_channel`` the
  log-distance to the transmitter computed from its map, down to the latent resolution.
- :class:`LatentPrior`: a diffusers ``UNet2DModel`` on ``concat(noisy latent, condition
  features)``, with the simulator id as its class embedding (``num_class_embeds`` = number
  of simulations), so one model serves every simulator and is asked for one at sampling time.
- The noise schedule: ``DDPMScheduler`` for training; DDIM or DPM-Solver++ for sampling,
  both with "trailing" timestep spacing so that even one step starts from the last
  training timestep (pure noise) rather than from t = 0.

Latents are scaled by the factor measured on the training data (:mod:`lib.vae_io`) before
the diffusion sees them; :func:`generate_maps` divides it out before decoding.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file
from torch import nn

from lib.baselines import log_distance
from lib.config import DiffusionConfig, PriorModelConfig
from lib.training import load_weights
from lib.vae_io import decode_latents

COND_CHANNELS = 3          # buildings, transmitter, cars (or buildings again)
UNET_DIR = "unet"
COND_ENCODER_FILE = "cond_encoder.safetensors"
EMA_FILE = "ema.safetensors"
Sampler = DDIMScheduler | DPMSolverMultistepScheduler
# Config keys that make a checkpoint another model: resume and evaluate refuse a difference.
MODEL_KEYS = ["prior.model", "prior.diffusion.num_train_timesteps", "prior.diffusion.beta_schedule",
              "prior.diffusion.prediction_type", "vae.model", "data.image_size"]


# --------------------------------------------------------------------------- networks
class ConditionEncoder(nn.Module):
    """(B, 3, S, S) condition maps -> (B, channels, S / downsample, S / downsample) features.

    3x3 convolutions, stride 2 per halving: a 3x3 window with stride 2 overlaps its
    neighbours, so the one-pixel transmitter reaches the features at every halving.
    """

    def __init__(self, channels: int, downsample: int, in_channels: int = COND_CHANNELS) -> None:
        super().__init__()
        halvings = int(math.log2(downsample))
        if 2 ** halvings != downsample:
            raise ValueError(f"downsample must be a power of 2, got {downsample}")
        groups = math.gcd(32, channels)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.SiLU()]
        for _ in range(halvings):
            # no bias: GroupNorm removes it (its gradient would be rounding noise)
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(groups, channels), nn.SiLU()]
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond)


def distance_map(cond: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) log-distance to the transmitter scaled to [-1, 1] (0 at the transmitter,
    1 at the far corner of the map): the transmitter pixel spread over the whole map, which
    a few convolutions would otherwise take many steps to learn to do."""
    size = cond.shape[-1]
    return (log_distance(cond) / math.log10(size * math.sqrt(2)) * 2.0 - 1.0).to(cond.dtype)


def build_unet(cfg: PriorModelConfig, latent_channels: int, latent_size: int,
               num_simulations: int) -> UNet2DModel:
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels + cfg.cond_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        num_class_embeds=num_simulations,
    )


class LatentPrior(nn.Module):
    """The trainable part of stage 2: condition encoder + UNet (one module, one optimizer,
    one DDP wrapper, one EMA)."""

    def __init__(self, cfg: PriorModelConfig, latent_channels: int, image_size: int,
                 downsample: int, num_simulations: int) -> None:
        super().__init__()
        self.distance_channel = cfg.distance_channel
        self.cond_encoder = ConditionEncoder(cfg.cond_channels, downsample,
                                             COND_CHANNELS + int(cfg.distance_channel))
        self.unet = build_unet(cfg, latent_channels, image_size // downsample, num_simulations)
        # Softmax attention ignores a bias added to every key, so the key biases' true gradient
        # is zero; AdamW would turn its rounding noise into steps of size lr (and runs with
        # other thread counts, e.g. a resume elsewhere, would drift apart). Keep them fixed.
        for name, p in self.unet.named_parameters():
            if name.endswith("to_k.bias"):
                p.requires_grad_(False)
        self.latent_channels = latent_channels
        self.latent_size = image_size // downsample

    def encode_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if self.distance_channel:
            cond = torch.cat([cond, distance_map(cond)], dim=1)
        return self.cond_encoder(cond)

    def denoise(self, z: torch.Tensor, t: torch.Tensor, features: torch.Tensor,
                sim_id: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for noisy latents ``z`` at timesteps ``t``."""
        return self.unet(torch.cat([z, features.to(z.dtype)], dim=1), t, class_labels=sim_id).sample

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                sim_id: torch.Tensor) -> torch.Tensor:
        return self.denoise(z, t, self.encode_cond(cond), sim_id)


def save_prior(prior: LatentPrior, folder: Path) -> None:
    """``unet/`` (save_pretrained, safetensors) and ``cond_encoder.safetensors``."""
    from safetensors.torch import save_file
    prior.unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in prior.cond_encoder.state_dict().items()},
              str(folder / COND_ENCODER_FILE))


def load_prior_weights(prior: LatentPrior, folder: Path, use_ema: bool = True) -> bool:
    """Load a checkpoint's weights into ``prior`` (its EMA weights when present and
    ``use_ema``); returns whether EMA weights were used. Mismatches are one-line errors."""
    tensors = {f"unet.{k}": v for k, v in
               load_file(str(folder / UNET_DIR / "diffusion_pytorch_model.safetensors")).items()}
    tensors.update({f"cond_encoder.{k}": v for k, v in
                    load_file(str(folder / COND_ENCODER_FILE)).items()})
    ema = use_ema and (folder / EMA_FILE).is_file()
    if ema:
        tensors.update(load_file(str(folder / EMA_FILE)))
    load_weights(prior, tensors, str(folder), "set prior.model as in that checkpoint's config.yaml")
    return ema


# --------------------------------------------------------------------------- noise schedules
def train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    # clip_sample off: scaled latents have unit variance, not a [-1, 1] range.
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def sampling_scheduler(cfg: DiffusionConfig, sampler: Optional[str] = None) -> Sampler:
    """A fresh sampler (they keep per-run state) on the training noise schedule."""
    base = train_scheduler(cfg).config
    name = sampler or cfg.sampler
    if name == "ddim":
        return DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=False,
                                         set_alpha_to_one=True, steps_offset=0)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++",
                                                       solver_order=2, timestep_spacing="trailing")
    raise ValueError(f"unknown sampler {name!r}; expected ddim or dpm")


def training_target(sched: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(latents, noise, t)
    return latents                                     # "sample"


def diffusion_loss(prior: nn.Module, sched: DDPMScheduler, latents: torch.Tensor, cond: torch.Tensor,
                   sim_id: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mean squared error of the prediction at uniformly drawn timesteps.

    Training passes no ``generator`` (noise and timesteps come from the global RNG, which the
    checkpoint restores); validation passes a fixed CPU one so it draws nothing globally.
    """
    b, device = latents.shape[0], latents.device
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator,
                      device=generator.device if generator is not None else device).to(device)
    noisy = sched.add_noise(latents, noise, t)
    pred = prior(noisy, t, cond, sim_id)
    return F.mse_loss(pred.float(), training_target(sched, latents, noise, t).float())


# --------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_latents(prior: LatentPrior, sampler: Sampler, cond: torch.Tensor, sim_id: torch.Tensor,
                   num_inference_steps: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Scaled latents for ``cond`` / ``sim_id`` after ``num_inference_steps`` sampler steps."""
    shape = (cond.shape[0], prior.latent_channels, prior.latent_size, prior.latent_size)
    sampler.set_timesteps(num_inference_steps, device=cond.device)
    z = randn_tensor(shape, generator=generator, device=cond.device, dtype=cond.dtype)
    z = z * sampler.init_noise_sigma
    features = prior.encode_cond(cond)                # once, not per step
    for t in sampler.timesteps:
        zin = sampler.scale_model_input(z, t)
        out = prior.denoise(zin, t.expand(z.shape[0]), features, sim_id)
        z = sampler.step(out, t, z, generator=generator).prev_sample
    return z


@torch.no_grad()
def generate_maps(prior: LatentPrior, vae, latent_scale: float, cond: torch.Tensor, sim_id: torch.Tensor,
                  cfg: DiffusionConfig, num_inference_steps: Optional[int] = None,
                  sampler: Optional[str] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The full stage-2 pipeline: condition -> sampled latent -> VAE decode; maps in [-1, 1]."""
    sched = sampling_scheduler(cfg, sampler)
    z = sample_latents(prior, sched, cond, sim_id, num_inference_steps or cfg.num_inference_steps,
                       generator)
    return decode_latents(vae, z / latent_scale)
