"""The sandbox runs the functions on the local Python; what Lambda's python3.14 would refuse is checked here.

What's New in Python 3.12, 3.13 and 3.14 (https://docs.python.org/3/whatsnew/3.12.html,
.../3.13.html, .../3.14.html), sections "Removed": the standard-library modules dropped in
each release, and the asyncio, ast and pkgutil functions 3.14 removed or changed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llmq_sandbox.python_runtime import lambda_python, removed_since, runtime_notice

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TO_LAMBDA = [ROOT / "functions", ROOT / "layers" / "llmq" / "python" / "llmq"]
# Calls that import fine and fail (or change meaning) on 3.14.
REMOVED_CALLS = {
    ("asyncio", "get_event_loop"),
    ("pkgutil", "find_loader"),
    ("pkgutil", "get_loader"),
    ("datetime", "utcnow"),
    ("datetime", "utcfromtimestamp"),
}


def _sources() -> list[Path]:
    return sorted(path for base in SHIPPED_TO_LAMBDA for path in base.rglob("*.py"))


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _attribute_calls(tree: ast.AST) -> set[tuple[str, str]]:
    calls: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            calls.add((name, node.func.attr))
    return calls


def test_the_code_lambda_runs_imports_no_module_its_python_removed() -> None:
    removed = set(removed_since((3, 11)))
    assert {"distutils", "imp", "telnetlib", "cgi"} <= removed  # the list is not empty by accident
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_modules(ast.parse(path.read_text())) & removed)
        for path in _sources()
    }
    assert len(offenders) > 20  # every handler and the whole domain package were read
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_code_lambda_runs_calls_nothing_python_3_14_removed() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_attribute_calls(ast.parse(path.read_text())) & REMOVED_CALLS)
        for path in _sources()
    }
    assert {path: calls for path, calls in offenders.items() if calls} == {}


def test_the_scan_sees_a_removed_module_and_a_removed_call() -> None:
    tree = ast.parse("import imp\nfrom distutils import util\nimport asyncio\nasyncio.get_event_loop()\n")
    assert _imported_modules(tree) & set(removed_since((3, 11))) == {"imp", "distutils"}
    assert _attribute_calls(tree) & REMOVED_CALLS == {("asyncio", "get_event_loop")}


def test_an_older_local_python_is_named_with_what_it_hides() -> None:
    lines = "\n".join(runtime_notice((3, 11)).lines())
    assert "Python 3.11, not Lambda's python3.14" in lines
    assert "telnetlib" in lines and "distutils" in lines
    assert "asyncio.get_event_loop() raises RuntimeError" in lines


@pytest.mark.parametrize("local", [(3, 14), (3, 15)])
def test_the_same_or_a_newer_python_says_so(local: tuple[int, int]) -> None:
    notice = runtime_notice(local)
    assert notice.matches == (local == lambda_python())
    assert notice.lines()[0].startswith(f"functions run on Python {local[0]}.{local[1]}")
    assert "telnetlib" not in "\n".join(notice.lines())
