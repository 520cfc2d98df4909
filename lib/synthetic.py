"""``python -m lib.synthetic``: write the synthetic city dataset (:mod:`lib.data.synthetic`);
``python -m lib.synthetic stats ROOT``: a RadioMapSeer-layout folder's statistics (:mod:`lib.data.map_stats`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lib.data.synthetic import generate, simulations
from lib.errors import run_cli


def stats_main(argv: list[str]) -> int:
    from lib.data.map_stats import map_statistics, stats_table
    p = argparse.ArgumentParser(prog="python -m lib.synthetic stats",
                                description="Statistics of a RadioMapSeer-layout folder (real or synthetic) next to "
                                            "the published maps': median gray level, shares above 0.5 and below "
                                            "0.05 (outside buildings), share of buildings.")
    p.add_argument("root", help="a folder with png/buildings_complete and gain/<simulation>")
    p.add_argument("--simulation", action="append", default=None,
                   help="simulation folder under gain/ (repeatable; default: every one there)")
    p.add_argument("--max-files", type=int, default=2000, help="gain maps measured per simulation, spread evenly")
    a = p.parse_args(argv)
    root = Path(a.root)
    sims = a.simulation
    if not sims:                      # every simulation there (a missing gain/ is the error for DPM)
        sims = sorted(d.name for d in (root / "gain").iterdir() if d.is_dir()) if (root / "gain").is_dir() else ["DPM"]
    print(stats_table(root, [map_statistics(root, s, a.max_files) for s in sims]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stats"]:
        return stats_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m lib.synthetic",
                                description="Write a synthetic city dataset in the RadioMapSeer layout "
                                            "(python -m lib.synthetic stats ROOT: its statistics).")
    p.add_argument("--root", required=True, help="output folder (must not exist)")
    p.add_argument("--num-maps", type=int, required=True)
    p.add_argument("--tx-per-map", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--no-cars", action="store_true", help="skip png/cars and gain/cars*")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    generate(a.root, a.num_maps, a.tx_per_map, a.seed, size=a.size, cars=not a.no_cars)
    print(f"wrote {a.num_maps} maps x {a.tx_per_map} transmitters x "
          f"{len(simulations(not a.no_cars))} simulations ({a.size} px) to {a.root} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
