"""A trained stage-2 model as a diffusers pipeline: ``RadioMapPipeline``, for handing models to
others and loading them with ``from_pretrained`` alone.

    from lib.evaluation.pipeline import RadioMapPipeline
    pipe = RadioMapPipeline.from_pretrained("models/radiomap-dpm")       # python -m lib.export wrote it
    maps = pipe(buildings, [(row, col)], steps=1)                          # (1, S, S) gray levels in [0, 1]

Its components: ``vae`` (the frozen stage-1 ``AutoencoderKL``, its ``scaling_factor`` the latent
scale the prior was trained with), ``unet`` (the prior's ``UNet2DModel``, EMA weights when the
run kept them), ``cond_encoder`` (:class:`RadioConditionEncoder`, a ``ModelMixin``), and
``scheduler`` (the objective's training noise schedule where it has one: DDPM's, rectified
flow's; none for RadioDiff's objective and the regression). Its config holds what the maps mean:
the objective (``prior.diffusion``, sampled by :mod:`lib.models.objectives`, the code that trained
it), the simulations (the class ids), the image size, the threshold, whether cars are an input.

It samples exactly as ``predict.py`` and ``evaluate.py`` do (the same batches and generator give
the same maps; a test checks it), since all three call :meth:`RadioMapPipeline.sample`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from lib.config import DiffusionConfig
from lib.data.condition import fill_condition
from lib.data.layout import cars_channels
from lib.data.measurements import with_measurements
from lib.evaluation.metrics import to_unit
from lib.evaluation.uncertainty import sample_stats
from lib.models.objectives import generate_maps, make_objective
from lib.models.prior import ConditionEncoder, LatentPrior, encoder_inputs


class RadioConditionEncoder(ConditionEncoder, ModelMixin, ConfigMixin):
    """The prior's condition encoder (:class:`lib.models.prior.ConditionEncoder`, the same weights and
    names) as a diffusers model: ``save_pretrained`` / ``from_pretrained`` with its config."""
    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: int = 64, downsample: int = 4, distance_channel: bool = True,
                 obstruction_channel: bool = True, measurements: bool = False) -> None:
        ConditionEncoder.__init__(self, channels, downsample,
                                  encoder_inputs(distance_channel, obstruction_channel, measurements))


class RadioMapPipeline(DiffusionPipeline):
    """Radio maps from building maps and transmitter positions (see the module docstring)."""
    model_cpu_offload_seq = "cond_encoder->unet->vae"
    _optional_components = ["scheduler"]

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, cond_encoder: RadioConditionEncoder,
                 scheduler: Any = None, diffusion: Optional[dict] = None, simulations: Optional[list] = None,
                 image_size: int = 256, threshold: float = 0.0, cars_input: Any = "auto", seed: int = 0,
                 measurements: Optional[dict] = None, db_range: Optional[list] = None) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, cond_encoder=cond_encoder, scheduler=scheduler)
        self.register_to_config(diffusion=diffusion or {}, simulations=list(simulations or []),
                                image_size=image_size, threshold=threshold, cars_input=cars_input, seed=seed,
                                measurements=measurements, db_range=list(db_range or [-127.0, -47.0]))

    # ------------------------------------------------------------------ what it samples with
    @property
    def objective(self):
        return make_objective(DiffusionConfig(**self.config.diffusion))

    @property
    def prior(self) -> LatentPrior:
        enc = self.cond_encoder.config
        return LatentPrior.from_parts(self.cond_encoder, self.unet, enc.distance_channel, enc.obstruction_channel,
                                      bool(enc.get("measurements", False)))

    @property
    def takes_measurements(self) -> bool:
        return bool(self.cond_encoder.config.get("measurements", False))

    def _maps(self, cond: torch.Tensor, sim_id: torch.Tensor, steps: Optional[int], sampler: Optional[str],
              generator: Optional[torch.Generator]) -> torch.Tensor:
        objective, measured = self.objective, self.config.measurements or {}
        sigma = float(measured.get("sigma", 2.0)) if measured.get("correct", True) else None
        return generate_maps(self.prior, self.vae, float(self.vae.config.scaling_factor), cond, sim_id, objective,
                             steps or objective.cfg.num_inference_steps, sampler, generator, sigma)

    def _gray(self, u: torch.Tensor, spread: bool = False) -> np.ndarray:
        """The metrics' [0, 1] scale -> gray levels (a spread: only scaled), (B, S, S) float32."""
        t = float(self.config.threshold)
        out = u.float().cpu().numpy()[:, 0] * (1.0 - t)
        return (out if spread else out + t).astype(np.float32)

    def sample(self, cond: torch.Tensor, sim_id: torch.Tensor, steps: Optional[int] = None,
               sampler: Optional[str] = None, generator: Optional[torch.Generator] = None) -> np.ndarray:
        """One batch: conditions ``cond`` ((B, 3, S, S) in [-1, 1], lib/data/condition.py; (B, 5, S, S)
        with the measurement channels, lib/data/measurements.py) and simulator ids -> (B, S, S) float32
        gray levels in [0, 1], the data's convention (``threshold`` undone)."""
        return self._gray(to_unit(self._maps(cond, sim_id, steps, sampler, generator).float()))

    def sample_spread(self, cond: torch.Tensor, sim_id: torch.Tensor, samples: int, steps: Optional[int] = None,
                      sampler: Optional[str] = None, generator: Optional[torch.Generator] = None
                      ) -> dict[str, np.ndarray]:
        """``samples`` maps per input, as :meth:`sample` draws them one after another: their ``mean``,
        ``std`` and quantiles ``q05``, ``q25``, ``q75``, ``q95`` (lib/evaluation/uncertainty.py), each
        (B, S, S) float32 gray levels."""
        draws = torch.stack([self._maps(cond, sim_id, steps, sampler, generator) for _ in range(samples)])
        return {k: self._gray(v, spread=k == "std") for k, v in sample_stats(draws).items()}

    def cars_needed(self, simulation: str) -> bool:
        """Whether the condition's third channel is the cars map for ``simulation`` (data.cars_input)."""
        return cars_channels([simulation], self.config.cars_input)[0]

    @torch.no_grad()
    def __call__(self, buildings: Any, tx: Any, cars: Any = None, simulation: Optional[str] = None,
                 steps: Optional[int] = None, sampler: Optional[str] = None,
                 generator: Optional[torch.Generator] = None, batch_size: int = 16) -> np.ndarray:
        """Radio maps for one or several cities.

        ``buildings``: a square 8-bit map (255 = building; ``numpy`` array or PIL image, at least
        the model's size, larger ones are resized), or a list of them. ``tx``: the transmitter's
        (row, column) pixel on that map, a list of them for one map (several radio maps of one
        city), or one per map for a list of maps. ``cars``: the cars map(s), for models that take
        cars as input. ``simulation``: which simulator's map (default: the first the model was
        trained on). Returns (N, S, S) float32 gray levels in [0, 1], one map per (city,
        transmitter), in order. ``generator``: the sampling noise (default: the training seed's)."""
        maps = [np.asarray(b) for b in (buildings if isinstance(buildings, (list, tuple)) else [buildings])]
        car_maps = None if cars is None else [np.asarray(c) for c in (cars if isinstance(cars, (list, tuple))
                                                                       else [cars])]
        pairs = [tuple(tx)] if len(maps) == 1 and np.ndim(tx) == 1 else [tuple(p) for p in tx]
        if len(maps) > 1 and len(pairs) != len(maps):
            raise ValueError(f"{len(maps)} maps need {len(maps)} transmitters (one per map), got {len(pairs)}")
        sims = list(self.config.simulations)
        simulation = simulation or sims[0]
        if simulation not in sims:
            raise ValueError(f"simulation {simulation!r}: this model knows {', '.join(sims)}")
        cars_needed = self.cars_needed(simulation)
        if cars_needed and car_maps is None:
            raise ValueError(f"this model takes the cars map as input for {simulation}: pass cars=")
        size = int(self.config.image_size)
        generator = generator or torch.Generator().manual_seed(int(self.config.seed))
        device = self.unet.device
        out = []
        for start in range(0, len(pairs), batch_size):
            chunk = range(start, min(start + batch_size, len(pairs)))
            cond = np.empty((len(chunk), 3, size, size), dtype=np.float32)
            for k, i in enumerate(chunk):
                city = maps[i if len(maps) > 1 else 0]
                car = car_maps[i if len(car_maps) > 1 else 0] if cars_needed else None
                fill_condition(cond[k], city.astype(np.uint8), None if car is None else car.astype(np.uint8),
                               pairs[i], city.shape)
            sim_id = torch.full((len(chunk),), sims.index(simulation), device=device)
            c = torch.from_numpy(cond).to(device)
            if self.takes_measurements:          # none here: predict.py --measurements gives them
                c = with_measurements(c, None, None)
            out.append(self.sample(c, sim_id, steps, sampler, generator))
        return np.concatenate(out)


