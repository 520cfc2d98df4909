"""The stage-2 network: a conditional prior over the stage-1 VAE's latents.

- :class:`ConditionEncoder`: a small conv net that brings the condition maps
  (:mod:`lib.data.condition`: buildings, transmitter, cars-or-buildings; (3, S, S) in [-1, 1]),
  plus, computed from them on the device, the log-distance to the transmitter
  (``distance_channel``) and the share of the direct path that runs through buildings
  (``obstruction_channel``), down to the latent resolution; a prior trained with sparse
  measurements (``prior.measurements``, :mod:`lib.data.measurements`) also gets their value and
  mask channels and, computed from them, their values spread over the map and how near one is.
- :class:`LatentPrior`: a diffusers ``UNet2DModel`` on ``concat(noisy latent, condition
  features)``, with the simulator id as its class embedding (``num_class_embeds`` = number
  of simulations), so one model serves every simulator and is asked for one at sampling time.

What it is trained to predict, and how latents are sampled from it, is :mod:`lib.models.objectives`.
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from torch import nn

from lib.config import PriorModelConfig
from lib.data.condition import CHANNELS, distance_map, obstruction_map
from lib.data.measurements import CHANNELS as MEASUREMENT_CHANNELS
from lib.data.measurements import spread

COND_CHANNELS = len(CHANNELS)
UNET_DIR = "unet"
COND_ENCODER_FILE = "cond_encoder.safetensors"
# Config keys that make a checkpoint another model: resume and evaluate refuse a difference.
ARCHITECTURE_KEYS = ["prior.model", "prior.diffusion.objective", "prior.diffusion.num_train_timesteps",
              "prior.diffusion.beta_schedule", "prior.diffusion.prediction_type", "vae.model", "data.image_size"]
# Resuming also needs the same simulations (sim_id i must keep meaning the same simulator) and
# the same measurements. (Whether the prior takes measurements at all follows the checkpoint.)
RESUME_KEYS = ARCHITECTURE_KEYS + ["data.simulation", "prior.measurements.count"]


def encoder_inputs(distance_channel: bool, obstruction_channel: bool, measurements: bool) -> int:
    """Input channels of the condition encoder: the condition, the channels computed from it, and
    with measurements their two channels and the two :func:`lib.data.measurements.spread` gives."""
    return COND_CHANNELS + int(distance_channel) + int(obstruction_channel) + 4 * int(measurements)


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


def build_unet(cfg: PriorModelConfig, latent_channels: int, latent_size: int,
               num_simulations: int, outputs: int = 1) -> UNet2DModel:
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels + cfg.cond_channels,
        out_channels=latent_channels * outputs,
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
                 downsample: int, num_simulations: int, outputs: int = 1, measurements: bool = False) -> None:
        super().__init__()
        self.distance_channel, self.obstruction_channel = cfg.distance_channel, cfg.obstruction_channel
        self.measurements = measurements
        self.cond_encoder = ConditionEncoder(cfg.cond_channels, downsample, encoder_inputs(
            cfg.distance_channel, cfg.obstruction_channel, measurements))
        self.unet = build_unet(cfg, latent_channels, image_size // downsample, num_simulations, outputs)
        # Softmax attention ignores a bias added to every key, so the key biases' true gradient
        # is zero; AdamW would turn its rounding noise into steps of size lr (and runs with
        # other thread counts, e.g. a resume elsewhere, would drift apart). Keep them fixed.
        for name, p in self.unet.named_parameters():
            if name.endswith("to_k.bias"):
                p.requires_grad_(False)
        self.latent_channels = latent_channels
        self.latent_size = image_size // downsample

    @classmethod
    def from_parts(cls, cond_encoder: ConditionEncoder, unet: UNet2DModel, distance_channel: bool,
                   obstruction_channel: bool, measurements: bool = False) -> "LatentPrior":
        """A prior around networks that exist already (a diffusers pipeline's components,
        lib/evaluation/pipeline.py), with the weights they hold."""
        prior = cls.__new__(cls)
        nn.Module.__init__(prior)
        prior.distance_channel, prior.obstruction_channel = distance_channel, obstruction_channel
        prior.cond_encoder, prior.unet, prior.measurements = cond_encoder, unet, measurements
        prior.latent_channels = unet.config.in_channels - cond_encoder.net[-1].out_channels
        prior.latent_size = unet.config.sample_size
        return prior

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` the condition encoder and the UNet in place, not this wrapper's
        ``forward``: sampling calls them through :meth:`encode_cond` and :meth:`denoise`."""
        self.cond_encoder.compile(*args, **kwargs)
        self.unet.compile(*args, **kwargs)

    @property
    def latent_shape(self) -> str:
        return f"{self.latent_channels}x{self.latent_size}x{self.latent_size}"

    @property
    def cond_channels(self) -> int:
        """Channels of the condition it takes: 3, and the 2 measurement channels when trained with them."""
        return COND_CHANNELS + len(MEASUREMENT_CHANNELS) * int(self.measurements)

    def encode_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[1] != self.cond_channels:
            raise ValueError(f"this prior takes {self.cond_channels} condition channels, got {cond.shape[1]}")
        extra = ([distance_map(cond)] if self.distance_channel else []) + \
            ([obstruction_map(cond)] if self.obstruction_channel else []) + \
            ([spread(cond)] if self.measurements else [])
        return self.cond_encoder(torch.cat([cond, *extra], dim=1) if extra else cond)

    def denoise(self, z: torch.Tensor, t: torch.Tensor, features: torch.Tensor,
                sim_id: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for noisy latents ``z`` at timesteps ``t``."""
        return self.unet(torch.cat([z, features.to(z.dtype)], dim=1), t, class_labels=sim_id).sample

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                sim_id: torch.Tensor) -> torch.Tensor:
        return self.denoise(z, t, self.encode_cond(cond), sim_id)


def prior_files(prior: LatentPrior) -> dict[str, nn.Module]:
    """What a checkpoint holds of the prior (:func:`lib.train.checkpoint.write_file`): ``unet/``
    (diffusers ``save_pretrained``, safetensors) and ``cond_encoder.safetensors``."""
    return {UNET_DIR: prior.unet, COND_ENCODER_FILE: prior.cond_encoder}
