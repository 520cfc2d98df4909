"""Command-line arguments of the entry points, and what they do before their slow imports.

Importing torch and diffusers takes seconds. Each script starts with :func:`early_start`, which
needs only this module: ``--help`` is answered at once, and SIGINT / SIGTERM end the program
during the imports (a process started in the background inherits SIGINT ignored; a user who
sends it means it). From ``main`` on, :func:`lib.errors.run_cli` and then the training loop
handle the signals.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from lib.errors import exit_on_signals


def early_start(parser: Callable[[], argparse.ArgumentParser]) -> None:
    """Before the slow imports of a script run as a program: honour SIGINT/SIGTERM, and answer
    ``-h`` / ``--help`` (``parser()`` builds the script's parser)."""
    exit_on_signals()
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        parser().parse_args()


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 or a negative number is an error, not "off")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a step: expected an integer >= 1")
    return value


def _config_parser(description: str, example: str) -> argparse.ArgumentParser:
    """A parser with the two arguments every config-driven entry point takes: ``--config``, ``--set``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key (dotted, value parsed as YAML); repeatable, e.g. --set {example}")
    return p


def trainer_parser(description: str, allow_overlap: bool = False) -> argparse.ArgumentParser:
    p = _config_parser(description, "vae.train.lr=1e-5")
    p.add_argument("--resume", default=None, metavar="latest|best|PATH",
                   help="continue from the newest complete checkpoint, the best by validation "
                        "loss, or a checkpoint folder (possibly of another run)")
    p.add_argument("--until-step", type=positive_int, default=None, metavar="N",
                   help="stop after N optimizer steps with a checkpoint, without changing the "
                        "schedule (split a long run into jobs; continue with --resume latest)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the LR schedule at its key points, then exit")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although data.simulation, threshold, split ... differ from "
                        "the checkpoint's (recorded in run.json)")
    if allow_overlap:
        p.add_argument("--allow-overlap", action="store_true",
                       help="measure on maps a loaded model was trained on (a different data.split); "
                            "recorded in the outputs")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = _config_parser("Evaluate the full pipeline (condition -> prior sampling -> VAE decode) on held-out maps.",
                       "output_dir=runs/other")
    p.add_argument("--split", choices=("test", "val"), default="test", help="maps to evaluate on")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="sampling steps (default: prior.diffusion.num_inference_steps)")
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help="one of the objective's samplers (default: prior.diffusion.sampler, else the objective's "
                        "own): ddim | dpm for ddpm, euler | heun for flow")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|PATH",
                   help="stage-2 checkpoint under {output_dir}/prior/checkpoints, or a folder")
    p.add_argument("--baseline-samples", type=int, default=4000, metavar="N",
                   help="training samples (spread evenly) the distance baseline is fitted on")
    p.add_argument("--max-maps", type=int, default=None, metavar="N",
                   help="evaluate N of the split's maps, spread evenly over it (a fixed subset)")
    p.add_argument("--save-predictions", action="store_true",
                   help="also write eval/predictions.npz and one PNG per predicted map")
    p.add_argument("--measurements", action="append", default=[], metavar="N",
                   help="give a model trained with measurements N measured pixels (200) or a share of those "
                        "outside buildings (1%%), fixed per sample by the seed; repeat it for a table over N")
    p.add_argument("--samples", type=positive_int, default=1, metavar="K",
                   help="draw K maps per input: metrics of their mean, calibration of their spread")
    p.add_argument("--conformal", action="store_true",
                   help="with --samples K: also widen the samples' 50 %% and 90 %% intervals by conformalized quantile "
                        "regression fitted on the validation maps, and report their coverage")
    p.add_argument("--save-samples", action="store_true",
                   help="with --save-predictions and --samples K: also every drawn map (N x K x S x S)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate on maps the VAE or the prior was trained on (recorded in metrics.json)")
    return p


def bench_parser() -> argparse.ArgumentParser:
    p = _config_parser("Benchmark a training stage: steps/s, samples/s, peak memory, the data loader alone, "
                       "where the time of a step goes, and the reference step.", "data.image_size=64")
    p.add_argument("--stage", choices=["vae", "prior", "data"], default=None,
                   help="data: the data loader alone, PNG against cached")
    p.add_argument("--suite", choices=["gpu"], default=None,
                   help="gpu: both stages at the config's sizes in fp32, bf16, channels_last and compile "
                        "(a table and --json; needs a CUDA GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--batch-size", type=int, default=None, help="the stage's batch size for this benchmark (data.batch_size and {stage}.train.batch_size)")
    p.add_argument("--phase", choices=["pre", "post", "both"], default="both",
                   help="vae: before disc_start, after it, or both (default)")
    p.add_argument("--no-reference", action="store_true", help="vae: skip the reference step")
    p.add_argument("--trainer-run", type=int, default=0, metavar="N",
                   help="vae: also run train_vae.py for N steps and report the share of its time "
                        "spent in validation, checkpoints and training records")
    p.add_argument("--data-seconds", type=float, default=0.5,
                   help="seconds per round (3 rounds) of the data-loader-alone measurement")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true",
                   help="vae: skip the peak-memory probes (two child processes)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results here")
    p.add_argument("--profile", default=None, metavar="OUT",
                   help="vae, prior: after the timing, one step of each kind under torch.profiler; its "
                        "operator tables go to this text file")
    p.add_argument("--memory-probe", choices=["toolkit", "reference"], help=argparse.SUPPRESS)
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Radio maps for new environments from a trained stage-2 checkpoint.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a stage-2 checkpoint folder, e.g. runs/demo/prior/checkpoints/step-0000600, or a folder "
                        "python -m lib.export wrote")
    p.add_argument("--buildings", metavar="PNG", help="building map of one city (8-bit grayscale, 255 = building)")
    p.add_argument("--tx", action="append", default=[], metavar="X,Y",
                   help="a transmitter at column X, row Y of --buildings (repeatable)")
    p.add_argument("--cars", metavar="PNG", help="cars map of that city (for models that take cars as input)")
    p.add_argument("--root", metavar="FOLDER", help="a RadioMapSeer-layout folder: every transmitter of its maps")
    p.add_argument("--maps", type=int, nargs="+", metavar="ID", help="with --root: only these maps")
    p.add_argument("--simulation", required=True, help="the simulator to predict, one the checkpoint was trained on")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="sampling steps (default: prior.diffusion.num_inference_steps of the checkpoint)")
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help="one of the objective's samplers (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="maps sampled together")
    p.add_argument("--seed", type=int, default=None, help="sampling noise and --measurements N's pixels "
                   "(default: the checkpoint's seed)")
    p.add_argument("--measurements", default=None, metavar="FILE|N",
                   help="a CSV x,y,gray or x,y,db (optionally a tx column, the --tx index) of measured pixels; or "
                        "with --root, N pixels (200) or a share (1%%) of each map's gain map, the pixels "
                        "evaluate.py measures with the same seed")
    p.add_argument("--samples", type=positive_int, default=1, metavar="K",
                   help="draw K maps per input: write their mean, and their std and quantiles")
    p.add_argument("--units", choices=("gray", "db"), default="gray",
                   help=".npy maps as gray levels in [0, 1] or as pathloss in dB (data.db_range)")
    p.add_argument("--out", required=True, metavar="FOLDER", help="where {simulation}/{name}_{tx}.png/.npy go")
    return p
