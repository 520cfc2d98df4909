"""The Accelerator both trainers use, the precision a run trains in, the checks that make a
wrong launch loud, and the speed switches of ``*.train`` (``mixed_precision``, ``tf32``,
``channels_last``, ``compile``, ``gradient_checkpointing``)."""
from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Optional

import torch
from accelerate import Accelerator
from torch import nn

from lib.config import TrainConfig
from lib.errors import ConfigError, UserError

LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"     # what `accelerate launch --mixed_precision X` sets


@dataclass
class Precision:
    """What a run computes in, and why; recorded in ``run.json`` and the start event."""
    mixed_precision: str        # no | bf16 | fp16: what the Accelerator autocasts to
    chosen_by: str              # where that came from, in words
    tf32: bool                  # TF32 float32 matmuls and convolutions (GPU only)
    device: str                 # "cpu" or the GPU's name

    def describe(self) -> str:
        fp32 = "float32" if self.mixed_precision == "no" else f"{self.mixed_precision} autocast"
        tf32 = (", TF32 matmuls and convolutions" if self.tf32 else ", PyTorch's default TF32 settings") \
            if self.device != "cpu" else ""
        return f"{fp32} on {self.device}{tf32} ({self.chosen_by})"

    def to_dict(self) -> dict:
        return asdict(self)


def _on_cuda(env: Mapping[str, str]) -> bool:
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not use_cpu


def resolve_precision(cfg: TrainConfig, key: str, env: Optional[Mapping[str, str]] = None,
                      cuda: Optional[bool] = None, bf16_supported: Optional[bool] = None) -> Precision:
    """The run's precision from ``cfg.mixed_precision`` (``key`` names it in messages) and the
    launcher's ``--mixed_precision`` (``ACCELERATE_MIXED_PRECISION``).

    ``auto``: the launcher's choice when it made one, else bf16 on a CUDA GPU that supports it,
    else float32. ``accelerate launch`` sets ``no`` when nothing is asked, so a launcher's ``no``
    is not a choice (set the config key to ``no`` for float32). An explicit config value and a
    launcher's other value are refused in one line rather than one of them silently ignored.
    """
    env = os.environ if env is None else env
    cuda = _on_cuda(env) if cuda is None else cuda
    device = torch.cuda.get_device_name(0) if cuda and torch.cuda.is_available() else ("cuda" if cuda else "cpu")
    launcher = env.get(LAUNCHER_ENV, "no").lower() or "no"
    if launcher not in ("no", "bf16", "fp16"):
        raise UserError(f"accelerate launch --mixed_precision {launcher}: not supported by these trainers; "
                        f"use bf16, fp16 or no (or set {key}: auto)")
    setting = cfg.mixed_precision
    if setting == "auto":
        if launcher != "no":
            mp, why = launcher, f"{key}: auto; accelerate launch --mixed_precision {launcher}"
        elif cuda:
            # native bf16 (Ampere and newer), not emulated; reads the device's properties only
            supported = torch.cuda.is_bf16_supported(including_emulation=False) if bf16_supported is None \
                else bf16_supported
            mp = "bf16" if supported else "no"
            why = f"{key}: auto; {device} {'supports' if supported else 'has no'} bf16"
        else:
            mp, why = "no", f"{key}: auto; no GPU"
    else:
        if launcher != "no" and launcher != setting:
            raise UserError(f"accelerate launch --mixed_precision {launcher} disagrees with {key} = {setting!r}; "
                            f"drop the launcher's flag, or pass --set {key}=auto (the launcher's choice wins) "
                            f"or --set {key}={launcher}")
        mp, why = setting, f"{key}: {setting}"
    if mp == "fp16" and not cuda:
        raise UserError(f"{key} = 'fp16' needs a CUDA GPU; use 'bf16', 'auto' or 'no'")
    return Precision(mp, why, bool(cfg.tf32) and cuda, device)


