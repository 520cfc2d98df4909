"""How numbers are printed, everywhere: logs, reports, tables, error messages.

Significant digits, never a fixed number of decimals: the reference trainer's ``{:.5f}``
printed every LR below 5e-6 as ``0.00000`` for a whole run.

- :func:`fmt`: 4 significant digits (``1.234e-05``, ``0.5``, ``1234``, ``-433.3``); ints as
  they are; ``n/a`` for None; ``nan`` / ``inf`` as such.
- :func:`fmt_lr`: a learning rate, always ``1.000e-04`` (4 significant digits, exponent), so
  that LRs line up in a log and compare at a glance.
- :func:`fmt_step`, :func:`fmt_span`, :func:`fmt_duration`: steps with thousands separators,
  step ranges, durations in s / min / h.
"""
from __future__ import annotations

import math
from typing import Any, Optional


def fmt(value: Any) -> str:
    """A number with 4 significant digits; other values as ``str``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.3e}"
    return f"{x:.4g}"


def fmt_lr(value: Optional[float]) -> str:
    """A learning rate: ``5.000e-06`` (never ``0.00001``)."""
    if value is None:
        return "n/a"
    return f"{float(value):.3e}"


def fmt_step(step: int) -> str:
    """``150,000``."""
    return f"{int(step):,}"


def fmt_span(first: int, last: int) -> str:
    """``step 5`` or ``steps 5-9``."""
    return f"step {fmt_step(first)}" if first == last else f"steps {fmt_step(first)}-{fmt_step(last)}"


def fmt_duration(seconds: Optional[float]) -> str:
    """``45 s``, ``12.5 min``, ``3.25 h``; ``n/a`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
