"""The dependencies layer: built for the runtime from uv.lock, and never silently stale."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from stacks import layers
from stacks.runtime import BYTECODE_KEY, LAMBDA_PYTHON_VERSION

ROOT = Path(__file__).resolve().parents[2]


def _load_build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llmq_layer_build", ROOT / "layers" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_script()


@pytest.fixture
def deps_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(layers, "DEPS_LAYER_DIR", tmp_path / "deps")
    return tmp_path / "deps"


def _write_build(deps_dir: Path, info: dict[str, str]) -> None:
    (deps_dir / "python").mkdir(parents=True)
    (deps_dir / layers.DEPS_BUILD_INFO).write_text(json.dumps(info))


def test_an_unbuilt_layer_synthesizes_as_a_placeholder_and_says_so(deps_dir):
    source = layers.locate_deps_layer(use_placeholder=False)

    assert source.path != deps_dir
    assert (source.path / "python").is_dir()
    assert source.problem is not None and "make layers" in source.problem


def test_a_layer_built_for_another_python_is_not_used(deps_dir):
    _write_build(deps_dir, {**build.wanted_build_info(), "python_version": "3.9"})

    source = layers.locate_deps_layer(use_placeholder=False)

    assert source.path != deps_dir
    assert source.problem is not None and "3.9" in source.problem


def test_a_current_build_is_used_as_is(deps_dir):
    # Given what layers/build.py records after a build from the current uv.lock
    _write_build(deps_dir, build.wanted_build_info())

    source = layers.locate_deps_layer(use_placeholder=False)

    assert source.path == deps_dir
    assert source.problem is None


def test_the_sandbox_always_uses_the_placeholder(deps_dir):
    _write_build(deps_dir, build.wanted_build_info())

    source = layers.locate_deps_layer(use_placeholder=True)

    assert source.path != deps_dir and source.problem is None


def test_the_build_targets_the_lambda_runtime():
    info = build.wanted_build_info()
    assert info["python_version"] == LAMBDA_PYTHON_VERSION
    assert info["platform"].startswith("aarch64-manylinux")


def test_the_layer_ships_the_runtime_dependencies_only(tmp_path):
    # Given the project's lock, When the requirements are exported for the layer
    try:
        uv = build.find_uv()
    except SystemExit:
        pytest.skip("uv is not installed")
    requirements = tmp_path / "requirements.txt"
    build.export_requirements(uv, requirements)
    names = {
        line.split("==")[0].strip().lower()
        for line in requirements.read_text().splitlines()
        if line and not line.startswith((" ", "#"))
    }

    # Then the runtime dependencies are pinned, and nothing used only to build or test is shipped
    assert {"aws-lambda-powertools", "pydantic", "httpx", "boto3"} <= names
    assert not names & {"aws-cdk-lib", "moto", "pytest", "cdk-nag", "cfn-lint", "mypy", "ruff"}


def test_a_build_whose_bytecode_was_compiled_for_the_runtime_ships_it(deps_dir):
    # Given a build that compiled its bytecode with the runtime's Python
    _write_build(deps_dir, {**build.wanted_build_info(), BYTECODE_KEY: "compiled"})

    source = layers.locate_deps_layer(use_placeholder=False)

    assert source.path == deps_dir and source.problem is None
    assert source.compiled


def test_a_named_interpreter_of_another_version_or_none_at_all_is_a_clear_error(monkeypatch, tmp_path):
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    monkeypatch.setenv("LLMQ_LAYER_PYTHON", sys.executable)
    if here == LAMBDA_PYTHON_VERSION:
        assert build.runtime_interpreter() == sys.executable
    else:
        # Never this machine's Python by mistake: its bytecode would be ignored on Lambda
        with pytest.raises(SystemExit, match=f"not the runtime's {LAMBDA_PYTHON_VERSION}"):
            build.runtime_interpreter()
    monkeypatch.setenv("LLMQ_LAYER_PYTHON", str(tmp_path / "python-missing"))
    with pytest.raises(SystemExit, match="does not run"):
        build.runtime_interpreter()


def test_without_a_named_interpreter_a_machine_without_the_runtime_s_python_compiles_nothing(monkeypatch):
    monkeypatch.delenv("LLMQ_LAYER_PYTHON", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert build.runtime_interpreter() is None


def test_compiled_bytecode_is_loaded_without_comparing_it_with_its_source(tmp_path):
    # Given a module compiled as the layer's build compiles it
    package = tmp_path / "python"
    package.mkdir()
    (package / "probe_module.py").write_text("ANSWER = 'from bytecode'\n")
    assert build.compile_bytecode(sys.executable, package)
    [pyc] = (package / "__pycache__").glob("probe_module.*.pyc")
    # (PEP 552: flags 0b01, hash-based and unchecked)
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01
    # When its source changes, as a zip's lost timestamps would make it look
    (package / "probe_module.py").write_text("ANSWER = 'from source'\n")
    # Then the runtime still runs the bytecode, without compiling anything
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-B",
            "-c",
            "import sys; sys.path[:0] = ['.']; import probe_module; print(probe_module.ANSWER)",
        ],
        cwd=package,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "from bytecode"
