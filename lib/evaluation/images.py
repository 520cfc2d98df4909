"""Sample grids, the one look of every grid the toolkit writes (training samples, validation,
evaluation): rows are samples, columns are kinds of image, a label per row, colour bars below.

A column is ``(title, tensor, kind)`` with ``tensor`` of shape ``(B, C, H, W)`` (any device or
dtype; only the first ``max_rows`` maps are moved to the CPU). All columns need the same ``B``,
``H`` and ``W``. Kinds:

- ``"map"``: values in ``[-1, 1]`` (model space), shown as the gray level ``(x + 1) / 2`` on the
  fixed scale ``[0, 1]`` through viridis (``C == 1``) or as RGB (``C == 3``). Its colour bar
  gives the gray level and, with ``db_per_level``, the pathloss in dB above the dataset's
  truncation level (RadioMapSeer: 80 dB per gray level; with a threshold ``t`` the maps are
  in RadioUNet's units ``y`` and the gray level is ``t + (1 - t) y``).
- ``"error"``: a non-negative error on the ``[0, 1]`` gray-level scale (e.g.
  ``|pred - target| / 2`` of model-space maps), ``C == 1``, through magma on its own scale
  ``[0, m]``: ``m`` is ``error_max`` or, by default, the largest error shown (rounded up to
  two significant digits); the column title says ``(0 to m)``.
- ``"cond"``: the condition stack in ``[-1, 1]``, ``C`` in ``{2, 3}``: buildings gray, cars cyan
  (only outside buildings), the transmitter a red square of ``2 r + 1`` px, ``r = max(1,
  round(min(H, W) / 64))``, so that it stays visible; a legend says which is which.

Maps smaller than ``TILE`` px are enlarged by a whole factor (nearest neighbour: every pixel
stays a sharp square), so a tile is at least ``TILE`` px. Drawn with Pillow (fast enough to
write at every validation) and written atomically (a temporary file moved into place), so a
crash never leaves a half-written image.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

KINDS = ("map", "error", "cond")
TILE = 128                 # smallest side of a tile in px
PAD = 6
TITLE_LINES = 2
FONT_SIZE = 13
LINE = FONT_SIZE + 4
LABEL_WIDTH = 120          # the row labels' margin, when there are labels
BAR_HEIGHT = 12
BAR_TITLE = 2 * (FONT_SIZE + 2)   # two lines of small text above a colour bar
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
BUILDING_RGB = (150, 150, 150)
CAR_RGB = (0, 200, 255)
TX_RGB = (255, 30, 30)
PNG_COMPRESS_LEVEL = 1     # zlib level: fast; grids are for eyes, not archives

Column = tuple[str, torch.Tensor, str]


@functools.lru_cache(maxsize=8)
def _lut(name: str) -> np.ndarray:
    """A colormap as a (256, 3) uint8 lookup table."""
    from matplotlib import colormaps  # imported lazily: only the colormap registry is needed

    try:
        cmap = colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}") from None
    rgba = cmap(np.linspace(0.0, 1.0, 256))
    return (rgba[:, :3] * 255.0 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_numpy(x: torch.Tensor, rows: int) -> np.ndarray:
    """First ``rows`` maps as a float32 numpy array (rows, C, H, W)."""
    return x[:rows].detach().to(device="cpu", dtype=torch.float32).numpy()


def _colorize(unit: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(N, H, W) values in [0, 1] -> (N, H, W, 3) uint8 through a lookup table."""
    scaled = np.nan_to_num(unit, nan=0.0) * np.float32(255.0)
    scaled += np.float32(0.5)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return lut[scaled.astype(np.uint8)]