def pipeline_from_checkpoint(folder: Path, device: torch.device | str = "cpu") -> RadioMapPipeline:
    """The pipeline of a stage-2 checkpoint folder: its VAE copy (with the latent scale), the
    prior with its EMA weights when saved, the objective and the data conventions of its config."""

    from lib.config import load_config
    from lib.train import checkpoint as ckpt
    from lib.train.weights import load_prior, load_prior_vae
    info = ckpt.resolve(str(folder), Path(folder).parent, option="--checkpoint")
    cfg = load_config(info.path / "config.yaml")
    loaded = load_prior_vae(info, cfg, device)
    loaded.vae.register_to_config(scaling_factor=float(info.state["latent_scale"]))
    trained = list(info.state["simulations"])
    prior, _ = load_prior(info.path, cfg, loaded.downsample, len(trained), device)
    pm = cfg.prior.model
    measured = cfg.prior.measurements.count is not None
    encoder = RadioConditionEncoder(pm.cond_channels, loaded.downsample, pm.distance_channel, pm.obstruction_channel,
                                    measured)
    encoder.load_state_dict(prior.cond_encoder.state_dict())
    encoder.requires_grad_(False).eval().to(device)
    objective = make_objective(cfg.prior.diffusion)
    return RadioMapPipeline(loaded.vae, prior.unet, encoder, objective.pipeline_scheduler(), dataclasses.asdict(cfg.prior.diffusion),
                            trained, cfg.data.image_size, cfg.data.threshold, cfg.data.cars_input, cfg.seed,
                            dataclasses.asdict(cfg.prior.measurements) if measured else None, cfg.data.db_range)
