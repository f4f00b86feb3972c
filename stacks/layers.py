"""The two Lambda layers: the `llmq` domain package and its third-party dependencies."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from stacks.bytecode import LAYER_ROOT, compiled_copy
from stacks.runtime import BYTECODE_KEY, LAMBDA_ARCHITECTURE, LAMBDA_PYTHON_VERSION

ROOT = Path(__file__).resolve().parent.parent
LLMQ_LAYER_DIR = ROOT / "layers" / "llmq"
DEPS_LAYER_DIR = ROOT / "layers" / "deps"
# Written by layers/build.py next to python/: what the layer was built for and from.
DEPS_BUILD_INFO = "build-info.json"
UV_LOCK = ROOT / "uv.lock"

# Why a synth without the layer fails, and what to do.
DEPS_LAYER_HINT = (
    "Without it every function fails with ImportModuleError. `make layers` builds it (`make synth` "
    "and `make deploy` do first); the sandbox (-c llmq:sandbox=true) needs none."
)

ASSET_EXCLUDES = ["**/__pycache__", "**/*.pyc", ".mypy_cache", ".pytest_cache"]
# A deps layer whose bytecode was compiled for the runtime (layers/build.py) keeps it.
COMPILED_ASSET_EXCLUDES = [".mypy_cache", ".pytest_cache"]


def lambda_runtime() -> lambda_.Runtime:
    runtime: lambda_.Runtime = getattr(lambda_.Runtime, "PYTHON_" + LAMBDA_PYTHON_VERSION.replace(".", "_"))
    return runtime


def lambda_architecture() -> lambda_.Architecture:
    known = (lambda_.Architecture.ARM_64, lambda_.Architecture.X86_64)
    return next(architecture for architecture in known if architecture.name == LAMBDA_ARCHITECTURE)


def code_asset(source: Path, bytecode_python: str | None, installed_at: str) -> lambda_.AssetCode:
    """`source` as a Lambda asset: with bytecode compiled by `bytecode_python` when given (and
    every module compiled), else its sources without any bytecode of this machine's Python.
    `installed_at`: where Lambda puts it (`stacks.bytecode.LAYER_ROOT` or `TASK_ROOT`)."""
    shipped = compiled_copy(source, bytecode_python, installed_at)
    return lambda_.Code.from_asset(
        str(shipped), exclude=COMPILED_ASSET_EXCLUDES if shipped != source else ASSET_EXCLUDES
    )


def lock_digest() -> str:
    return hashlib.sha256(UV_LOCK.read_bytes()).hexdigest() if UV_LOCK.exists() else ""


@dataclass(frozen=True)
class DepsLayerSource:
    path: Path
    # None when the layer is real and current; otherwise why a placeholder was used.
    problem: str | None
    # Its bytecode was compiled for the runtime, and ships with it.
    compiled: bool = False


def locate_deps_layer(use_placeholder: bool) -> DepsLayerSource:
    """The built deps layer when it matches the runtime and uv.lock, else an empty placeholder.

    Synth must work on a fresh checkout without network, and the sandbox never runs code
    from the layer (moto cannot run Lambda; the sandbox runs handlers in-process).
    """
    if use_placeholder:
        return DepsLayerSource(_placeholder_dir(), None)
    info_file = DEPS_LAYER_DIR / DEPS_BUILD_INFO
    if not (DEPS_LAYER_DIR / "python").is_dir() or not info_file.exists():
        return DepsLayerSource(_placeholder_dir(), "layers/deps is not built: run `make layers`")
    info = json.loads(info_file.read_text())
    if info.get("python_version") != LAMBDA_PYTHON_VERSION:
        problem = f"layers/deps was built for Python {info.get('python_version')}: run `make layers`"
        return DepsLayerSource(_placeholder_dir(), problem)
    if info.get("uv_lock_sha256") != lock_digest():
        return DepsLayerSource(DEPS_LAYER_DIR, "layers/deps is older than uv.lock: run `make layers`")
    return DepsLayerSource(DEPS_LAYER_DIR, None, compiled=BYTECODE_KEY in info)


def _placeholder_dir() -> Path:
    # Outside the repository so that nothing resembling a build output is ever committed;
    # its content is fixed, so its asset hash is stable across machines.
    path = Path(tempfile.gettempdir()) / "llmq-deps-layer-placeholder"
    (path / "python").mkdir(parents=True, exist_ok=True)
    marker = path / "python" / "LLMQ_DEPS_PLACEHOLDER.txt"
    text = "Placeholder for the llmq dependencies layer. Build the real one with `make layers`.\n"
    if not marker.exists() or marker.read_text() != text:
        marker.write_text(text)
    return path


class LayersConstruct(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        use_placeholder_deps: bool,
        require_deps: bool,
        bytecode_python: str | None = None,
    ) -> None:
        """`bytecode_python`: a Python of the runtime's version, to ship the llmq layer with its
        bytecode (`stacks.bytecode`); None ships its sources only."""
        super().__init__(scope, construct_id)
        runtime = lambda_runtime()
        self.llmq = lambda_.LayerVersion(
            self,
            "LlmqLayer",
            code=code_asset(LLMQ_LAYER_DIR, bytecode_python, LAYER_ROOT),
            compatible_runtimes=[runtime],
            compatible_architectures=[lambda_architecture()],
            description="llmq domain package (layers/llmq/python/llmq)",
        )
        deps = locate_deps_layer(use_placeholder_deps)
        if deps.problem is not None and require_deps:
            # A placeholder or stale layer would break every function (ImportModuleError, and
            # the API answers 502): a deploy is refused, not shipped broken.
            cdk.Annotations.of(self).add_error(f"{deps.problem}. {DEPS_LAYER_HINT}")
        elif deps.problem is not None:
            cdk.Annotations.of(self).add_warning_v2("llmq:deps-layer", deps.problem)
        self.deps = lambda_.LayerVersion(
            self,
            "DepsLayer",
            code=lambda_.Code.from_asset(
                str(deps.path), exclude=COMPILED_ASSET_EXCLUDES if deps.compiled else ASSET_EXCLUDES
            ),
            compatible_runtimes=[runtime],
            compatible_architectures=[lambda_architecture()],
            description="llmq runtime dependencies (pyproject [project].dependencies, pinned by uv.lock)",
        )

    @property
    def all(self) -> list[lambda_.ILayerVersion]:
        return [self.deps, self.llmq]