def _render_map(x: np.ndarray, cmap: str) -> np.ndarray:
    unit = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    if x.shape[1] == 1:
        return _colorize(unit[:, 0], _lut(cmap))
    rgb = np.nan_to_num(unit.transpose(0, 2, 3, 1), nan=0.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _render_error(x: np.ndarray, error_max: float) -> np.ndarray:
    return _colorize(np.clip(x[:, 0] / error_max, 0.0, 1.0), _lut("magma"))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation of a (N, H, W) bool mask by radius ``r`` (separable running max)."""
    out = mask.copy()
    for axis in (1, 2):
        src = out.copy()
        n = src.shape[axis]
        for d in range(1, min(r, n - 1) + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - d), slice(d, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def marker_radius(height: int, width: int) -> int:
    """Radius of the transmitter marker for an ``H x W`` cond image."""
    return max(1, round(min(height, width) / 64))


def _render_cond(x: np.ndarray) -> np.ndarray:
    unit = (x + 1.0) / 2.0
    n, _, h, w = x.shape
    out = np.zeros((n, h, w, 3), dtype=np.uint8)
    buildings = unit[:, 0] > 0.5
    out[buildings] = BUILDING_RGB
    if x.shape[1] >= 3:
        cars = (unit[:, 2] > 0.5) & ~buildings
        out[cars] = CAR_RGB
    tx = _dilate(unit[:, 1] > 0.5, marker_radius(h, w))
    out[tx] = TX_RGB
    return out


def _validate(columns: Sequence[Column], max_rows: int) -> tuple[int, int, int]:
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if len(columns) == 0:
        raise ValueError("save_grid needs at least one column")
    shapes = []
    for i, col in enumerate(columns):
        if not (isinstance(col, (tuple, list)) and len(col) == 3):
            raise ValueError(f"column {i} must be a (title, tensor, kind) tuple")
        title, x, kind = col
        if kind not in KINDS:
            raise ValueError(f"column {i} ({title!r}): kind {kind!r} is not one of {KINDS}")
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"column {i} ({title!r}): expected a (B, C, H, W) tensor")
        allowed = {"map": (1, 3), "error": (1,), "cond": (2, 3)}[kind]
        if x.shape[1] not in allowed:
            raise ValueError(f"column {i} ({title!r}): kind {kind!r} needs C in {allowed}, got {tuple(x.shape)}")
        shapes.append((x.shape[0], x.shape[2], x.shape[3]))
    if len(set(shapes)) != 1:
        raise ValueError(f"columns differ in (B, H, W): {shapes}")
    b, h, w = shapes[0]
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"columns hold no pixels: (B, H, W) = {shapes[0]}")
    return min(b, max_rows), h, w


def nice_max(value: float) -> float:
    """``value`` rounded up to two significant digits (a colour scale's top); at least 1e-3; 1 for
    a value that is not finite (a model whose output is NaN still gets its grid)."""
    if not math.isfinite(float(value)):
        return 1.0
    value = max(float(value), 1e-3)
    step = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / step - 1e-9) * step


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    """``text`` wrapped to ``width`` px in at most ``lines`` lines (the last cut with an ellipsis
    only if it cannot fit)."""
    words, out = str(text).split(), []
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words:
        out[-1] = f"{out[-1]} {' '.join(words)}"
    while out and draw.textlength(out[-1], font=font) > width and len(out[-1]) > 1:
        out[-1] = out[-1][:-2] + "…"
    return out


def _footer_blocks(kinds: set[str], x0: int, y0: int, width: int, bar_w: int, db: bool
                   ) -> list[tuple[str, int, int]]:
    """Where the colour bars and the legend go below the tiles: (what, x, y); a block that
    does not fit beside the previous one starts a new line."""
    bar_h = BAR_TITLE + BAR_HEIGHT + LINE + (LINE if db else 0) + PAD
    blocks, x, y = [], x0, y0
    for what in ("map", "error"):
        if what in kinds:
            if x + bar_w > width - PAD and x > x0:
                x, y = x0, y + bar_h
            blocks.append((what, x, y))
            x += bar_w + 3 * PAD
    y_legend = (y + bar_h) if blocks else y0
    if "cond" in kinds:
        blocks.append(("cond", x0, y_legend))
    return blocks


def render_grid(columns: Sequence[Column], max_rows: int = 8, *, labels: Optional[Sequence[str]] = None,
                map_cmap: str = "viridis", error_max: Optional[float] = None,
                db_per_level: Optional[float] = 80.0, threshold: float = 0.0) -> np.ndarray:
    """The grid :func:`save_grid` writes, as an ``(height, width, 3)`` uint8 RGB array."""
    from lib.numfmt import fmt
    rows, h, w = _validate(columns, max_rows)
    arrays = [(title, _to_numpy(x, rows), kind) for title, x, kind in columns]
    errors = [a for _, a, kind in arrays if kind == "error"]
    if error_max is None:
        error_max = nice_max(max((float(np.nanmax(a)) for a in errors), default=1.0))
    if not error_max > 0:
        raise ValueError(f"error_max must be > 0, got {error_max}")
    # layout
    k = max(1, math.ceil(TILE / min(h, w)))                  # a whole enlargement factor
    th, tw = h * k, w * k
    label_w = LABEL_WIDTH if labels is not None else 0
    header = PAD + TITLE_LINES * LINE + PAD
    width = PAD + label_w + len(arrays) * (tw + PAD)
    kinds = {kind for _, _, kind in arrays}
    bar_w = min(260, max(120, width - label_w - 3 * PAD))
    if len(kinds & {"map", "error"}) == 2:                       # side by side when both fit
        bar_w = max(bar_w if bar_w * 2 + 5 * PAD <= width - label_w else 0,
                    min(260, (width - label_w - 5 * PAD) // 2)) if (width - label_w - 5 * PAD) // 2 >= 150 else bar_w
    blocks = _footer_blocks(kinds, PAD + label_w, header + rows * (th + PAD) + PAD, width, bar_w, bool(db_per_level))
    height = max(y for _, _, y in blocks) + (LINE + PAD if "cond" in kinds else
                                             BAR_TITLE + BAR_HEIGHT + LINE + (LINE if db_per_level else 0) + PAD) \
        if blocks else header + rows * (th + PAD)
    # pixels: tiles, colour ramps, legend swatches
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[...] = BACKGROUND
    titles = []
    for j, (title, a, kind) in enumerate(arrays):
        tiles = (_render_map(a, map_cmap) if kind == "map" else _render_error(a, error_max) if kind == "error"
                 else _render_cond(a))
        tiles = tiles.repeat(k, axis=1).repeat(k, axis=2)
        x0 = PAD + label_w + j * (tw + PAD)
        for i in range(rows):
            y0 = header + i * (th + PAD)
            canvas[y0:y0 + th, x0:x0 + tw] = tiles[i]
        titles.append(f"{title} (0 to {fmt(error_max)})" if kind == "error" else title)
    for what, x, y in blocks:
        if what in ("map", "error"):
            lut = _lut(map_cmap if what == "map" else "magma")
            canvas[y + BAR_TITLE:y + BAR_TITLE + BAR_HEIGHT, x:x + bar_w] = \
                lut[np.linspace(0, 255, bar_w).astype(np.uint8)][None]
    # text: titles, row labels, the bars' titles and ticks, the legend
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font, small = _font(FONT_SIZE), _font(FONT_SIZE - 2)
    for j, title in enumerate(titles):
        x0 = PAD + label_w + j * (tw + PAD)
        for n, line in enumerate(_fit(draw, title, font, tw, TITLE_LINES)):
            draw.text((x0 + tw / 2, PAD + n * LINE), line, fill=INK, font=font, anchor="ma")
    for i, label in enumerate(list(labels or [])[:rows]):
        lines = textwrap.wrap(str(label), 16)[:4] or [""]
        y0 = header + i * (th + PAD) + th / 2 - len(lines) * LINE / 2
        for n, line in enumerate(lines):
            draw.text((PAD, y0 + n * LINE), line, fill=INK, font=_font(FONT_SIZE - 1))

    def ticks(x: int, y: int, marks: list[tuple[float, str]]) -> None:
        for frac, label in marks:
            tx = x + frac * (bar_w - 1)
            draw.line([(tx, y), (tx, y + 3)], fill=INK)
            lw = draw.textlength(label, font=small)
            draw.text((min(max(tx - lw / 2, x), x + bar_w - lw), y + 3), label, fill=INK, font=small)

    gray = lambda v: threshold + (1 - threshold) * v  # noqa: E731
    for what, x, y in blocks:
        if what == "map":
            level = "gray level" if threshold == 0 else f"level above the {threshold:g} noise floor"
            level += "; below it: dB over truncation" if db_per_level else ""
            for n, line in enumerate(_fit(draw, level, small, bar_w, 2)):
                draw.text((x, y + n * (FONT_SIZE + 2)), line, fill=INK, font=small)
            ticks(x, y + BAR_TITLE + BAR_HEIGHT, [(v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)])
            if db_per_level:
                ticks(x, y + BAR_TITLE + LINE + BAR_HEIGHT,
                      [(v, f"{db_per_level * gray(v):.0f} dB") for v in (0.0, 0.5, 1.0)])
        elif what == "error":
            for n, line in enumerate(_fit(draw, "|error| in gray levels, on its own scale", small, bar_w, 2)):
                draw.text((x, y + n * (FONT_SIZE + 2)), line, fill=INK, font=small)
            ticks(x, y + BAR_TITLE + BAR_HEIGHT, [(v, fmt(v * error_max)) for v in (0.0, 0.5, 1.0)])
        else:
            for rgb, name in ((BUILDING_RGB, "building"), (CAR_RGB, "car"), (TX_RGB, "transmitter")):
                draw.rectangle([x, y + 3, x + 10, y + 13], fill=rgb)
                draw.text((x + 14, y), name, fill=INK, font=small)
                x += 24 + int(draw.textlength(name, font=small))
    return np.asarray(image)


def save_grid(path: str | os.PathLike, columns: Sequence[Column], max_rows: int = 8, *,
              labels: Optional[Sequence[str]] = None, map_cmap: str = "viridis",
              error_max: Optional[float] = None, db_per_level: Optional[float] = 80.0,
              threshold: float = 0.0) -> None:
    """Write a PNG grid: one row per sample (at most ``max_rows``; ``labels`` says which, e.g.
    ``map 12, tx 3, DPM``), one column per ``(title, tensor, kind)`` (see the module docstring).
    Creates the parent folder; writes atomically (temp file + ``os.replace``)."""
    path = Path(path)
    grid = render_grid(columns, max_rows, labels=labels, map_cmap=map_cmap, error_max=error_max,
                       db_per_level=db_per_level, threshold=threshold)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp makes 0600; a grid is an ordinary output
            Image.fromarray(grid).save(fh, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def sample_labels(first: dict, simulations: Sequence[str]) -> list[str]:
    """``map 12, tx 3, DPM`` for each sample of a batch (``map_id``, ``tx``, ``sim_id``)."""
    return [f"map {m}, tx {t}, {simulations[s]}" for m, t, s in
            zip(first["map_id"].tolist(), first["tx"].tolist(), first["sim_id"].tolist())]


def save_samples(path: str | os.PathLike, first: dict, predictions: dict[str, str], simulations: Sequence[str],
                 threshold: float = 0.0, truth: str = "ground truth", condition: bool = True) -> Path:
    """The grid of the first batch :func:`lib.evaluation.scoring.score_methods` scored (``first``): the
    condition (with ``condition``), the ground truth, each prediction ({column title: key in
    ``first``}) and the error of the first one, a row label per sample. Returns its path."""
    columns = [("buildings + transmitter", first["cond"], "cond")] if condition else []
    columns += [(truth, first["image"], "map")] + [(title, first[key], "map") for title, key in predictions.items()]
    title, key = next(iter(predictions.items()))
    columns.append(("|error|" if len(predictions) == 1 else f"|{title} error|",
                    (first[key] - first["image"]).abs() / 2, "error"))
    save_grid(path, columns, labels=sample_labels(first, simulations), threshold=threshold)
    return Path(path)
