"""``python -m lib.cache build|check``: the command line of the packed data cache (:mod:`lib.data.cache`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from lib.data.cache import AUTO_DIR, PackedMaps, build, configured_path, use_view
from lib.data.layout import cars_channels
from lib.errors import run_cli


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.cache", description="Pack a RadioMapSeer-layout folder into a memory-mapped cache (build), or check that one is fresh (check).")
    p.add_argument("command", choices=["build", "check"],
                   help="build: pack the PNGs (replacing a cache there); check: is it fresh?")
    p.add_argument("--config", help="experiment YAML: data.root, data.simulation and data.cache")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.cache=/fast/cache")
    p.add_argument("--root", help="dataset folder (instead of --config)")
    p.add_argument("--simulation", nargs="+", default=None, help="with --root: simulations to pack")
    p.add_argument("--out", help="with --root: cache folder")
    a = p.parse_args(argv)
    if a.config is not None:
        from lib.config import load_config
        full = load_config(a.config, a.set)
        cfg = full.data
        if cfg.source == "synthetic":
            from lib.data.synthetic import ensure_synthetic
            ensure_synthetic(cfg, full.seed)
        root, sims = Path(cfg.root), list(cfg.simulation)
        cars = any(cars_channels(sims, cfg.cars_input))
        out = configured_path(cfg) or Path(cfg.root) / AUTO_DIR
        if cfg.cache == "off":
            print(f"note: data.cache is off in {a.config}; building at {out} (use it with "
                  f"--set data.cache=auto)", file=sys.stderr)
    elif a.root and a.out:
        root, out = Path(a.root), Path(a.out)
        sims = a.simulation or ["DPM"]
        cars = any(cars_channels(sims))
    else:
        p.error("give --config CONFIG, or --root ROOT --out OUT [--simulation SIM ...]")
    if a.command == "build":
        packed = build(root, sims, out, cars=cars)
        if a.config is not None:
            use_view(packed, cfg.image_size)
        return 0
    packed = PackedMaps.open(out)
    packed.check(root, sims, cars)
    print(f"data.cache {out}: fresh for {root} ({', '.join(sims)}; built {packed.index['created']})")
    return 0


if __name__ == "__main__":
    run_cli(main)
