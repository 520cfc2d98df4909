"""Reading the original RadioDiff trainer's text logs into a :class:`lib.report.runtable.ParsedRun`.

One file per start of the trainer. Its lines are ``<time> [Train Step] 200/150000:
train/total_loss: 1234.56789, ..., lr: 0.00000, ``; a generator and a discriminator line may
share a step (merged into one row); the first line of a file is the trainer config printed as a
Python dict. Nothing in a log is ever executed: the config line is read with
:func:`ast.literal_eval` (literals only; a call such as ``__import__(...)`` makes it
unreadable, and it is skipped). Lines that cannot be used are counted by reason: empty or
truncated files, binary garbage, bytes that are not UTF-8, unrelated lines. When a resumed run
logs a step again, the record from the later start is kept.
"""
from __future__ import annotations

import ast
import multiprocessing
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lib.numfmt import fmt_lr
from lib.report.runtable import (MAX_EXAMPLES, MAX_STEP, ParsedRun, Rows, Schedule, Skips, build_table, read_lines,
                                 split_segments)

# The reference trainers' LambdaLR multiplier: max((1 - step / N) ** power, min_lr). Its
# stage-1 (VAE) trainer used power 0.95, its stage-2 (conditional LDM) trainer 0.96; min_lr
# floors the *multiplier*, so the LR floor is lr * min_lr.
ORIGINAL_LR_POWER = {"vae": 0.95, "prior": 0.96}
MAX_CONFIG_LINE = 1_000_000      # characters; a longer "config line" is not parsed

_TRAIN_TAG = "[Train Step]"
_HEAD_RE = re.compile(r"\[Train Step\] ?(\d+) ?/ ?(\d+) ?: ")
_TIME_RE = re.compile(r"\s*(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(?:[,.](\d{1,6}))?")
_KEY_RE = re.compile(r"[A-Za-z_][\w./-]*")


