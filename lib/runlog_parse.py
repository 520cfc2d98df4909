"""Read a training run into one table: this toolkit's run folders and the original trainer's text logs.

Two inputs, one result (:class:`ParsedRun`):

- a run folder of this toolkit (``{output_dir}/vae`` or ``{output_dir}/prior``): ``metrics.jsonl``
  (TensorBoard events under ``tb/`` when it is missing), ``run.json`` and ``config.yaml``;
- text logs of the original RadioDiff trainer, one file per start of the trainer. Their lines
  are ``<time> [Train Step] 200/150000: train/total_loss: 1234.56789, ..., lr: 0.00000, ``; a
  generator and a discriminator line may share a step (merged into one row); the first line
  of a file is the trainer config printed as a Python dict.

Nothing in a log is ever executed: the config line is read with :func:`ast.literal_eval`
(literals only; a call such as ``__import__(...)`` makes it unreadable, and it is skipped).
Every line that cannot be used is counted by reason in :attr:`ParsedRun.skipped` instead of
raising: empty or truncated files, binary garbage, bytes that are not UTF-8, unrelated lines.

The table has one row per logged step. When a resumed run logs a step again, the record from
the later start of the trainer is kept (the earlier one belongs to a branch that was abandoned);
:attr:`ParsedRun.segments` keeps each start's step range for the resume analysis.
"""
from __future__ import annotations

import ast
import json
import math
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import orjson

from lib.errors import UserError

# The reference trainers' LambdaLR multiplier: max((1 - step / N) ** power, min_lr). Its
# stage-1 (VAE) trainer used power 0.95, its stage-2 (conditional LDM) trainer 0.96; min_lr
# floors the *multiplier*, so the LR floor is lr * min_lr.
ORIGINAL_LR_POWER = {"vae": 0.95, "prior": 0.96}

RUN_FILES = ("metrics.jsonl", "run.json", "config.yaml", "tb")
LOG_SUFFIXES = (".log", ".txt")
MAX_CONFIG_LINE = 1_000_000      # characters; a longer "config line" is not parsed
MAX_EXAMPLES = 8                 # skipped lines quoted in the summary
JUMP_FACTOR = 10                 # a step gap > this x the typical interval is a jump (resume / lost logs)

_TRAIN_TAG = "[Train Step]"
_HEAD_RE = re.compile(r"\[Train Step\] ?(\d+) ?/ ?(\d+) ?: ")
_TIME_RE = re.compile(r"\s*(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(?:[,.](\d{1,6}))?")
_KEY_RE = re.compile(r"[A-Za-z_][\w./-]*")
_BARE_NONFINITE = re.compile(r"(?<=[:\[,])(\s*)(-?)(nan|inf|infinity)(?=\s*[,}\]])", re.IGNORECASE)


# --------------------------------------------------------------------------- result
@dataclass
class Segment:
    """One start of the trainer: a log file, or the records after a resume / a step jump."""
    index: int
    source: str                 # file name the records came from
    reason: str                 # "start" | "new log file" | "step went back" | "resume event" | "step jump"
    first_step: int
    last_step: int
    first_time: float           # unix seconds (NaN when the log has no times)
    last_time: float
    records: int
    info: dict[str, Any] = field(default_factory=dict)   # e.g. from_checkpoint of a resume event


@dataclass
class Schedule:
    """The LR a configured schedule gives at each step, and where that schedule came from."""
    description: str
    source: str
    decaying: bool
    lr_at_steps: Callable[[np.ndarray], np.ndarray]


