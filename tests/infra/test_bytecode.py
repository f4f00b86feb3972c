"""The llmq layer and the functions ship bytecode when a Python of the runtime's version is at
hand (stacks/bytecode.py), and never a stale or foreign .pyc."""

from __future__ import annotations

import marshal
import os
import sys
import time
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
    assert bytecode.compiled_copy(source, None, bytecode.LAYER_ROOT, staging=tmp_path / "staging") == source
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
    staged = bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging")
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
    assert bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging") == staged


def test_a_changed_source_is_staged_afresh_never_shipped_with_a_stale_pyc(tmp_path: Path) -> None:
    source = _package(tmp_path)
    first = bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging")
    (source / "python" / "probe" / "module.py").write_text("ANSWER = 2\n")
    second = bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging")
    assert second != first
    assert (second / "python" / "probe" / "module.py").read_text() == "ANSWER = 2\n"


def test_the_same_sources_compile_to_the_same_bytes_wherever_they_are_staged(tmp_path: Path) -> None:
    # Given one folder's sources in two checkouts (two machines, or CI's fresh clone)
    here = _package(tmp_path / "here")
    there = _package(tmp_path / "there")
    # When each is staged
    one = bytecode.compiled_copy(here, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging-here")
    other = bytecode.compiled_copy(there, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging-there")
    # Then the bytecode is the same bytes (so is the asset's hash: no new layer version, no new
    # function code on a deploy that changed nothing), naming where Lambda puts the module
    assert one.name == other.name
    for pyc in _pycs(one):
        assert (one / pyc).read_bytes() == (other / pyc).read_bytes(), pyc
    module = marshal.loads((one / next(p for p in _pycs(one) if "module." in p)).read_bytes()[16:])
    assert module.co_filename == "/opt/python/probe/module.py"


def test_another_compiling_python_stages_afresh(tmp_path: Path, monkeypatch) -> None:
    source = _package(tmp_path)
    first = bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging")
    # (a pre-release and its final release of one version have different magic numbers)
    monkeypatch.setattr(bytecode, "interpreter_identity", lambda interpreter: "0a0d0000 cpython-314")
    assert bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging") != first


def test_a_staging_is_named_by_what_it_holds_even_when_a_source_changes_during_the_copy(
    tmp_path: Path, monkeypatch
) -> None:
    # Given a source edited while the synth copies it
    source = _package(tmp_path)
    copy = bytecode.shutil.copytree

    def copy_then_edit(src: Path, dst: Path, *args: object, **kwargs: object) -> object:
        copied = copy(src, dst, *args, **kwargs)
        if Path(src) == source:  # (the whole tree copied)
            (source / "python" / "probe" / "module.py").write_text("ANSWER = 'edited later'\n")
        return copied

    monkeypatch.setattr(bytecode.shutil, "copytree", copy_then_edit)
    staged = bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging")
    monkeypatch.setattr(bytecode.shutil, "copytree", copy)
    # Then the staging holds the sources as copied, under their name, so the edited sources
    # are staged afresh rather than served this staging
    assert (staged / "python" / "probe" / "module.py").read_text() == "ANSWER = 1\n"
    assert bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging") != staged


def test_older_stagings_are_swept_only_once_nobody_can_be_using_them(tmp_path: Path) -> None:
    source = _package(tmp_path)
    staging = tmp_path / "staging"
    first = bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=staging)
    (source / "python" / "probe" / "module.py").write_text("ANSWER = 2\n")
    second = bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=staging)
    # A staging another synth may still be copying from stays
    assert first.exists() and second.exists()
    # One unused for longer than the sweep's age goes with the next staging (as does a building
    # tree a cut-short synth left)
    left = staging / ".code.999.1"
    left.mkdir()
    old = time.time() - bytecode.STALE_STAGING_SECONDS - 60
    for path in (first, left):
        os.utime(path, (old, old))
    bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=staging)
    assert not first.exists() and not left.exists() and second.exists()


def test_the_tests_synthesize_without_bytecode_and_a_deploy_with_it(monkeypatch) -> None:
    from stacks.app_builder import settings_from_context
    from stacks.synthesis import synth_key
    from tests.infra.synthesis import TEST_CONTEXT

    assert settings_from_context(cdk.App(context=TEST_CONTEXT)).bytecode is False
    assert settings_from_context(cdk.App()).bytecode is True
    # And a cached synth is never served to a machine that compiles with another Python
    monkeypatch.setattr(bytecode, "runtime_interpreter", lambda: None)
    without = synth_key(None, {})
    monkeypatch.setattr(bytecode, "runtime_interpreter", lambda: PYTHON)
    assert synth_key(None, {}) != without
    assert synth_key(None, TEST_CONTEXT) == synth_key(None, TEST_CONTEXT)


def test_sources_that_do_not_compile_ship_as_they_are(tmp_path: Path) -> None:
    source = _package(tmp_path, source="def broken(:\n")
    assert bytecode.compiled_copy(source, PYTHON, bytecode.LAYER_ROOT, staging=tmp_path / "staging") == source
    assert not any((tmp_path / "staging").iterdir())


def test_the_synthesized_asset_keeps_the_staged_bytecode(tmp_path: Path, monkeypatch) -> None:
    # Given the llmq layer staged with the runtime's Python, as LlmqStack stages it
    monkeypatch.setattr(bytecode, "STAGING_DIR", tmp_path / "staging")
    app = cdk.App(outdir=str(tmp_path / "cdk.out"))
    stack = cdk.Stack(app, "Probe")
    lambda_.LayerVersion(
        stack,
        "Layer",
        code=code_asset(LLMQ_LAYER_DIR, PYTHON, bytecode.LAYER_ROOT),
        compatible_runtimes=[lambda_runtime()],
    )
    # When the app is synthesized
    assembly = app.synth()
    # Then the layer's asset holds the bytecode of the llmq package's modules
    [asset] = [path for path in Path(assembly.directory).glob("asset.*") if path.is_dir()]
    modules = {path.stem for path in (LLMQ_LAYER_DIR / "python" / "llmq").glob("*.py")}
    compiled = {path.name.split(".")[0] for path in (asset / "python" / "llmq" / "__pycache__").glob("*.pyc")}
    assert modules and compiled == modules
