"""Command-line arguments shared by the trainers."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 or a negative number is an error, not "off")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a step: expected an integer >= 1")
    return value


def trainer_parser(description: str, allow_overlap: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, value parsed as YAML); repeatable, "
                        "e.g. --set vae.train.lr=1e-5")
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