def parse_config_line(text: str) -> Optional[dict[str, Any]]:
    """The trainer config printed as a Python dict -> dict, or None when it is not a pure
    literal (nothing is evaluated: ``ast.literal_eval`` accepts literals only)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start or end - start > MAX_CONFIG_LINE:
        return None
    try:
        value = ast.literal_eval(text[start:end + 1])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _find_key(tree: Any, key: str, depth: int = 0) -> Any:
    """Value of ``key`` in a nested dict: this level first, then each sub-dict in order
    (the ``trainer`` section first), or None."""
    if not isinstance(tree, dict) or depth > 8:
        return None
    if key in tree:
        return tree[key]
    subs = sorted(tree.items(), key=lambda kv: kv[0] != "trainer")
    for _, value in subs:
        found = _find_key(value, key, depth + 1)
        if found is not None:
            return found
    return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _times_to_unix(prefixes: list[str]) -> np.ndarray:
    """Line prefixes holding a local time ('2025-01-02 10:00:00,123 ...'; no zone: read as
    UTC, only differences are used) -> unix seconds, NaN where there is no valid time."""
    n = len(prefixes)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    # fast path: every prefix starts with 'YYYY-MM-DD HH:MM:SS,fff'
    heads = [p[:23] for p in prefixes]
    if all(len(h) == 23 and h[4] == "-" and h[10] in " T" and h[19] in ",." for h in heads):
        try:
            text = "\n".join(heads).replace(",", ".").split("\n")
            return np.array(text, dtype="datetime64[us]").astype("int64") / 1e6
        except ValueError:
            pass
    for i, p in enumerate(prefixes):
        stamp = _stamp_text(p) if p else None
        if stamp:
            try:
                out[i] = np.datetime64(stamp, "us").astype("int64") / 1e6
            except ValueError:
                pass
    return out


# --------------------------------------------------------------------------- original logs
@dataclass
class _Chunk:
    """What one stretch of lines of one log file gave."""
    file_index: int
    name: str
    rows: Rows
    steps: list[int]
    stamps: list[str]               # the text before [Train Step] (holds the time)
    lr_texts: list[str]             # the first printed LR values (to see their decimals)
    total: Optional[str]            # N of the last "step/N"
    config: Optional[dict]
    skips: Skips


def _parse_original_lines(file_index: int, name: str, lines: list[tuple[int, str]],
                          first_chunk: bool, last_chunk: bool) -> _Chunk:
    """Parse ``[Train Step]`` lines; a generator and a discriminator line of one step become
    one row. The first line of a file may be its config dict; a bad last line of a file is
    'truncated'. Time stamps stay text here (converted in bulk by :func:`_times_to_unix`)."""
    skips = Skips()
    rows = Rows(floats_only=True)
    steps: list[int] = []
    stamps: list[str] = []
    lr_texts: list[str] = []
    config: Optional[dict] = None
    key_cache: dict = {}
    cur_step = None
    cur_row = -1
    last = len(lines) - 1 if last_chunk else -1
    tag_text = _TRAIN_TAG
    key_ok = _KEY_RE.fullmatch
    search = _HEAD_RE.search
    missing = object()
    last_match = None
    for k, (lineno, text) in enumerate(lines):
        m = search(text)
        if m is None:
            if tag_text in text:
                skips.add("truncated record" if k == last else "malformed record", f"{name}:{lineno}", text)
            elif k == 0 and first_chunk and "{" in text:
                config = parse_config_line(text)
                if config is None:
                    skips.add("config line not readable as a literal", f"{name}:{lineno}", text)
            else:
                skips.add("unrelated text", f"{name}:{lineno}", text)
            continue
        body = text[m.end():].rstrip()
        names = None
        if body.endswith(","):
            items = body[:-1].replace(": ", ", ").split(", ")
            keys = tuple(items[0::2])
            names = key_cache.get(keys, missing)
            if names is missing:
                names = None
                if len(items) % 2 == 0 and all(key_ok(x.strip()) for x in keys):
                    names = tuple(x.strip()[6:] if x.strip().startswith("train/") else x.strip() for x in keys)
                key_cache[keys] = names
            if names is not None:
                try:
                    values = list(map(float, items[1::2]))
                except ValueError:
                    names = None
        if names is None:
            skips.add("truncated record" if k == last else "malformed record", f"{name}:{lineno}", text)
            continue
        step = int(m.group(1))
        if step >= MAX_STEP:
            skips.add("step out of range", f"{name}:{lineno}", text)
            continue
        if step == cur_step:
            rows.add_to(cur_row, names, values)     # generator + discriminator line of one step
            continue
        if len(lr_texts) < 200 and "lr" in names:
            lr_texts.append(body.rsplit("lr: ", 1)[-1].split(",", 1)[0].strip())
        cur_row = rows.add(names, values)
        cur_step = step
        steps.append(step)
        stamps.append(text[:m.start()])
        last_match = m
    return _Chunk(file_index, name, rows, steps, stamps, lr_texts,
                  last_match.group(2) if last_match else None, config, skips)


PARALLEL_MIN_LINES = 50_000     # below this, parsing in one process is faster than forking


def _parse_chunks(jobs: list[tuple[int, str, list, bool, bool]]) -> list[_Chunk]:
    return [_parse_original_lines(*job) for job in jobs]


def _chunks_in_helper(jobs: list, conn: Any) -> None:
    try:
        conn.send(_parse_chunks(jobs))
    except Exception:
        conn.send(None)
    conn.close()


def _parse_original_parallel(jobs: list[tuple[int, str, list, bool, bool]]) -> list[_Chunk]:
    """Parse the second half of the jobs in a forked helper process while this one parses the
    first half (when there is a second core and enough lines); the same result as in order."""
    n_lines = sum(len(j[2]) for j in jobs)
    if len(jobs) < 2 or n_lines < PARALLEL_MIN_LINES or (os.cpu_count() or 1) < 2 \
            or "fork" not in multiprocessing.get_all_start_methods():
        return _parse_chunks(jobs)
    half, acc = len(jobs), 0
    for i, j in enumerate(jobs):
        acc += len(j[2])
        if acc >= n_lines / 2:
            half = i + 1
            break
    mine, theirs = jobs[:half], jobs[half:]
    if not theirs:
        return _parse_chunks(jobs)
    try:
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_chunks_in_helper, args=(theirs, child), daemon=True)
        proc.start()
        child.close()
    except OSError:
        return _parse_chunks(jobs)
    out = _parse_chunks(mine)
    try:
        rest = parent.recv()
    except (EOFError, OSError):
        rest = None
    proc.join()
    return out + (rest if rest is not None else _parse_chunks(theirs))


def _stamp_text(prefix: str) -> Optional[str]:
    """'2025-01-02 10:00:00,123 INFO ' -> '2025-01-02T10:00:00.123' (None without a time)."""
    m = _TIME_RE.search(prefix)
    return f"{m.group(1)}T{m.group(2)}.{m.group(3) or '0'}" if m else None


def _decimals(texts: list[str]) -> Optional[int]:
    """Decimals the values were printed with, when all use the same fixed count."""
    counts = set()
    for t in texts:
        if "e" in t.lower() or "n" in t.lower():     # exponent, nan, inf: not fixed-point
            if t.lower().lstrip("-") in ("nan", "inf", "infinity"):
                continue
            return None
        counts.add(len(t.split(".", 1)[1]) if "." in t else 0)
    return counts.pop() if len(counts) == 1 else None


def parse_original(paths: list[Path]) -> ParsedRun:
    skips = Skips()
    jobs = []                 # (file index, name, lines, first chunk of its file, last chunk)
    for i, p in enumerate(paths):
        lines = read_lines(p, skips)
        if len(lines) >= PARALLEL_MIN_LINES:
            h = len(lines) // 2
            jobs += [(i, p.name, lines[:h], True, False), (i, p.name, lines[h:], False, True)]
        else:
            jobs.append((i, p.name, lines, True, True))
    chunks = _parse_original_parallel(jobs)
    per_file: list[dict] = []      # chunks of one file, in order
    for i, path in enumerate(paths):
        mine = [c for c in chunks if c.file_index == i]
        first = next((_stamp_text(c.stamps[0]) for c in mine if c.stamps), None)
        per_file.append({"path": path, "chunks": mine, "first": first})
    # order the files by their first time stamp (a resumed run starts a new file), then name
    per_file.sort(key=lambda f: (f["first"] is None, f["first"] or "", f["path"].name))
    rows = Rows(floats_only=True)
    steps, stamps, sources, lr_texts, totals = [], [], [], [], []
    seg_starts: dict[int, tuple[str, dict]] = {}
    config = None
    configs_seen = []
    file_configs = []
    for f in per_file:
        file_started = False
        for k, c in enumerate(f["chunks"]):
            for reason, n in c.skips.counts.items():
                skips.counts[reason] = skips.counts.get(reason, 0) + n
            skips.examples += c.skips.examples[:max(0, MAX_EXAMPLES - len(skips.examples))]
            if c.config is not None:
                config = c.config          # the latest start's config
                configs_seen.append(f["path"].name)
                file_configs.append(c.config)
            if not c.steps:
                continue
            if not file_started and steps:
                seg_starts[len(steps)] = ("new log file", {"file": f["path"].name})
            merge = file_started and c.steps[0] == steps[-1]
            rows.extend(c.rows, merge_first_into=rows.n - 1 if merge else None)
            skip = 1 if merge else 0
            steps += c.steps[skip:]
            stamps += c.stamps[skip:]
            sources += [c.name] * (len(c.steps) - skip)
            lr_texts += c.lr_texts
            if c.total is not None:
                totals.append(c.total)
            file_started = True
    times = _times_to_unix(stamps)
    segs, median = split_segments(steps, times, seg_starts, sources)
    all_steps, columns, present, t, dropped = build_table(rows, steps, times)
    stage = None
    if any(c in columns for c in ("rec_loss", "kl_loss", "nll_loss")):
        stage = "vae"
    elif any(c in columns for c in ("loss_simple", "loss_vlb")):
        stage = "prior"
    run = ParsedRun(kind="original", stage=stage, sources=[str(f["path"]) for f in per_file],
                    steps=all_steps, columns=columns, present=present, time=t, segments=segs,
                    original_config=config, lr_decimals=_decimals(lr_texts),
                    median_interval=median, skipped=skips.counts, skipped_examples=skips.examples,
                    non_utf8_lines=skips.non_utf8, lines_read=skips.lines)
    distinct = {repr(c) for c in file_configs}
    if len(distinct) > 1:
        run.notes.append(f"the config lines of {', '.join(configs_seen)} differ; the schedule is "
                         f"taken from the last one ({configs_seen[-1]})")
    if totals:
        run.max_steps = int(totals[-1])
    if config is not None:
        n = _number(_find_key(config, "train_num_steps"))
        if n and n > 0:
            run.max_steps = int(n)
        ds = _number(_find_key(config, "disc_start"))
        if ds is not None and stage != "prior":
            run.disc_start = int(ds)
    return run


def original_schedule(config: dict[str, Any], stage: Optional[str]) -> Optional[Schedule]:
    """The reference trainer's own LR schedule from its config line (its formula, not ours):
    ``lr * max((1 - step / N) ** power, min_lr)``."""
    lr = _number(_find_key(config, "lr"))
    n = _number(_find_key(config, "train_num_steps"))
    min_lr = _number(_find_key(config, "min_lr"))
    if lr is None or not n or n <= 0 or lr <= 0:
        return None
    min_lr = 0.0 if min_lr is None else min_lr
    power = ORIGINAL_LR_POWER.get(stage or "vae", 0.95)

    def fn(steps: np.ndarray) -> np.ndarray:
        base = np.clip(1.0 - np.asarray(steps, dtype=np.float64) / n, 0.0, None)
        return lr * np.maximum(base ** power, min_lr)

    return Schedule(
        description=(f"reference polynomial schedule lr*max((1-step/{int(n)})**{power}, min_lr) "
                     f"with lr {fmt_lr(lr)}, min_lr {fmt_lr(min_lr)} (a floor on the multiplier: "
                     f"LR floor {fmt_lr(lr * min_lr)})"),
        source="config line of the log", decaying=min_lr < 1.0, lr_at_steps=fn)


