"""Bytecode for the Lambda runtime: compiled where a Python of its version is at hand.

Lambda's /opt (layers) and /var/task (the function) are read-only, so a module shipped
without bytecode is compiled on every cold start, and none is ever cached (BENCHMARKS §4).
The runtime's Python (`stacks.runtime`) is usually not the one running the CDK app, and
bytecode is version-specific, so the build compiles with a Python of the runtime's version
when this machine has one (`LLMQ_LAYER_PYTHON`, else python<version> on PATH), and ships
sources only when it has none. Nothing is ever downloaded.

`layers/build.py` compiles the deps layer this way. At synth, `compiled_copy` does the same for
the llmq layer and each function's folder: a copy staged under .llmq/compiled, named by the
digest of its sources, so a changed source never ships a stale .pyc.

Kept free of CDK imports so that `layers/build.py` can use it without starting jsii.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from stacks.runtime import LAMBDA_PYTHON_VERSION

ROOT = Path(__file__).resolve().parent.parent
STAGING_DIR = ROOT / ".llmq" / "compiled"
# Never copied into a staged tree: caches, and bytecode compiled by another Python.
_NOT_SHIPPED = ("__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache")


def runtime_interpreter() -> str | None:
    """A Python of the Lambda runtime's version on this machine (`LLMQ_LAYER_PYTHON`, else
    python<version> on PATH), to compile bytecode with; None when there is none.
    Never downloaded: without one, sources ship alone and each cold start compiles what it
    imports, since /opt and /var/task are read-only (BENCHMARKS §4)."""
    named = os.environ.get("LLMQ_LAYER_PYTHON")
    found = named or shutil.which(f"python{LAMBDA_PYTHON_VERSION}")
    if not found:
        return None
    try:
        version = subprocess.run(
            [found, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError as exc:
        raise SystemExit(f"LLMQ_LAYER_PYTHON={found} does not run: {exc}") from exc
    if version == LAMBDA_PYTHON_VERSION:
        return found
    if named:
        # Asked for by name: an operator expects bytecode, so a wrong Python is an error.
        raise SystemExit(
            f"LLMQ_LAYER_PYTHON={named} is Python {version or '(unknown)'}, not the runtime's {LAMBDA_PYTHON_VERSION}"
        )
    return None


def compile_bytecode(interpreter: str, target: Path) -> bool:
    """Compile every module under `target` with `interpreter`, as unchecked-hash .pyc files:
    the runtime loads them without comparing them with their sources, whose timestamps the
    asset's zip does not keep. False when some file did not compile (it then runs from source)."""
    done = subprocess.run(
        [
            interpreter,
            "-I",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            str(target),
        ],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def sources_digest(source: Path) -> str:
    """What a staged copy is named by: every shipped file's path and bytes under `source`."""
    digest = hashlib.sha256(LAMBDA_PYTHON_VERSION.encode())
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or any(relative.match(pattern) for pattern in _NOT_SHIPPED):
            continue
        if "__pycache__" in relative.parts or any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def compiled_copy(source: Path, interpreter: str | None, staging: Path | None = None) -> Path:
    """The directory to ship for `source`: itself when there is no `interpreter` (or a module
    does not compile), else a copy of it with every module's bytecode compiled by `interpreter`.

    The copy is staged once per content (`sources_digest`) and moved into place whole, so two
    synths at once, or one cut short, never ship a half-compiled tree.
    """
    if interpreter is None:
        return source
    staging = staging or STAGING_DIR
    staged = staging / f"{source.name}-{sources_digest(source)}"
    if staged.is_dir():
        return staged
    staging.mkdir(parents=True, exist_ok=True)
    building = staging / f".{staged.name}.{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    shutil.copytree(
        source,
        building,
        ignore=shutil.ignore_patterns(*_NOT_SHIPPED, ".*"),
    )
    if not compile_bytecode(interpreter, building):
        shutil.rmtree(building, ignore_errors=True)
        return source
    try:
        building.rename(staged)
    except OSError:  # another synth staged the same content first
        shutil.rmtree(building, ignore_errors=True)
    # Earlier stagings of the same folder are of sources that no longer exist (`make clean`
    # removes them all).
    for older in staging.glob(f"{source.name}-*"):
        if older != staged and older.is_dir():
            shutil.rmtree(older, ignore_errors=True)
    return staged
