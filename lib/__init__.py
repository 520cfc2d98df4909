"""The toolkit's library, in layers: each package imports only from the ones before it.

- the base modules here: the config (:mod:`lib.config`), one-line errors, number formats,
  progress lines, command-line parsing, files written safely (:mod:`lib.outputs`);
- :mod:`lib.data`: from a RadioMapSeer-layout folder to batches;
- :mod:`lib.models`: the networks, the losses and the stage-2 objectives;
- :mod:`lib.train`: a training run: its folder, accelerator, optimizer, schedule, checkpoints;
- :mod:`lib.evaluation`, :mod:`lib.report`, :mod:`lib.bench`: using trained models, analysing
  runs, measuring steps;
- the commands ``python -m lib.cache``, ``python -m lib.synthetic`` and ``python -m lib.export``,
  and the scripts at the repository's root, on top.
"""

import importlib
from typing import Any, Callable


def exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A package's ``__getattr__`` for its public names (``names``: name -> its module in the
    package): ``from lib.train import Run`` imports ``lib.train.run`` when it is first asked for,
    so that importing one module of a package never imports the others (``report.py`` reads
    ``lib.train.schedule`` without torch). Inside ``lib/``, modules import each other directly."""
    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
    __getattr__.names = dict(names)           # type: ignore[attr-defined]
    return __getattr__
