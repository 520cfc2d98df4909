"""Radio maps for new environments from a trained stage-2 checkpoint (or its exported pipeline).

    python predict.py --checkpoint runs/demo/prior/checkpoints/step-0000600 --buildings city.png \\
        --tx 120,37 --tx 30,200 --simulation DPM --out maps/
    python predict.py --checkpoint runs/m/prior/checkpoints/step-0050000 --root /data/RadioMapSeer \\
        --maps 2 14 15 --simulation DPM --steps 1 --out maps/
    python predict.py --checkpoint runs/meas/prior/checkpoints/step-0000600 --buildings city.png --tx 120,37 \\
        --measurements measured.csv --samples 8 --units db --simulation DPM --out maps/

The checkpoint holds everything needed: the prior, the VAE it decodes with (``vae/``), the latent
scale, and in its ``config.yaml`` the model and the data conventions (image size, threshold,
cars input); a folder ``python -m lib.export`` wrote holds the same as a diffusers pipeline.
Either way the maps come from ``RadioMapPipeline.sample`` (lib/evaluation/pipeline.py). An environment is a building map (an 8-bit grayscale PNG, square, 255 = building,
like RadioMapSeer's ``png/buildings_complete``; resized to the model's size like the training
maps), transmitters at pixels ``--tx X,Y`` (column, row of that image) and, for a model that
takes cars as input, a cars map. ``--root`` reads the environments of a RadioMapSeer-layout
folder instead (``png/buildings_complete``, ``png/antennas``, ``png/cars``; all maps or
``--maps``). Writes, per transmitter, ``{out}/{simulation}/{name}_{tx}.png`` (8 bits, the
dataset's gray-level convention: with a threshold t the model's y is written as t + (1 - t) y)
and ``.npy`` (the same gray level as float32 in [0, 1], or with ``--units db`` the pathloss in dB,
``data.db_range``: lib/data/units.py), in batches, on a GPU when there is one.

A model trained with measurements (``prior.measurements``) takes them: ``--measurements FILE``, a
CSV with a header ``x,y,gray`` or ``x,y,db`` (pixels of the input map, like ``--tx``; a ``tx``
column, the 0-based ``--tx`` index, when there are several transmitters), or with ``--root``
``--measurements N`` (200 pixels, or "1%" of those outside buildings) read from the gain maps of
``--simulation`` at the pixels ``evaluate.py --measurements N`` measures with the same seed.
``--samples K`` draws K maps per input: the map written is their mean, and
``{name}_{tx}_uncertainty.npz`` holds their per-pixel ``std`` and quantiles ``q05``, ``q25``,
``q75``, ``q95`` (in ``--units``), ``{name}_{tx}_std.png`` the std (white: a quarter of the range).
"""
from __future__ import annotations

if __name__ == "__main__":       # answer --help and honour Ctrl-C before the slow imports below
    from lib.cli import early_start, predict_parser
    early_start(predict_parser)

import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from lib.cli import predict_parser
from lib.data import measurements
from lib.data.condition import fill_condition, scale_pixel
from lib.data.dataset import RadioMapDataset
from lib.data.layout import (ANTENNAS_DIR, BUILDINGS_DIR, CARS_DIR, BadFile, discover_maps, file_names, read_png,
                             tx_pixel)
from lib.data.units import db_to_gray, gray_to_db, gray_to_model
from lib.errors import UserError, one_line, run_cli
from lib.evaluation.pipeline import RadioMapPipeline, pipeline_from_checkpoint
from lib.models.objectives import choose_sampler
from lib.progress import echo, progress

Environment = tuple[str, int, np.ndarray, tuple[int, int], "np.ndarray | None"]   # name, tx, buildings, pixel, cars


def read_map(path: Path, what: str, size: int) -> np.ndarray:
    """An environment map: an 8-bit grayscale PNG, square, at least the model's size."""
    try:
        arr = read_png(path, None)
    except BadFile as exc:
        raise UserError(f"{what} {path}: {exc.reason}") from None
    if arr.shape[0] != arr.shape[1] or arr.shape[0] < size:
        raise UserError(f"{what} {path}: {arr.shape[1]}x{arr.shape[0]} px; expected a square map of at least "
                        f"{size}x{size} (the model's size; larger maps are resized to it)")
    return arr


