"""Every Python code block of the README runs as written.

Each ```python block is executed on its own (a fresh namespace, in a temporary working directory, seeded),
so that a reader can paste any one of them. A block that imports a package that is not installed (an optional
peer such as torchvision) skips naming it; a block that reads the packed datasets (it names ``../shared/data``
or ``NSL_SHARED_DATA``) skips where they are absent. Dynamic layers run on the pure-PyTorch ``unfold``
backend here (the fused C++ kernel, compiled on first use, is tested elsewhere).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the block's first code line, code)`` of every ```python block of ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _missing_modules(code: str) -> list[str]:
    """Top-level packages that ``code`` imports and that are not installed here."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def _data_missing(code: str) -> str | None:
    if "../shared/data" not in code and "NSL_SHARED_DATA" not in code:
        return None
    root = Path(os.environ.get("NSL_SHARED_DATA", REPO.parent / "shared" / "data"))
    return None if root.is_dir() else f"the block reads the packed datasets, which are not at {root}"


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks_and_the_extractor_finds_them():
    assert BLOCKS, "no ```python block found in README.md"
    sample = "text\n```python\nx = 1\n```\nmore\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(sample) == [(3, "x = 1\n"), (10, "y = 2\nz = 3\n")]


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_as_written(line, code, tmp_path, monkeypatch, unfold_backend, capsys):
    missing = _missing_modules(code)
    if missing:
        pytest.skip(f"README.md:{line} imports {', '.join(missing)}, not installed here")
    why = _data_missing(code)
    if why:
        pytest.skip(f"README.md:{line}: {why}")
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    torch.manual_seed(0)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
    capsys.readouterr()
