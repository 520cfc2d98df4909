"""Stage-1 networks: the diffusers AutoencoderKL with its learned output log-variance, and a
PatchGAN discriminator."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import AutoencoderKL
from torch import nn

from lib.config import VAELossConfig, VAEModelConfig

# Config keys that make a stage-1 checkpoint another model (the discriminator's shape included):
# a resume with other values is refused before anything is written.
RESUME_KEYS = ["vae.model", "vae.loss.disc_channels", "vae.loss.disc_layers", "data.image_size"]


def build_vae(cfg: VAEModelConfig, image_size: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_attention,
        sample_size=image_size,
    )


class VAEWithLogvar(nn.Module):
    """AutoencoderKL plus the learned scalar output log-variance of the NLL term.

    One module so that ``logvar`` sits in the generator optimizer (the reference trainer
    left it in no optimizer, so it stayed 0) and so that the forward pass, which also
    returns the posterior's KL, goes through the DDP wrapper.
    """

    def __init__(self, cfg: VAEModelConfig, image_size: int, logvar_init: float = 0.0) -> None:
        super().__init__()
        self.vae = build_vae(cfg, image_size)
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the reconstruction and the KL of the posterior to N(0, I), per sample."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        rec = self.vae.decode(z).sample
        return rec, posterior.kl()

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` in place (``nn.Module.compile``), all but the decoder's last
        convolution: the adaptive GAN weight takes gradients at its weight with ``retain_graph``
        (lib/models/losses.py). Outside the compiled graph those touch that one convolution; inside,
        each would run the whole compiled backward, which refuses ``retain_graph`` (its buffers
        are donated to the one backward pass it expects)."""
        conv_out = self.vae.decoder.conv_out
        conv_out.forward = torch.compiler.disable(conv_out.forward)
        super().compile(*args, **kwargs)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight: the adaptive GAN weight is measured here."""
        return self.vae.decoder.conv_out.weight


def _norm(channels: int) -> nn.Module:
    # GroupNorm rather than BatchNorm: per-sample statistics, so real and fake batches do not
    # mix and replicas on N processes stay identical without SyncBatchNorm.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` strided 4×4 convolutions, one stride-1 convolution, and a 1-channel
    logit map (one logit per receptive-field patch)."""

    def __init__(self, in_channels: int = 1, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = channels
        for i in range(1, n_layers):
            nxt = channels * min(2 ** i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), _norm(nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        nxt = channels * min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ch, nxt, 4, 1, 1, bias=False), _norm(nxt), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(nxt, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_discriminator(model_cfg: VAEModelConfig, loss_cfg: VAELossConfig) -> PatchDiscriminator:
    return PatchDiscriminator(model_cfg.out_channels, loss_cfg.disc_channels, loss_cfg.disc_layers)


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily stop gradients into ``module``'s parameters (inputs still get gradients)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
