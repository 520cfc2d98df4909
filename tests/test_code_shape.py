"""The codebase's shape: lib/ in layers (base <- data <- models <- train <- evaluation, report,
bench <- commands and scripts), no import cycle, and a README whose Layout lists every module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_vae.py", "train_unified_prior.py", "evaluate.py", "predict.py", "report.py", "bench.py"]
COMMANDS = {"lib.cache", "lib.synthetic", "lib.export"}          # python -m lib.X: on top, like the scripts
LAYER = {"data": 1, "models": 2, "train": 3, "evaluation": 4, "report": 4, "bench": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


LIB = {module_name(p): p for p in sorted((ROOT / "lib").rglob("*.py"))}


def layer(module: str) -> tuple[int, str]:
    """(layer, package): the base modules are 0, commands and scripts 5."""
    parts = module.split(".")
    if module in COMMANDS or parts[0] != "lib":
        return 5, "scripts"
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYER):
        return LAYER[parts[1]], parts[1]
    return 0, "base"


def lib_imports(path: Path, module_level: bool = True) -> set[str]:
    """The lib modules ``path`` imports (at module level, or anywhere, lazy imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lib":
            for a in node.names:                     # from lib.data import cache: the module lib.data.cache
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in LIB else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lib"}
    unknown = out - set(LIB)
    assert not unknown, f"{path.name} imports modules that do not exist: {unknown}"
    return out


def test_the_modules_and_their_imports_are_found():
    assert {"lib.config", "lib.data.dataset", "lib.models.prior", "lib.train.run", "lib.report.findings"} <= set(LIB)
    assert "lib.data.layout" in lib_imports(LIB["lib.data.dataset"])
    assert sum(len(lib_imports(p)) for p in LIB.values()) > 60


def test_no_import_cycle_in_lib():
    graph = {m: lib_imports(p) for m, p in LIB.items()}

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, " -> ".join(path[path.index(node):] + [node])
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])

    for module in graph:
        visit(module, [])


def test_no_module_imports_from_a_higher_layer_or_a_sibling_package():
    found = []
    files = {**LIB, **{s[:-3]: ROOT / s for s in SCRIPTS}}
    for module, path in files.items():
        (mine, package) = layer(module)
        for imported in lib_imports(path, module_level=False):
            (theirs, other) = layer(imported)
            if theirs > mine or (theirs == mine and mine in (4, 5) and other != package and package != "scripts"):
                found.append(f"{module} ({package}) imports {imported} ({other})")
    assert not found, "\n".join(found)


def test_trainers_import_from_at_most_8_modules():
    """The packages' names (``from lib.train import Run``) are their API for the scripts."""
    for script in ("train_vae.py", "train_unified_prior.py"):
        modules = lib_imports(ROOT / script)
        assert len(modules) <= 8, (script, sorted(modules))
        assert {"lib.data", "lib.models", "lib.train"} <= modules, (script, sorted(modules))


def test_package_names_resolve_and_lib_modules_import_modules_not_packages():
    import importlib
    for package in ("lib.data", "lib.models", "lib.train", "lib.evaluation"):
        api = importlib.import_module(package)
        for name, module in api.__getattr__.names.items():
            assert getattr(api, name) is getattr(importlib.import_module(f"{package}.{module}"), name)
    from lib.train import Run, build_scheduler
    from lib.train.run import Run as run_class
    from lib.train.schedule import build_scheduler as scheduler_function
    assert Run is run_class and build_scheduler is scheduler_function
    import lib.train
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lib.train.nothing
    packages = {"lib.data", "lib.models", "lib.train", "lib.evaluation", "lib.report", "lib.bench"}
    inside = {m: sorted(lib_imports(p, module_level=False) & packages) for m, p in LIB.items()}
    assert not {m: found for m, found in inside.items() if found}


def test_readme_layout_lists_every_lib_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    listed = {line.split()[0] for line in readme if line.startswith("lib/")}
    expected = {str(p.relative_to(ROOT)) for p in LIB.values()}
    expected = {p[:-len("__init__.py")] if p.endswith("__init__.py") else p for p in expected} - {"lib/"}
    assert expected <= listed, sorted(expected - listed)
