"""The stage-1 VAE-GAN loss (the LDM / taming recipe, with the reference trainer's defects fixed).

Generator objective, per batch::

    rec      = l1_weight * |x - x̂| + l2_weight * (x - x̂)² (+ perceptual_weight * P(x, x̂))
    nll      = rec / exp(logvar) + logvar          (summed over pixels, mean over the batch)
    kl       = KL(q(z|x) || N(0, I))               (summed over latent, mean over the batch)
    g_loss   = -mean(D(x̂))
    d_weight = disc_weight * clamp(||∇nll|| / (||∇g_loss|| + 1e-4), 0, 1e4)   (decoder's last layer)
    total    = nll + kl_weight * kl + disc_factor * d_weight * g_loss

``disc_factor`` is 0 until ``disc_start`` optimizer steps are done and 1 afterwards.

The discriminator runs once per generator update, on a detached copy of x̂: its gradient at
x̂, ``∂g_loss/∂x̂``, gives both ``||∇g_loss||`` at the last layer and, pulled back through the
VAE with ``d_weight``, the GAN term's gradient (the same gradient as backpropagating
``d_weight * g_loss``; the logged ``total`` is the same number). So no backward pass runs twice
through the discriminator, and none is taken with ``retain_graph`` through a compiled graph
(``torch.compile`` refuses that; the decoder's last convolution stays outside the compiled
graph, lib/models/vae.py). Because
the last term enters only after the switch (and can be large and negative), ``total`` is not
comparable across the switch; ``rec_loss`` (the per-pixel mean of ``rec``) is.

Discriminator objective (hinge): ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x̂.detach()))))``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lib.config import VAELossConfig
from lib.errors import ConfigError

ADAPTIVE_WEIGHT_MAX = 1e4
# The discriminator's gradient at x̂ is taken of 2^10 * g_loss and divided back: exact in binary
# floating point, and it keeps fp16's small per-pixel gradients above the format's floor.
GAN_GRAD_SCALE = 2.0 ** 10


@dataclass
class GeneratorLoss:
    total: torch.Tensor
    logs: dict[str, Optional[torch.Tensor]]   # detached, for logging


def load_perceptual(cfg: VAELossConfig) -> Optional[nn.Module]:
    """The perceptual network, or None when the term is off.

    Nothing can be downloaded, so the user names the network and its local weights:
    ``vae.loss.perceptual_network`` is ``"package.module:factory"``, a callable returning an
    ``nn.Module`` that takes two (B, 3, H, W) images in [-1, 1] and returns a per-sample
    distance (B,) or (B, 1, 1, 1), e.g. an LPIPS implementation; ``perceptual_weights`` is
    its state dict as safetensors. The network is frozen.
    """
    if cfg.perceptual_weight <= 0:
        return None
    target = str(cfg.perceptual_network)
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"vae.loss.perceptual_network = {target!r}: cannot import it "
                          f"(expected 'package.module:factory' on the Python path)") from None
    path = Path(str(cfg.perceptual_weights))
    if not path.is_file():
        raise ConfigError(f"vae.loss.perceptual_weights = {str(path)!r}: file not found "
                          f"(the network's .safetensors weights; or set vae.loss.perceptual_weight: 0)")
    net = factory()
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"vae.loss.perceptual_weights = {str(path)!r}: does not fit "
                          f"{target} ({first[:160]})") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def reconstruction_map(x: torch.Tensor, rec: torch.Tensor, cfg: VAELossConfig,
                       perceptual: Optional[nn.Module] = None) -> torch.Tensor:
    """Per-pixel reconstruction loss (B, C, H, W)."""
    diff = x.float() - rec.float()
    out = cfg.l1_weight * diff.abs() + cfg.l2_weight * diff.pow(2)
    if perceptual is not None:
        rgb = lambda t: t.float().expand(-1, 3, -1, -1) if t.shape[1] == 1 else t.float()
        p = perceptual(rgb(x), rgb(rec)).reshape(x.shape[0], 1, 1, 1)
        out = out + cfg.perceptual_weight * p
    return out


def grad_norm_at(output: torch.Tensor, weight: torch.Tensor, grad_output: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """``||∂output/∂weight||`` (with ``grad_output``: of the vector-Jacobian product), keeping the
    graph for the backward pass that follows."""
    return torch.autograd.grad(output, weight, grad_output, retain_graph=True)[0].norm()


def adaptive_weight(nll_grad_norm: torch.Tensor, g_grad_norm: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """``disc_weight * clamp(||∇nll|| / (||∇g|| + 1e-4), 0, 1e4)`` from the two gradient norms at
    the decoder's last layer; detached."""
    w = nll_grad_norm / (g_grad_norm + 1e-4)
    return torch.clamp(w, 0.0, ADAPTIVE_WEIGHT_MAX).detach() * disc_weight


