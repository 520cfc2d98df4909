"""The codebase's shape that issue 11 asked for, kept: short trainer scripts, lib/ modules one
concern each and short, and no import cycle in lib/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = sorted((ROOT / "lib").glob("*.py"))


def lib_imports(path: Path) -> set[str]:
    """The lib modules ``path`` imports at module level (lazy imports inside functions excluded)."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module == "lib":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lib.")}
    return out & {p.stem for p in LIB}


def test_trainers_are_under_260_lines():
    for script in ("train_vae.py", "train_unified_prior.py"):
        assert len((ROOT / script).read_text(encoding="utf-8").splitlines()) < 260, script


def test_lib_modules_are_at_most_400_lines_except_the_config_schema():
    long = {p.name: n for p in LIB if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert set(long) <= {"config.py"}, long


def test_no_import_cycle_in_lib():
    graph = {p.stem: lib_imports(p) for p in LIB}
    assert sum(map(len, graph.values())) > 20            # the imports were found

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, " -> ".join(path[path.index(node):] + [node])
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])

    for module in graph:
        visit(module, [])


def test_readme_layout_lists_every_lib_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    listed = {line.split()[0] for line in readme if line.startswith("lib/")}
    assert {f"lib/{p.name}" for p in LIB} - {"lib/__init__.py"} <= listed
