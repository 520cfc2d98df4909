"""What a radio-map dataset looks like, in four numbers: ``python -m lib.synthetic stats ROOT``.

For any RadioMapSeer-layout folder, real or synthetic, and one simulation at a time:

- per gain map (one map x transmitter), over the pixels outside buildings, with gray levels
  in [0, 1] (the PNG's 0..255 / 255): the **median** gray level, the **share above 0.5** and
  the **share below 0.05**;
- per city map: the **share of buildings** (``png/buildings_complete``, pixels > 0).

Each is summarised by its median and its 10th-90th percentile range over the maps, next to
the range measured on published RadioMapSeer maps (:data:`REAL_RANGES`), so that a user can
compare their data, or the synthetic generator, with the real thing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lib.data.layout import _TX_NAME, BUILDINGS_DIR, GAIN_DIR, read_png, require_dir, require_root
from lib.errors import DataError

# Measured on four published RadioMapSeer IRT4 gain maps (pixels outside buildings), as
# reported in this project's issue 17 ("The embedded synthetic city data looks like
# RadioMapSeer"): the ranges over those four maps.
REAL_RANGES = {"median": (0.03, 0.25), "above_half": (0.02, 0.06), "below_005": (0.18, 0.58),
               "buildings": (0.16, 0.31)}
LABELS = {"median": "median gray level (outside buildings)", "above_half": "share above 0.5",
          "below_005": "share below 0.05", "buildings": "buildings, share of the map"}


@dataclass
class MapStats:
    simulation: str
    files: int                       # gain maps measured
    maps: int                        # city maps they belong to
    total_files: int                 # gain maps of the simulation in the folder
    values: dict[str, np.ndarray]    # statistic -> one value per gain map (buildings: per city map)

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                    "p90": float(np.percentile(v, 90)), "min": float(v.min()), "max": float(v.max())}
                for k, v in self.values.items()}

    def inside_real(self) -> dict[str, bool]:
        """Whether the median over the maps lies in the published maps' range."""
        s = self.summary()
        return {k: REAL_RANGES[k][0] <= s[k]["median"] <= REAL_RANGES[k][1] for k in REAL_RANGES}


def gain_statistics(gain: np.ndarray, buildings: np.ndarray) -> tuple[float, float, float]:
    """(median, share > 0.5, share < 0.05) of the gray levels outside ``buildings``."""
    g = gain[~buildings].astype(np.float64) / 255.0
    if g.size == 0:
        return 0.0, 0.0, 1.0
    return float(np.median(g)), float((g > 0.5).mean()), float((g < 0.05).mean())


def map_statistics(root: str | Path, simulation: str, max_files: Optional[int] = 2000) -> MapStats:
    """The statistics of ``simulation``'s gain maps under ``root`` (at most ``max_files``, spread
    evenly over them; None: all)."""
    root = Path(root)
    require_root(root)
    folder = require_dir(root, f"{GAIN_DIR}/{simulation}")
    names = sorted(n for n in (p.name for p in folder.iterdir()) if _TX_NAME.fullmatch(n))
    if not names:
        raise DataError(f"{folder}: no gain maps (expected files named <map>_<tx>.png)")
    chosen = names if max_files is None or len(names) <= max_files else \
        [names[int(i)] for i in np.linspace(0, len(names) - 1, max_files).round()]
    buildings: dict[int, np.ndarray] = {}
    rows = []
    for name in chosen:
        map_id = int(_TX_NAME.fullmatch(name).group(1))
        if map_id not in buildings:
            buildings[map_id] = read_png(root / BUILDINGS_DIR / f"{map_id}.png", None) > 0
        b = buildings[map_id]
        rows.append(gain_statistics(read_png(folder / name, b.shape, root / BUILDINGS_DIR / f"{map_id}.png"), b))
    v = np.array(rows)
    values = {"median": v[:, 0], "above_half": v[:, 1], "below_005": v[:, 2],
              "buildings": np.array([b.mean() for b in buildings.values()])}
    return MapStats(simulation, len(chosen), len(buildings), len(names), values)


def stats_table(root: str | Path, stats: list[MapStats]) -> str:
    """The report ``python -m lib.synthetic stats`` prints."""
    lines = [f"{root}: gray levels in [0, 1] (PNG / 255), pixels outside buildings; median and 10th-90th "
             f"percentile over the maps; RadioMapSeer: the range over four published IRT4 maps"]
    for st in stats:
        s, ok = st.summary(), st.inside_real()
        sampled = "" if st.files == st.total_files else f" (spread evenly over {st.total_files})"
        lines += ["", f"{st.simulation}: {st.files} gain maps of {st.maps} city maps{sampled}",
                  f"  {'statistic':<40} {'median':>8} {'p10 - p90':>15} {'RadioMapSeer':>14}  median inside"]
        for k, label in LABELS.items():
            lo, hi = REAL_RANGES[k]
            lines.append(f"  {label:<40} {s[k]['median']:>8.3f} {s[k]['p10']:>7.3f} - {s[k]['p90']:<5.3f} "
                         f"{lo:>6.2f} - {hi:<5.2f}  {'yes' if ok[k] else 'no'}")
    return "\n".join(lines)
