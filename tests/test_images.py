"""Sample grids: layout, colours, transmitter marker, atomic writes, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lib.evaluation.images as images
from lib.evaluation.images import BUILDING_RGB, CAR_RGB, PAD, TX_RGB, marker_radius, render_grid, save_grid

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


K = -(-images.TILE // min(H, W))            # the whole enlargement factor: tiles of at least TILE px
TH, TW = H * K, W * K
HEADER = PAD + images.TITLE_LINES * images.LINE + PAD


def _cell(img: np.ndarray, row: int, col: int, labels: bool = False) -> np.ndarray:
    """The cell's pixels at the maps' own resolution (one pixel per K x K block)."""
    x_label = images.LABEL_WIDTH if labels else 0
    y0, x0 = HEADER + row * (TH + PAD), PAD + x_label + col * (TW + PAD)
    block = img[y0: y0 + TH, x0: x0 + TW]
    assert (block[::K, ::K] == block[K - 1::K, K - 1::K]).all()       # whole K x K squares
    return block[::K, ::K]


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im.convert("RGB"))


def test_tiles_are_at_least_128_px_and_the_grid_grows_with_rows_and_columns(tmp_path):
    cols = [("target", _maps(3), "map"), ("pred", _maps(3, 1), "map")]
    a = render_grid(cols)
    assert TH >= 128 and TW >= 128 and a.shape[1] == PAD + 2 * (TW + PAD)
    b = render_grid(cols + [("err", _maps(3, 2).abs(), "error")])
    assert b.shape[1] == a.shape[1] + TW + PAD                                   # one more column
    c = render_grid([("target", _maps(5), "map"), ("pred", _maps(5, 1), "map")])
    assert c.shape[0] == a.shape[0] + 2 * (TH + PAD)                             # two more rows
    d = render_grid([("target", _maps(5), "map"), ("pred", _maps(5, 1), "map")], max_rows=2)
    assert d.shape[0] == a.shape[0] - (TH + PAD)                                 # rows capped
    e = render_grid(cols, labels=["map 1, tx 0, DPM"] * 3)
    assert e.shape[1] == a.shape[1] + images.LABEL_WIDTH                         # a margin for the labels
    assert (e[HEADER:HEADER + TH, PAD:images.LABEL_WIDTH] != 255).any()          # ink: the row label
    save_grid(tmp_path / "a.png", cols)
    assert np.array_equal(_read(tmp_path / "a.png"), a)


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


def test_the_error_column_has_its_own_scale_and_says_so():
    lut = images._lut("magma")
    e = torch.zeros(2, 1, H, W)
    e[1] = 0.04
    e[1, 0, 0, 0] = 0.08
    img = render_grid([("err", e, "error")])                 # scale 0 to 0.08: the largest error shown
    assert images.nice_max(0.08) == pytest.approx(0.08) and images.nice_max(0.0812) == pytest.approx(0.082)
    assert (_cell(img, 0, 0) == lut[0]).all()
    assert (_cell(img, 1, 0)[1:, 1:] == lut[128]).all() and (_cell(img, 1, 0)[0, 0] == lut[255]).all()
    img = render_grid([("err", e, "error")], error_max=0.02)  # 0.04 saturates at 0.02
    assert (_cell(img, 1, 0) == lut[255]).all()


def test_colour_bars_and_legend_below_the_tiles():
    img = render_grid([("cond", _cond(1, [(3, 3)]), "cond"), ("map", _maps(1), "map"),
                       ("err", _maps(1).abs(), "error")])
    below = img[HEADER + TH + PAD:]
    viridis, magma = images._lut("viridis"), images._lut("magma")
    row = below[images.PAD + images.BAR_TITLE + 2]              # a row through both bars
    found = lambda lut: sum((row == c).all(axis=-1).any() for c in lut[::32])  # noqa: E731
    assert found(viridis) == 8 and found(magma) == 8            # both ramps, end to end
    for rgb in (BUILDING_RGB, CAR_RGB, TX_RGB):                  # the legend's swatches
        assert (below == rgb).all(axis=-1).any()


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


def test_titles_are_drawn_whole_in_the_header():
    cols = [("reconstruction", _maps(1), "map"), ("", _maps(1), "map"), ("distance baseline", _maps(1), "map")]
    img = render_grid(cols)
    header = img[:HEADER]
    first, second = header[:, PAD: PAD + TW], header[:, 2 * PAD + TW: 2 * PAD + 2 * TW]
    assert (first != 255).any()  # ink for the title
    assert (second == 255).all()  # empty title: blank
    from PIL import ImageDraw
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    for title in ("reconstruction", "ground truth", "distance baseline", "|model error| (0 to 0.25)"):
        assert "…" not in "".join(images._fit(draw, title, images._font(images.FONT_SIZE), TW, images.TITLE_LINES))


def test_accepts_low_precision_and_grad_tensors():
    """fp16, bf16 and tensors that require grad (what validation under autocast hands over) draw
    the very pixels of their float32 values."""
    x = _maps(2).half().requires_grad_(False)
    y = _maps(2, 1).requires_grad_(True)
    img = render_grid([("a", x, "map"), ("b", y, "map")])
    assert img.dtype == np.uint8 and img.shape[1] == PAD + 2 * (TW + PAD)
    assert np.array_equal(img, render_grid([("a", x.float(), "map"), ("b", y.detach(), "map")]))
    z = _maps(2, 2).bfloat16()
    assert np.array_equal(render_grid([("c", z, "map")]), render_grid([("c", z.float(), "map")]))
    assert not np.array_equal(img, render_grid([("a", y.detach(), "map"), ("b", x.float(), "map")]))


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
