"""lib.data.layout, lib.data.splits, lib.data.dataset: discovery, splits, samples, bad-file handling."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.config import DataConfig, SyntheticConfig
from lib.data.batching import eval_batches
from lib.data.dataset import build_datasets
from lib.data.layout import discover_maps
from lib.data.splits import random_split
from lib.errors import DataError
from tests.helpers import CITY_MAPS as N_MAPS
from tests.helpers import CITY_SIZE as SIZE
from tests.helpers import CITY_TX as N_TX
from tests.helpers import dataset as ds
from tests.helpers import quiet


@pytest.fixture
def copy(city, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(city, tmp_path / "city"))


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / 255 * 2 - 1


# ------------------------------------------------------------------ discovery, splits
def test_discover_maps(city, tmp_path):
    assert discover_maps(city) == list(range(N_MAPS))
    with pytest.raises(DataError, match=r"nowhere: folder not found \(expected the RadioMapSeer layout"):
        discover_maps(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        discover_maps(tmp_path / "empty")
    msg = str(err.value)
    assert "missing folder " + str(tmp_path / "empty/png/buildings_complete") in msg
    assert "\n" not in msg


def test_missing_simulation_or_cars_folder(copy):
    shutil.rmtree(copy / "gain/IRT2")
    with pytest.raises(DataError, match="missing folder .*gain/IRT2 .*RadioMapSeer layout"):
        ds(copy, sims=["DPM", "IRT2"])
    shutil.rmtree(copy / "png/cars")
    ds(copy, sims=["DPM"])                                  # cars not needed
    with pytest.raises(DataError, match="missing folder .*png/cars"):
        ds(copy, sims=["carsDPM"])
    ds(copy, sims=["carsDPM"], cars_input=False)            # the cars target without cars as input


# -------------------------------------------------------------------------- samples
def test_index_and_sample_contents(city):
    d = ds(city, sims=["DPM", "carsIRT2"], maps=[1, 4])
    assert len(d) == 2 * N_TX * 2
    assert [d.sample_key(i) for i in range(3)] == [(1, 0, "DPM"), (1, 0, "carsIRT2"), (1, 1, "DPM")]
    for i in (0, 1):
        s = d[i]
        m, t, sim = d.sample_key(i)
        assert (s["map_id"], s["tx"], s["sim_id"]) == (m, t, i)
        assert s["image"].shape == (1, SIZE, SIZE) and s["cond"].shape == (3, SIZE, SIZE)
        assert s["image"].dtype == s["cond"].dtype == torch.float32
        assert -1 <= s["image"].min() and s["image"].max() <= 1
        np.testing.assert_allclose(s["image"][0], unit(png(city / f"gain/{sim}/{m}_{t}.png")), atol=1e-6)
        buildings = unit(png(city / f"png/buildings_complete/{m}.png"))
        np.testing.assert_allclose(s["cond"][0], buildings, atol=1e-6)
        np.testing.assert_array_equal(s["cond"][1], unit(png(city / f"png/antennas/{m}_{t}.png")))
        third = unit(png(city / f"png/cars/{m}.png")) if sim.startswith("cars") else buildings
        np.testing.assert_allclose(s["cond"][2], third, atol=1e-6)
    assert not torch.equal(d[0]["cond"][2], d[1]["cond"][2])              # cars differ from buildings


def test_tx_per_map_keeps_the_first(city):
    d = ds(city, maps=[2], tx_per_map=2)
    assert [d.sample_key(i) for i in range(len(d))] == [(2, 0, "DPM"), (2, 1, "DPM")]


@pytest.mark.parametrize("size", [8, 16, 64])
def test_resize_keeps_the_transmitter_pixel(copy, size):
    # put transmitter 0 of map 0 in the last pixel, where rounding could lose it
    a = np.zeros((SIZE, SIZE), np.uint8)
    a[SIZE - 1, SIZE - 1] = 255
    Image.fromarray(a).save(copy / "png/antennas/0_0.png")
    d = ds(copy, maps=[0], size=size)
    for i in range(len(d)):
        s = d[i]
        assert s["image"].shape == (1, size, size) and s["cond"].shape == (3, size, size)
        tx = s["cond"][1]
        assert (tx == 1).sum() == 1 and (tx == -1).sum() == size * size - 1
        y, x = np.argwhere(png(copy / f"png/antennas/0_{i}.png"))[0]
        oy, ox = torch.nonzero(tx == 1)[0].tolist()
        # the output pixel sits on the transmitter: centres at most half a pixel apart
        tol = 0.5 * max(1.0, SIZE / size)
        assert abs((oy + 0.5) * SIZE / size - (y + 0.5)) <= tol
        assert abs((ox + 0.5) * SIZE / size - (x + 0.5)) <= tol
        assert -1 <= s["image"].min() and s["image"].max() <= 1
    assert tuple(torch.nonzero(d[0]["cond"][1] == 1)[0].tolist()) == (size - 1, size - 1)
    # area-like downsampling keeps the mean of the map
    if size < SIZE:
        full = unit(png(copy / "gain/DPM/0_1.png")).mean()
        assert abs(d[1]["image"].mean().item() - full) < 0.05


# ------------------------------------------------------------------------- bad data
def damage_cases():
    def missing_gain(root):
        (root / "gain/DPM/2_1.png").unlink()
        return "gain/DPM/2_1.png", "missing gain map", 1

    def missing_antenna(root):
        (root / "png/antennas/3_2.png").unlink()      # its gain file is now unexpected
        return "gain/DPM/3_2.png", "unexpected file: no transmitter file", 1

    def extra_in_antennas(root):
        (root / "png/antennas/notes.txt").write_text("hello")
        return "png/antennas/notes.txt", "unexpected file name", 0

    def extra_in_gain(root):
        shutil.copy(root / "gain/DPM/0_0.png", root / "gain/DPM/0_0 copy.png")
        return "gain/DPM/0_0 copy.png", "unexpected file name", 0

    def extra_in_buildings(root):
        shutil.copy(root / "png/buildings_complete/0.png", root / "png/buildings_complete/007.png")
        return "png/buildings_complete/007.png", "unexpected file name", 0

    def antenna_of_unknown_map(root):
        shutil.copy(root / "png/antennas/0_0.png", root / "png/antennas/99_0.png")
        return "png/antennas/99_0.png", "no building map", 0

    def missing_buildings(root):
        (root / "png/buildings_complete/5.png").unlink()     # antennas of map 5 become orphans
        return "png/buildings_complete/5.png", "missing building map", N_TX

    return [missing_gain, missing_antenna, extra_in_antennas, extra_in_gain,
            extra_in_buildings, antenna_of_unknown_map, missing_buildings]


@pytest.mark.parametrize("damage", damage_cases(), ids=lambda f: f.__name__)
def test_structural_problems(copy, damage):
    rel, reason, lost = damage(copy)
    with pytest.raises(DataError) as err:
        ds(copy)
    msg = str(err.value)
    assert msg.startswith(str(copy / rel) + ": ") and reason in msg and "\n" not in msg
    lines: list[str] = []
    d = ds(copy, on_bad_file="skip", log=lines.append)
    assert len(d) == N_MAPS * N_TX - lost
    assert any(p == str(copy / rel) and reason in r for p, r in d.skipped)
    assert len(lines) == 1 and "skipped" in lines[0] and str(copy) in lines[0]


def test_missing_cars_map(copy):
    (copy / "png/cars/4.png").unlink()
    with pytest.raises(DataError, match=r"png/cars/4.png: missing cars map"):
        ds(copy, sims=["DPM", "carsDPM"])
    d = ds(copy, sims=["DPM", "carsDPM"], on_bad_file="skip")
    assert len(d) == N_MAPS * N_TX * 2 - N_TX                   # only carsDPM of map 4 lost
    assert len(d.skipped) == 1
    assert ds(copy, sims=["DPM"]).skipped == []                  # not needed without cars


def read_cases():
    def wrong_size(path):
        Image.fromarray(np.zeros((SIZE + 2, SIZE), np.uint8)).save(path)
        return "size 32x34; expected 32x32"

    def wrong_mode(path):
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
        return "mode 'RGB'; expected 8-bit grayscale"

    def sixteen_bit(path):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint16)).save(path)
        return "expected 8-bit grayscale"

    def truncated(path):
        path.write_bytes(path.read_bytes()[:-30])
        return "corrupt or truncated PNG"

    def garbage(path):
        path.write_bytes(b"not an image at all")
        return "corrupt or truncated PNG"

    def jpeg(path):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(path, format="JPEG")
        return "not a PNG file"

    return [wrong_size, wrong_mode, sixteen_bit, truncated, garbage, jpeg]


@pytest.mark.parametrize("damage", read_cases(), ids=lambda f: f.__name__)
def test_unreadable_files(copy, damage):
    """A file whose header is wrong (size, mode, format, not an image) is found when the dataset
    is built, before any training; one damaged further in (truncated data) when it is read."""
    path = copy / "gain/DPM/1_1.png"
    reason = damage(path)
    at_start = damage.__name__ != "truncated"
    if at_start:
        with pytest.raises(DataError) as err:
            ds(copy)
        assert str(err.value).startswith(f"{path}: ") and reason in str(err.value)
        lines: list[str] = []
        d = ds(copy, on_bad_file="skip", log=lines.append)      # its samples are left out
        assert (1, 1, "DPM") not in [d.sample_key(i) for i in range(len(d))]
        assert d.skipped == [(str(path), d.skipped[0][1])] and reason in d.skipped[0][1]
        assert len(d) == N_MAPS * N_TX - 1 and len(lines) == 1
        return
    d = ds(copy)                                               # the header is fine
    bad = [i for i in range(len(d)) if d.sample_key(i) == (1, 1, "DPM")][0]
    d[bad - 1]
    with pytest.raises(DataError) as err:
        d[bad]
    assert str(err.value).startswith(f"{path}: ") and reason in str(err.value)
    lines = []
    d = ds(copy, on_bad_file="skip", log=lines.append)
    s = d[bad]                                                 # the next readable sample instead
    assert (s["map_id"], s["tx"]) == d.sample_key(bad + 1)[:2]
    assert d.skipped == [(str(path), d.skipped[0][1])] and reason in d.skipped[0][1]
    assert len(lines) == 1
    d[bad]
    assert len(d.skipped) == 1                                 # recorded once


def test_bad_transmitter_and_building_files(copy):
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(copy / "png/antennas/0_1.png")
    with pytest.raises(DataError, match=r"antennas/0_1.png: no transmitter pixel"):
        ds(copy, maps=[0])[1]
    (copy / "png/buildings_complete/2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"buildings_complete/2.png: corrupt or truncated"):
        ds(copy, maps=[2])


# ------------------------------------------------------------------- build_datasets
def test_build_datasets_generates_synthetic(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "syn"), simulation=["DPM", "carsIRT4"], image_size=32,
                     train_maps=3, val_maps=1, test_maps=1, tx_per_map=1,
                     synthetic=SyntheticConfig(num_maps=4, tx_per_map=2))
    lines: list[str] = []
    out = build_datasets(cfg, seed=0, parts=("train", "val", "test"), log=lines.append)
    assert len(lines) == 2 and "not found: generating a synthetic dataset there (4 maps x 2 transmitters" in lines[0]
    assert lines[1].startswith(f"generated the synthetic dataset {tmp_path / 'syn'} in ")   # said before and after
    parts = random_split(range(4), 3, 1, 1, seed=0)
    assert {k: v.map_ids for k, v in out.items()} == {k: parts.maps(k) for k in ("train", "val", "test")}
    assert len(out["train"]) == 2 * 1 * 2
    s = out["val"][0]
    assert s["image"].shape == (1, 32, 32) and (s["cond"][1] == 1).sum() == 1


def test_build_datasets_real_source_does_not_generate(tmp_path):
    cfg = DataConfig(source="radiomapseer", root=str(tmp_path / "RadioMapSeer"))
    with pytest.raises(DataError, match="RadioMapSeer: folder not found"):
        build_datasets(cfg, seed=0, log=quiet)
    assert not (tmp_path / "RadioMapSeer").exists()


def test_pixel_conversion_is_exact_float32_arithmetic():
    """uint8 -> [-1, 1]: float32(pixel) * float32(2/255) - 1 for every value, as torch computes it."""
    from lib.data.layout import to_unit
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = torch.from_numpy(pixels.copy()).float().mul_(2.0 / 255.0).sub_(1.0)
    got = to_unit(pixels, pixels[::-1].copy())
    assert got.dtype == torch.float32 and got.shape == (2, 16, 16)
    assert torch.equal(got[0], expected) and torch.equal(got[1], expected.flip(0))
    assert got[0, 0, 0] == -1.0 and got[0, -1, -1] == 1.0


@pytest.mark.parametrize("size", [SIZE, 20])
def test_batched_reads_equal_collated_samples(city, copy, size):
    """__getitems__ (what the loaders call) gives what default_collate of __getitem__ gives,
    including the next readable sample in place of a bad one (on_bad_file: skip)."""
    from torch.utils.data import default_collate
    (copy / "gain" / "IRT2" / "1_1.png").write_bytes(b"not a png")
    for d in (ds(city, ("DPM", "carsDPM"), size=size), ds(copy, ("DPM", "IRT2"), size=size, on_bad_file="skip")):
        idx = [0, 5, 9, 2, len(d) - 1]          # 9: map 1, transmitter 1, IRT2 (bad in the copy)
        batch = d.__getitems__(idx)
        ref = default_collate([d[i] for i in idx])
        assert batch.keys() == ref.keys()
        for k in batch:
            assert batch[k].dtype == ref[k].dtype and torch.equal(batch[k], ref[k]), k
        loaded = next(iter(eval_batches(d, batch_size=len(d))))
        assert torch.equal(loaded["cond"], default_collate([d[i] for i in range(len(d))])["cond"])
    assert [Path(p).name for p, _ in d.skipped] == ["1_1.png"]
    assert (batch["map_id"][2], batch["tx"][2], batch["sim_id"][2]) == (1, 2, 0)   # the next readable one


# ------------------------------------------------------------------ what each stage reads
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("size", [SIZE, 20])
def test_each_stage_reads_only_its_fields(city, tmp_path, monkeypatch, cached, size):
    """Stage 1 reads the gain map alone (one PNG per sample), stage 2 on its latent cache the
    condition alone (no gain map); the values are those of a dataset that reads everything."""
    import lib.data.layout as layout
    from lib.data.cache import PackedMaps, build
    from lib.data.dataset import STAGE_FIELDS
    packed = None
    if cached:
        build(city, ["DPM", "carsIRT2"], tmp_path / "packed", log=quiet)
        packed = PackedMaps.open(tmp_path / "packed")
    full = ds(city, ("DPM", "carsIRT2"), size=size, cache=packed)
    read: list[str] = []
    real = layout.read_png
    monkeypatch.setattr(layout, "read_png", lambda path, *a: read.append(Path(path).parts[-2]) or real(path, *a))
    idx = [0, 3, len(full) - 1]
    reference = {i: full[i] for i in idx}
    read.clear()
    for stage, kinds in (("vae", {"DPM", "carsIRT2"}), ("prior-cached", {"buildings_complete", "antennas", "cars"})):
        d = full.with_fields(STAGE_FIELDS[stage])
        batch = d.__getitems__(idx)
        assert set(batch) == {*STAGE_FIELDS[stage], "sim_id", "map_id", "tx", "index"}
        for k, i in enumerate(idx):
            single = d[i]
            for f in STAGE_FIELDS[stage]:
                assert torch.equal(single[f], reference[i][f]) and torch.equal(batch[f][k], reference[i][f]), (stage, f)
        if cached:
            assert read == []                               # the arrays, no PNG
        else:
            assert set(read) <= kinds and read, (stage, read)
            if stage == "vae":
                assert len(read) == 2 * len(idx)            # one gain PNG per sample (single and batched)
        read.clear()
    assert full.fields == ("image", "cond")                 # with_fields copies, the original reads both
    with pytest.raises(ValueError, match="fields"):
        full.with_fields(("gain",))
