"""Imports between the two trees go one way: ``benchmarks/`` may use ``tests/support``, and
``tests/`` never imports a benchmark (a test of a benchmark lives beside it in ``benchmarks/``)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(folder: Path) -> Iterator[tuple[str, str]]:
    """(file relative to the repository, imported module) for every import under ``folder``."""
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                yield str(path.relative_to(REPO)), name


def _benchmark_modules() -> set[str]:
    return {path.stem for path in (REPO / "benchmarks").glob("*.py")}


def test_tests__never_import_a_benchmark() -> None:
    """No module under tests/ imports benchmarks/ or one of its scripts by name."""
    benchmarks = _benchmark_modules() | {"benchmarks"}
    found = [(path, name) for path, name in _imports(REPO / "tests") if name.split(".")[0] in benchmarks]
    assert found == []


def test_benchmarks__import_only_the_support_package_of_tests() -> None:
    """From tests/, benchmarks/ imports tests.support and nothing else (no test module)."""
    found = [(path, name) for path, name in _imports(REPO / "benchmarks")
             if name.split(".")[0] == "tests" and not (name == "tests.support" or name.startswith("tests.support."))]
    assert found == []
