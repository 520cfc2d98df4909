"""Shared test utilities: tiny configs, in-process trainer runs, reading run outputs."""
from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lib.models.objectives import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
CITY_MAPS, CITY_TX, CITY_SIZE = 6, 3, 32      # the ``city`` fixture (conftest.py)


def quiet(message: str) -> None:
    pass


def dataset(root: Path, sims=("DPM",), maps=range(CITY_MAPS), size: int = CITY_SIZE, **kw):
    """A RadioMapDataset of ``root`` (the ``city`` fixture by default shape), quiet."""
    from lib.data.dataset import RadioMapDataset
    kw.setdefault("log", quiet)
    return RadioMapDataset(root, list(sims), list(maps), size, **kw)


def batch_keys(batch: dict) -> list[tuple[int, int, int]]:
    """(map, tx, sim_id) of every sample of a batch."""
    return list(zip(batch["map_id"].tolist(), batch["tx"].tolist(), batch["sim_id"].tolist()))


def tiny_config(tmp_path: Path, data_root: Path, name: str = "tiny.yaml", **sections) -> Path:
    """A config small enough for a CPU test: 32 px maps, a few channels, a few steps."""
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "data": {"source": "synthetic", "root": str(data_root), "simulation": ["DPM"],
                 "image_size": 32, "batch_size": 2, "num_workers": 0, "train_maps": 6,
                 "val_maps": 2, "test_maps": 2,
                 "synthetic": {"num_maps": 8, "tx_per_map": 2, "size": 32, "cars": True}},
        "vae": {
            "model": {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2,
                      "norm_num_groups": 8, "mid_block_attention": False},
            "loss": {"disc_start": 3, "disc_channels": 8, "disc_layers": 2},
            "train": {"max_steps": 6, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2,
                      "log_every": 1, "val_every": 3, "val_batches": 1, "checkpoint_every": 3,
                      "keep_last": 10},
        },
    }
    for section, values in sections.items():
        node = cfg
        parts = section.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(values, dict):
            node.setdefault(parts[-1], {}).update(values)
        else:
            node[parts[-1]] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_main(module, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a trainer's ``main`` in this process; returns its exit code (SystemExit included)."""
    reset_accelerate()
    monkeypatch.setattr(sys, "argv", [module.__file__] + [str(a) for a in argv])
    from lib.errors import run_cli
    try:
        run_cli(module.main)          # as the script's __main__ does: one-line errors, exit 2
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        reset_accelerate()
    return int(code or 0)


def read_records(run_dir: Path, split: str | None = None) -> list[dict]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in recs if split is None or r["split"] == split]


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's weights (model files plus the accelerate model state)."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- trainers
@dataclass
class TrainerSpec:
    """How the shared trainer tests drive one trainer (see tests/test_faults.py)."""
    module_name: str
    subdir: str                      # run folder under output_dir
    model: str                       # "module:Class" of the trained model whose forward the tests wrap
    poison: Callable[[Any], Any]     # that forward's output made NaN
    spike_lr: float                  # an LR that makes the tiny model diverge
    shape_override: str              # a --set that changes the model shape
    watched: str = "rec_loss"        # the training loss to compare between runs
    data_root: Optional[Path] = None
    extra_sections: dict = field(default_factory=dict)
    setup: Optional[Callable[[Path], dict]] = None   # data root -> more sections (e.g. a VAE to use)

    @property
    def module(self):
        return importlib.import_module(self.module_name)


def _poison_vae_output(out):
    rec, kl = out
    return rec * float("nan"), kl


# Stage 2 on top of a tiny stage-1 VAE: a UNet of two levels on 16x16x2 latents, 2 sampling steps.
TINY_PRIOR = {
    "latent_scale_batches": 2,
    "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [False, True],
              "norm_num_groups": 8, "attention_head_dim": 8, "cond_channels": 8},
    "diffusion": {"num_inference_steps": 2},
    "train": {"max_steps": 6, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "log_every": 1,
              "val_every": 3, "val_batches": 1, "checkpoint_every": 3, "keep_last": 10,
              "ema_decay": 0.99},
}


def tiny_vae_checkpoint(data_root: Path) -> Path:
    """A tiny stage-1 VAE trained for 3 steps on ``data_root``; trained once and kept next to
    the data (the session's ``tiny_data``), so every prior test shares it."""
    out = data_root.parent / "tiny-vae"
    folder = out / "vae" / "checkpoints" / "step-0000003"
    if not folder.is_dir():
        import train_vae
        cfg = tiny_config(data_root.parent, data_root, "tiny-vae.yaml", output_dir=str(out),
                          **{"vae.train": {"max_steps": 3}})
        with pytest.MonkeyPatch.context() as mp:
            assert run_main(train_vae, ["--config", cfg], mp) == 0
    return folder


def tiny_prior_sections(data_root: Path) -> dict:
    import copy
    return {"prior": dict(copy.deepcopy(TINY_PRIOR), vae_checkpoint=str(tiny_vae_checkpoint(data_root)))}


