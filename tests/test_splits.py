"""lib/data/splits.py: the published protocols exactly as the original loaders compute them, the
random split's own seed, split files, the contamination guard; the RadioMapSeer layout as it is
(IRT4 only for transmitters 0-1), cars as an input channel and RadioUNet's threshold."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lib.config import DataConfig, load_config
from lib.data.dataset import RadioMapDataset, prepare_data
from lib.data.splits import check_overlap, make_split, protocol_split, protocol_warnings, random_split
from lib.errors import DataError
from tests.helpers import dataset, quiet, tiny_config


def original_loader_ids(first: int, last: int) -> list[int]:
    """The map ids of positions first..last (inclusive), as RadioUNet's and RadioDiff's
    lib/loaders.py compute them: np.arange(0, 700), np.random.seed(42), np.random.shuffle,
    file id = shuffled[k] + 1."""
    maps_inds = np.arange(0, 700, 1, dtype=np.int16)
    np.random.seed(42)
    np.random.shuffle(maps_inds)
    return sorted(int(maps_inds[k]) + 1 for k in range(first, last + 1))


def test_radiounet_split_equals_the_original_loader():
    s = protocol_split("radiounet")
    assert s.train == original_loader_ids(0, 500) and s.val == original_loader_ids(501, 600)
    assert s.test == original_loader_ids(601, 699)
    assert (len(s.train), len(s.val), len(s.test)) == (501, 100, 99)
    ids = s.train + s.val + s.test
    assert len(set(ids)) == 700 and min(ids) >= 1 and max(ids) <= 700      # map 0 is never used
    assert protocol_warnings(s) == []


def test_radiodiff_split_equals_the_original_loader_and_warns():
    s = protocol_split("radiodiff")
    assert s.train == original_loader_ids(0, 600) and s.test == original_loader_ids(600, 699)
    assert s.val == original_loader_ids(600, 650)
    assert (len(s.train), len(s.val), len(s.test)) == (601, 51, 100)
    both = set(s.train) & set(s.test)
    assert both == set(original_loader_ids(600, 600))                      # one map in train and test
    warnings = protocol_warnings(s)
    assert f"({next(iter(both))})" in warnings[0] and "both train and test" in warnings[0]
    assert "validation maps are test maps" in warnings[1]


def test_protocols_leave_the_global_numpy_rng_alone():
    np.random.seed(7)
    state = np.random.get_state()[1].copy()
    protocol_split("radiounet")
    assert np.array_equal(np.random.get_state()[1], state)


def test_random_split_follows_split_seed_not_seed(tmp_path, tiny_data):
    ids = list(range(20))
    a = random_split(ids, train_maps=12, val_maps=2, test_maps=5, seed=1)
    assert a == random_split(list(reversed(ids)), 12, 2, 5, seed=1)       # deterministic
    assert [len(a.maps(k)) for k in ("train", "val", "test")] == [10, 2, 5]
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    assert a.train != random_split(ids, 12, 2, 5, seed=2).train
    with pytest.raises(DataError, match=r"found 20, but data.train_maps \(16\) \+ data.test_maps \(5\) = 21"):
        random_split(ids, 16, 2, 5, seed=1)
    cfg = tiny_config(tmp_path, tiny_data)
    split = lambda *o: prepare_data(load_config(cfg, list(o)).data, load_config(cfg, list(o)).seed, quiet)  # noqa: E731
    assert split().to_dict() == split("seed=5").to_dict()                 # seed does not move the split
    assert split().train != split("data.split_seed=3").train or split().test != split("data.split_seed=3").test


def test_split_files(tmp_path, tiny_data):
    def write(obj) -> str:
        p = tmp_path / f"split{len(list(tmp_path.glob('split*')))}.json"
        p.write_text(json.dumps(obj))
        return str(p)

    cfg = lambda path: DataConfig(root=str(tiny_data), split=path)  # noqa: E731
    good = make_split(cfg(write({"train": [0, 1, 2], "val": [3], "test": [4, 5]})), range(8))
    assert (good.train, good.val, good.test) == ([0, 1, 2], [3], [4, 5])
    cases = [({"train": [0, 1, 1], "val": [3], "test": [4]}, "'train' lists map 1 more than once"),
             ({"train": [0, 1], "val": [1], "test": [4]}, "map 1 is in both 'train' and 'val'"),
             ({"train": [0, 99], "val": [3], "test": [4]}, "1 of the 4 maps the split file"),
             ({"train": [0], "val": [3]}, "expected exactly the keys train, val, test"),
             ({"train": ["a"], "val": [3], "test": [4]}, "'train' must be a list of map ids")]
    for obj, message in cases:
        with pytest.raises(DataError, match=message):
            make_split(cfg(write(obj)), range(8))
    with pytest.raises(DataError, match="not found"):
        make_split(cfg(str(tmp_path / "nope.json")), range(8))


def test_a_protocol_needs_its_maps(tiny_data):
    with pytest.raises(DataError, match=r"data.split radiounet: 693 of the 700 maps the radiounet protocol needs "
                                        r"are not in .*found 8 maps"):
        make_split(DataConfig(root=str(tiny_data), split="radiounet"), range(8))


def test_the_guard_refuses_or_records_an_overlap():
    mine = {"name": "random", "seed": 1, "train": [0, 1], "val": [2], "test": [3, 4]}
    vae = {"name": "random", "seed": 0, "train": [3, 5, 6]}
    with pytest.raises(DataError, match=r"1 of the 2 test maps were training maps of the VAE checkpoint v .*"
                                        r"random \(split_seed 0\).*random \(split_seed 1\).*--allow-overlap"):
        check_overlap([3, 4], "test", mine, [("VAE checkpoint", "v", vae)], allow=False)
    notes, overlaps = check_overlap([3, 4], "test", mine, [("VAE checkpoint", "v", vae)], allow=True)
    assert overlaps[0]["maps"] == 1 and "measured anyway" in notes[0]
    notes, overlaps = check_overlap([3, 4], "test", mine, [("VAE checkpoint", "v", None)], allow=False)
    assert overlaps == [] and "records no split" in notes[0]


# ------------------------------------------------------------------- the dataset as it is
def test_radiomapseer_layout_loads_dpm_and_irt4_together(rms_like):
    split = make_split(DataConfig(root=str(rms_like), split="radiounet"), range(701))
    ds = RadioMapDataset(rms_like, ["DPM", "IRT4"], split.train, 8, log=quiet)
    assert len(ds) == 501 * (3 + 2)                # DPM: 3 transmitters per map, IRT4: 2
    maps, txs, sims = ds.sample_keys()
    assert set(txs[sims == 1].tolist()) == {0, 1} and set(txs[sims == 0].tolist()) == {0, 1, 2}
    assert ds[len(ds) - 1]["image"].shape == (1, 8, 8)
    capped = RadioMapDataset(rms_like, ["DPM", "IRT4"], split.test, 8, tx_per_map=1, log=quiet)
    assert len(capped) == 99 * 2                   # data.tx_per_map still caps both


def test_a_missing_expected_gain_map_is_still_an_error(rms_like, tmp_path):
    import shutil
    root = tmp_path / "rms"
    for sub in ("png/buildings_complete", "png/antennas", "gain/IRT4"):
        (root / sub).mkdir(parents=True)
        for name in ("5.png", "5_0.png", "5_1.png", "5_2.png"):
            if (rms_like / sub / name).exists():
                shutil.copy(rms_like / sub / name, root / sub / name)
    RadioMapDataset(root, ["IRT4"], [5], 8, log=quiet)
    (root / "gain/IRT4/5_1.png").unlink()
    with pytest.raises(DataError, match=r"gain/IRT4/5_1.png: missing gain map"):
        RadioMapDataset(root, ["IRT4"], [5], 8, log=quiet)


def test_cars_input_is_its_own_switch(rms_like):
    cars = np.asarray(Image.open(rms_like / "png/cars/7.png"), np.float32) / 255 * 2 - 1
    buildings = np.asarray(Image.open(rms_like / "png/buildings_complete/7.png"), np.float32) / 255 * 2 - 1
    for sims, cars_input, third in ((["carsDPM"], "auto", cars), (["DPM"], "auto", buildings),
                                    (["DPM"], True, cars), (["carsDPM"], False, buildings)):
        ds = RadioMapDataset(rms_like, sims, [7], 8, cars_input=cars_input, log=quiet)
        assert np.allclose(ds[0]["cond"][2].numpy(), third, atol=1e-6), (sims, cars_input)


def test_threshold_equals_radiounets_transform_for_every_gray_level(tiny_data, tmp_path):
    import shutil
    root = tmp_path / "city"
    shutil.copytree(tiny_data, root)
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(2, axis=0).repeat(2, axis=1)   # 32 x 32
    Image.fromarray(gray, mode="L").save(root / "gain/DPM/0_0.png")
    image = dataset(root, maps=[0], threshold=0.2)[0]["image"][0].double().numpy()
    g = gray.astype(np.float64) / 255                                 # RadioUNet lib/loaders.py, thresh 0.2
    g[g < 0.2] = 0.2
    expected = (g - 0.2) / (1 - 0.2)
    assert np.abs((image + 1) / 2 - expected).max() < 1e-6
    assert ((image + 1) / 2)[gray < 51].max() == 0                     # below the floor: exactly 0


@pytest.mark.parametrize("override,expected", [
    ("data.threshold=1.0", "data.threshold = 1.0 is invalid; expected a number in [0, 1)"),
    ("data.threshold=-0.1", "data.threshold = -0.1 is invalid"),
    ("data.split=radiounet", "data.split radiounet: 693 of the 700 maps the radiounet protocol needs are not in"),
    ("data.split=holdout", "data.split = 'holdout' is invalid; expected radiounet, radiodiff, random, or the path"),
    ("data.cars_input=always", "data.cars_input = 'always' is invalid; expected one of 'auto', true, false"),
])
def test_bad_data_settings_are_one_line(tmp_path, tiny_data, monkeypatch, capsys, override, expected):
    import train_vae
    from tests.helpers import run_main
    cfg = tiny_config(tmp_path, tiny_data)
    assert run_main(train_vae, ["--config", cfg, "--set", override], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and expected in err
    assert not (tmp_path / "run").exists()                    # nothing written


def test_bad_split_file_and_missing_cars_write_nothing(tmp_path, tiny_data, monkeypatch, capsys):
    import shutil

    import train_vae
    from tests.helpers import run_main
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [0, 1, 1], "val": [2], "test": [3]}))
    no_cars = tmp_path / "no-cars"
    shutil.copytree(tiny_data, no_cars)
    shutil.rmtree(no_cars / "png/cars")
    for overrides, expected in (([f"data.split={split}"], "'train' lists map 1 more than once"),
                                ([f"data.root={no_cars}", "data.cars_input=true"],
                                 "data.cars_input = true: " + str(no_cars / "png" / "cars") + " not found")):
        cfg = tiny_config(tmp_path, tiny_data)
        assert run_main(train_vae, ["--config", cfg] + [x for o in overrides for x in ("--set", o)], monkeypatch) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and expected in err, err
        assert not (tmp_path / "run").exists()