def given_environment(args, size: int, cars_needed: bool) -> Iterator[Environment]:
    """--buildings, --tx and --cars: one city, any number of transmitters."""
    buildings = read_map(Path(args.buildings), "--buildings", size)
    cars = read_map(Path(args.cars), "--cars", size) if args.cars else None
    if cars is not None and cars.shape != buildings.shape:
        raise UserError(f"--cars {args.cars}: {cars.shape[1]}x{cars.shape[0]} px, the buildings "
                        f"{buildings.shape[1]}x{buildings.shape[0]}")
    if cars_needed and cars is None:
        raise UserError("this checkpoint takes cars as input (data.cars_input); pass --cars CARS.png")
    n = buildings.shape[0]
    for i, text in enumerate(args.tx):
        try:
            x, y = (int(v) for v in text.split(","))
        except ValueError:
            raise UserError(f"--tx {text}: expected X,Y (column,row in pixels), e.g. --tx 120,37") from None
        if not (0 <= x < n and 0 <= y < n):
            raise UserError(f"--tx {text}: outside the {n}x{n} map (X and Y in 0..{n - 1})")
        if buildings[y, x] > 127:
            echo(f"WARNING: --tx {text} is inside a building")
        yield Path(args.buildings).stem, i, buildings, (y, x), cars if cars_needed else None


def folder_environments(args, size: int, cars_needed: bool) -> Iterator[Environment]:
    """--root: every transmitter of every map (or of --maps) of a RadioMapSeer-layout folder."""
    root = Path(args.root)
    found = discover_maps(root)
    maps = args.maps if args.maps else found
    missing = sorted(set(maps) - set(found))
    if missing:
        raise UserError(f"--maps: {len(missing)} map(s) not in {root / BUILDINGS_DIR} (first: {missing[0]})")
    txs: dict[int, list[int]] = {}
    for name in file_names(root / ANTENNAS_DIR):
        m, _, t = name[:-4].partition("_")
        if name.endswith(".png") and m.isdigit() and t.isdigit():
            txs.setdefault(int(m), []).append(int(t))
    for m in maps:
        buildings = read_map(root / BUILDINGS_DIR / f"{m}.png", "buildings map", size)
        cars = read_map(root / CARS_DIR / f"{m}.png", "cars map", size) if cars_needed else None
        for t in sorted(txs.get(m, [])):
            pixel = tx_pixel(read_png(root / ANTENNAS_DIR / f"{m}_{t}.png", buildings.shape))
            if pixel is None:
                raise UserError(f"{root / ANTENNAS_DIR / f'{m}_{t}.png'}: no transmitter pixel")
            yield str(m), t, buildings, pixel, cars


def safe_name(text: str) -> str:
    """``text`` as a plain file name: letters, digits, ``.``, ``_`` and ``-`` kept, anything else
    (a path separator, ``..``) replaced by ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")
    return name or "_"


def output_folder(out: Path, simulation: str) -> Path:
    """``--out/SIMULATION``, made; only ever a folder under ``--out`` (a checkpoint's simulation
    names are data from whoever trained it)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder; pass a folder for the maps")
    folder = out / safe_name(simulation)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc}); pass a writable folder") from None
    if not folder.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--simulation {simulation!r}: not a name maps can be written under --out {out} as")
    return folder


def load_pipeline(path: Path, device: torch.device) -> RadioMapPipeline:
    """A stage-2 checkpoint folder, or a folder ``python -m lib.export`` wrote (model_index.json)."""
    if (path / "model_index.json").is_file():
        try:
            return RadioMapPipeline.from_pretrained(str(path)).to(device)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--checkpoint {path}: not a loadable RadioMapPipeline ({one_line(str(exc))[:200]})") from None
    return pipeline_from_checkpoint(path, device)


