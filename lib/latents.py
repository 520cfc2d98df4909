"""The stage-1 VAE's latent space as stage 2 uses it: encode, decode, and the scale factor.

Latents are the posterior mean (``latent_dist.mode()``): deterministic, so the scale factor,
the training targets and the VAE round trip draw nothing from the random number generators.
The diffusion works on latents multiplied by the scale factor (unit variance on the
training data, the LDM convention); :func:`lib.objectives.generate_maps` divides it out
before decoding.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset, Subset

from lib.batching import eval_batches
from lib.errors import UserError
from lib.progress import progress


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Maps in [-1, 1] (B, 1, H, W) -> unscaled latents (the posterior mean)."""
    return vae.encode(x).latent_dist.mode()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> maps clamped to [-1, 1]."""
    return vae.decode(z).sample.float().clamp(-1.0, 1.0)


@torch.no_grad()
def measure_latent_scale(latents: Callable[[dict], torch.Tensor], dataset: Dataset, batch_size: int,
                         num_batches: int, log: Optional[Callable[[str], None]] = None) -> float:
    """1 / std of the latents (``latents(batch)``: unscaled, the posterior mean; from the
    encoder or the latent cache) of ``num_batches`` batches of ``dataset``, so that scaled
    latents have unit variance (the LDM convention; RadioMapSeer latents are far from unit scale).

    The samples are spread evenly over the dataset (not its first maps only) and read in a
    fixed order; every process measures the same samples, so all agree on the factor.
    """
    t0 = time.perf_counter()
    n = min(len(dataset), batch_size * num_batches)
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    values = []
    with progress(math.ceil(n / batch_size), desc="latent scale", unit="batch", show=log is not None) as bar:
        for b in eval_batches(Subset(dataset, indices), batch_size):
            values.append(latents(b).float().flatten().cpu())
            bar.update(1)
    std = float(torch.cat(values).std())
    if not math.isfinite(std) or std <= 0:
        raise UserError(f"the VAE's latents have std {std} on {n} training samples; the latent "
                        f"scale factor cannot be measured (is the VAE checkpoint trained?)")
    if log is not None:
        log(f"latent scale factor {1.0 / std:.6g} = 1 / std of the latents of {n} training samples "
            f"({time.perf_counter() - t0:.1f} s)")
    return 1.0 / std
