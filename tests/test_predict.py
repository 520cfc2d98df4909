"""predict.py: radio maps for new environments from a trained stage-2 checkpoint equal
evaluate.py's for the same inputs and seed; bad input is one line."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import evaluate
import predict
import train_unified_prior
from tests.helpers import TRAINERS, run_main, trainer_config


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny DPM prior (2 steps) and evaluate.py's saved predictions of its test maps."""
    tmp = tmp_path_factory.mktemp("predict")
    spec = replace(TRAINERS["prior"], data_root=tiny_data)
    cfg = trainer_config(tmp, spec, **{"prior.train": {"max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                                       "val_every": 2}})
    with pytest.MonkeyPatch.context() as mp:
        assert run_main(train_unified_prior, ["--config", cfg], mp) == 0
        assert run_main(evaluate, ["--config", cfg, "--steps", "1", "--save-predictions"], mp) == 0
    metrics = json.loads((tmp / "run" / "eval" / "metrics.json").read_text())
    return tmp, cfg, metrics


def test_predict_equals_evaluate_for_the_same_inputs_and_seed(trained, tiny_data, monkeypatch, capsys):
    tmp, _, metrics = trained
    ckpt = metrics["checkpoints"]["prior"]
    test_maps = metrics["protocol"]["map_ids"]
    out = tmp / "pred"
    assert run_main(predict, ["--checkpoint", ckpt, "--root", tiny_data, "--maps", *test_maps, "--simulation", "DPM",
                              "--steps", "1", "--batch-size", "2", "--out", out], monkeypatch) == 0
    assert "samples/s" in capsys.readouterr().err
    with np.load(tmp / "run" / "eval" / "predictions.npz") as z:
        expected = {(int(m), int(t)): p for m, t, p in zip(z["map_id"], z["tx"], z["pred"])}
    assert len(expected) == len(test_maps) * 2
    for (m, t), pred in expected.items():
        got = np.load(out / "DPM" / f"{m}_{t}.npy")
        assert got.shape == pred.shape and np.abs(got - pred).max() < 1e-6
        png = np.asarray(Image.open(out / "DPM" / f"{m}_{t}.png"))
        assert png.dtype == np.uint8 and np.abs(png / 255.0 - got).max() <= 0.5 / 255 + 1e-6


def test_a_new_city_from_a_building_map_and_transmitters(trained, tiny_data, monkeypatch, capsys):
    tmp, _, metrics = trained
    ckpt = metrics["checkpoints"]["prior"]
    buildings = np.zeros((64, 64), np.uint8)          # a new city, twice the model's 32 px
    buildings[10:30, 20:50] = 255
    Image.fromarray(buildings, mode="L").save(tmp / "city.png")
    out = tmp / "city-maps"
    args = ["--checkpoint", ckpt, "--buildings", tmp / "city.png", "--simulation", "DPM", "--out", out]
    assert run_main(predict, args + ["--tx", "5,5", "--tx", "60,40", "--tx", "25,15"], monkeypatch) == 0
    assert "--tx 25,15 is inside a building" in capsys.readouterr().err
    for i in range(3):
        assert np.load(out / "DPM" / f"city_{i}.npy").shape == (32, 32)
        assert Image.open(out / "DPM" / f"city_{i}.png").mode == "L"
    Image.fromarray(np.zeros((64, 48), np.uint8), mode="L").save(tmp / "narrow.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8), mode="RGB").save(tmp / "rgb.png")
    for extra, expected in ((["--tx", "64,3"], "--tx 64,3: outside the 64x64 map"),
                            (["--tx", "3"], "--tx 3: expected X,Y"),
                            (["--tx", "3,3", "--simulation", "IRT4"], "--simulation IRT4: "),
                            (["--tx", "3,3", "--buildings", tmp / "narrow.png"], "48x64 px; expected a square map"),
                            (["--tx", "3,3", "--buildings", tmp / "rgb.png"], "image mode 'RGB'"),
                            ([], "--buildings needs at least one --tx")):
        assert run_main(predict, args + extra, monkeypatch) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and expected in err, err