class Measured:
    """``--measurements``: the measurement channels of each batch (lib/data/measurements.py)."""

    def __init__(self, args, pipe: RadioMapPipeline, environments: list[Environment], size: int, seed: int) -> None:
        self.size, self.seed, self.amount, self.csv, self.gain = size, seed, None, {}, None
        spec = args.measurements
        if not pipe.takes_measurements:
            raise UserError(f"--measurements {spec}: {args.checkpoint} was trained without measurements "
                            f"(prior.measurements.count: null); only a prior trained with them takes them")
        threshold = float(pipe.config.threshold)
        if not Path(spec).is_file() and measurements.looks_like_amount(spec):
            self.amount = measurements.parse_amount(spec, "--measurements")
            if args.root is None:
                raise UserError(f"--measurements {spec}: N measured pixels are read from the gain maps of --root; "
                                f"for a city of your own give a CSV file (x,y,gray or x,y,db)")
            maps = sorted({int(name) for name, *_ in environments})
            ds = RadioMapDataset(args.root, [args.simulation], maps, size, fields=("image",), threshold=threshold,
                                 cars_input=pipe.config.cars_input, log=echo)
            keys = dict(zip(zip(*(a.tolist() for a in ds.sample_keys()[:2])), range(len(ds))))
            self.gain = lambda name, tx: ds[keys[(int(name), tx)]]["image"] if (int(name), tx) in keys else None
            return
        unit, rows = measurements.read_csv(Path(spec))
        if args.root is not None and len({name for name, *_ in environments}) > 1:
            raise UserError(f"--measurements {spec}: a CSV holds the pixels of one city; with --root give one map "
                            f"(--maps ID), or N to read them from each map's gain map")
        txs = {tx for *_, tx in rows}
        if None in txs and len(environments) > 1:
            raise UserError(f"--measurements {spec}: {len(environments)} transmitters; add a tx column (the --tx "
                            f"index, from 0) saying whose map each measurement is of")
        for i, (name, tx, buildings, _, _) in enumerate(environments):
            channels = np.zeros((2, size, size), dtype=np.float32)
            n = buildings.shape[0]
            for x, y, value, row_tx in rows:
                if row_tx is not None and row_tx != tx:
                    continue
                if not (0 <= x < n and 0 <= y < n):
                    raise UserError(f"--measurements {spec}: x,y {x},{y} outside the {n}x{n} map (0..{n - 1})")
                if buildings[y, x] > 127:
                    raise UserError(f"--measurements {spec}: x,y {x},{y} is inside a building (measurements are of "
                                    f"pixels outside buildings)")
                r, c = scale_pixel((y, x), buildings.shape, size)
                gray = db_to_gray(value, pipe.config.db_range) if unit == "db" else value
                channels[:, r, c] = gray_to_model(gray, threshold), 1.0
            self.csv[(name, tx)] = channels
        unknown = sorted(t for t in txs - {None} if t not in {tx for _, tx, *_ in environments})
        if unknown:
            raise UserError(f"--measurements {spec}: tx {unknown[0]} is not a transmitter of this run "
                            f"({', '.join(str(t) for _, t, *_ in environments)})")

    def channels(self, cond: torch.Tensor, batch: list[Environment]) -> torch.Tensor:
        """``cond`` (B, 3, S, S) with its two measurement channels."""
        if self.amount is None:
            extra = torch.from_numpy(np.stack([self.csv[(name, tx)] for name, tx, *_ in batch])).to(cond.device)
            return torch.cat([cond, extra], dim=1)
        images = []
        for name, tx, *_ in batch:
            image = self.gain(name, tx)
            if image is None:
                raise UserError(f"--measurements {self.amount}: no {name}_{tx}.png gain map of this simulation under "
                                f"--root")
            images.append(image)
        image = torch.stack(images).to(cond.device)
        mask = measurements.fixed_mask(cond, self.amount, self.seed, [name for name, *_ in batch],
                                       [tx for _, tx, *_ in batch])
        return measurements.with_measurements(cond, image, mask)


