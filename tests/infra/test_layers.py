"""The dependencies layer: built for the runtime from uv.lock, and never silently stale."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from stacks import layers
from stacks.runtime import LAMBDA_PYTHON_VERSION

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
