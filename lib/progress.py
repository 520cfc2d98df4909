"""What a person watching sees during a wait: tqdm bars and message lines on stderr.

- :func:`progress`: a bar drawn only on a terminal (``disable=None``). In a redirected stderr
  (a cluster's log file) there is no bar to garble the lines; callers that would have shown
  values on the bar print them as lines instead (``bar.disable`` tells them).
- :func:`echo`: a message line, written through tqdm so it never glues to a bar.

No torch import here: the synthetic-data CLI and the cache builder use it too.
"""
from __future__ import annotations

import sys
from typing import Any


def progress(total: int, initial: int = 0, desc: str = "", unit: str = "step", show: bool = True, **kw: Any):
    """A tqdm bar on stderr for ``total`` units, drawn only on a terminal and when ``show``."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=None if show else True, file=sys.stderr, **kw)


def echo(message: str) -> None:
    """A line for the person watching, on stderr, through tqdm (it never glues to a bar)."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)
