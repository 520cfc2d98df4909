"""The reference trainer's stage-1 step (RadioDiff's ``train_vae.py`` with the LDM loss),
rebuilt from this toolkit's pieces so that ``bench.py`` can time it next to ours at the same
config, in the same process.

Per step, fp32 and eager, PNG data: a generator update (a full VAE forward; the
discriminator's logits and the adaptive weight computed even before ``disc_start``, where
they are multiplied by ``disc_factor = 0``; backward; step) and a discriminator update with a
second full VAE forward of the same batch; gradient clipping after the optimizer steps (no
effect), and ``.item()`` of every logged value each step. (The discriminator's two calls are
batched into one, which favours the reference slightly.) Its generator optimizer holds the
VAE only: the reference's learned ``logvar`` was in no optimizer.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from accelerate.utils import set_seed

from lib.config import Config
from lib.data.batching import train_batches
from lib.data.dataset import RadioMapDataset
from lib.models.losses import adaptive_weight, discriminator_loss, generator_loss, grad_norm_at, load_perceptual
from lib.models.vae import VAEWithLogvar, build_discriminator
from lib.train.schedule import build_scheduler


class ReferenceVAE:
    """The reference step (see the module docstring); ``step(phase, disc_active)``."""

    def __init__(self, cfg: Config, device: torch.device, dataset: RadioMapDataset) -> None:
        self.cfg, self.device = cfg, device
        train_cfg, loss_cfg = cfg.vae.train, cfg.vae.loss
        set_seed(cfg.seed)
        self.gen = VAEWithLogvar(cfg.vae.model, cfg.data.image_size, loss_cfg.logvar_init).to(device)
        self.disc = build_discriminator(cfg.vae.model, loss_cfg).to(device)
        self.perceptual = load_perceptual(loss_cfg)
        if self.perceptual is not None:
            self.perceptual.to(device)
        # RadioDiff's trainer: torch's AdamW with its default implementation (a loop over the
        # parameters on the CPU, foreach on a GPU), not the toolkit's fused one.
        adamw = lambda ps: torch.optim.AdamW(ps, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas),  # noqa: E731
                                             weight_decay=train_cfg.weight_decay)
        self.opt_g, self.opt_d = adamw(self.gen.vae.parameters()), adamw(self.disc.parameters())
        self.sched_g, self.sched_d = build_scheduler(self.opt_g, train_cfg), build_scheduler(self.opt_d, train_cfg)
        self.params = list(self.gen.parameters()) + list(self.disc.parameters())
        self.data = train_batches(dataset, cfg.batch_size("vae"), cfg.seed, num_workers=cfg.data.num_workers)

    def step(self, t: Callable[[str], ContextManager] = lambda name: nullcontext(), disc_active: bool = False) -> None:
        loss_cfg = self.cfg.vae.loss
        disc_factor = 1.0 if disc_active else 0.0          # the reference's adopt_weight
        with t("data"):
            x = next(self.data)["image"].to(self.device)
        # generator update
        with t("forward"):
            rec, kl = self.gen(x)
            base = generator_loss(x, rec, kl, self.gen.logvar, loss_cfg, False, perceptual=self.perceptual)
            g_loss = -self.disc(rec).mean()             # the discriminator is not frozen here
            # base.total = nll + kl_weight * kl; the KL has no gradient at the decoder's last
            # layer, so this is the reference's adaptive weight of the NLL.
            d_weight = adaptive_weight(grad_norm_at(base.total, self.gen.last_layer),
                                       grad_norm_at(g_loss, self.gen.last_layer), loss_cfg.disc_weight)
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
                    float(v.detach())
