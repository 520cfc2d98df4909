"""One table for a training run, whatever it was read from (:mod:`lib.report.read_toolkit`: this
toolkit's run folders; :mod:`lib.report.read_original`: the original RadioDiff trainer's text logs).

:class:`ParsedRun` has one row per logged step: a float column per logged key (``val_`` before
validation keys), a mask of where each was logged, the time of each train record, the starts
of the trainer (:class:`Segment`: log files, resumes, step jumps), the events, and what could
not be read (counted by reason, never raised). :class:`Rows` collects records grouped by their
key signature, so values become arrays per group rather than per record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lib.errors import UserError

MAX_EXAMPLES = 8                 # skipped lines quoted in the summary
JUMP_FACTOR = 10                 # a step gap > this x the typical interval is a jump (resume / lost logs)


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


class Skips:
    """Lines that could not be used: counted by reason, the first few quoted."""

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



# --------------------------------------------------------------------------- reading text
MAX_LINE = 1 << 20         # bytes: a longer line is not read (a log line is a few hundred)
MAX_STEP = 1 << 62         # a step beyond this is not a step any run made


def read_lines(path: Path, skips: Skips) -> list[tuple[int, str]]:
    """(line number, text) of every non-empty line. Bytes that are not UTF-8 are replaced
    (and the line counted); a line with NUL bytes or mostly unprintable text is binary and
    skipped; a line longer than :data:`MAX_LINE` is skipped unread (memory stays bounded
    whatever the file holds). The last line of a file that does not end with a newline may be
    cut off: callers call a bad last line truncated."""
    out: list[tuple[int, str]] = []
    try:
        with open(path, "rb") as f:
            lineno = 0
            while True:
                raw = f.readline(MAX_LINE + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):         # the rest of it, a block at a time
                        raw = f.readline(MAX_LINE + 1)
                    skips.lines += 1
                    skips.add(f"line longer than {MAX_LINE // 2**20} MiB", f"{path.name}:{lineno}", "(not read)")
                    continue
                raw = raw.rstrip(b"\n")
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                try:
                    text, bad = raw.decode("utf-8"), False
                except UnicodeDecodeError:
                    text, bad = raw.decode("utf-8", errors="replace"), True
                if not text or text.isspace():
                    continue
                skips.lines += 1
                skips.non_utf8 += bad
                if "\x00" in text or (bad and _mostly_unprintable(text)):
                    skips.add("binary", f"{path.name}:{lineno}", text)
                    continue
                out.append((lineno, text))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return out


def _mostly_unprintable(text: str) -> bool:
    bad = sum(1 for ch in text if ch == "\ufffd" or (not ch.isprintable() and ch not in "\t"))
    return bad * 4 > len(text)


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


def build_table(rows: Rows, steps: list[int], times: np.ndarray, val_rows: Optional[Rows] = None,
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_float(v: Any) -> float:
    if _is_number(v):
        try:
            return float(v)
        except OverflowError:
            return math.nan
    return math.nan


def split_segments(steps: list[int], times: np.ndarray, seg_starts: dict[int, tuple[str, dict]],
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
