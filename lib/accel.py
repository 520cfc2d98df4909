"""The Accelerator both trainers use, and the checks that make a wrong launch loud."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from lib.config import TrainConfig
from lib.errors import UserError


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for ``cfg``'s mixed precision and gradient accumulation.

    The schedulers are stepped by the trainers once per optimizer update
    (``step_scheduler_with_optimizer=False``): accelerate's default steps a prepared
    scheduler once per process, which ends a schedule N× early on N processes.
    """
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' (recommended) or 'no'")
    acc = Accelerator(mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      step_scheduler_with_optimizer=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:
        raise UserError(
            f"WORLD_SIZE={world} but Accelerate sees one process, so every rank would train alone "
            f"on all the data; launch with `accelerate launch --multi_gpu --num_processes {world} ...` "
            f"(on CPU prefix ACCELERATE_USE_CPU=1)")
    return acc
