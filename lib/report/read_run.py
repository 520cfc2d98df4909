"""What ``report.py`` reads: a run folder of this toolkit or logs of the original trainer
(:func:`resolve_inputs`), into one :class:`lib.report.runtable.ParsedRun` (:func:`load_run`), and the
LR schedule the run was configured with (:func:`schedule_for`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from lib.errors import UserError
from lib.report.read_original import original_schedule, parse_original
from lib.report.read_toolkit import parse_toolkit, set_config, toolkit_schedule
from lib.report.runtable import ParsedRun, Schedule

RUN_FILES = ("metrics.jsonl", "run.json", "config.yaml", "tb")
LOG_SUFFIXES = (".log", ".txt")


def _is_toolkit_folder(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in RUN_FILES)


def resolve_inputs(paths: Iterable[str]) -> tuple[str, list[Path]]:
    """-> ("toolkit", [folder]) or ("original", [log files]); UserError for anything else."""
    items = [Path(p) for p in paths]
    if not items:
        raise UserError("no RUN given: pass a run folder or one or more log files")
    for p in items:
        if not p.exists():
            raise UserError(f"RUN path not found: {p} (pass a run folder such as runs/demo/vae, "
                            f"or log files of the original trainer)")
    if len(items) == 1:
        p = items[0]
        if p.is_file() and p.name == "metrics.jsonl":
            return "toolkit", [p.parent]
        if _is_toolkit_folder(p):
            return "toolkit", [p]
        if p.is_dir():
            stages = [p / s for s in ("vae", "prior") if _is_toolkit_folder(p / s)]
            if len(stages) == 1:
                return "toolkit", stages
            if len(stages) > 1:
                raise UserError(f"{p} holds several stages; pass one of: "
                                f"{', '.join(str(s) for s in stages)}")
    files: list[Path] = []
    for p in items:
        if p.is_dir():
            if _is_toolkit_folder(p):
                raise UserError(f"{p} is a run folder of this toolkit: report on it alone")
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in LOG_SUFFIXES)
            if not found:
                raise UserError(f"{p}: no metrics.jsonl, run.json or tb/ (a run of this toolkit) and "
                                f"no *.log / *.txt files (logs of the original trainer)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"RUN path is neither a file nor a folder: {p}")
    seen: dict[Path, None] = {}
    for f in files:
        seen.setdefault(f.resolve(), None)
    return "original", list(seen)


def load_run(paths: Iterable[str], config_path: Optional[str] = None) -> ParsedRun:
    """Read RUN (a toolkit run folder, or original log files/folders) and an optional config."""
    kind, resolved = resolve_inputs(paths)
    run = parse_toolkit(resolved[0]) if kind == "toolkit" else parse_original(resolved)
    if config_path is not None:
        from lib.config import load_config
        cfg = load_config(config_path)        # a bad --config is the user's error: one line
        if run.stage is None:
            run.notes.append("stage unknown: --config read as a stage-1 (VAE) config")
        set_config(run, cfg, f"--config {config_path}")
    return run


def schedule_for(run: ParsedRun) -> Optional[Schedule]:
    """The schedule the run was configured with: our config (config.yaml / --config) through
    ``lib.train.schedule.lr_at``, else the original trainer's config line with its own formula."""
    if run.train_config is not None:
        return toolkit_schedule(run)
    if run.original_config is not None:
        return original_schedule(run.original_config, run.stage)
    return None