@dataclass
class ParsedRun:
    kind: str                               # "toolkit" | "tensorboard" | "original"
    stage: Optional[str]                    # "vae" | "prior" | None (unknown)
    sources: list[str]
    steps: np.ndarray                       # int64, sorted, unique: one row per step
    columns: dict[str, np.ndarray]          # float64 per row; NaN where not logged
    present: dict[str, np.ndarray]          # bool per row: the value was logged (may be NaN/inf)
    time: np.ndarray                        # unix seconds of the train record; NaN if none
    segments: list[Segment] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    run_info: Optional[dict[str, Any]] = None
    config: Any = None                      # lib.config.Config when known
    train_config: Any = None                # its vae.train / prior.train section
    config_source: Optional[str] = None
    original_config: Optional[dict[str, Any]] = None
    max_steps: Optional[int] = None
    disc_start: Optional[int] = None        # configured first step with the GAN term
    lr_decimals: Optional[int] = None       # decimals the LR was printed with (None: full precision)
    median_interval: Optional[float] = None # typical step distance between train records
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    non_utf8_lines: int = 0
    lines_read: int = 0
    dropped_values: int = 0                 # non-numeric values in valid records (ignored)
    notes: list[str] = field(default_factory=list)

    @property
    def train_columns(self) -> list[str]:
        return [c for c in self.columns if not c.startswith("val_")]

    @property
    def val_columns(self) -> list[str]:
        return [c for c in self.columns if c.startswith("val_")]

    def series(self, name: str, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows where ``name`` was logged (and is finite by default)."""
        if name not in self.columns:
            return np.zeros(0, np.int64), np.zeros(0)
        mask = self.present[name]
        if finite:
            mask = mask & np.isfinite(self.columns[name])
        return self.steps[mask], self.columns[name][mask]

    def has(self, name: str) -> bool:
        return name in self.present and bool(self.present[name].any())

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class _Skips:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []
        self.non_utf8 = 0
        self.lines = 0

    def add(self, reason: str, where: str, line: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            text = line if len(line) <= 120 else line[:117] + "..."
            text = "".join(ch if ch.isprintable() else "?" for ch in text)
            self.examples.append(f"{where}: {reason}: {text}")


# --------------------------------------------------------------------------- text helpers
def _read_lines(path: Path, skips: _Skips) -> list[tuple[int, str]]:
    """(line number, text) of every non-empty line. Bytes that are not UTF-8 are replaced
    (and the line counted); a line with NUL bytes or mostly unprintable text is binary and
    skipped. The last line of a file that does not end with a newline may be cut off: callers
    call a bad last line truncated."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        texts = data.decode("utf-8").split("\n")
        bad_rows: set[int] = set()
    except UnicodeDecodeError:
        texts, bad_rows = [], set()
        for i, raw in enumerate(data.split(b"\n")):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(raw.decode("utf-8", errors="replace"))
                bad_rows.add(i)
    skips.non_utf8 += len(bad_rows)
    if b"\r" in data:
        texts = [t[:-1] if t.endswith("\r") else t for t in texts]
    out = [(i + 1, t) for i, t in enumerate(texts) if t and not t.isspace()]
    skips.lines += len(out)
    if b"\x00" in data or bad_rows:
        keep = []
        for lineno, t in out:
            if "\x00" in t or (lineno - 1 in bad_rows and _mostly_unprintable(t)):
                skips.add("binary", f"{path.name}:{lineno}", t)
            else:
                keep.append((lineno, t))
        out = keep
    return out


def _mostly_unprintable(text: str) -> bool:
    bad = sum(1 for ch in text if ch == "\ufffd" or (not ch.isprintable() and ch not in "\t"))
    return bad * 4 > len(text)


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


# --------------------------------------------------------------------------- table building
class Rows:
    """Records grouped by their key signature (rows with the same keys in the same order):
    their values are converted to arrays per group, not per record. A record may add keys to
    an earlier row (the discriminator line of a step adds to the generator line's row)."""

    def __init__(self, floats_only: bool = False) -> None:
        self.groups: dict[tuple, tuple[list[int], list[list]]] = {}
        self.n = 0
        self.floats_only = floats_only          # every value is a float (parsed text logs)

    def add(self, keys: tuple, values: list) -> int:
        g = self.groups.get(keys)
        if g is None:
            g = self.groups[keys] = ([], [])
        g[0].append(self.n)
        g[1].append(values)
        self.n += 1
        return self.n - 1

    def add_to(self, row: int, keys: tuple, values: list) -> None:
        g = self.groups.get(keys)
        if g is None:
            g = self.groups[keys] = ([], [])
        g[0].append(row)
        g[1].append(values)

    def extend(self, other: "Rows", merge_first_into: Optional[int] = None) -> None:
        """Append the rows of ``other`` after these (its row numbers shifted); with
        ``merge_first_into``, its row 0 adds to that existing row instead (a step whose
        generator and discriminator lines fell into two chunks)."""
        offset = self.n - (1 if merge_first_into is not None else 0)
        for keys, (idx, vals) in other.groups.items():
            g = self.groups.get(keys)
            if g is None:
                g = self.groups[keys] = ([], [])
            if merge_first_into is None:
                g[0].extend(i + offset for i in idx)
            else:
                g[0].extend(merge_first_into if i == 0 else i + offset for i in idx)
            g[1].extend(vals)
        self.n = offset + other.n

    def fill(self, keep: np.ndarray, positions: np.ndarray, n: int, prefix: str,
             columns: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> int:
        """Write the kept rows (row ``keep[i]`` -> table row ``positions[i]``) into columns;
        returns the number of values that were not numbers (ignored)."""
        pos_of_row = np.full(self.n, -1, dtype=np.int64)
        pos_of_row[keep] = positions
        dropped = 0
        for keys, (idx, vals) in self.groups.items():
            rows = pos_of_row[np.asarray(idx, dtype=np.int64)]
            sel = np.nonzero(rows >= 0)[0]
            if len(sel) == 0:
                continue
            rows = rows[sel]
            if len(sel) < len(vals):
                vals = [vals[i] for i in sel.tolist()]
            for j, key, arr, pres, bad in _group_columns(keys, vals, self.floats_only):
                name = prefix + key
                dropped += bad
                if not pres.any() and name not in columns:
                    continue                                    # no number at all (yet)
                if name not in columns:
                    columns[name] = np.full(n, np.nan)
                    present[name] = np.zeros(n, dtype=bool)
                columns[name][rows[pres]] = arr[pres]
                present[name][rows[pres]] = True
        return dropped


def _group_columns(keys: tuple, vals: list[list], floats_only: bool):
    """(index, key, float values, logged mask, non-numbers) for each metric key of a group."""
    wanted = [(j, k) for j, k in enumerate(keys) if k not in NOT_COLUMNS]
    if not wanted or not vals:
        return
    n = len(vals)
    if floats_only:                                   # parsed text: floats by construction
        arr = np.array(vals, dtype=np.float64)
        ones = np.ones(n, dtype=bool)
        for j, k in wanted:
            yield j, k, arr[:, j], ones, 0
        return
    try:
        obj = np.array(vals, dtype=object)
    except ValueError:
        obj = None
    if obj is not None and obj.ndim == 2 and obj.shape[1] == len(keys):
        sub = obj[:, [j for j, _ in wanted]]
        none = np.equal(sub, None)
        try:                                          # numbers and None (-> NaN, not logged)
            arr = np.where(none, np.nan, sub).astype(np.float64)
        except (TypeError, ValueError, OverflowError):
            arr = None                                # text somewhere: value by value below
        if arr is not None:
            pres = ~none
            for c, (j, k) in enumerate(wanted):
                col_ok = pres[:, c]
                yield j, k, arr[:, c], col_ok, 0
            return
    for j, k in wanted:                               # mixed types: value by value
        col = [row[j] if j < len(row) else None for row in vals]
        numeric = [_is_number(v) for v in col]
        arr = np.array([_as_float(v) if ok else math.nan for v, ok in zip(col, numeric)])
        yield j, k, arr, np.array(numeric, dtype=bool), sum(
            1 for v, ok in zip(col, numeric) if v is not None and not ok)


def _last_of_each(steps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(unique steps, index of the last record of each)."""
    st = np.asarray(steps, dtype=np.int64)
    if len(st) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq, rev_idx = np.unique(st[::-1], return_index=True)
    return uniq, len(st) - 1 - rev_idx


def _build_table(rows: Rows, steps: list[int], times: np.ndarray, val_rows: Optional[Rows] = None,
                 val_steps: Optional[list[int]] = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, int]:
    """One row per step: for a step logged more than once, the last record wins (records are
    in log order, so that is the latest start of the trainer). ``steps[i]`` is the step of
    row ``i`` of ``rows``."""
    t_steps, keep = _last_of_each(steps)
    v_steps, v_keep = _last_of_each(val_steps or [])
    all_steps = np.union1d(t_steps, v_steps).astype(np.int64)
    n = len(all_steps)
    columns: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    train_pos = np.searchsorted(all_steps, t_steps)
    dropped = rows.fill(keep, train_pos, n, "", columns, present)
    if val_rows is not None:
        dropped += val_rows.fill(v_keep, np.searchsorted(all_steps, v_steps), n, "val_", columns, present)
    t = np.full(n, np.nan)
    if len(keep):
        t[train_pos] = times[keep]
    return all_steps, columns, present, t, dropped


NOT_COLUMNS = frozenset(("step", "split", "time"))
_NUMBER_TYPES = {float, int, type(None)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(v: Any) -> float:
    if _is_number(v):
        try:
            return float(v)
        except OverflowError:
            return math.nan
    return math.nan


def _segments(steps: list[int], times: np.ndarray, seg_starts: dict[int, tuple[str, dict]],
              sources: list[str]) -> tuple[list[Segment], Optional[float]]:
    """Split the train records (in log order) into starts of the trainer: at every index in
    ``seg_starts`` (new file, resume event), where the step goes back, and where it jumps by
    more than ``JUMP_FACTOR`` typical intervals."""
    n = len(steps)
    if n == 0:
        return [], None
    st = np.asarray(steps, dtype=np.int64)
    d = np.diff(st)
    pos = d[d > 0]
    median = float(np.median(pos)) if len(pos) else None
    starts = dict(seg_starts)
    starts.setdefault(0, ("start", {}))
    back = np.nonzero(d < 0)[0] + 1
    for i in back.tolist():
        starts.setdefault(i, ("step went back", {}))
    if median:
        jumps = np.nonzero(d > JUMP_FACTOR * median)[0] + 1
        for i in jumps.tolist():
            starts.setdefault(i, ("step jump", {}))
    bounds = sorted(k for k in starts if 0 <= k < n)
    segs = []
    for j, b in enumerate(bounds):
        e = bounds[j + 1] if j + 1 < len(bounds) else n
        reason, info = starts[b]
        segs.append(Segment(index=j, source=sources[b], reason=reason if j else "start",
                            first_step=int(st[b]), last_step=int(st[e - 1]),
                            first_time=float(times[b]), last_time=float(times[e - 1]),
                            records=e - b, info=info))
        if j == 0 and reason != "start":
            segs[0].info = dict(info, first_reason=reason)
    return segs, median


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
    skips: _Skips


def _parse_original_lines(file_index: int, name: str, lines: list[tuple[int, str]],
                          first_chunk: bool, last_chunk: bool) -> _Chunk:
    """Parse ``[Train Step]`` lines; a generator and a discriminator line of one step become
    one row. The first line of a file may be its config dict; a bad last line of a file is
    'truncated'. Time stamps stay text here (converted in bulk by :func:`_times_to_unix`)."""
    skips = _Skips()
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
    skips = _Skips()
    jobs = []                 # (file index, name, lines, first chunk of its file, last chunk)
    for i, p in enumerate(paths):
        lines = _read_lines(p, skips)
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
    segs, median = _segments(steps, times, seg_starts, sources)
    all_steps, columns, present, t, dropped = _build_table(rows, steps, times)
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
                     f"with lr {lr:.3e}, min_lr {min_lr:.3e} (a floor on the multiplier: "
                     f"LR floor {lr * min_lr:.3e})"),
        source="config line of the log", decaying=min_lr < 1.0, lr_at_steps=fn)


# --------------------------------------------------------------------------- toolkit runs
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


def _decode_json_lines(lines: list[tuple[int, str]], name: str, skips: _Skips) -> list[tuple[int, Any]]:
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


def parse_jsonl(path: Path, skips: _Skips):
    """-> train rows, steps, times, val rows, val steps, events, segment starts, sources.
    Rows are the decoded records themselves (``step``/``split``/``time`` are not columns)."""
    rows, val_rows = Rows(), Rows()
    steps, times, sources = [], [], []
    val_steps, events = [], []
    seg_starts: dict[int, tuple[str, dict]] = {}
    name = path.name
    for lineno, rec in _decode_json_lines(_read_lines(path, skips), name, skips):
        if not isinstance(rec, dict):
            skips.add("malformed record", f"{name}:{lineno}", str(rec))
            continue
        step = rec.get("step")
        split = rec.get("split")
        if type(step) is not int:
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            else:
                split = None
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


def parse_tensorboard(folder: Path, skips: _Skips):
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
    skips = _Skips()
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
    segs, median = _segments(steps, times, seg_starts, sources)
    all_steps, columns, present, t, dropped = _build_table(rows, steps, times, val_rows, val_steps)
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


# --------------------------------------------------------------------------- dispatch
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
    """``lib.schedule.lr_at(cfg, s)`` for every s (plain Python: about a microsecond each)."""
    from lib.schedule import lr_at
    return np.array([lr_at(cfg, s) for s in steps.tolist()], dtype=np.float64)


def toolkit_schedule(run: ParsedRun) -> Optional[Schedule]:
    """``lib.schedule.lr_at`` for this run's train config, piecewise over resumes that changed
    the schedule (run.json ``changes``: {key: [old, new]}), so steps before a rebase are
    compared with the schedule that was in force then."""
    tcfg = run.train_config
    if tcfg is None:
        return None
    import dataclasses

    pieces: list[tuple[int, Any]] = []       # (first step, config) in increasing step order
    current = tcfg
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

    name = tcfg.lr_scheduler
    desc = (f"{name} (lr {tcfg.lr:.3e}, min_lr {tcfg.min_lr:.3e}, warmup {tcfg.warmup_steps}, "
            f"max_steps {tcfg.max_steps}" + (f", power {tcfg.lr_power:g}" if name == "polynomial" else "")
            + ")")
    if len(pieces) > 1:
        desc += f"; {len(pieces) - 1} resume(s) changed it (run.json), compared piecewise"
    decaying = any(c.lr_scheduler in ("cosine", "linear", "polynomial") and c.min_lr < c.lr
                   for _, c in pieces)
    return Schedule(description=desc, source=run.config_source or "config", decaying=decaying,
                    lr_at_steps=fn)


def schedule_for(run: ParsedRun) -> Optional[Schedule]:
    """The schedule the run was configured with: our config (config.yaml / --config) through
    ``lib.schedule.lr_at``, else the original trainer's config line with its own formula."""
    if run.train_config is not None:
        return toolkit_schedule(run)
    if run.original_config is not None:
        return original_schedule(run.original_config, run.stage)
    return None


def finite_or_str(x: Any) -> Any:
    """JSON-safe number: non-finite floats as the strings 'nan', 'inf', '-inf'."""
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, np.integer):
        return int(x)
    return x
