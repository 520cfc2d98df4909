"""The trained stage-1 VAE as stage 2 uses it: found, loaded frozen, and its latent space.

``prior.vae_checkpoint`` names a checkpoint of ``train_vae.py``: ``best`` or ``latest`` under
``{output_dir}/vae/checkpoints``, or a ``step-N`` folder. The VAE is built from this config's
``vae.model`` and given the checkpoint's weights (its EMA weights when it has them); a
missing checkpoint or one of another shape is a one-line :class:`CheckpointError`.

Latents are the posterior mean (``latent_dist.mode()``): deterministic, so the scale factor,
the training targets and the VAE round trip draw nothing from the random number generators.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch.utils.data import Dataset, Subset

from lib import checkpoint as ckpt
from lib.config import Config
from lib.data import eval_batches
from lib.errors import CheckpointError, UserError
from lib.models import build_vae
from lib.training import load_weights

EMA_FILE = "ema.safetensors"
WEIGHTS_FILE = "vae/diffusion_pytorch_model.safetensors"


@dataclass
class LoadedVAE:
    vae: AutoencoderKL
    path: Path                  # the step-N checkpoint folder
    ema: bool                   # whether its EMA weights were used

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along a side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def resolve_vae_checkpoint(spec: str, output_dir: str | Path, config_path: str = "CONFIG") -> ckpt.CheckpointInfo:
    """``best`` | ``latest`` (under ``{output_dir}/vae/checkpoints``) | a folder -> a complete checkpoint."""
    ckpt_dir = Path(output_dir) / "vae" / "checkpoints"
    first = f"run `python train_vae.py --config {config_path}` first"
    if spec in ("latest", "best"):
        infos = ckpt.list_checkpoints(ckpt_dir, lambda m: None)
        if not infos:
            raise CheckpointError(f"prior.vae_checkpoint {spec}: no stage-1 VAE checkpoint under "
                                  f"{ckpt_dir}; {first} (or set prior.vae_checkpoint to a folder)")
        if spec == "best" and ckpt.best_of(infos) is None:
            raise CheckpointError(f"prior.vae_checkpoint best: no VAE checkpoint under {ckpt_dir} "
                                  f"has a validation result; use prior.vae_checkpoint=latest")
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise CheckpointError(f"prior.vae_checkpoint {spec}: no such folder; {first}, or pass "
                                  f"best, latest or a folder like {ckpt_dir}/step-0005000")
        reason = ckpt.check_complete(folder)
        if reason or not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"prior.vae_checkpoint {spec}: not a complete stage-1 checkpoint "
                                  f"({reason or 'no ' + WEIGHTS_FILE})")
    return ckpt.resolve(spec, ckpt_dir)


def load_vae(folder: Path, cfg: Config, device: torch.device | str = "cpu") -> LoadedVAE:
    """The VAE of checkpoint ``folder`` built as ``cfg.vae.model`` says, frozen, in eval mode."""
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (not a stage-1 VAE checkpoint; "
                              f"prior.vae_checkpoint must point at train_vae.py's checkpoints)")
    vae = build_vae(cfg.vae.model, cfg.data.image_size)
    tensors = load_file(str(weights_path))
    ema = (folder / EMA_FILE).is_file()
    if ema:    # keyed like the VAE's parameters; buffers (none in AutoencoderKL) stay as saved
        tensors.update(load_file(str(folder / EMA_FILE)))
    load_weights(vae, tensors, str(folder), "set vae.model as in that checkpoint's config.yaml, "
                                            "or point prior.vae_checkpoint at a matching one")
    vae.requires_grad_(False).eval().to(device)
    return LoadedVAE(vae, folder, ema)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Maps in [-1, 1] (B, 1, H, W) -> unscaled latents (the posterior mean)."""
    return vae.encode(x).latent_dist.mode()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> maps clamped to [-1, 1]."""
    return vae.decode(z).sample.float().clamp(-1.0, 1.0)


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, dataset: Dataset, batch_size: int, num_batches: int,
                         device: torch.device | str = "cpu") -> float:
    """1 / std of the latents of ``num_batches`` batches of ``dataset``, so that scaled latents
    have unit variance (the LDM convention; RadioMapSeer latents are far from unit scale).

    The samples are spread evenly over the dataset (not its first maps only) and read in a
    fixed order; every process measures the same samples, so all agree on the factor.
    """
    n = min(len(dataset), batch_size * num_batches)
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    latents = [encode_latents(vae, b["image"].to(device)).float().flatten().cpu()
               for b in eval_batches(Subset(dataset, indices), batch_size)]
    std = float(torch.cat(latents).std())
    if not math.isfinite(std) or std <= 0:
        raise UserError(f"the VAE's latents have std {std} on {n} training samples; the latent "
                        f"scale factor cannot be measured (is the VAE checkpoint trained?)")
    return 1.0 / std
