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


def test_maps_go_under_out_only_and_never_twice(trained, tiny_data, monkeypatch, capsys):
    """A checkpoint's simulation names come from whoever trained it: a name with a path in it
    writes under --out all the same; two inputs of one run that would land on one file are
    refused; an --out that is a file is one line."""
    import shutil
    tmp, _, metrics = trained
    ckpt = tmp / "hostile"
    shutil.copytree(metrics["checkpoints"]["prior"], ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["simulations"] = ["../../../../elsewhere/x"]
    from lib.train import checkpoint as ck

    state["state_sha256"] = ck.state_digest(state)             # a consistent but hostile checkpoint
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    out = tmp / "safe-out"
    assert run_main(predict, ["--checkpoint", ckpt, "--root", tiny_data, "--maps", "0", "--simulation",
                              "../../../../elsewhere/x", "--steps", "1", "--out", out], monkeypatch) == 0
    written = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert written and all(len(p.parts) == 2 and not p.parts[0].startswith(".") for p in written)
    assert not (tmp.parent / "elsewhere").exists() and not any(tmp.parent.parent.glob("elsewhere"))
    real = metrics["checkpoints"]["prior"]
    assert run_main(predict, ["--checkpoint", real, "--root", tiny_data, "--maps", "0", "0", "--simulation", "DPM",
                              "--steps", "1", "--out", tmp / "twice"], monkeypatch) == 2
    assert "two inputs of this run would both be written there (city '0', transmitter 0)" in \
        capsys.readouterr().err.strip().splitlines()[-1]
    (tmp / "a-file").write_text("x")
    assert run_main(predict, ["--checkpoint", real, "--root", tiny_data, "--maps", "0", "--simulation", "DPM",
                              "--out", tmp / "a-file"], monkeypatch) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: --out {tmp / 'a-file'}: a file, not a folder; pass a folder for the maps"


def test_the_exported_pipeline_equals_predict_and_evaluate(trained, tiny_data, monkeypatch, capsys):
    """python -m lib.export -> RadioMapPipeline.from_pretrained -> the same maps as predict.py on the
    checkpoint and as evaluate.py's saved predictions, for the same seed; a model card with the
    checkpoint's evaluation."""
    import torch

    from lib import export
    from lib.data.layout import ANTENNAS_DIR, BUILDINGS_DIR, read_png, tx_pixel
    from lib.evaluation.pipeline import RadioConditionEncoder, RadioMapPipeline
    from tests.helpers import reset_accelerate
    tmp, cfg, metrics = trained
    ckpt = metrics["checkpoints"]["prior"]
    out = tmp / "radiomap-dpm"
    assert export.main(["--checkpoint", ckpt, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "cond_encoder", "model_index.json", "scheduler",
                                                     "unet", "vae"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "## Config" in card and "output_dir:" in card
    assert f"| this model | {metrics['model']['nmse']:.4g} ± {metrics['model']['nmse_std']:.4g} |" in card
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))             # safetensors only
    with pytest.raises(SystemExit):                                                         # nothing overwritten
        from lib.errors import run_cli
        monkeypatch.setattr("sys.argv", ["export", "--checkpoint", ckpt, "--out", str(out)])
        run_cli(export.main)
    assert "exists and is not an empty folder" in capsys.readouterr().err

    pipe = RadioMapPipeline.from_pretrained(out)
    assert isinstance(pipe.cond_encoder, RadioConditionEncoder) and pipe.config.simulations == ["DPM"]
    test_maps = metrics["protocol"]["map_ids"]
    reset_accelerate()
    assert run_main(predict, ["--checkpoint", out, "--root", tiny_data, "--maps", *test_maps, "--simulation", "DPM",
                              "--steps", "1", "--batch-size", "2", "--out", tmp / "from-pipeline"], monkeypatch) == 0
    with np.load(tmp / "run" / "eval" / "predictions.npz") as z:
        expected = {(int(m), int(t)): p for m, t, p in zip(z["map_id"], z["tx"], z["pred"])}
    for (m, t), pred in expected.items():
        assert np.abs(np.load(tmp / "from-pipeline" / "DPM" / f"{m}_{t}.npy") - pred).max() < 1e-6
    # the pipeline called directly: the first test map's two transmitters, one batch, the seed
    m = test_maps[0]
    buildings = read_png(tiny_data / BUILDINGS_DIR / f"{m}.png", None)
    txs = [tx_pixel(read_png(tiny_data / ANTENNAS_DIR / f"{m}_{t}.png", None)) for t in (0, 1)]
    maps = pipe(buildings, txs, simulation="DPM", steps=1, batch_size=2,
                generator=torch.Generator().manual_seed(load_seed(cfg)))
    assert maps.shape == (2, 32, 32)
    for t in (0, 1):
        assert np.abs(maps[t] - expected[(int(m), t)]).max() < 1e-6


def load_seed(cfg) -> int:
    from lib.config import load_config
    return load_config(cfg).seed
