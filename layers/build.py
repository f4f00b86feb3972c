#!/usr/bin/env python3
"""Build the Lambda dependencies layer into layers/deps/python, for the Lambda runtime and arm64.

The requirements are [project].dependencies exported from uv.lock, so the layer ships the
exact versions the tests ran against. Wheels only (`--only-binary=:all:`), for the manylinux
aarch64 platform and the runtime's Python version: no Docker, no compiler. A build whose
inputs (uv.lock, Python version, platform) have not changed is skipped; `--force` rebuilds.

    python layers/build.py [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stacks.bytecode import compile_bytecode, runtime_interpreter  # noqa: E402
from stacks.runtime import BYTECODE_KEY, LAMBDA_PYTHON_VERSION, LAYER_PLATFORM  # noqa: E402

DEPS_DIR = ROOT / "layers" / "deps"
TARGET = DEPS_DIR / "python"
BUILD_INFO = DEPS_DIR / "build-info.json"
UV_LOCK = ROOT / "uv.lock"
# Console scripts and caches are of no use on Lambda and only add size.
PRUNE_DIRS = ("bin", "__pycache__")


def find_uv() -> str:
    for candidate in (shutil.which("uv"), ROOT / ".tools" / "bin" / "uv", ROOT / ".venv" / "bin" / "uv"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("uv not found: install it with `pip install uv` (see the Makefile)")


def wanted_build_info() -> dict[str, str]:
    return {
        "python_version": LAMBDA_PYTHON_VERSION,
        "platform": LAYER_PLATFORM,
        "uv_lock_sha256": hashlib.sha256(UV_LOCK.read_bytes()).hexdigest(),
    }


def is_current(info: dict[str, str]) -> bool:
    if not BUILD_INFO.exists() or not TARGET.is_dir():
        return False
    built: dict[str, str] = json.loads(BUILD_INFO.read_text())
    return all(built.get(key) == value for key, value in info.items())


def export_requirements(uv: str, destination: Path) -> None:
    subprocess.run(
        [
            uv, "export", "--project", str(ROOT), "--frozen", "--no-dev", "--no-default-groups",
            "--no-hashes", "--no-emit-project", "--quiet", "--output-file", str(destination),
        ],
        check=True,
    )  # fmt: skip


def install(
    uv: str,
    requirements: Path,
    target: Path = TARGET,
    platform: str = LAYER_PLATFORM,
    python_version: str = LAMBDA_PYTHON_VERSION,
) -> None:
    """Wheels only, no bytecode, into `target`: the Lambda runtime's by default (the bench
    installs the same requirements for this machine's)."""
    subprocess.run(
        [
            uv, "pip", "install", "--quiet", "--requirement", str(requirements), "--target", str(target),
            "--python-platform", platform, "--python-version", python_version,
            "--only-binary=:all:", "--no-compile",
        ],
        check=True,
    )  # fmt: skip


def prune() -> None:
    for name in PRUNE_DIRS:
        for path in sorted(TARGET.rglob(name), reverse=True):
            if path.is_dir():
                shutil.rmtree(path)


def size_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 1_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    args = parser.parse_args(argv)
    info = wanted_build_info()
    if is_current(info) and not args.force:
        print(f"layers/deps is current (Python {LAMBDA_PYTHON_VERSION}, {LAYER_PLATFORM})")
        return 0
    uv = find_uv()
    shutil.rmtree(DEPS_DIR, ignore_errors=True)
    TARGET.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as workdir:
        requirements = Path(workdir) / "requirements.txt"
        export_requirements(uv, requirements)
        install(uv, requirements)
    prune()
    interpreter = runtime_interpreter()
    if interpreter is not None:
        complete = compile_bytecode(interpreter, TARGET, installed_at="/opt/python")
        info = {**info, BYTECODE_KEY: "compiled" if complete else "partial"}
    BUILD_INFO.write_text(json.dumps(info, indent=2) + "\n")
    bytecode = (
        f"bytecode compiled by {interpreter}"
        if interpreter
        else f"no bytecode (no python{LAMBDA_PYTHON_VERSION} here; set LLMQ_LAYER_PYTHON to compile it)"
    )
    print(
        f"layers/deps built: {size_mb(TARGET):.1f} MB for Python {LAMBDA_PYTHON_VERSION} on {LAYER_PLATFORM}, "
        + bytecode
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
