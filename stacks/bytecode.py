"""Bytecode for the Lambda runtime: compiled where a Python of its version is at hand.

Lambda's /opt (layers) and /var/task (the function) are read-only, so a module shipped
without bytecode is compiled on every cold start, and none is ever cached (BENCHMARKS §4).
The runtime's Python (`stacks.runtime`) is usually not the one running the CDK app, and
bytecode is version-specific, so the build compiles with a Python of the runtime's version
when this machine has one (`LLMQ_LAYER_PYTHON`, else python<version> on PATH), and ships
sources only when it has none. Nothing is ever downloaded.

`layers/build.py` compiles the deps layer this way. At synth, `compiled_copy` does the same for
the llmq layer and each function's folder: a copy staged under .llmq/compiled, named by the
digest of its sources and of the compiling Python, so a changed source (or Python) never
ships a stale .pyc. Each module records where Lambda puts it (/opt, /var/task) as its file
name, not this machine's path: the same sources give the same bytes, and the same asset.

Kept free of CDK imports so that `layers/build.py` can use it without starting jsii.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
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


# What a compiled copy is named by besides its sources: bump it when the compile changes.
_COMPILE_FORMAT = "unchecked-hash, -d <where Lambda puts it>, v2"
# A staging of older sources, or one a synth cut short left, is removed once it is this old
# (not at once: another synth of the same checkout may be copying it into its assembly).
STALE_STAGING_SECONDS = 3600
# Where Lambda puts a layer's contents, and a function's folder.
LAYER_ROOT = "/opt"
TASK_ROOT = "/var/task"


def compile_bytecode(interpreter: str, target: Path, installed_at: str | None = None) -> bool:
    """Compile every module under `target` with `interpreter`, as unchecked-hash .pyc files:
    the runtime loads them without comparing them with their sources, whose timestamps the
    asset's zip does not keep. `installed_at`: where `target` lands on Lambda, recorded as each
    module's file name instead of this machine's path, so that the same sources compile to the
    same bytes wherever they are staged (and the assets' hashes stay put). False when some file
    did not compile (it then runs from source)."""
    command = [
        interpreter,
        "-I",
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        "--invalidation-mode",
        "unchecked-hash",
    ]
    if installed_at is not None:
        command += ["-d", installed_at]
    done = subprocess.run([*command, str(target)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(
            f"warning: {target.name}: a module did not compile; it ships as sources\n{done.stdout[-2000:]}",
            file=sys.stderr,
        )
    return done.returncode == 0


@functools.cache
def interpreter_identity(interpreter: str) -> str:
    """What makes one Python's bytecode another's: its magic number and cache tag."""
    return subprocess.run(
        [
            interpreter,
            "-I",
            "-c",
            "import importlib.util, sys; print(importlib.util.MAGIC_NUMBER.hex(), sys.implementation.cache_tag)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def sources_digest(tree: Path, salt: str = "") -> str:
    """Every shipped file's path and bytes under `tree`, with `salt`."""
    digest = hashlib.sha256(salt.encode())
    for path in sorted(tree.rglob("*")):
        relative = path.relative_to(tree)
        if not path.is_file() or any(relative.match(pattern) for pattern in _NOT_SHIPPED):
            continue
        if "__pycache__" in relative.parts or any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def compiled_copy(
    source: Path, interpreter: str | None, installed_at: str, staging: Path | None = None
) -> Path:
    """The directory to ship for `source`: itself when there is no `interpreter` (or a module
    does not compile), else a copy of it with every module's bytecode compiled by `interpreter`
    as if at `installed_at` (LAYER_ROOT or TASK_ROOT).

    The copy is taken first and named by its own content (so an edit during the synth never
    ships under the name of other sources), compiled, and moved into place whole: two synths
    at once, or one cut short, never ship a half-compiled tree.
    """
    if interpreter is None:
        return source
    staging = staging or STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    _sweep(staging, source.name)
    building = staging / f".{source.name}.{os.getpid()}.{time.monotonic_ns()}"
    shutil.copytree(source, building, ignore=shutil.ignore_patterns(*_NOT_SHIPPED, ".*"))
    salt = f"{LAMBDA_PYTHON_VERSION} {interpreter_identity(interpreter)} {installed_at} {_COMPILE_FORMAT}"
    staged = staging / f"{source.name}-{sources_digest(building, salt)}"
    if staged.is_dir():
        shutil.rmtree(building, ignore_errors=True)
        _touch(staged)
        return staged
    if not compile_bytecode(interpreter, building, installed_at):
        shutil.rmtree(building, ignore_errors=True)
        return source
    try:
        building.rename(staged)
    except OSError:  # another synth staged the same content first
        shutil.rmtree(building, ignore_errors=True)
    _touch(staged)
    return staged


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _sweep(staging: Path, name: str) -> None:
    """Stagings of `name` not used for STALE_STAGING_SECONDS, and building trees left that long."""
    cutoff = time.time() - STALE_STAGING_SECONDS
    for older in [*staging.glob(f"{name}-*"), *staging.glob(f".{name}.*")]:
        with contextlib.suppress(OSError):
            if older.is_dir() and older.stat().st_mtime < cutoff:
                shutil.rmtree(older, ignore_errors=True)