def _poison_tensor(out: torch.Tensor) -> torch.Tensor:
    return out * float("nan")


def poison_training_forward(monkeypatch: pytest.MonkeyPatch, trainer: "TrainerSpec", bad: Callable[[int], bool]) -> None:
    """Make the trained model's output NaN in the training forward passes ``n`` (1, 2, ...) for
    which ``bad(n)``; forwards without gradients (validation, sampling) are left alone."""
    module_name, cls_name = trainer.model.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    orig, calls = cls.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        calls["n"] += 1
        return trainer.poison(out) if bad(calls["n"]) else out
    monkeypatch.setattr(cls, "forward", forward)


TRAINERS: dict[str, TrainerSpec] = {
    "vae": TrainerSpec("train_vae", "vae", "lib.models.vae:VAEWithLogvar", _poison_vae_output, spike_lr=5.0,
                       shape_override="vae.model.latent_channels=3"),
    "prior": TrainerSpec("train_unified_prior", "prior", "lib.models.prior:LatentPrior", _poison_tensor, spike_lr=5.0,
                         shape_override="prior.model.cond_channels=16", watched="loss",
                         setup=tiny_prior_sections),
}
# Every stage-2 objective (lib/models/objectives.py) keeps the trainer's guarantees: the stage-2 cases of
# the shared trainer tests run for each (the ddpm prior above is the fourth).
for _objective in [name for name in REGISTRY if name != "ddpm"]:
    TRAINERS[f"prior-{_objective}"] = dataclasses.replace(
        TRAINERS["prior"], extra_sections={"prior.diffusion": {"objective": _objective}})
# ... and so does a prior conditioned on sparse measurements (their pixels drawn from the global RNG).
TRAINERS["prior-measurements"] = dataclasses.replace(
    TRAINERS["prior"], extra_sections={"prior.measurements": {"count": [0, "10%"]}})


def trainer_config(tmp_path: Path, trainer: TrainerSpec, name: str = "tiny.yaml", **sections) -> Path:
    merged = trainer.setup(trainer.data_root) if trainer.setup is not None else {}
    merged.update(trainer.extra_sections)        # after the setup's sections: they refine them
    merged.update(sections)
    return tiny_config(tmp_path, trainer.data_root, name, **merged)


def run_injected(tmp_path: Path, trainer: TrainerSpec, cfg: Path, patch: str, *args: Any,
                 processes: int = 1, timeout: int = 600, name: str = "inject.py", background: bool = False):
    """Run a trainer in fresh process(es) after executing ``patch`` (Python source) in each.

    ``processes > 1`` launches them with ``accelerate launch --multi_gpu`` on the CPU (gloo).
    ``background``: start it and return the ``subprocess.Popen`` (output in ``name``.out/.err).
    """
    import os
    import subprocess
    import textwrap
    script = tmp_path / name
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import importlib
        trainer = importlib.import_module({trainer.module_name!r})
        from lib.errors import run_cli
    """) + textwrap.dedent(patch) + textwrap.dedent(f"""
        sys.argv = ["{trainer.module_name}.py", "--config", {str(cfg)!r}] + {[str(a) for a in args]!r}
        run_cli(trainer.main)
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if processes > 1:
        # one thread per process (2 cores); a single process keeps the default, like the
        # in-process reference runs it is compared with (thread count changes float sums)
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script)]
    else:
        cmd = [sys.executable, str(script)]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=open(f"{script}.out", "w"),
                                stderr=open(f"{script}.err", "w"))
    return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def radiomapseer_like(root: Path, num_maps: int = 701, num_tx: int = 3, size: int = 8) -> Path:
    """A folder shaped like RadioMapSeer, small: map ids 0..num_maps-1, ``num_tx`` transmitters
    each, gain/DPM and gain/carsDPM for every transmitter, gain/IRT4 only for transmitters 0
    and 1 (as in the real data), png/cars; 8-bit grayscale ('L') PNGs of ``size`` px."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    folders = ["png/buildings_complete", "png/antennas", "png/cars", "gain/DPM", "gain/carsDPM", "gain/IRT4"]
    for f in folders:
        (root / f).mkdir(parents=True, exist_ok=True)

    def save(arr, rel: str) -> None:
        Image.fromarray(arr.astype(np.uint8), mode="L").save(root / rel, compress_level=0)

    for m in range(num_maps):
        buildings = (rng.random((size, size)) < 0.3).astype(np.uint8) * 255
        save(buildings, f"png/buildings_complete/{m}.png")
        save((rng.random((size, size)) < 0.05).astype(np.uint8) * 255, f"png/cars/{m}.png")
        for t in range(num_tx):
            antenna = np.zeros((size, size), np.uint8)
            antenna[(m + t) % size, (3 * m + t) % size] = 255
            save(antenna, f"png/antennas/{m}_{t}.png")
            gain = rng.integers(0, 256, (size, size)) * (buildings == 0)
            for sim in ("DPM", "carsDPM") + (("IRT4",) if t < 2 else ()):
                save(gain, f"gain/{sim}/{m}_{t}.png")
    return root
