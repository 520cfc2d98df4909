"""Shared test utilities: tiny configs, in-process trainer runs, reading run outputs."""
from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent.parent


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
    loss_fn: str                     # module-level loss function the tests wrap
    poison: Callable[[Any], None]    # make that function's result NaN
    spike_lr: float                  # an LR that makes the tiny model diverge
    shape_override: str              # a --set that changes the model shape
    data_root: Optional[Path] = None
    extra_sections: dict = field(default_factory=dict)

    @property
    def module(self):
        return importlib.import_module(self.module_name)


def _poison_generator_loss(out) -> None:
    out.total = out.total * float("nan")


TRAINERS: dict[str, TrainerSpec] = {
    "vae": TrainerSpec("train_vae", "vae", "generator_loss", _poison_generator_loss, spike_lr=5.0,
                       shape_override="vae.model.latent_channels=3"),
}


def trainer_config(tmp_path: Path, trainer: TrainerSpec, name: str = "tiny.yaml", **sections) -> Path:
    merged = dict(trainer.extra_sections)
    merged.update(sections)
    return tiny_config(tmp_path, trainer.data_root, name, **merged)
