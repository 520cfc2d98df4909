"""What the stage-2 prior (:mod:`lib.models.prior`) learns, and how a latent is sampled from it:
``prior.diffusion.objective``. Each objective gives the training loss (:meth:`Objective.loss`)
and a sampler (:meth:`Objective.sample`); the maps follow by decoding (:func:`generate_maps`).
:data:`REGISTRY` maps each name to its class, which says its samplers and the
``prior.diffusion`` keys it reads: the config's check (:func:`check_diffusion`), evaluate.py's
and predict.py's ``--sampler`` and the tests read it, so a new objective is one class here,
decorated with :func:`register`, plus its test.

- ``ddpm``: DDPM latent diffusion (diffusers' ``DDPMScheduler``); the UNet predicts the noise,
  the velocity or the clean latent (``prediction_type``), sampled with DDIM or DPM-Solver++
  (``sampler``), both with "trailing" spacing, so that one step starts from pure noise.
- ``radiodiff``: RadioDiff's decoupled diffusion. Continuous ``t`` in (0, 1], drawn from
  U(``time_eps``, 1); ``x_t = x0 + C t + sqrt(t) eps`` with ``C = -x0`` (so ``x_1 = eps``). The
  UNet predicts both ``C`` and ``eps`` (twice the latent channels). Loss
  ``w1(t) |C^ - C|^2 + w2(t) |eps^ - eps|^2`` (means over the latent), with RadioDiff's
  ``w1 = 2 e^(1 - t)``, ``w2 = e^sqrt(t)`` (``radiodiff_weighting``; else 1), and with
  ``radiodiff_loss: l1_l2`` its variant ``(w1 (L2 + L1)_C + w2 (L2 + L1)_eps) / 2``.
  ``x0^ = x_t - C^ t - sqrt(t) eps^``. Its sampler goes from t = 1 to 0 in K equal steps ``s``:
  ``x_{t-s} = x_t + s x0^ - (s / sqrt(t)) eps^ + sqrt(s (t - s) / t) z`` (RadioDiff's update with
  the corrected drift ``-x0^`` and fresh noise ``z``); the last step returns ``x0^``, so K = 1
  is one network evaluation.
- ``flow``: rectified flow. ``x_t = (1 - t) x0 + t eps``, t ~ U(0, 1), the UNet predicts the
  velocity ``eps - x0``; sampled from t = 1 to 0 in K steps by diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (``sampler: euler``; one evaluation per step) or
  ``FlowMatchHeunDiscreteScheduler`` (``heun``; two per step but the last).
- ``regression``: the same network given no noise (zeros in the latent's place, t = 0)
  predicts the clean latent in one forward pass, trained on the squared error: the ablation
  that says what the diffusion adds.

Written from the equations in the RadioDiff paper and the others cited; the
continuous ``t`` reaches the UNet as ``t * 1000``, the range of its discrete timesteps.
Training draws noise and times from the global RNG (restored on resume); validation and
evaluation pass a generator of their own.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from lib.config import DiffusionConfig
from lib.data.measurements import correct
from lib.errors import ConfigError, UserError
from lib.models.latents import decode_latents

TIME_SCALE = 1000.0          # continuous t in (0, 1] -> the UNet's timestep t * 1000
# Keys every objective reads; each class adds its own in ``reads``.
COMMON_KEYS = ("objective", "sampler", "num_inference_steps")


def _noise(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _uniform(n: int, low: float, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``n`` times drawn from U(low, 1) (on the generator's device, then moved)."""
    u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
    return (low + (1.0 - low) * u).to(device)


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).mean(dim=1)


