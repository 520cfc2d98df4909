"""lib.data.synthetic: layout, determinism and the physics the simulations must respect."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib import synthetic as synthetic_cli
from lib.config import DataConfig, SyntheticConfig
from lib.data import synthetic
from lib.errors import DataError

SIMS = ["DPM", "IRT2", "IRT4", "carsDPM", "carsIRT2", "carsIRT4"]
N_MAPS, N_TX, SIZE = 4, 3, 64


def load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE), path
        return np.asarray(im).astype(np.int64)


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "city"
    synthetic.generate(root, N_MAPS, N_TX, seed=0, size=SIZE, log=lambda m: None)
    return root


def test_layout_and_counts(data):
    assert sorted(p.name for p in (data / "png").iterdir()) == ["antennas", "buildings_complete", "cars"]
    assert sorted(p.name for p in (data / "gain").iterdir()) == sorted(SIMS)
    maps = {f"{m}.png" for m in range(N_MAPS)}
    pairs = {f"{m}_{t}.png" for m in range(N_MAPS) for t in range(N_TX)}
    assert {p.name for p in (data / "png/buildings_complete").iterdir()} == maps
    assert {p.name for p in (data / "png/cars").iterdir()} == maps
    assert {p.name for p in (data / "png/antennas").iterdir()} == pairs
    for sim in SIMS:                          # like RadioMapSeer: IRT4 only for transmitters 0 and 1
        expected = {f"{m}_{t}.png" for m in range(N_MAPS) for t in (0, 1)} if sim.endswith("IRT4") else pairs
        assert {p.name for p in (data / "gain" / sim).iterdir()} == expected
    load(data / "gain/IRT4/3_1.png")          # mode L, SIZE x SIZE
    # no temporary folder left next to the dataset
    assert [p.name for p in data.parent.iterdir()] == ["city"]


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    synthetic.generate(tmp_path / "again", N_MAPS, N_TX, seed=0, size=SIZE, log=lambda m: None)
    assert all_bytes(tmp_path / "again") == all_bytes(data)
    synthetic.generate(tmp_path / "other", 1, 1, seed=1, size=SIZE, log=lambda m: None)
    assert ((tmp_path / "other/png/buildings_complete/0.png").read_bytes()
            != (data / "png/buildings_complete/0.png").read_bytes())


def test_files_do_not_depend_on_the_number_of_threads(data, tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "MAX_THREADS", 1)          # the fixture: one thread per CPU
    synthetic.generate(tmp_path / "one", N_MAPS, N_TX, seed=0, size=SIZE, log=lambda m: None)
    assert all_bytes(tmp_path / "one") == all_bytes(data)


def test_map_content_does_not_depend_on_num_maps(data, tmp_path):
    synthetic.generate(tmp_path / "two", 2, N_TX, seed=0, size=SIZE, cars=True, log=lambda m: None)
    for rel in ["png/buildings_complete/1.png", "png/antennas/1_2.png", "gain/carsIRT2/1_2.png"]:
        assert (tmp_path / "two" / rel).read_bytes() == (data / rel).read_bytes()


def test_maps_vary_and_look_like_cities(data):
    fractions = []
    for m in range(N_MAPS):
        b = load(data / f"png/buildings_complete/{m}.png")
        assert set(np.unique(b)) <= {0, 255}
        fractions.append((b > 0).mean())
    assert all(0.1 < f < 0.8 for f in fractions), fractions
    assert len(set(np.round(fractions, 3))) == N_MAPS           # density varies per map


def test_transmitters_and_cars_outside_buildings(data):
    cars_total = 0
    for m in range(N_MAPS):
        b = load(data / f"png/buildings_complete/{m}.png") > 0
        c = load(data / f"png/cars/{m}.png") > 0
        assert not (b & c).any()
        cars_total += c.sum()
        spots = set()
        for t in range(N_TX):
            a = load(data / f"png/antennas/{m}_{t}.png")
            assert (a == 255).sum() == 1 and (a > 0).sum() == 1
            y, x = np.argwhere(a)[0]
            assert not b[y, x] and not c[y, x]
            spots.add((y, x))
        assert len(spots) == N_TX
    assert cars_total > 0


def gains(data: Path, m: int, t: int) -> dict[str, np.ndarray]:
    return {s: load(data / f"gain/{s}/{m}_{t}.png") for s in SIMS if t < 2 or not s.endswith("IRT4")}


def test_gain_zero_in_buildings_and_decreasing_with_distance(data):
    for m in range(N_MAPS):
        b = load(data / f"png/buildings_complete/{m}.png") > 0
        for t in range(N_TX):
            y, x = np.argwhere(load(data / f"png/antennas/{m}_{t}.png"))[0]
            yy, xx = np.indices(b.shape)
            d = np.hypot(yy - y, xx - x)
            for sim, g in gains(data, m, t).items():
                assert (g[b] == 0).all(), (m, t, sim)
                free = ~b
                assert g[free].max() > 200                         # bright near the transmitter
                near, far = free & (d < SIZE / 4), free & (d > SIZE / 2)
                assert g[near].mean() > g[far].mean() + 30, (m, t, sim)
                assert np.corrcoef(d[free], g[free])[0, 1] < -0.5, (m, t, sim)


def test_simulations_differ_as_dpm_and_ray_tracing_do(data):
    more_irt4 = 0
    for m in range(N_MAPS):
        b = load(data / f"png/buildings_complete/{m}.png") > 0
        pairs = ~b[:, 1:] & ~b[:, :-1]                          # horizontal neighbours, both free
        for t in range(N_TX):
            g = gains(data, m, t)
            lit = ~b & ((g["DPM"] > 0) | (g["IRT2"] > 0))
            assert (g["DPM"] != g["IRT2"])[lit].mean() > 0.5
            # ray tracing sums every path (more power than the dominant one) and keeps the
            # reflections' sharp edges; the dominant path is smoothed
            assert g["IRT2"].mean() > g["DPM"].mean()
            step = {s: np.abs(np.diff(g[s], axis=1))[pairs].mean() for s in ("DPM", "IRT2")}
            assert step["DPM"] < step["IRT2"], (m, t, step)
            if "IRT4" in g:   # IRT4 adds interactions on top of IRT2: never darker, brighter somewhere
                assert (g["IRT4"] >= g["IRT2"]).all()
                more_irt4 += (g["IRT4"] > g["IRT2"]).sum()
    assert more_irt4 > 0


def test_cars_variants_only_add_loss_behind_cars(data):
    darker = 0
    for m in range(N_MAPS):
        for t in range(N_TX):
            g = gains(data, m, t)
            for base in ("DPM", "IRT2", "IRT4")[:3 if t < 2 else 2]:
                assert (g["cars" + base] <= g[base]).all(), (m, t, base)
                darker += (g["cars" + base] < g[base]).sum()
    assert darker > 0


def test_no_cars(tmp_path):
    synthetic.generate(tmp_path / "nc", 1, 1, seed=0, size=32, cars=False, log=lambda m: None)
    assert not (tmp_path / "nc/png/cars").exists()
    assert sorted(p.name for p in (tmp_path / "nc/gain").iterdir()) == ["DPM", "IRT2", "IRT4"]


def test_existing_root_is_refused(data):
    before = all_bytes(data)
    with pytest.raises(DataError, match="already exists"):
        synthetic.generate(data, 1, 1, seed=5, size=32, log=lambda m: None)
    assert all_bytes(data) == before


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def boom(root, map_id, *args):
        calls.append(map_id)
        if map_id == 1:
            raise RuntimeError("disk full")
        return real(root, map_id, *args)

    real = synthetic._write_map
    monkeypatch.setattr(synthetic, "_write_map", boom)
    with pytest.raises(RuntimeError):
        synthetic.generate(tmp_path / "half", 3, 1, seed=0, size=32, log=lambda m: None)
    assert calls == [0, 1]
    assert list(tmp_path.iterdir()) == []


def test_ensure_synthetic_generates_once(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "d" / "syn"),
                     synthetic=SyntheticConfig(num_maps=2, tx_per_map=1, cars=False))
    lines: list[str] = []
    synthetic.ensure_synthetic(cfg, seed=3, log=lines.append)
    assert len(lines) == 2                                  # before (what, where) and after (how long)
    assert str(tmp_path / "d" / "syn") in lines[0] and "2 maps x 1 transmitters" in lines[0]
    assert lines[0].endswith("seed 3)") and lines[1].startswith("generated the synthetic dataset")
    assert sorted(p.name for p in (tmp_path / "d/syn/png/buildings_complete").iterdir()) == ["0.png", "1.png"]
    with Image.open(tmp_path / "d/syn/gain/DPM/1_0.png") as im:
        assert im.size == (256, 256)                       # the real RadioMapSeer size
    before = all_bytes(tmp_path / "d" / "syn")
    synthetic.ensure_synthetic(cfg, seed=4, log=lines.append)   # exists: nothing happens
    assert len(lines) == 2 and all_bytes(tmp_path / "d" / "syn") == before
    meta = tmp_path / "d" / "syn" / "synthetic.json"          # an older generator's data: a warning
    meta.write_text(meta.read_text().replace(f'"version": {synthetic.VERSION}', '"version": 1'))
    synthetic.ensure_synthetic(cfg, seed=3, log=lines.append)
    assert lines[2].startswith("warning: data.root") and "version 1 of the synthetic generator" in lines[2]


def test_cli(tmp_path, capsys):
    assert synthetic_cli.main(["--root", str(tmp_path / "c"), "--num-maps", "2", "--tx-per-map", "2",
                           "--seed", "7", "--size", "32", "--no-cars"]) == 0
    assert "2 maps x 2 transmitters" in capsys.readouterr().out
    assert len(list((tmp_path / "c/gain/IRT2").iterdir())) == 4
    assert not (tmp_path / "c/gain/carsDPM").exists()
