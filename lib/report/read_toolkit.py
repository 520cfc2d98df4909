"""Reading a run folder of this toolkit into a :class:`lib.report.runtable.ParsedRun`:
``metrics.jsonl`` (TensorBoard events under ``tb/`` when it is missing), ``run.json`` and
``config.yaml``; and the run's configured LR schedule, piecewise over resumes that changed it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import orjson

from lib.errors import UserError
from lib.numfmt import fmt_lr
from lib.report.runtable import MAX_STEP, ParsedRun, Rows, Schedule, Skips, build_table, read_lines, split_segments

JSON_CHUNK = 20_000      # lines decoded in one json.loads call when they are all valid
_BARE_NONFINITE = re.compile(r"(?<=[:\[,])(\s*)(-?)(nan|inf|infinity)(?=\s*[,}\]])", re.IGNORECASE)


def _loads_lenient(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    fixed = _BARE_NONFINITE.sub(
        lambda m: m.group(1) + m.group(2) + ("NaN" if m.group(3).lower() == "nan" else "Infinity"), text)
    fixed = fixed.replace("-NaN", "NaN")
    return json.loads(fixed)


JSON_CHUNK = 20_000      # lines decoded in one json.loads call when they are all valid


def _decode_json_lines(lines: list[tuple[int, str]], name: str, skips: Skips) -> list[tuple[int, Any]]:
    """(line number, decoded value) per valid line. Chunks of lines are decoded with orjson
    (strict JSON, fast); a chunk it refuses (``NaN``/``Infinity``, which Python's json writes
    for non-finite values, or a bad line) is decoded line by line, leniently."""
    out = []
    last = len(lines) - 1
    for c0 in range(0, len(lines), JSON_CHUNK):
        chunk = lines[c0:c0 + JSON_CHUNK]
        try:
            values = [orjson.loads(t) for _, t in chunk]
            out.extend((ln, v) for (ln, _), v in zip(chunk, values))
            continue
        except orjson.JSONDecodeError:
            pass
        for k, (lineno, text) in enumerate(chunk):
            try:
                out.append((lineno, _loads_lenient(text)))
            except (ValueError, RecursionError):
                reason = "truncated record" if c0 + k == last else "malformed record"
                skips.add(reason, f"{name}:{lineno}", text)
    return out


def parse_jsonl(path: Path, skips: Skips):
    """-> train rows, steps, times, val rows, val steps, events, segment starts, sources.
    Rows are the decoded records themselves (``step``/``split``/``time`` are not columns)."""
    rows, val_rows = Rows(), Rows()
    steps, times, sources = [], [], []
    val_steps, events = [], []
    seg_starts: dict[int, tuple[str, dict]] = {}
    name = path.name
    for lineno, rec in _decode_json_lines(read_lines(path, skips), name, skips):
        if not isinstance(rec, dict):
            skips.add("malformed record", f"{name}:{lineno}", str(rec))
            continue
        step = rec.get("step")
        split = rec.get("split")
        if type(step) is not int:
            if isinstance(step, float) and step.is_integer() and abs(step) < MAX_STEP:
                step = int(step)
            else:
                split = None
        if type(step) is int and not 0 <= step < MAX_STEP:
            skips.add("step out of range", f"{name}:{lineno}", str(step))
            continue
        if split == "train":
            rows.add(tuple(rec), list(rec.values()))
            steps.append(step)
            t = rec.get("time")
            times.append(t if type(t) is float or type(t) is int else np.nan)
            sources.append(name)
        elif split == "val":
            val_rows.add(tuple(rec), list(rec.values()))
            val_steps.append(step)
        elif split == "event":
            ev = dict(rec)
            ev["step"] = step
            events.append(ev)
            if ev.get("event") == "resume" and steps:
                seg_starts.setdefault(len(steps), ("resume event", {
                    k2: ev.get(k2) for k2 in ("from_checkpoint", "from_step", "changes", "message")
                    if k2 in ev}))
        else:
            skips.add("malformed record", f"{name}:{lineno}", json.dumps(rec)[:200])
    return rows, steps, np.asarray(times, dtype=np.float64), val_rows, val_steps, events, seg_starts, sources


def parse_tensorboard(folder: Path, skips: Skips):
    """Scalars ``train/<key>`` and ``val/<key>`` from the event files under ``folder``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise UserError(f"{folder.parent}: no metrics.jsonl, and the tensorboard package needed "
                        f"to read {folder} is not installed") from None
    try:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
    except Exception as exc:  # corrupt event files raise many kinds of errors
        skips.add("unreadable TensorBoard events", str(folder), f"{type(exc).__name__}: {exc}")
        tags = []
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    ttime: dict[int, float] = {}
    for tag in tags:
        split, _, key = tag.partition("/")
        if split not in ("train", "val") or not key:
            continue
        target = train if split == "train" else val
        for ev in acc.Scalars(tag):
            target.setdefault(int(ev.step), {})[key] = float(ev.value)
            if split == "train":
                ttime[int(ev.step)] = float(ev.wall_time)
    steps = sorted(train)
    vsteps = sorted(val)
    rows, val_rows = Rows(floats_only=True), Rows(floats_only=True)
    for s in steps:
        rows.add(tuple(train[s]), list(train[s].values()))
    for s in vsteps:
        val_rows.add(tuple(val[s]), list(val[s].values()))
    return rows, steps, np.array([ttime[s] for s in steps], dtype=np.float64), val_rows, vsteps


