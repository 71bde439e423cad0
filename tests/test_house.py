"""The package's import structure: no two modules of ``nsl`` import each other (at any depth of the
file: top-level and function-level imports alike), so that imports flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

import nsl

SRC = Path(nsl.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC.parent / rel).with_suffix(".py").is_file() or (SRC.parent / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The ``nsl`` modules that the file at ``path`` imports (``from .a import b`` counts ``a.b`` when it is a
    module of its own, else ``a``)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nsl"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "nsl":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    found.discard(me)
    return found


def test_no_two_modules_import_each_other():
    graph = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}
    assert len(graph) > 40  # the walk found the package
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert pairs == [], f"modules importing each other: {pairs}"


def test_the_import_walk_sees_relative_and_function_level_imports():
    deps = _imports(SRC / "fewshot" / "cli.py")
    assert "nsl._cli_utils" in deps  # from .._cli_utils import ... (top level)
    assert "nsl.fewshot.train" in deps  # from .train import ... inside a function
