"""Where a run's records and images go besides its own files: Accelerate's experiment trackers
(``*.train.report_to: tensorboard | wandb | mlflow | comet_ml | all``). TensorBoard is the
default and writes ``{run}/tb`` offline; the others use their package's own settings (API keys,
``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``) and must be installed. ``all`` is every one of
them that is installed. Sample grids and evaluation figures are logged as images where the
tracker takes images (TensorBoard, W&B, Comet; MLflow as an artifact).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lib.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def chosen(report_to: str, key: str) -> list[str]:
    """The trackers ``report_to`` names; a named tracker whose package is missing is a one-line
    error (``all`` takes the installed ones)."""
    if report_to == "all":
        return [t for t in TRACKERS if installed(t)]
    if not installed(report_to):
        raise ConfigError(f"{key} = {report_to!r}: the {PACKAGES[report_to]} package is not installed "
                          f"(pip install {PACKAGES[report_to]}, or report_to: tensorboard)")
    return [report_to]


def flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as the flat key/value pairs trackers store as hyperparameters."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


def open_trackers(report_to: str, key: str, run_dir: Path, project: str,
                  config: Optional[dict] = None, run_name: Optional[str] = None) -> list[Any]:
    """Started trackers of ``report_to`` for the run folder ``run_dir`` (TensorBoard: ``run_dir/tb``)."""
    from accelerate.tracking import CometMLTracker, MLflowTracker, TensorBoardTracker, WandBTracker
    run_name = run_name or f"{run_dir.parent.name}/{run_dir.name}"
    make = {"tensorboard": lambda: TensorBoardTracker("tb", run_dir),
            "wandb": lambda: WandBTracker(project, name=run_name, dir=str(run_dir)),
            "mlflow": lambda: MLflowTracker(project, run_name=run_name),
            "comet_ml": lambda: CometMLTracker(project)}
    out = []
    for name in chosen(report_to, key):
        tracker = make[name]()
        tracker.start()
        if config is not None and name != "tensorboard":     # TensorBoard: config.yaml is beside it
            tracker.store_init_configuration(flat(config))
        out.append(tracker)
    return out


def log_scalars(trackers: list[Any], values: dict[str, float], step: int) -> None:
    for tracker in trackers:
        tracker.log(values, step=step)


def log_image(trackers: list[Any], tag: str, path: Path, step: int) -> None:
    """A PNG already written (a sample grid, an evaluation figure) as an image of ``tag``."""
    from PIL import Image
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "mlflow":
            tracker.log_artifact(str(path), artifact_path=f"images/{tag}")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [pixels]}, step=step)


def close_trackers(trackers: list[Any]) -> None:
    for tracker in trackers:
        tracker.finish()