def _load_toolkit_config(path: Path, run: ParsedRun) -> None:
    from lib.config import load_config
    try:
        cfg = load_config(path)
    except UserError as exc:
        run.notes.append(f"{path} could not be read as a config ({exc}); no schedule to compare with")
        return
    set_config(run, cfg, str(path))


def set_config(run: ParsedRun, cfg: Any, source: str) -> None:
    """Use a loaded :class:`lib.config.Config` for this run: schedule, max_steps, disc_start."""
    run.config = cfg
    run.config_source = source
    stage = run.stage or "vae"
    run.train_config = cfg.prior.train if stage == "prior" else cfg.vae.train
    run.max_steps = run.train_config.max_steps
    run.disc_start = cfg.vae.loss.disc_start if stage == "vae" else None


def parse_toolkit(folder: Path) -> ParsedRun:
    skips = Skips()
    run_info = None
    notes = []
    rj = folder / "run.json"
    if rj.is_file():
        try:
            run_info = json.loads(rj.read_bytes().decode("utf-8", errors="replace"))
            if not isinstance(run_info, dict):
                run_info, _ = None, notes.append(f"{rj}: not a JSON object; ignored")
        except ValueError:
            notes.append(f"{rj}: not valid JSON; ignored")
    stage = run_info.get("stage") if run_info and run_info.get("stage") in ("vae", "prior") else None
    if stage is None and folder.name in ("vae", "prior"):
        stage = folder.name
    jsonl = folder / "metrics.jsonl"
    events: list = []
    if jsonl.is_file():
        kind = "toolkit"
        rows, steps, times, val_rows, val_steps, events, seg_starts, sources = parse_jsonl(jsonl, skips)
        sources_list = [str(jsonl)]
    elif (folder / "tb").is_dir():
        kind = "tensorboard"
        rows, steps, times, val_rows, val_steps = parse_tensorboard(folder / "tb", skips)
        seg_starts, sources = {}, ["tb"] * len(steps)
        sources_list = [str(folder / "tb")]
        notes.append("metrics.jsonl is missing: read the TensorBoard events instead "
                     "(no events, no resume records)")
    else:
        raise UserError(f"{folder}: no metrics.jsonl and no tb/ folder: not a run folder of this "
                        f"toolkit (expected {{output_dir}}/vae or {{output_dir}}/prior)")
    segs, median = split_segments(steps, times, seg_starts, sources)
    all_steps, columns, present, t, dropped = build_table(rows, steps, times, val_rows, val_steps)
    if stage is None:
        stage = "vae" if "rec_loss" in columns or "kl_loss" in columns else (
            "prior" if "loss" in columns else None)
    run = ParsedRun(kind=kind, stage=stage, sources=sources_list, steps=all_steps, columns=columns,
                    present=present, time=t, segments=segs, events=events, run_info=run_info,
                    median_interval=median, skipped=skips.counts, skipped_examples=skips.examples,
                    non_utf8_lines=skips.non_utf8, lines_read=skips.lines,
                    dropped_values=dropped, notes=notes)
    cfg_path = folder / "config.yaml"
    if cfg_path.is_file():
        _load_toolkit_config(cfg_path, run)
    return run


