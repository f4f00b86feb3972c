"""The llmq layer and the functions ship bytecode when a Python of the runtime's version is at
hand (stacks/bytecode.py), and never a stale or foreign .pyc."""

from __future__ import annotations

import sys
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_lambda as lambda_

from stacks import bytecode
from stacks.layers import LLMQ_LAYER_DIR, code_asset, lambda_runtime

# This machine's Python stands in for the runtime's: what is checked is what the staging does
# with whatever interpreter it is given (`runtime_interpreter` refuses a wrong version).
PYTHON = sys.executable


def _package(root: Path, source: str = "ANSWER = 1\n") -> Path:
    package = root / "code" / "python" / "probe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "module.py").write_text(source)
    return root / "code"


def _pycs(tree: Path) -> set[str]:
    return {path.relative_to(tree).as_posix() for path in tree.rglob("*.pyc")}


def test_without_the_runtimes_python_the_sources_ship_as_they_are(tmp_path: Path) -> None:
    source = _package(tmp_path)
    assert bytecode.compiled_copy(source, None, staging=tmp_path / "staging") == source
    assert not (tmp_path / "staging").exists()


def test_a_staged_copy_holds_the_bytecode_of_every_module_and_leaves_the_sources_alone(
    tmp_path: Path,
) -> None:
    # Given sources with a cache of this machine's own beside them
    source = _package(tmp_path)
    (source / "python" / "probe" / "__pycache__").mkdir()
    (source / "python" / "probe" / "__pycache__" / "module.cpython-00.pyc").write_bytes(b"foreign")
    (source / ".mypy_cache").mkdir()
    # When it is staged with the runtime's Python
    staged = bytecode.compiled_copy(source, PYTHON, staging=tmp_path / "staging")
    # Then the copy has an unchecked-hash .pyc per module, compiled by that Python, and none
    # of the foreign cache; the sources gained nothing
    tag = sys.implementation.cache_tag
    assert staged != source
    assert _pycs(staged) == {
        f"python/probe/__pycache__/__init__.{tag}.pyc",
        f"python/probe/__pycache__/module.{tag}.pyc",
    }
    pyc = staged / "python" / "probe" / "__pycache__" / f"module.{tag}.pyc"
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01
    assert not (staged / ".mypy_cache").exists()
    assert _pycs(source) == {"python/probe/__pycache__/module.cpython-00.pyc"}
    # And staging the same sources again reuses the copy
    assert bytecode.compiled_copy(source, PYTHON, staging=tmp_path / "staging") == staged


def test_a_changed_source_is_staged_afresh_never_shipped_with_a_stale_pyc(tmp_path: Path) -> None:
    source = _package(tmp_path)
    first = bytecode.compiled_copy(source, PYTHON, staging=tmp_path / "staging")
    (source / "python" / "probe" / "module.py").write_text("ANSWER = 2\n")
    second = bytecode.compiled_copy(source, PYTHON, staging=tmp_path / "staging")
    assert second != first
    assert (second / "python" / "probe" / "module.py").read_text() == "ANSWER = 2\n"
    # (and the copy of sources that no longer exist is gone)
    assert not first.exists()


def test_sources_that_do_not_compile_ship_as_they_are(tmp_path: Path) -> None:
    source = _package(tmp_path, source="def broken(:\n")
    assert bytecode.compiled_copy(source, PYTHON, staging=tmp_path / "staging") == source
    assert not any((tmp_path / "staging").iterdir())


def test_the_synthesized_asset_keeps_the_staged_bytecode(tmp_path: Path, monkeypatch) -> None:
    # Given the llmq layer staged with the runtime's Python, as LlmqStack stages it
    monkeypatch.setattr(bytecode, "STAGING_DIR", tmp_path / "staging")
    app = cdk.App(outdir=str(tmp_path / "cdk.out"))
    stack = cdk.Stack(app, "Probe")
    lambda_.LayerVersion(
        stack,
        "Layer",
        code=code_asset(LLMQ_LAYER_DIR, PYTHON),
        compatible_runtimes=[lambda_runtime()],
    )
    # When the app is synthesized
    assembly = app.synth()
    # Then the layer's asset holds the bytecode of the llmq package's modules
    [asset] = [path for path in Path(assembly.directory).glob("asset.*") if path.is_dir()]
    modules = {path.stem for path in (LLMQ_LAYER_DIR / "python" / "llmq").glob("*.py")}
    compiled = {path.name.split(".")[0] for path in (asset / "python" / "llmq" / "__pycache__").glob("*.pyc")}
    assert modules and compiled == modules
