"""Stage-2 diffusion: what the prior (:mod:`lib.prior`) is trained to predict, and how maps
are sampled from it.

- The noise schedule: ``DDPMScheduler`` for training; DDIM or DPM-Solver++ for sampling,
  both with "trailing" timestep spacing so that even one step starts from the last
  training timestep (pure noise) rather than from t = 0.
- :func:`diffusion_loss`: the mean squared error of the prediction (``epsilon``,
  ``v_prediction`` or ``sample``) at uniformly drawn timesteps.
- :func:`generate_maps`: condition -> sampled latent -> VAE decode.

Latents are scaled by the factor measured on the training data (:mod:`lib.latents`) before
the diffusion sees them; :func:`generate_maps` divides it out before decoding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from lib.config import DiffusionConfig
from lib.latents import decode_latents
from lib.prior import LatentPrior

Sampler = DDIMScheduler | DPMSolverMultistepScheduler


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
