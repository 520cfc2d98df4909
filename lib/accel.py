"""The Accelerator both trainers use, the checks that make a wrong launch loud, and the speed
switches of ``*.train`` (``tf32``, ``channels_last``, ``compile``)."""
from __future__ import annotations

import atexit
import os

import torch
from accelerate import Accelerator
from torch import nn

from lib.config import TrainConfig
from lib.errors import UserError


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for ``cfg``'s mixed precision and gradient accumulation.

    The schedulers are stepped by the trainers once per optimizer update
    (``step_scheduler_with_optimizer=False``): accelerate's default steps a prepared
    scheduler once per process, which ends a schedule N× early on N processes.
    Also applies the process-wide ``tf32`` switch (:func:`apply_backend_flags`).
    """
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' (recommended) or 'no'")
    apply_backend_flags(cfg)
    acc = Accelerator(mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      step_scheduler_with_optimizer=False)
    atexit.unregister(_destroy_process_group)     # once, however many runs in one process
    atexit.register(_destroy_process_group)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:
        raise UserError(
            f"WORLD_SIZE={world} but Accelerate sees one process, so every rank would train alone "
            f"on all the data; launch with `accelerate launch --multi_gpu --num_processes {world} ...` "
            f"(on CPU prefix ACCELERATE_USE_CPU=1)")
    return acc


def apply_backend_flags(cfg: TrainConfig) -> None:
    """``tf32``: let float32 matmuls and cuDNN convolutions use TensorFloat-32 on Ampere and
    newer GPUs (faster; 10-bit mantissa inputs). Off means IEEE float32 for both, including
    the convolutions PyTorch would otherwise run in TF32 by default. No effect on CPUs."""
    precision = "tf32" if cfg.tf32 else "ieee"
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # torch < 2.9: the older flags (mixing both APIs is an error in newer versions)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def prepare_model(module: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Apply ``channels_last`` and ``compile`` to a model before ``accelerator.prepare``.

    ``compile`` uses ``nn.Module.compile`` (in place), so the module, its attributes and its
    state-dict keys stay as they are: checkpoints of compiled and plain runs are interchangeable.
    Returns ``module``.
    """
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    if cfg.compile:
        module.compile()
    return module


def _destroy_process_group() -> None:
    """At interpreter exit, once the trainer's models (and their DDP wrappers) are freed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
