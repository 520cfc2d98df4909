"""The exponential moving average of a model's weights (diffusers' ``EMAModel``): made, used
for validation, saved next to the model and restored on resume.

Saved as a safetensors state dict keyed like the module's parameters
(``ema.safetensors``), so that loading trained weights (:mod:`lib.train.weights`) can put the EMA
weights over the raw ones with a plain dict update.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from lib.config import TrainConfig
from lib.errors import CheckpointError

EMA_FILE = "ema.safetensors"


def make_ema(module: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optional[EMAModel]:
    """An EMA of ``module``'s parameters when ``cfg.ema`` is on (None otherwise). Made after
    ``accelerator.prepare``, so on N processes it starts from the synchronised weights."""
    if not cfg.ema:
        return None
    ema = EMAModel(module.parameters(), decay=cfg.ema_decay, foreach=True)   # one kernel for all, not one each
    ema.to(device)
    return ema


def ema_state_dict(ema: EMAModel, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights keyed like ``module``'s parameters (CPU, contiguous: for saving)."""
    names = [n for n, _ in module.named_parameters()]
    return {n: p.detach().contiguous().cpu() for n, p in zip(names, ema.shadow_params)}


def ema_files(ema: Optional[EMAModel], module: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """What a checkpoint holds of the EMA (:func:`lib.train.checkpoint.write_file`): ``ema.safetensors``
    (none without an EMA)."""
    return {} if ema is None else {EMA_FILE: ema_state_dict(ema, module)}


def ema_state(ema: Optional[EMAModel]) -> dict[str, Optional[int]]:
    """What a checkpoint's trainer state records of the EMA: its update count."""
    return {"ema_step": ema.optimization_step if ema is not None else None}


def load_ema(ema: EMAModel, module: torch.nn.Module, path: Path, optimization_step: int) -> None:
    """Restore ``ema`` from a file written from :func:`ema_state_dict` of ``module``."""
    tensors = load_file(str(path))
    for (name, _), shadow in zip(module.named_parameters(), ema.shadow_params):
        if name not in tensors or tensors[name].shape != shadow.shape:
            raise CheckpointError(f"{path}: EMA weights do not match the model ({name})")
        shadow.data.copy_(tensors[name].to(shadow.device))
    ema.optimization_step = optimization_step


@contextmanager
def ema_weights(ema: Optional[EMAModel], parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block the parameters hold the EMA weights (unchanged when ``ema`` is None)."""
    if ema is None:
        yield
        return
    params = list(parameters)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