def main() -> int:
    args = predict_parser().parse_args()
    if (args.root is None) == (args.buildings is None):
        raise UserError("give --buildings PNG (with --tx) or --root FOLDER")
    if args.buildings and not args.tx:
        raise UserError("--buildings needs at least one --tx X,Y")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(Path(args.checkpoint), device)
    trained = list(pipe.config.simulations)
    if args.simulation not in trained:
        raise UserError(f"--simulation {args.simulation}: {args.checkpoint} was trained on {', '.join(trained)}")
    objective = pipe.objective
    dcfg = objective.cfg
    steps = dcfg.num_inference_steps if args.steps is None else args.steps
    if not 1 <= steps <= dcfg.num_train_timesteps or args.batch_size < 1:
        raise UserError(f"--steps {steps} / --batch-size {args.batch_size}: expected integers >= 1")
    sampler = choose_sampler(dcfg, args.sampler)
    size, cars_needed = int(pipe.config.image_size), pipe.cars_needed(args.simulation)
    environments = list((folder_environments if args.root else given_environment)(args, size, cars_needed))
    if not environments:
        raise UserError(f"--root {args.root}: no transmitters to predict for")

    seed = int(pipe.config.seed) if args.seed is None else args.seed
    measured = Measured(args, pipe, environments, size, seed) if args.measurements is not None else None
    if measured is None and pipe.takes_measurements:
        echo("this model takes measurements (--measurements FILE or N); predicting without any")
    samples = args.samples if objective.stochastic else 1
    if samples < args.samples:
        echo(f"--samples {args.samples}: objective {dcfg.objective} is deterministic; one map per input")
    db_range = list(pipe.config.db_range)
    units = (lambda g, spread=False: g * (db_range[1] - db_range[0]) if spread else gray_to_db(g, db_range)) \
        if args.units == "db" else (lambda g, spread=False: g)

    out = output_folder(Path(args.out), args.simulation)
    written: set[str] = set()
    rng = torch.Generator().manual_seed(seed)
    sim_id = trained.index(args.simulation)
    seconds = 0.0
    with torch.no_grad(), progress(len(environments), desc="predict", unit="sample") as bar:
        for start in range(0, len(environments), args.batch_size):
            batch = environments[start:start + args.batch_size]
            cond = np.empty((len(batch), 3, size, size), dtype=np.float32)
            for k, (_, _, buildings, pixel, cars) in enumerate(batch):
                fill_condition(cond[k], buildings, cars, pixel, buildings.shape)
            c = torch.from_numpy(cond).to(device)
            if measured is not None:
                c = measured.channels(c, batch)
            elif pipe.takes_measurements:
                c = measurements.with_measurements(c, None, None)
            ids = torch.full((len(batch),), sim_id, device=device)
            t0 = time.perf_counter()           # the pipeline's own sampling (lib/evaluation/pipeline.py)
            if samples > 1:
                spread = pipe.sample_spread(c, ids, samples, steps, sampler, rng)
                gray = spread["mean"]
            else:
                gray = pipe.sample(c, ids, steps, sampler, rng)
            seconds += time.perf_counter() - t0
            for k, ((name, tx, *_), g) in enumerate(zip(batch, gray)):
                stem = safe_name(f"{name}_{tx}")
                if stem in written:
                    raise UserError(f"{out / stem}.png: two inputs of this run would both be written there (city "
                                    f"{name!r}, transmitter {tx}); give the cities different file names")
                written.add(stem)
                np.save(out / f"{stem}.npy", units(g))
                Image.fromarray(np.rint(g * 255.0).astype(np.uint8), mode="L").save(out / f"{stem}.png")
                if samples > 1:
                    np.savez(out / f"{stem}_uncertainty.npz", units=args.units, samples=samples,
                             **{q: units(spread[q][k], spread=q == "std") for q in spread if q != "mean"})
                    std = np.rint(np.minimum(1.0, 4.0 * spread["std"][k]) * 255.0).astype(np.uint8)
                    Image.fromarray(std, mode="L").save(out / f"{stem}_std.png")
            bar.update(len(batch))
    echo(f"{len(environments)} samples (radio maps) in {seconds:.2f} s of sampling ({len(environments) / max(seconds, 1e-9):.3g} "
         f"samples/s; objective {dcfg.objective}, {sampler}, {steps} steps, {samples} map(s) per input, {device.type}); "
         f"written to {out} ({args.units})")
    return 0


if __name__ == "__main__":
    run_cli(main)
