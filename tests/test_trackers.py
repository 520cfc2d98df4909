"""lib.train.trackers: Accelerate's experiment trackers (report_to). TensorBoard, the default, gets the
records and the sample grids as images; a tracker whose package is missing is one line."""
from __future__ import annotations

import pytest

import train_vae
from lib.config import load_config
from lib.errors import ConfigError
from lib.train import trackers
from tests.helpers import read_records, run_main, tiny_config


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_the_records_and_the_sample_grids(tmp_path, tiny_data, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_data)
    assert run_main(train_vae, ["--config", cfg], monkeypatch) == 0
    run = tmp_path / "run" / "vae"
    acc = events(run / "tb")
    assert [e.step for e in acc.Images("samples")] == [3, 6]         # every validation's grid
    from PIL import Image
    grid = Image.open(run / "samples" / "step-0000006.png")
    assert (acc.Images("samples")[-1].width, acc.Images("samples")[-1].height) == grid.size
    logged = {e.step: e.value for e in acc.Scalars("train/rec_loss")}
    assert logged == pytest.approx({r["step"]: r["rec_loss"] for r in read_records(run, "train")}, rel=1e-6)
    assert [e.step for e in acc.Scalars("val/psnr")] == [3, 6]


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    monkeypatch.setattr(trackers, "installed", lambda name: name == "tensorboard")
    cfg = tiny_config(tmp_path, tiny_data, **{"vae.train": {"report_to": "wandb"}})
    assert run_main(train_vae, ["--config", cfg], monkeypatch) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: vae.train.report_to = 'wandb': the wandb package is not installed (pip install wandb, or "
        "report_to: tensorboard)")
    assert trackers.chosen("all", "vae.train.report_to") == ["tensorboard"]      # all: the installed ones
    with pytest.raises(ConfigError, match=r"vae.train.report_to = 'nope' is invalid; expected one of 'tensorboard'"):
        load_config(cfg, ["vae.train.report_to=nope"])


def test_flat_config_for_the_trackers_hyperparameters():
    flat = trackers.flat({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x"})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "d": None, "e": "x"}
