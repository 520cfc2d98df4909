"""Sparse measurements as a stage-2 condition: a few pixels of the true map, outside buildings.

A model trained with ``prior.measurements.count`` set takes two more condition channels
(:func:`measurement_channels`): the measured gray level (model space, [-1, 1]) at the measured
pixels and 0 elsewhere, and the mask (1 measured, 0 not). Which pixels are measured:

- training: ``count`` pixels drawn afresh for every sample and step from the pixels outside
  buildings (:func:`draw_mask`, the global RNG, restored on resume); ``count`` is a number of
  pixels (``200``), a share of the pixels outside buildings (``"1%"``), or a range
  ``[low, high]`` of either, drawn uniformly per sample (``[0, "2%"]``: the model also learns to
  do without);
- validation, ``evaluate.py --measurements N`` and ``predict.py --measurements N``: fixed per
  sample (:func:`fixed_mask`): a generator seeded from the run's seed, the map and the
  transmitter ranks the pixels outside buildings once, and the first N are measured, so the same
  seed measures the same pixels in every script, and the pixels of a smaller N are among
  those of a larger one;
- ``predict.py --measurements FILE``: a CSV of ``x,y,gray`` or ``x,y,db`` (:func:`read_csv`).

:func:`correct` lets the measurements correct a decoded map: the residual at the measured pixels
(measured minus predicted) spread over its surroundings with a Gaussian of ``sigma`` px,
``r(p) = sum_i g(p - p_i) r_i / (sum_i g(p - p_i) + 1/2)`` with ``g`` peaking at 1 (so the
correction fades out where the nearest measurement is far), outside buildings only, and the
measured pixels set to their measured values.
"""
from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lib.errors import UserError

CHANNELS = ("measured_value", "measured_mask")
FADE = 0.5                     # :func:`correct`: the weight at which a correction is half its residual
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")


@dataclass(frozen=True)
class Amount:
    """A number of measured pixels, or a share of the pixels outside buildings (``fraction``)."""
    value: float
    fraction: bool

    def of(self, free: torch.Tensor) -> torch.Tensor:
        """Pixels per sample for ``free`` ((B,) counts of pixels outside buildings), capped by them."""
        n = free.double() * self.value if self.fraction else torch.full_like(free, self.value, dtype=torch.float64)
        return torch.minimum(n.round().long(), free.long())

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.fraction else f"{int(self.value)}"


def parse_amount(text: object, what: str) -> Amount:
    """``200`` (pixels) or ``"1%"`` / ``"0.5%"`` (of the pixels outside buildings); one-line error
    naming ``what`` otherwise."""
    m = _AMOUNT.match(str(text))
    if m is None or isinstance(text, bool):
        raise UserError(f"{what} {text!r}: expected a number of pixels (200) or a share of the pixels outside "
                        f"buildings (\"1%\")")
    value, percent = float(m.group(1)), bool(m.group(2))
    if percent:
        if value > 100:
            raise UserError(f"{what} {text!r}: a share of at most 100%")
        return Amount(value / 100.0, True)
    if not value.is_integer():
        raise UserError(f"{what} {text!r}: a number of pixels is an integer (or give a share: \"{value:g}%\")")
    return Amount(value, False)


def looks_like_amount(text: str) -> bool:
    """Whether ``text`` reads as an amount (200, 1%) rather than, say, a file name."""
    return _AMOUNT.match(text) is not None


@dataclass(frozen=True)
class Spec:
    """``prior.measurements.count``: a range [low, high] of amounts (low == high: a fixed amount)."""
    low: Amount
    high: Amount

    def draw(self, free: torch.Tensor) -> torch.Tensor:
        """Counts per sample, uniform in [low, high] (global RNG, on ``free``'s device)."""
        lo, hi = self.low.of(free), self.high.of(free)
        hi = torch.maximum(hi, lo)
        u = torch.rand(free.shape, device=free.device, dtype=torch.float64)
        return lo + (u * (hi - lo + 1).double()).floor().long().clamp(max=(hi - lo))

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low} .. {self.high}"


MeasurementSpec = Spec


def parse_spec(count: Optional[Sequence[str]], key: str = "prior.measurements.count") -> Optional[Spec]:
    """The config's ``count`` (None, ``[N]`` or ``[low, high]``) as a :class:`Spec` (None: off)."""
    if count is None:
        return None
    if len(count) not in (1, 2):
        raise UserError(f"{key} {list(count)!r}: expected null, one amount (200 or \"1%\") or a range [low, high]")
    low, high = (parse_amount(c, key) for c in (count[0], count[-1]))
    if low.fraction == high.fraction and low.value > high.value:
        raise UserError(f"{key} {list(count)!r}: the range's low end is above its high end")
    return Spec(low, high)