def make_accelerator(cfg: TrainConfig, key: str = "train.mixed_precision") -> Accelerator:
    """An Accelerator for ``cfg``'s precision (:func:`resolve_precision`; the result is
    ``accelerator.precision``) and gradient accumulation.

    The schedulers are stepped by the trainers once per optimizer update
    (``step_scheduler_with_optimizer=False``): accelerate's default steps a prepared
    scheduler once per process, which ends a schedule N× early on N processes.
    Also applies the process-wide ``tf32`` switch (:func:`apply_backend_flags`).
    """
    precision = resolve_precision(cfg, key)
    apply_backend_flags(cfg)
    acc = Accelerator(mixed_precision=precision.mixed_precision,
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      step_scheduler_with_optimizer=False)
    acc.precision = precision
    atexit.unregister(_destroy_process_group)     # once, however many runs in one process
    atexit.register(_destroy_process_group)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:
        raise UserError(
            f"WORLD_SIZE={world} but Accelerate sees one process, so every rank would train alone "
            f"on all the data; launch with `accelerate launch --multi_gpu --num_processes {world} ...` "
            f"(on CPU prefix ACCELERATE_USE_CPU=1)")
    return acc


# PyTorch's own defaults: cuDNN convolutions may use TF32, float32 matmuls do not.
DEFAULT_PRECISION = {"matmul": "none", "conv": "tf32"}


def apply_backend_flags(cfg: Optional[TrainConfig]) -> None:
    """``tf32`` true: float32 matmuls and cuDNN convolutions in TensorFloat-32 on Ampere and
    newer GPUs (10-bit mantissa inputs, float32 accumulation). False, or ``cfg`` None:
    PyTorch's defaults (TF32 convolutions, IEEE matmuls): no setting is slower than those.
    IEEE float32 throughout: ``NVIDIA_TF32_OVERRIDE=0`` in the environment. No effect on CPUs."""
    tf32 = bool(cfg is not None and cfg.tf32)
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else DEFAULT_PRECISION["matmul"]
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else DEFAULT_PRECISION["conv"]
    else:  # torch < 2.9: the older flags (mixing both APIs is an error in newer versions)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = True


@contextmanager
def backend_flags(cfg: Optional[TrainConfig]) -> Iterator[None]:
    """:func:`apply_backend_flags` for a block (None: PyTorch's defaults), then the flags as
    they were: bench.py runs the reference step under PyTorch's defaults, as RadioDiff's users
    ran it, next to the toolkit's step under its config."""
    new_api = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")
    if new_api:
        matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    else:
        matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    apply_backend_flags(cfg)
    try:
        yield
    finally:
        if new_api:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


def prepare_model(module: nn.Module, cfg: TrainConfig, key: str = "train") -> nn.Module:
    """Apply ``gradient_checkpointing``, ``channels_last`` and ``compile`` to a model before
    ``accelerator.prepare``.

    Gradient checkpointing is diffusers' ``enable_gradient_checkpointing`` on every diffusers
    model inside ``module`` (the VAE, the prior's UNet): their blocks recompute activations in
    the backward pass instead of keeping them. ``compile`` uses ``module.compile`` (in place),
    so the module, its attributes and its state-dict keys stay as they are: checkpoints of
    compiled and plain runs are interchangeable. Returns ``module``.
    """
    if cfg.gradient_checkpointing:
        found = [m for m in module.modules() if hasattr(m, "enable_gradient_checkpointing")]
        if not found:
            raise ConfigError(f"{key}.gradient_checkpointing: {type(module).__name__} has no diffusers model "
                              f"that supports it; set it to false")
        for m in found:
            m.enable_gradient_checkpointing()
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    if cfg.compile:
        from torch._dynamo import list_backends
        if cfg.compile_backend not in list_backends(exclude_tags=()):
            raise ConfigError(f"{key}.compile_backend = {cfg.compile_backend!r} is not a torch.compile backend; "
                              f"expected one of {', '.join(list_backends())}")
        options = {"backend": cfg.compile_backend}
        if cfg.compile_backend == "inductor":
            options["mode"] = cfg.compile_mode
        module.compile(**options)
    return module


def _destroy_process_group() -> None:
    """At interpreter exit, once the trainer's models (and their DDP wrappers) are freed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
