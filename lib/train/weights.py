"""Trained weights: a stage's checkpoint found (``best`` | ``latest`` | a folder) and its models
loaded for use, frozen, with their EMA weights when the checkpoint has them.

Importable without the training loop: nothing here touches optimizers, resume or faults, so
evaluation, prediction and stage 2 load a model the same way. A missing checkpoint, or one
whose weights do not fit the configured model, is a one-line :class:`CheckpointError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from lib.config import Config
from lib.errors import CheckpointError
from lib.models.objectives import make_objective
from lib.models.prior import COND_ENCODER_FILE, UNET_DIR, LatentPrior
from lib.models.vae import build_vae
from lib.train import checkpoint as ckpt
from lib.train.ema import EMA_FILE

VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
PRIOR_WEIGHTS = f"{UNET_DIR}/diffusion_pytorch_model.safetensors"
# stage -> (what it is called, the script that trains it, the file every checkpoint of it has)
STAGES = {"vae": ("stage-1 VAE", "train_vae.py", VAE_WEIGHTS),
          "prior": ("stage-2", "train_unified_prior.py", PRIOR_WEIGHTS)}


def _disc_start(info: ckpt.CheckpointInfo) -> Optional[int]:
    """The ``vae.loss.disc_start`` a stage-1 checkpoint was trained with (None: GAN off)."""
    try:
        loss = (yaml.safe_load((info.path / "config.yaml").read_text(encoding="utf-8")) or {})["vae"]["loss"]
        return int(loss["disc_start"]) if loss.get("disc_weight", 0.5) > 0 else None
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def resolve_trained(stage: str, spec: str, output_dir: str | Path, flags: str = "--config CONFIG",
                    option: str = "--checkpoint", warn: Callable[[str], None] = print) -> ckpt.CheckpointInfo:
    """``best`` | ``latest`` (under ``{output_dir}/{stage}/checkpoints``) | a folder -> a
    complete checkpoint of ``stage`` (:func:`lib.train.checkpoint.resolve`); ``option`` is how
    the user named it and ``flags`` the user's own ``--config`` / ``--set`` (:attr:`Config.flags`),
    repeated in the hint. ``best`` of a stage-1 run that went past ``disc_start`` considers only
    the checkpoints after it: the reconstruction loss favours the checkpoints before the GAN term."""
    name, script, weights = STAGES[stage]
    ckpt_dir = Path(output_dir) / stage / "checkpoints"
    infos = ckpt.list_checkpoints(ckpt_dir, lambda message: None) if spec == "best" and stage == "vae" else []
    return ckpt.resolve(spec, ckpt_dir, warn, option, what=f"{name} ", weights=weights,
                        hint=f"run `{' '.join(['python', script] + ([flags] if flags else []))}` first",
                        best_after=_disc_start(infos[-1]) if infos else None)


def stage1_checkpoint(cfg: Config, resume: Optional[ckpt.CheckpointInfo] = None,
                      warn: Callable[[str], None] = print) -> ckpt.CheckpointInfo:
    """The stage-1 checkpoint a prior trains on: ``prior.vae_checkpoint``, or for a resumed
    prior the one it was trained on (which must still be there, intact)."""
    if resume is None:
        return resolve_trained("vae", cfg.prior.vae_checkpoint, cfg.output_dir, cfg.flags,
                               "prior.vae_checkpoint", warn)
    path = Path(resume.state["vae_checkpoint"])
    if ckpt.check_complete(path, verify=True) is not None:
        raise CheckpointError(f"{resume.path} was trained on the VAE checkpoint {path}, which is gone or "
                              f"incomplete; the prior cannot continue without it")
    return ckpt.CheckpointInfo(path, int(ckpt.read_state(path)["step"]), ckpt.read_state(path))


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                 hint: str) -> None:
    """Load ``tensors`` into ``module``: every key of its state dict must be there with its
    shape, and nothing else; otherwise a one-line :class:`CheckpointError` naming the first
    difference, ``source`` and ``hint`` (what to do about it)."""
    own = module.state_dict()
    problems = [f"{k}: missing" for k in own if k not in tensors]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} there, {tuple(v.shape)} in this config"
                 for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    problems += [f"{k}: not in this model" for k in tensors if k not in own]
    if problems:
        raise CheckpointError(f"{source}: the weights do not match the configured model "
                              f"({problems[0]}; {len(problems)} difference(s)); {hint}")
    module.load_state_dict(tensors)


def read_weights(folder: Path, files: dict[str, str], use_ema: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of ``files`` ({key prefix: safetensors file under ``folder``}) with their
    prefixes, and over them the checkpoint's EMA weights (keyed like the trained module) when
    it has them and ``use_ema``. Returns the tensors and whether EMA weights were used."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, rel in files.items():
        tensors.update({prefix + k: v for k, v in load_file(str(folder / rel)).items()})
    ema = use_ema and (folder / EMA_FILE).is_file()
    if ema:
        tensors.update(load_file(str(folder / EMA_FILE)))
    return tensors, ema


@dataclass
class LoadedVAE:
    vae: AutoencoderKL
    path: Path                  # the step-N checkpoint folder
    ema: bool                   # whether its EMA weights were used

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along a side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_vae(folder: Path, cfg: Config, device: torch.device | str = "cpu", use_ema: bool = True) -> LoadedVAE:
    """The VAE of stage-1 checkpoint ``folder`` (or the one exported into a stage-2 checkpoint,
    with ``use_ema`` False), built as ``cfg.vae.model`` says, frozen, in eval mode."""
    if not (folder / VAE_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: no {VAE_WEIGHTS} (not a stage-1 VAE checkpoint; "
                              f"prior.vae_checkpoint must point at train_vae.py's checkpoints)")
    vae = build_vae(cfg.vae.model, cfg.data.image_size)
    tensors, ema = read_weights(folder, {"": VAE_WEIGHTS}, use_ema)
    load_weights(vae, tensors, str(folder), "set vae.model as in that checkpoint's config.yaml, "
                                            "or point prior.vae_checkpoint at a matching one")
    vae.requires_grad_(False).eval().to(device)
    return LoadedVAE(vae, folder, ema)


def load_prior_vae(info: ckpt.CheckpointInfo, cfg: Config, device: torch.device | str = "cpu") -> LoadedVAE:
    """The VAE a stage-2 checkpoint was trained with: the copy exported into it (``vae/``, with
    its ``scaling_factor``), or for older checkpoints its stage-1 checkpoint."""
    if (info.path / VAE_WEIGHTS).is_file():
        loaded = load_vae(info.path, cfg, device, use_ema=False)
        loaded.ema = bool(info.state.get("vae_ema"))
        return loaded
    return load_vae(Path(info.state["vae_checkpoint"]), cfg, device)


def load_prior(folder: Path, cfg: Config, downsample: int, num_simulations: int,
               device: torch.device | str = "cpu", use_ema: bool = True,
               measurements: Optional[bool] = None) -> tuple[LatentPrior, bool]:
    """The prior of stage-2 checkpoint ``folder``, built as ``cfg.prior.model`` says (and taking
    measurements as ``measurements`` says; None: as ``cfg``), frozen, in eval mode (its EMA weights
    when saved and ``use_ema``); and whether EMA was used."""
    if measurements is None:
        measurements = cfg.prior.measurements.count is not None
    prior = LatentPrior(cfg.prior.model, cfg.vae.model.latent_channels, cfg.data.image_size,
                        downsample, num_simulations, make_objective(cfg.prior.diffusion).outputs, measurements)
    tensors, ema = read_weights(folder, {"unet.": PRIOR_WEIGHTS, "cond_encoder.": COND_ENCODER_FILE}, use_ema)
    load_weights(prior, tensors, str(folder), "set prior.model as in that checkpoint's config.yaml")
    prior.requires_grad_(False).eval().to(device)
    return prior, ema
