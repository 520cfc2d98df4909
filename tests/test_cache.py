"""lib.data.cache: the packed copy reads exactly like the PNGs, and a stale or bad cache is refused."""
from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib import cache as cache_cli
from lib.config import load_config
from lib.data import cache
from lib.data.batching import train_batches
from lib.data.dataset import RadioMapDataset, build_datasets
from lib.errors import ConfigError, DataError
from tests.helpers import tiny_config

SIMS = ["DPM", "carsIRT2"]


def quiet(message: str) -> None:
    pass


@pytest.fixture
def city(tiny_data, tmp_path) -> Path:
    """A private copy of the session's tiny dataset (8 maps x 2 transmitters, 32 px)."""
    return Path(shutil.copytree(tiny_data, tmp_path / "city"))


def dataset(root, packed=None, size=32, sims=SIMS, **kw) -> RadioMapDataset:
    return RadioMapDataset(root, sims, range(8), size, log=quiet, cache=packed, **kw)


def same_sample(a: dict, b: dict) -> bool:
    """The same sample (its row ``index`` may differ: a split without a skipped file has other rows)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a if k != "index")


def one_line_error(fn) -> str:
    with pytest.raises(DataError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ the same values
@pytest.mark.parametrize("size,resized_copy", [(32, False), (16, False), (16, True), (48, True)])
def test_cached_samples_equal_the_png_path(city, tmp_path, size, resized_copy):
    packed = cache.build(city, SIMS, tmp_path / "packed", log=quiet)
    if resized_copy:                     # samples are then slices of float32 maps at `size`
        cache.use_view(packed, size, log=quiet)
        assert packed.views == {size} and (tmp_path / f"packed/size-{size}/view.json").is_file()
    png, cached = dataset(city, size=size), dataset(city, packed, size=size)
    assert len(png) == len(cached) == 8 * 2 * 2
    for i in range(len(png)):
        assert same_sample(png[i], cached[i]), i
    a, b = next(train_batches(png, 4, seed=1)), next(train_batches(cached, 4, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dataloader_workers_get_the_index_not_the_arrays(city, tmp_path):
    packed = cache.build(city, SIMS, tmp_path / "packed", log=quiet)
    ds = dataset(city, packed)
    ds[0]                                            # arrays mapped in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000                        # the gain arrays alone are 4 x 16 x 32 x 32 bytes
    assert same_sample(pickle.loads(blob)[5], ds[5])


def test_unreadable_files_behave_as_on_the_png_path(city, tmp_path):
    bad = city / "gain/DPM/3_1.png"
    bad.write_bytes(bad.read_bytes()[:-30])                          # truncated
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(city / "png/antennas/5_0.png")   # no transmitter
    packed = cache.build(city, SIMS, tmp_path / "packed", log=quiet)
    assert set(packed.bad) == {"gain/DPM/3_1.png"}
    # The PNG path finds the truncated file when it reads it; the cache recorded it when it
    # packed it, so a dataset reading through the cache refuses it before any training.
    png = dataset(city)
    errors = []
    for i in range(len(png)):
        try:
            png[i]
        except DataError as exc:
            errors.append(str(exc))
    assert errors[0] == one_line_error(lambda: dataset(city, packed))
    png, cached = dataset(city, on_bad_file="skip"), dataset(city, packed, on_bad_file="skip")
    read = [png[i] for i in range(len(png))]                 # the PNG path skips as it reads
    from_cache = [cached[i] for i in range(len(cached))]
    assert len(cached) == len(png) - 1
    assert sorted(png.skipped) == sorted(cached.skipped) and len(cached.skipped) == 2
    keys = [(int(r["map_id"]), int(r["tx"]), int(r["sim_id"])) for r in read]
    for sample in from_cache:
        j = keys.index((int(sample["map_id"]), int(sample["tx"]), int(sample["sim_id"])))
        assert same_sample(read[j], sample)


# ------------------------------------------------------------------ config switch
def test_auto_builds_once_and_rebuilds_when_stale(city, tmp_path):
    cfg = load_config(tiny_config(tmp_path, city, data={"cache": "auto", "simulation": SIMS}))
    lines: list[str] = []
    first = build_datasets(cfg.data, cfg.seed, ("train", "val"), log=lines.append)
    assert (city / cache.AUTO_DIR / "index.json").is_file()
    assert sum(line.startswith("data.cache: packed") for line in lines) == 1
    assert first["train"].cache is not None and first["train"].cache is first["val"].cache
    assert first["train"].cache.views == set()                       # 32 px: the native size
    lines.clear()
    build_datasets(cfg.data, cfg.seed, ("train",), log=lines.append)
    assert lines == []                                               # reused as it is
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(city / "gain/DPM/1_1.png")   # a file changed
    build_datasets(cfg.data, cfg.seed, ("train",), log=lines.append)
    assert any("stale" in line and "rebuilding" in line for line in lines)
    assert sum(line.startswith("data.cache: packed") for line in lines) == 1


def test_off_reads_pngs_and_path_must_exist(city, tmp_path):
    cfg = load_config(tiny_config(tmp_path, city))
    assert cfg.data.cache == "off"
    assert build_datasets(cfg.data, cfg.seed, ("train",), log=quiet)["train"].cache is None
    missing = replace(cfg.data, cache=str(tmp_path / "nowhere"))
    msg = one_line_error(lambda: build_datasets(missing, cfg.seed, ("train",), log=quiet))
    assert "nowhere: no cache there" in msg and "python -m lib.cache build" in msg


def test_cache_key_validation(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=r"data.cache = '' is invalid; expected off, auto, or the folder"):
        load_config(tiny_config(tmp_path, tiny_data), ['data.cache=""'])
    assert load_config(tiny_config(tmp_path, tiny_data), ["data.cache=off"]).data.cache == "off"
    with pytest.raises(ConfigError, match=r"data.cache = True has the wrong type; expected a string \(quote it"):
        load_config(tiny_config(tmp_path, tiny_data), ["data.cache=on"])      # not a value of data.cache


# ------------------------------------------------------------------ stale and bad caches
@pytest.mark.parametrize("change", ["modify", "add", "remove"])
def test_stale_cache_is_refused(city, tmp_path, change):
    out = tmp_path / "packed"
    cache.build(city, SIMS, out, log=quiet)
    target = city / "gain/carsIRT2/2_0.png"
    if change == "modify":
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(target)
    elif change == "add":
        shutil.copy(target, city / "gain/carsIRT2/2_9.png")
    else:
        target.unlink()
    # (skip: the PNG listing itself would report the added or missing file first)
    msg = one_line_error(lambda: dataset(city, cache.PackedMaps.open(out), on_bad_file="skip"))
    assert msg.startswith(f"data.cache {out}: stale: {city / 'gain/carsIRT2'} changed")
    assert "rebuild it with `python -m lib.cache build" in msg
    dataset(city, cache.PackedMaps.open(out), sims=["DPM"])        # the folders it uses are unchanged


def test_bad_caches_are_one_line_errors(city, tmp_path):
    out = tmp_path / "packed"
    cache.build(city, ["DPM"], out, log=quiet)
    msg = one_line_error(lambda: dataset(city, cache.PackedMaps.open(out)))          # lacks carsIRT2
    assert "holds simulations ['DPM'], not ['carsIRT2']" in msg
    np.save(out / "gain-DPM.npy", np.zeros((3, 32, 32), np.uint8))                  # wrong shape
    msg = one_line_error(lambda: cache.PackedMaps.open(out))
    assert "damaged or not a cache of this toolkit (gain-DPM.npy has shape (3, 32, 32)" in msg
    (out / "index.json").write_text("{not json")
    assert "damaged" in one_line_error(lambda: cache.PackedMaps.open(out))
    (out / "index.json").write_text(json.dumps({"version": 99}))
    assert "version 99, expected 1" in one_line_error(lambda: cache.PackedMaps.open(out))


# ------------------------------------------------------------------ command line
def test_command_line_build_and_check(city, tmp_path, capsys):
    out = tmp_path / "cli-cache"
    assert cache_cli.main(["build", "--root", str(city), "--simulation", "DPM", "IRT2", "--out", str(out)]) == 0
    assert cache_cli.main(["check", "--root", str(city), "--simulation", "DPM", "--out", str(out)]) == 0
    assert "fresh" in capsys.readouterr().out
    cfg = tiny_config(tmp_path, city, data={"cache": str(tmp_path / "from-config")})
    assert cache_cli.main(["build", "--config", str(cfg)]) == 0
    assert cache.PackedMaps.open(tmp_path / "from-config").simulations == ["DPM"]


def test_unwritable_cache_location(city, tmp_path):
    (tmp_path / "a-file").write_text("")
    msg = one_line_error(lambda: cache.build(city, ["DPM"], tmp_path / "a-file" / "packed", log=quiet))
    assert msg.startswith(f"data.cache: cannot write {tmp_path / 'a-file' / 'packed'}") and "writable" in msg


# ------------------------------------------------------------------ a full disk
def test_a_full_disk_while_packing_is_one_line_and_leaves_nothing(city, tmp_path, monkeypatch):
    """The arrays' blocks are reserved before they are filled: a full disk is an error naming the
    folder and the bytes needed (not a SIGBUS), the partial cache is removed, and a disk that is
    known to be too small is refused before anything is decoded."""
    import errno

    import lib.outputs as outputs

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(outputs.os, "posix_fallocate", full)
    out = tmp_path / "packed"
    with pytest.raises(DataError, match=rf"^data.cache: cannot write {out} \(.*No space left on device, [0-9.]+ "
                                        r"(KiB|MiB) needed\); set data.cache to a writable folder with room"):
        cache.build(city, ["DPM"], out, log=lambda m: None)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("packed")]
    monkeypatch.undo()
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(DataError, match=rf"^data.cache: {tmp_path}/packed.tmp-\d+ has 100 bytes free, [0-9.]+ "
                                        r"(KiB|MiB) needed; free space there, or set data.cache to a folder on"):
        cache.build(city, ["DPM"], out, log=lambda m: None)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("packed")]