def generator_loss(x: torch.Tensor, rec: torch.Tensor, kl: torch.Tensor, logvar: torch.Tensor,
                   cfg: VAELossConfig, disc_active: bool,
                   disc: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   last_layer: Optional[torch.Tensor] = None,
                   perceptual: Optional[nn.Module] = None) -> GeneratorLoss:
    """The generator's total loss and its logged components (see the module docstring).

    ``disc`` is only called when ``disc_active``; the caller passes it with its parameters
    frozen. It sees a detached copy of ``rec``, so the generator's backward pass never enters
    the discriminator; the GAN term's gradient reaches the VAE through ``rec``.
    """
    batch = x.shape[0]
    rec_map = reconstruction_map(x, rec, cfg, perceptual)
    nll_loss = (rec_map / torch.exp(logvar) + logvar).sum() / batch
    kl_loss = kl.sum() / batch
    total = nll_loss + cfg.kl_weight * kl_loss
    # Detached tensors, not floats: .item() would synchronise with the GPU every step.
    logs: dict[str, Optional[torch.Tensor]] = {
        "rec_loss": rec_map.detach().mean(),
        "nll_loss": nll_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "logvar": logvar.detach().float(),
        "disc_factor": torch.tensor(1.0 if disc_active else 0.0, device=x.device),
        "g_loss": None,
        "d_weight": None,
    }
    if disc_active and cfg.disc_weight > 0:
        assert disc is not None and last_layer is not None
        if torch.is_grad_enabled():
            fake = rec.detach().requires_grad_(True)
            g_loss = -disc(fake).float().mean()
            g_scaled = torch.autograd.grad(g_loss * GAN_GRAD_SCALE, fake)[0]    # ∂g_loss/∂x̂: one pass, graph freed
            d_weight = adaptive_weight(grad_norm_at(nll_loss, last_layer),
                                       grad_norm_at(rec, last_layer, g_scaled) / GAN_GRAD_SCALE, cfg.disc_weight)
            g_rec = g_scaled.float() / GAN_GRAD_SCALE
            pull = (rec.float() * g_rec).sum()                         # its gradient: g_rec through the VAE
            total = total + d_weight * (g_loss.detach() + pull - pull.detach())   # value d_weight * g_loss
        else:  # validation: no graph to differentiate
            g_loss = -disc(rec).float().mean()
            d_weight = torch.tensor(0.0, device=x.device)
            total = total + d_weight * g_loss
        logs["g_loss"] = g_loss.detach()
        logs["d_weight"] = d_weight
    logs["total_loss"] = total.detach()
    return GeneratorLoss(total, logs)


def discriminator_loss(disc: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge loss on real ``x`` and detached ``rec``, in one discriminator call (one DDP forward)."""
    logits = disc(torch.cat([x, rec.detach()], dim=0)).float()
    real, fake = logits.chunk(2, dim=0)
    loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return loss, {"disc_loss": loss.detach(), "logits_real": real.detach().mean(),
                  "logits_fake": fake.detach().mean()}
