"""python -m lib.synthetic stats: the statistics of a RadioMapSeer-layout folder, and the
synthetic generator against the published maps' ranges."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from lib import synthetic as synthetic_cli
from lib.data import synthetic
from lib.data.map_stats import REAL_RANGES, map_statistics
from lib.errors import DataError


def png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L").save(path)


@pytest.fixture
def handmade(tmp_path):
    """Two 4x4 city maps with known buildings and gray levels."""
    root = tmp_path / "hand"
    b0 = np.zeros((4, 4)); b0[0, :] = 255                      # map 0: 4 of 16 pixels are building
    b1 = np.zeros((4, 4)); b1[:2, :2] = 255; b1[3, 3] = 255    # map 1: 5 of 16
    png(root / "png/buildings_complete/0.png", b0)
    png(root / "png/buildings_complete/1.png", b1)
    # map 0, tx 0: the 12 free pixels hold 0 x6, 10 x2 (0.039 < 0.05), 200 x2 (0.78), 255 x2
    g = np.zeros((4, 4)); g[1, :2] = 10; g[2, :2] = 200; g[3, :2] = 255
    png(root / "gain/DPM/0_0.png", g)
    # map 1, tx 0: the 11 free pixels all 51 (0.2)
    png(root / "gain/DPM/1_0.png", np.where(b1 > 0, 0, 51))
    return root


def test_statistics_of_a_handmade_folder(handmade, capsys):
    st = map_statistics(handmade, "DPM")
    assert (st.files, st.maps, st.total_files) == (2, 2, 2)
    np.testing.assert_allclose(st.values["median"], [np.median([0] * 6 + [10, 10, 200, 200, 255, 255]) / 255, 0.2])
    np.testing.assert_allclose(st.values["above_half"], [4 / 12, 0.0])
    np.testing.assert_allclose(st.values["below_005"], [8 / 12, 0.0])
    np.testing.assert_allclose(sorted(st.values["buildings"]), [4 / 16, 5 / 16])
    s = st.summary()
    assert s["buildings"]["median"] == pytest.approx(4.5 / 16)
    # medians over the two maps: 0.11, 0.167, 0.333, 0.281
    assert st.inside_real() == {"median": True, "above_half": False, "below_005": True, "buildings": True}

    assert synthetic_cli.main(["stats", str(handmade)]) == 0          # every simulation under gain/
    out = capsys.readouterr().out
    assert "DPM: 2 gain maps of 2 city maps" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("buildings, share of the map"))
    assert row.split()[-8:] == ["0.281", "0.256", "-", "0.306", "0.16", "-", "0.31", "yes"]


def test_missing_simulation_is_one_line(handmade):
    with pytest.raises(DataError, match=r"missing folder .*hand/gain/IRT2 \(expected the RadioMapSeer layout"):
        map_statistics(handmade, "IRT2")
    for p in (handmade / "gain/DPM").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"hand/gain/DPM: no gain maps"):
        map_statistics(handmade, "DPM")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "city"
    synthetic.generate(root, 12, 3, seed=0, size=128, cars=False, log=lambda m: None)
    return root


def edge_angles(buildings: np.ndarray) -> np.ndarray:
    """Orientation (radians, modulo 90 degrees) of the building mask's edges."""
    gy, gx = np.gradient(buildings.astype(np.float64))
    edge = np.hypot(gy, gx) > 0
    return np.mod(np.arctan2(gy[edge], gx[edge]), math.pi / 2)


def test_street_grids_turn_and_buildings_are_not_all_axis_aligned(generated):
    dominant, off_axis = [], []
    for m in range(12):
        with Image.open(generated / f"png/buildings_complete/{m}.png") as im:
            a = edge_angles(np.asarray(im) > 0)
        dominant.append(np.angle(np.exp(4j * a).mean()) / 4 % (math.pi / 2))   # the grid's angle, mod 90
        near_axis = np.minimum(a, math.pi / 2 - a) < math.radians(5)
        off_axis.append(1 - near_axis.mean())
    spread = np.degrees(np.ptp(np.sort(dominant)))
    assert spread > 45, np.degrees(dominant)                   # the maps' grids point every way
    assert sum(f > 0.5 for f in off_axis) >= 6, off_axis       # most edges off the axes in most maps


def test_default_generator_is_inside_the_published_ranges(generated):
    for sim in ("DPM", "IRT2"):
        st = map_statistics(generated, sim)
        assert all(st.inside_real().values()), (sim, st.summary())
        s = st.summary()
        assert REAL_RANGES["above_half"][0] <= s["above_half"]["median"] <= REAL_RANGES["above_half"][1]