class Objective:
    """A stage-2 objective (see the module docstring); its subclasses are in :data:`REGISTRY`."""
    name: str                          # prior.diffusion.objective
    samplers: tuple[str, ...]          # prior.diffusion.sampler / --sampler values, the default first
    reads: tuple[str, ...] = ()        # the prior.diffusion keys it reads besides COMMON_KEYS
    outputs = 1              # predictions per latent channel (the UNet's out_channels factor)
    iterative = True         # False: one forward pass whatever the number of steps
    stochastic = True        # False: the same map every draw (evaluate.py --samples K draws one)

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg

    def loss(self, prior: nn.Module, latents: torch.Tensor, cond: torch.Tensor, sim_id: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, prior: nn.Module, cond: torch.Tensor, sim_id: torch.Tensor, steps: int,
               sampler: Optional[str] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents for ``cond`` / ``sim_id``."""
        raise NotImplementedError

    def evaluations(self, steps: int, sampler: Optional[str] = None) -> int:
        """Network evaluations of :meth:`sample` with ``steps``."""
        return steps

    def pipeline_scheduler(self) -> Optional[object]:
        """The diffusers scheduler saved with an exported pipeline (None: its sampler is its own)."""
        return None

    @staticmethod
    def _start(prior: nn.Module, cond: torch.Tensor, generator: Optional[torch.Generator]) -> tuple:
        shape = (cond.shape[0], prior.latent_channels, prior.latent_size, prior.latent_size)
        x = randn_tensor(shape, generator=generator, device=cond.device, dtype=cond.dtype)
        return x, prior.encode_cond(cond)            # the condition's features, once per sample


REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Add an objective to :data:`REGISTRY` under its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


@register
class DDPM(Objective):
    name, samplers = "ddpm", ("ddim", "dpm")
    reads = ("num_train_timesteps", "beta_schedule", "prediction_type")

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__(cfg)
        # clip_sample off: scaled latents have unit variance, not a [-1, 1] range.
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                       prediction_type=cfg.prediction_type, clip_sample=False)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        return latents                                     # "sample"

    def loss(self, prior, latents, cond, sim_id, generator=None):
        """Mean squared error of the prediction at uniformly drawn timesteps."""
        noise = _noise(latents, generator)
        t = torch.randint(0, self.cfg.num_train_timesteps, (latents.shape[0],), generator=generator,
                          device=generator.device if generator is not None else latents.device).to(latents.device)
        pred = prior(self.scheduler.add_noise(latents, noise, t), t, cond, sim_id)
        return F.mse_loss(pred.float(), self.target(latents, noise, t).float())

    def sampling_scheduler(self, sampler: Optional[str] = None) -> DDIMScheduler | DPMSolverMultistepScheduler:
        """A fresh sampler (they keep per-run state) on the training noise schedule."""
        base = self.scheduler.config
        name = sampler or self.cfg.sampler or self.samplers[0]
        if name == "ddim":
            return DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=False,
                                             set_alpha_to_one=True, steps_offset=0)
        if name == "dpm":
            return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2,
                                                           timestep_spacing="trailing")
        raise ValueError(f"unknown sampler {name!r} for ddpm; expected ddim or dpm")

    @torch.no_grad()
    def sample(self, prior, cond, sim_id, steps, sampler=None, generator=None):
        sched = self.sampling_scheduler(sampler)
        sched.set_timesteps(steps, device=cond.device)
        z, features = self._start(prior, cond, generator)
        z = z * sched.init_noise_sigma
        for t in sched.timesteps:
            out = prior.denoise(sched.scale_model_input(z, t), t.expand(z.shape[0]), features, sim_id)
            # float32 in: the schedulers cast their state to the model output's dtype (bf16 under autocast)
            z = sched.step(out.float(), t, z, generator=generator).prev_sample
        return z

    def pipeline_scheduler(self):
        return self.scheduler


@register
class RadioDiff(Objective):
    name, samplers = "radiodiff", ("radiodiff",)
    reads = ("radiodiff_weighting", "radiodiff_loss", "time_eps")
    outputs = 2              # C and eps

    def weights(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cfg.radiodiff_weighting:
            return torch.ones_like(t), torch.ones_like(t)
        return 2.0 * torch.exp(1.0 - t), torch.exp(t.sqrt())

    @staticmethod
    def forward_process(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = x0 + C t + sqrt(t) eps`` with ``C = -x0``; ``t`` of shape (B,)."""
        tt = t.view(-1, 1, 1, 1).to(x0.dtype)
        return x0 + (-x0) * tt + tt.sqrt() * noise

    @staticmethod
    def reconstruct(x_t: torch.Tensor, t: torch.Tensor, c_hat: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """``x0^ = x_t - C^ t - sqrt(t) eps^``."""
        tt = t.view(-1, 1, 1, 1).to(x_t.dtype)
        return x_t - c_hat * tt - tt.sqrt() * eps_hat

    def loss(self, prior, latents, cond, sim_id, generator=None):
        noise = _noise(latents, generator)
        t = _uniform(latents.shape[0], self.cfg.time_eps, latents.device, generator)
        c_hat, eps_hat = prior(self.forward_process(latents, t, noise), t * TIME_SCALE, cond, sim_id).chunk(2, dim=1)
        w1, w2 = self.weights(t)
        c_err, eps_err = c_hat.float() - (-latents).float(), eps_hat.float() - noise.float()
        loss = w1 * _per_sample(c_err ** 2) + w2 * _per_sample(eps_err ** 2)
        if self.cfg.radiodiff_loss == "l1_l2":
            loss = 0.5 * (loss + w1 * _per_sample(c_err.abs()) + w2 * _per_sample(eps_err.abs()))
        return loss.mean()

    @torch.no_grad()
    def sample(self, prior, cond, sim_id, steps, sampler=None, generator=None):
        x, features = self._start(prior, cond, generator)
        b, s, t = x.shape[0], 1.0 / steps, 1.0
        for k in range(steps):
            tt = torch.full((b,), t, device=x.device)
            c_hat, eps_hat = prior.denoise(x, tt * TIME_SCALE, features, sim_id).chunk(2, dim=1)
            x0 = self.reconstruct(x, tt, c_hat, eps_hat)
            if k == steps - 1:
                return x0
            t_next = max(t - s, 0.0)
            x = x + s * x0 - (s / math.sqrt(t)) * eps_hat + math.sqrt(s * t_next / t) * _noise(x, generator)
            t = t_next
        return x


@register
class Flow(Objective):
    name, samplers = "flow", ("euler", "heun")

    def loss(self, prior, latents, cond, sim_id, generator=None):
        noise = _noise(latents, generator)
        t = _uniform(latents.shape[0], 0.0, latents.device, generator)
        tt = t.view(-1, 1, 1, 1).to(latents.dtype)
        pred = prior((1.0 - tt) * latents + tt * noise, t * TIME_SCALE, cond, sim_id)
        return F.mse_loss(pred.float(), (noise - latents).float())

    def scheduler(self, sampler: Optional[str] = None):
        name = sampler or self.cfg.sampler or self.samplers[0]
        cls = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}.get(name)
        if cls is None:
            raise ValueError(f"unknown sampler {name!r} for flow; expected euler or heun")
        return cls(num_train_timesteps=int(TIME_SCALE))

    def evaluations(self, steps, sampler=None):
        return steps if (sampler or self.cfg.sampler or self.samplers[0]) == "euler" else 2 * steps - 1

    def pipeline_scheduler(self):
        return self.scheduler()

    @torch.no_grad()
    def sample(self, prior, cond, sim_id, steps, sampler=None, generator=None):
        sched = self.scheduler(sampler)
        sched.set_timesteps(steps, device=cond.device)
        x, features = self._start(prior, cond, generator)
        for t in sched.timesteps:
            v = prior.denoise(x, t.expand(x.shape[0]), features, sim_id)
            x = sched.step(v.float(), t, x).prev_sample.to(x.dtype)     # float32 state (see DDPM.sample)
        return x


@register
class Regression(Objective):
    name, samplers = "regression", ("one forward pass",)
    iterative = stochastic = False

    @staticmethod
    def _inputs(like_shape, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(like_shape, device=device, dtype=dtype), torch.zeros(like_shape[0], device=device)

    def loss(self, prior, latents, cond, sim_id, generator=None):
        z, t = self._inputs(latents.shape, latents.device, latents.dtype)
        return F.mse_loss(prior(z, t, cond, sim_id).float(), latents.float())

    def evaluations(self, steps, sampler=None):
        return 1

    @torch.no_grad()
    def sample(self, prior, cond, sim_id, steps, sampler=None, generator=None):
        shape = (cond.shape[0], prior.latent_channels, prior.latent_size, prior.latent_size)
        z, t = self._inputs(shape, cond.device, cond.dtype)
        return prior(z, t, cond, sim_id)


def check_diffusion(cfg: DiffusionConfig) -> type[Objective]:
    """``prior.diffusion.objective`` and ``sampler`` against :data:`REGISTRY` (one-line errors)."""
    cls = REGISTRY.get(cfg.objective)
    if cls is None:
        raise ConfigError(f"prior.diffusion.objective: {cfg.objective!r} is not an objective; expected one of "
                          f"{', '.join(REGISTRY)}")
    if cfg.sampler is not None and cfg.sampler not in cls.samplers:
        raise ConfigError(f"prior.diffusion.sampler: {cfg.sampler!r} is not a sampler of objective {cls.name}; "
                          f"expected null or {' or '.join(cls.samplers)}")
    return cls


def make_objective(cfg: DiffusionConfig) -> Objective:
    return check_diffusion(cfg)(cfg)


def choose_sampler(cfg: DiffusionConfig, requested: Optional[str]) -> str:
    """The sampler of a run: ``--sampler`` (one of the objective's), else the config's, else the
    objective's default."""
    cls = check_diffusion(cfg)
    if requested is not None and requested not in cls.samplers:
        raise UserError(f"--sampler {requested}: objective {cls.name} samples with {' or '.join(cls.samplers)}")
    return requested or cfg.sampler or cls.samplers[0]


@torch.no_grad()
def generate_maps(prior: nn.Module, vae: AutoencoderKL, latent_scale: float, cond: torch.Tensor,
                  sim_id: torch.Tensor, objective: Objective, steps: Optional[int] = None,
                  sampler: Optional[str] = None, generator: Optional[torch.Generator] = None,
                  correct_sigma: Optional[float] = None) -> torch.Tensor:
    """The full stage-2 pipeline: condition -> sampled latent -> VAE decode; maps in [-1, 1]. With
    measurements in ``cond`` and ``correct_sigma``, the measurements then correct the decoded map
    (:func:`lib.data.measurements.correct`)."""
    z = objective.sample(prior, cond, sim_id, steps or objective.cfg.num_inference_steps, sampler, generator)
    maps = decode_latents(vae, z / latent_scale)
    if correct_sigma and getattr(prior, "measurements", False):
        maps = correct(maps, cond, correct_sigma)
    return maps