# --------------------------------------------------------------------------- masks
def free_pixels(cond: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool: the pixels outside buildings of conditions ``cond`` (channel 0 < 0)."""
    return cond[:, :1] < 0


def _first(scores: torch.Tensor, free: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``counts[i]`` free pixels of lowest score per sample: (B, 1, S, S) bool."""
    b = scores.shape[0]
    flat = torch.where(free.reshape(b, -1), scores.reshape(b, -1), torch.full_like(scores.reshape(b, -1), 2.0))
    order = flat.argsort(dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < counts.view(b, 1).to(ranks.device)).view_as(free)


def draw_mask(cond: torch.Tensor, spec: Spec) -> torch.Tensor:
    """Training: a fresh random set of measured pixels per sample (global RNG, on the device)."""
    free = free_pixels(cond)
    counts = spec.draw(free.flatten(1).sum(dim=1))
    return _first(torch.rand(free.shape, device=cond.device), free, counts)


def sample_generator(seed: int, map_id: object, tx: object) -> torch.Generator:
    """The generator that ranks one sample's pixels: from the seed, the map and the transmitter."""
    digest = hashlib.sha256(f"measurements/{seed}/{map_id}/{tx}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def fixed_mask(cond: torch.Tensor, amount: Amount, seed: int, map_ids: Sequence, txs: Sequence) -> torch.Tensor:
    """Validation, evaluation, prediction: the same pixels for the same (seed, map, transmitter),
    whatever the batch; the pixels of a smaller amount are among those of a larger one."""
    free = free_pixels(cond)
    scores = torch.stack([torch.rand(free.shape[1:], generator=sample_generator(seed, m, t))
                          for m, t in zip(map_ids, txs)]).to(cond.device)
    return _first(scores, free, amount.of(free.flatten(1).sum(dim=1)))


def measurement_channels(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 2, S, S): the measured values (``image``, model space, at the mask) and the mask."""
    m = mask.to(image.dtype)
    return torch.cat([image * m, m], dim=1)


def with_measurements(cond: torch.Tensor, image: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The condition with its measurement channels (``mask`` None: no measurements, zeros)."""
    if mask is None:
        return torch.cat([cond, cond.new_zeros(cond.shape[0], 2, *cond.shape[2:])], dim=1)
    return torch.cat([cond, measurement_channels(image, mask).to(cond.dtype)], dim=1)


# --------------------------------------------------------------------------- what the prior and the decoder do with them
def _gauss(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with peak weight 1 (not normalised), zero padding, in float32
    (outside autocast: validation under bf16 gives what evaluate.py gives)."""
    with torch.autocast(x.device.type, enabled=False):
        return _gauss32(x.float(), sigma)


def _gauss32(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def spread(cond: torch.Tensor, grid: int = 16) -> torch.Tensor:
    """(B, 2, S, S) features the condition encoder gets besides the sparse channels: the measured
    values interpolated over the map (a Gaussian-weighted mean on a ``grid`` x ``grid`` raster,
    bilinearly brought to S) and how much measurement is near (1 - e^-weight), both 0 far from
    any measurement. ``cond`` holds the measurement channels as its last two."""
    value, mask = cond[:, -2:-1].float(), cond[:, -1:].float()
    size = cond.shape[-1]
    n = min(grid, size)
    cells = lambda x: F.adaptive_avg_pool2d(x, n) * (size / n) ** 2  # noqa: E731  sums per cell
    num, den = _gauss(cells(value * mask), 1.0), _gauss(cells(mask), 1.0)
    interp = torch.where(den > 1e-3, num / den.clamp(min=1e-3), torch.zeros_like(num))
    feats = torch.cat([interp, 1.0 - torch.exp(-den)], dim=1)
    return F.interpolate(feats, size=(size, size), mode="bilinear", align_corners=False).to(cond.dtype)


def correct(maps: torch.Tensor, cond: torch.Tensor, sigma: float) -> torch.Tensor:
    """Decoded ``maps`` (B, 1, S, S) in [-1, 1] corrected by the measurements in ``cond``'s last two
    channels (see the module docstring); maps without measurements come back unchanged."""
    value, mask = cond[:, -2:-1].float(), cond[:, -1:].float()
    residual = (value - maps.float()) * mask
    num, den = _gauss(residual, sigma), _gauss(mask, sigma)
    free = free_pixels(cond).float()
    out = maps.float() + free * num / (den + FADE)
    out = torch.where((mask > 0) & (free > 0), value, out)
    return out.clamp(-1.0, 1.0).to(maps.dtype)


# --------------------------------------------------------------------------- predict.py's CSV
def read_csv(path: Path) -> tuple[str, list[tuple[int, int, float, Optional[int]]]]:
    """``x,y,gray`` or ``x,y,db`` (header required; an optional ``tx`` column: the --tx it belongs
    to, 0-based): (unit, rows of (x, y, value, tx)). One-line errors name the file and line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise UserError(f"--measurements {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"--measurements {path}: not a text CSV file") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    unit = next((u for u in ("gray", "db") if u in header), None)
    if "x" not in header or "y" not in header or unit is None:
        raise UserError(f"--measurements {path}: expected a header x,y,gray or x,y,db (optionally a tx column), "
                        f"got {','.join(header) or 'an empty file'}")
    cols = {h: i for i, h in enumerate(header)}
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            x, y = int(row[cols["x"]]), int(row[cols["y"]])
            value = float(row[cols[unit]])
            tx = int(row[cols["tx"]]) if "tx" in cols else None
        except (ValueError, IndexError):
            raise UserError(f"--measurements {path}:{n}: expected integers x,y, a number {unit}"
                            f"{' and an integer tx' if 'tx' in cols else ''}, got {','.join(row)}") from None
        if not math.isfinite(value):
            raise UserError(f"--measurements {path}:{n}: {unit} {row[cols[unit]]} is not a finite number")
        if unit == "gray" and not 0.0 <= value <= 1.0:
            raise UserError(f"--measurements {path}:{n}: gray {row[cols[unit]]} is outside [0, 1] (gray levels as "
                            f"predict.py writes them; 8-bit pixel values: divide by 255)")
        out.append((x, y, value, tx))
    if not out:
        raise UserError(f"--measurements {path}: no measurements under its header")
    return unit, out
