"""Sample grids: layout, colours, transmitter marker, atomic writes, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lib.images as images
from lib.images import (
    BUILDING_RGB,
    CAR_RGB,
    HEADER,
    PAD,
    TX_RGB,
    marker_radius,
    render_grid,
    save_grid,
)

H, W = 32, 48  # not square, so rows and columns cannot be confused


def _maps(b: int, seed: int = 0, c: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, H, W, generator=g) * 2 - 1


def _cond(b: int, tx: list[tuple[int, int]]) -> torch.Tensor:
    cond = -torch.ones(b, 3, H, W)
    cond[:, 0, 0:6, 30:40] = 1  # a building
    cond[:, 2, 0:6, 30:40] = 1  # "cars" channel repeats buildings there (no-car layout) ...
    cond[:, 2, 25:28, 2:10] = 1  # ... and has a car here
    for i, (y, x) in enumerate(tx):
        cond[i, 1, y, x] = 1
    return cond


def _cell(img: np.ndarray, row: int, col: int) -> np.ndarray:
    y0, x0 = HEADER + row * (H + PAD), PAD + col * (W + PAD)
    return img[y0 : y0 + H, x0 : x0 + W]


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im.convert("RGB"))


def test_png_size_scales_with_rows_and_columns(tmp_path):
    cols = [("target", _maps(3), "map"), ("pred", _maps(3, 1), "map")]
    save_grid(tmp_path / "a.png", cols)
    a = _read(tmp_path / "a.png")
    assert a.shape == (HEADER + 3 * (H + PAD), PAD + 2 * (W + PAD), 3)

    save_grid(tmp_path / "b.png", cols + [("err", _maps(3, 2).abs(), "error")])
    b = _read(tmp_path / "b.png")
    assert b.shape[0] == a.shape[0] and b.shape[1] == a.shape[1] + W + PAD  # one more column

    more = [("target", _maps(5), "map"), ("pred", _maps(5, 1), "map")]
    save_grid(tmp_path / "c.png", more)
    c = _read(tmp_path / "c.png")
    assert c.shape[1] == a.shape[1] and c.shape[0] == a.shape[0] + 2 * (H + PAD)  # two more rows

    save_grid(tmp_path / "d.png", more, max_rows=2)  # rows capped by max_rows
    assert _read(tmp_path / "d.png").shape[0] == HEADER + 2 * (H + PAD)


def test_rows_are_samples_and_map_colours_follow_values(tmp_path):
    lut = images._lut("viridis")
    x = torch.empty(3, 1, H, W)
    x[0], x[1], x[2] = -1.0, 1.0, 0.0
    img = render_grid([("map", x, "map")])
    assert (_cell(img, 0, 0) == lut[0]).all()
    assert (_cell(img, 1, 0) == lut[255]).all()
    assert (_cell(img, 2, 0) == lut[128]).all()
    gray = render_grid([("map", x, "map")], map_cmap="gray")
    assert (_cell(gray, 1, 0) == 255).all() and (_cell(gray, 0, 0) == 0).all()


def test_error_column_uses_fixed_scale():
    lut = images._lut("magma")
    e = torch.zeros(2, 1, H, W)
    e[1] = 0.5
    img = render_grid([("err", e, "error")])
    assert (_cell(img, 0, 0) == lut[0]).all()
    assert (_cell(img, 1, 0) == lut[128]).all()
    img = render_grid([("err", e, "error")], error_max=0.25)  # 0.5 saturates at 0.25
    assert (_cell(img, 1, 0) == lut[255]).all()


def test_cond_column_shows_buildings_cars_and_a_visible_transmitter(tmp_path):
    tx = [(12, 20), (30, 47)]  # second one in a corner: marker is clipped, not wrapped
    cols = [("cond", _cond(2, tx), "cond"), ("target", _maps(2), "map")]
    path = tmp_path / "grid.png"
    save_grid(path, cols)
    img = _read(path)
    r = marker_radius(H, W)
    assert r >= 1
    for row, (y, x) in enumerate(tx):
        cell = _cell(img, row, 0)
        ys, xs = slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1)
        assert (cell[ys, xs] == TX_RGB).all()  # whole dilated marker, not a lone pixel
        n_tx = (cell == TX_RGB).all(axis=-1).sum()
        assert n_tx == cell[ys, xs].shape[0] * cell[ys, xs].shape[1]
    cell = _cell(img, 0, 0)
    assert (cell[0:6, 30:40] == BUILDING_RGB).all()  # buildings win over the repeated channel
    assert (cell[25:28, 2:10] == CAR_RGB).all()
    assert (cell[16:22, 0:4] == 0).all()  # background black
    # the wrap-around check: nothing red on the opposite side of the corner marker
    assert not (_cell(img, 1, 0)[0:3, 0:3] == TX_RGB).all(axis=-1).any()


def test_cond_with_two_channels_and_rgb_map():
    cond = _cond(1, [(5, 5)])[:, :2]
    rgb = _maps(1, c=3)
    img = render_grid([("cond", cond, "cond"), ("rgb", rgb, "map")])
    assert (_cell(img, 0, 0)[5, 5] == TX_RGB).all()
    expected = np.floor(((rgb[0].permute(1, 2, 0).numpy() + 1) / 2) * 255 + 0.5)
    assert np.abs(_cell(img, 0, 1).astype(int) - expected).max() <= 1


def test_titles_are_drawn_in_the_header():
    cols = [("target", _maps(1), "map"), ("", _maps(1), "map")]
    img = render_grid(cols)
    header = img[:HEADER]
    first, second = header[:, PAD : PAD + W], header[:, 2 * PAD + W : 2 * PAD + 2 * W]
    assert (first != 255).any()  # some ink for "target"
    assert (second == 255).all()  # empty title: blank


def test_accepts_low_precision_and_grad_tensors():
    x = _maps(2).half().requires_grad_(False)
    y = _maps(2, 1).requires_grad_(True)
    img = render_grid([("a", x, "map"), ("b", y, "map")])
    assert img.dtype == np.uint8 and img.shape == (HEADER + 2 * (H + PAD), PAD + 2 * (W + PAD), 3)


def test_creates_parent_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "runs" / "samples" / "step_10.png"
    save_grid(path, [("t", _maps(2), "map")])
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["step_10.png"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_grid(path, [("t", _maps(2), "map")])
    before = path.read_bytes()

    def boom(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(images.Image.Image, "save", boom)
    with pytest.raises(RuntimeError):
        save_grid(path, [("t", _maps(4, 3), "map")])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.parametrize("columns", [
    [],                                                        # nothing to draw
    [("a", _maps(2), "map"), ("b", _maps(3), "map")],          # different batch sizes
    [("a", _maps(2), "sparkle")],                              # unknown kind
    [("a", torch.zeros(2, 32, 32), "map")],                    # not (B, C, H, W)
])
def test_bad_columns_raise(tmp_path, columns):
    with pytest.raises(ValueError):
        save_grid(tmp_path / "x.png", columns)
    assert not (tmp_path / "x.png").exists()