def resume_history(run: ParsedRun) -> list[dict[str, Any]]:
    """Resumes recorded by the trainer: run.json ``resumes`` and ``resume`` events, one entry
    per step: {"step", "from_checkpoint", "changes", "time", "source"}."""
    out: dict[int, dict[str, Any]] = {}
    for r in (run.run_info or {}).get("resumes") or []:
        if isinstance(r, dict) and isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool):
            out[r["step"]] = {"step": r["step"], "from_checkpoint": r.get("from_checkpoint"),
                              "changes": r.get("changes") if isinstance(r.get("changes"), dict) else {},
                              "time": r.get("time"), "source": "run.json"}
    for ev in run.events:
        if ev.get("event") != "resume":
            continue
        step = ev.get("from_step", ev.get("step"))
        if not isinstance(step, int) or isinstance(step, bool):
            step = ev["step"]
        entry = out.setdefault(step, {"step": step, "from_checkpoint": ev.get("from_checkpoint"),
                                      "changes": ev.get("changes") if isinstance(ev.get("changes"), dict) else {},
                                      "time": ev.get("time"), "source": "metrics.jsonl"})
        if entry["source"] == "run.json":
            entry["source"] = "run.json + metrics.jsonl"
    return [out[k] for k in sorted(out)]


def _lr_at_steps(cfg: Any, steps: np.ndarray) -> np.ndarray:
    """``lib.train.schedule.lr_at(cfg, s)`` for every s (plain Python: about a microsecond each)."""
    from lib.train.schedule import lr_at
    return np.array([lr_at(cfg, s) for s in steps.tolist()], dtype=np.float64)


def toolkit_schedule(run: ParsedRun) -> Optional[Schedule]:
    """``lib.train.schedule.lr_at`` for this run's train config, piecewise over resumes that changed
    the schedule (run.json ``changes``: {key: [old, new]}), so steps before a rebase are
    compared with the schedule that was in force then."""
    train_cfg = run.train_config
    if train_cfg is None:
        return None
    import dataclasses

    pieces: list[tuple[int, Any]] = []       # (first step, config) in increasing step order
    current = train_cfg
    for r in reversed(resume_history(run)):
        changes, step = r["changes"], r["step"]
        old = {k: v[0] for k, v in changes.items()
               if isinstance(v, (list, tuple)) and len(v) == 2 and hasattr(current, k) and v[0] is not None}
        if not old:
            continue
        try:
            previous = dataclasses.replace(current, **old)
        except (TypeError, ValueError):
            continue
        pieces.insert(0, (step, current))
        current = previous
    pieces.insert(0, (-(2 ** 62), current))

    def fn(steps: np.ndarray) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.int64)
        out = np.empty(len(steps))
        starts = np.array([p[0] for p in pieces], dtype=np.int64)
        # a resume at step R changes the LR of the updates after R; the record at R itself
        # was logged before the resume
        which = np.searchsorted(starts, steps, side="left") - 1
        for j, (_, cfg) in enumerate(pieces):
            idx = np.nonzero(which == j)[0]
            if len(idx):
                out[idx] = _lr_at_steps(cfg, steps[idx])
        return out

    name = train_cfg.lr_scheduler
    desc = (f"{name} (lr {fmt_lr(train_cfg.lr)}, min_lr {fmt_lr(train_cfg.min_lr)}, warmup {train_cfg.warmup_steps}, "
            f"max_steps {train_cfg.max_steps}" + (f", power {train_cfg.lr_power:g}" if name == "polynomial" else "")
            + ")")
    if len(pieces) > 1:
        desc += f"; {len(pieces) - 1} resume(s) changed it (run.json), compared piecewise"
    decaying = any(c.lr_scheduler in ("cosine", "linear", "polynomial") and c.min_lr < c.lr
                   for _, c in pieces)
    return Schedule(description=desc, source=run.config_source or "config", decaying=decaying,
                    lr_at_steps=fn)


