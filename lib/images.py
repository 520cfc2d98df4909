"""Sample grids: rows are samples, columns are kinds of image, titles on top; written as PNG.

A column is ``(title, tensor, kind)`` with ``tensor`` of shape ``(B, C, H, W)`` (any device
or dtype; only the first ``max_rows`` maps are moved to the CPU). All columns need the same
``B``, ``H`` and ``W``. Kinds:

- ``"map"``   values in ``[-1, 1]`` (model space), shown as ``(x + 1) / 2`` clamped to
  ``[0, 1]`` on a fixed ``[0, 1]`` scale: ``C == 1`` through ``map_cmap`` (viridis by
  default, ``"gray"`` for grayscale), ``C == 3`` as RGB.
- ``"error"`` a non-negative error (e.g. ``|pred - target|`` on the ``[0, 1]`` map scale),
  ``C == 1``, shown with magma on the fixed scale ``[0, error_max]`` (default ``[0, 1]``;
  larger values saturate). Put the scale in the title if it is not ``[0, 1]``.
- ``"cond"``  the condition stack in ``[-1, 1]``, ``C`` in ``{2, 3}``: channel 0 buildings,
  channel 1 transmitter, channel 2 (optional) cars, or buildings again when there are no
  cars. Each channel is thresholded at 0.5 after mapping to ``[0, 1]`` and drawn on black:
  buildings gray, cars cyan (only where there is no building), the transmitter as a red
  square dilated to ``2 * r + 1`` px with ``r = max(1, round(min(H, W) / 64))`` (3 px at
  32 px, 9 px at 256 px) so it stays visible when the image is shown small.

Layout: ``PAD`` px of white between and around cells and a ``HEADER`` px title band, so
the PNG is ``PAD + ncols * (W + PAD)`` wide and ``HEADER + nrows * (H + PAD)`` high with
``nrows = min(B, max_rows)``. Titles longer than a cell are cut with an ellipsis.

Titles are drawn and the PNG encoded with Pillow (zlib level 1: grids are written during
training, so speed matters more than size). It is written to a temporary file in the target folder and moved into place with
``os.replace``, so a crash never leaves a half-written image under ``path``.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

KINDS = ("map", "error", "cond")
PAD = 2
HEADER = 18
FONT_SIZE = 12
BACKGROUND = (255, 255, 255)
TITLE_COLOR = (0, 0, 0)
BUILDING_RGB = (150, 150, 150)
CAR_RGB = (0, 200, 255)
TX_RGB = (255, 30, 30)
PNG_COMPRESS_LEVEL = 1  # zlib level: fast; grids are for eyes, not archives

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


def _fit_title(draw: ImageDraw.ImageDraw, title: str, font, width: int) -> str:
    if draw.textlength(title, font=font) <= width:
        return title
    for end in range(len(title) - 1, 0, -1):
        cut = title[:end] + "…"
        if draw.textlength(cut, font=font) <= width:
            return cut
    return ""


def _validate(columns: Sequence[Column], max_rows: int, error_max: float) -> tuple[int, int, int]:
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if not error_max > 0:
        raise ValueError(f"error_max must be > 0, got {error_max}")
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
        c = x.shape[1]
        allowed = {"map": (1, 3), "error": (1,), "cond": (2, 3)}[kind]
        if c not in allowed:
            raise ValueError(
                f"column {i} ({title!r}): kind {kind!r} needs C in {allowed}, got {tuple(x.shape)}"
            )
        shapes.append((x.shape[0], x.shape[2], x.shape[3]))
    if len(set(shapes)) != 1:
        raise ValueError(f"columns differ in (B, H, W): {shapes}")
    b, h, w = shapes[0]
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"columns hold no pixels: (B, H, W) = {shapes[0]}")
    return min(b, max_rows), h, w


def render_grid(
    columns: Sequence[Column],
    max_rows: int = 8,
    *,
    map_cmap: str = "viridis",
    error_max: float = 1.0,
) -> np.ndarray:
    """The grid :func:`save_grid` writes, as an ``(height, width, 3)`` uint8 RGB array."""
    rows, h, w = _validate(columns, max_rows, error_max)
    ncols = len(columns)
    canvas = np.empty((HEADER + rows * (h + PAD), PAD + ncols * (w + PAD), 3), dtype=np.uint8)
    canvas[...] = BACKGROUND
    for j, (_, x, kind) in enumerate(columns):
        a = _to_numpy(x, rows)
        if kind == "map":
            tiles = _render_map(a, map_cmap)
        elif kind == "error":
            tiles = _render_error(a, error_max)
        else:
            tiles = _render_cond(a)
        x0 = PAD + j * (w + PAD)
        for i in range(rows):
            y0 = HEADER + i * (h + PAD)
            canvas[y0 : y0 + h, x0 : x0 + w] = tiles[i]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = _font(FONT_SIZE)
    for j, (title, _, _) in enumerate(columns):
        text = _fit_title(draw, str(title), font, w)
        if text:
            x0 = PAD + j * (w + PAD)
            draw.text((x0 + w / 2, HEADER / 2), text, fill=TITLE_COLOR, font=font, anchor="mm")
    return np.asarray(image)


def save_grid(
    path: str | os.PathLike,
    columns: Sequence[Column],
    max_rows: int = 8,
    *,
    map_cmap: str = "viridis",
    error_max: float = 1.0,
) -> None:
    """Write a PNG grid: one row per sample (at most ``max_rows``), one column per entry.

    ``columns`` is a list of ``(title, tensor, kind)``, ``kind`` in ``{"map", "error",
    "cond"}`` (see the module docstring). Creates ``path``'s parent folder if needed and
    writes atomically (temp file + ``os.replace``).
    """
    path = Path(path)
    grid = render_grid(columns, max_rows, map_cmap=map_cmap, error_max=error_max)
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
