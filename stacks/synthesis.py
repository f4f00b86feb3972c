"""Synthesize the llmq app into a cloud assembly, once per input when a cache is asked for.

A synth costs a jsii start and cdk-nag (10-20 s on a busy two-core machine), and the test
suites and the sandbox synthesize the same app again and again. With LLMQ_SYNTH_CACHE set to
a directory, a synth whose inputs were synthesized before copies that cloud assembly instead:
the template, the asset manifest and the staged asset directories, byte for byte, so asset
paths stay valid and a deploy publishes the same zips. Without it, every call synthesizes.

The key is a hash of everything the template is made of: the effective LlmqConfig, the CDK
context (cdk.json's and the caller's, so the sandbox flag too), every file of stacks/, app.py,
cdk.json, functions/ and layers/llmq/, uv.lock and the CDK library versions, the deps layer
that `stacks.layers.locate_deps_layer` would ship, and CDK_* variables. A change to any of
them is a new entry; a hit is checked against the template's recorded hash. Strings that
differ on every run (the sandbox's fake provider URL) are kept as placeholders and put back
on a hit: tests/infra/test_synthesis.py proves the template equals a fresh synth's. A process
that changes the app in memory (tests/e2e/wiring_fault.py) must not set the variable.

Kept free of CDK imports at module level: a hit never starts jsii.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from llmq.config import LlmqConfig
from stacks.context import CONTEXT_BYTECODE, CONTEXT_SANDBOX, cdk_json_context, context_flag

SYNTH_CACHE_ENV = "LLMQ_SYNTH_CACHE"
log = logging.getLogger("llmq.synth")
ROOT = Path(__file__).resolve().parent.parent
# What a synth reads from the tree; the function and layer directories are also asset sources.
SOURCE_FILES = ("app.py", "cdk.json", "uv.lock")
SOURCE_TREES = ("stacks", "functions", "layers/llmq")
CDK_LIBRARIES = ("aws-cdk-lib", "cdk-nag", "constructs", "jsii")
# Entries are about 1 MB; the least recently used go beyond this many.
MAX_ENTRIES = 32
# A staging directory this old belongs to a writer that died.
STALE_STAGING_SECONDS = 3600
# Bump when the key or the entry layout changes.
_FORMAT = "1"
_IGNORED_PARTS = {"__pycache__", ".mypy_cache", ".pytest_cache"}


@dataclass(frozen=True)
class SynthesizedStack:
    """The llmq stack's artifact in a cloud assembly on disk."""

    directory: Path
    artifact_id: str
    stack_name: str
    template_file: str

    @property
    def template_path(self) -> Path:
        return self.directory / self.template_file

    @property
    def assets_manifest(self) -> Path:
        return self.directory / f"{self.artifact_id}.assets.json"

    def template(self) -> dict[str, Any]:
        template: dict[str, Any] = json.loads(self.template_path.read_text())
        return template


def synthesize(
    config: LlmqConfig | None = None,
    context: Mapping[str, Any] | None = None,
    outdir: str | Path | None = None,
    *,
    run_values: Mapping[str, str] | None = None,
) -> SynthesizedStack:
    """The llmq app synthesized into `outdir` (a fresh temporary directory unless given).

    `run_values`: strings of the config that belong to this run only (name -> value: the
    sandbox's fake provider URL, whose port is new each boot). The cache keys and keeps the
    assembly with a placeholder in their place, and a hit puts this run's values back: the
    template is then a fresh synth's, byte for byte, while the asset manifests keep naming
    the template's upload by the hash it was stored under.

    Raises when cdk-nag reports an unacknowledged error, as `cdk synth` does; a failed synth
    is never cached.
    """
    outdir = Path(outdir or tempfile.mkdtemp(prefix="llmq-cdk-"))
    cache_root = os.environ.get(SYNTH_CACHE_ENV)
    if not cache_root:
        return _synthesize(config, context, outdir)
    cache = SynthCache(Path(cache_root))
    placeholders = RunValues(run_values or {})
    key = synth_key(config, context, placeholders)
    # Processes that want the same assembly at once (pytest-xdist workers, sandboxes started
    # side by side) wait for the first one's synth instead of repeating it.
    with cache.lock(key):
        restored = cache.restore(key, outdir, placeholders)
        if restored is not None:
            return restored
        synthesized = _synthesize(config, context, outdir)
        try:
            cache.store(key, synthesized, placeholders)
        except OSError as exc:  # a full disk or an unwritable cache costs the next run a synth, no more
            log.warning("synth cache not written (%s): %s", key[:12], exc)
    return synthesized


@dataclass(frozen=True)
class RunValues:
    """Run-specific strings and their placeholders, in the key and in the cached text files."""

    values: Mapping[str, str]

    def hide(self, text: str) -> str:
        for name, value in self.values.items():
            text = text.replace(value, _placeholder(name))
        return text

    def reveal(self, text: str) -> str:
        for name, value in self.values.items():
            text = text.replace(_placeholder(name), value)
        return text

    def rewrite(self, directory: Path, change: Callable[[str], str]) -> None:
        """Apply `change` to the assembly's own files (the template, manifests, tree), never to
        the staged assets, which are copies of the source."""
        if not self.values:
            return
        for path in directory.glob("*.json"):
            text = path.read_text()
            changed = change(text)
            if changed != text:
                path.write_text(changed)


def _placeholder(name: str) -> str:
    return f"{{{{llmq:run:{name}}}}}"


def _synthesize(
    config: LlmqConfig | None, context: Mapping[str, Any] | None, outdir: Path
) -> SynthesizedStack:
    from stacks.app_builder import build_app, llmq_stack

    app = build_app(config, outdir=str(outdir), context=context)
    artifact_id = llmq_stack(app).artifact_id
    assembly = app.synth()
    artifact = assembly.get_stack_artifact(artifact_id)
    return SynthesizedStack(
        directory=Path(assembly.directory),
        artifact_id=artifact.id,
        stack_name=artifact.stack_name,
        template_file=artifact.template_file,
    )


# ---- the key ------------------------------------------------------------------------------


def synth_key(
    config: LlmqConfig | None, context: Mapping[str, Any] | None, run_values: RunValues | None = None
) -> str:
    merged = {**cdk_json_context(), **(context or {})}
    digest = hashlib.sha256()
    for part in _key_parts(config, merged):
        digest.update((run_values.hide(part) if run_values else part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _key_parts(config: LlmqConfig | None, context: dict[str, Any]) -> Iterator[str]:
    yield _FORMAT
    yield config.model_dump_json() if config is not None else "config from context"
    yield json.dumps(context, sort_keys=True, default=str)
    yield json.dumps({name: value for name, value in sorted(os.environ.items()) if name.startswith("CDK_")})
    for library in CDK_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            yield f"{library}=={metadata.version(library)}"
    yield from _tree_digests()
    yield _deps_layer_fingerprint(sandbox=context_flag(context.get(CONTEXT_SANDBOX)))
    yield _bytecode_fingerprint(context)


def _bytecode_fingerprint(context: dict[str, Any]) -> str:
    """The Python a synth would compile the llmq layer and the functions with, if any."""
    off = context.get(CONTEXT_BYTECODE) is not None and not context_flag(context.get(CONTEXT_BYTECODE))
    if off or context_flag(context.get(CONTEXT_SANDBOX)):
        return "bytecode: none"
    from stacks.bytecode import interpreter_identity, runtime_interpreter

    interpreter = runtime_interpreter()
    return f"bytecode: {interpreter_identity(interpreter) if interpreter else 'none'}"


def _tree_digests() -> Iterator[str]:
    paths = [ROOT / name for name in SOURCE_FILES]
    for tree in SOURCE_TREES:
        paths += sorted(path for path in (ROOT / tree).rglob("*") if path.is_file())
    for path in paths:
        relative = path.relative_to(ROOT)
        if _IGNORED_PARTS & set(relative.parts) or path.suffix == ".pyc" or not path.is_file():
            continue
        yield f"{relative.as_posix()}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def _deps_layer_fingerprint(sandbox: bool) -> str:
    """The deps layer a synth would ship: a fixed placeholder in the sandbox, else whatever
    `locate_deps_layer` finds now (tests point stacks.layers.DEPS_LAYER_DIR elsewhere)."""
    if sandbox:
        return "deps layer: placeholder"
    from stacks import layers

    source = layers.locate_deps_layer(use_placeholder=False)
    files = sorted(path for path in source.path.rglob("*") if path.is_file())
    stats = [
        f"{path.relative_to(source.path)}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files
    ]
    return json.dumps({"path": str(source.path), "problem": source.problem, "files": stats})


# ---- the entries --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    artifact_id: str
    stack_name: str
    template_file: str
    template_sha256: str


class SynthCache:
    """<root>/<key>/assembly (a copy of the cloud assembly), <root>/<key>/entry.json, and
    <root>/<key>.lock, held while the key is looked up and synthesized."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{key}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def restore(self, key: str, outdir: Path, run_values: RunValues) -> SynthesizedStack | None:
        entry_dir = self.root / key
        try:
            entry = _Entry(**json.loads((entry_dir / "entry.json").read_text()))
        except (OSError, ValueError, TypeError):
            # No readable entry: a half-written one is removed, so the next store can land.
            shutil.rmtree(entry_dir, ignore_errors=True)
            return None
        try:
            intact = _sha256(entry_dir / "assembly" / entry.template_file) == entry.template_sha256
            if intact:
                shutil.copytree(entry_dir / "assembly", outdir, dirs_exist_ok=True)
        except (OSError, shutil.Error):  # damaged, or pruned by another process meanwhile
            intact = False
        if not intact:
            shutil.rmtree(entry_dir, ignore_errors=True)
            return None
        run_values.rewrite(outdir, run_values.reveal)
        os.utime(entry_dir)  # recently used: kept by the pruning
        log.info("cloud assembly %s restored from %s", key[:12], self.root)
        return SynthesizedStack(outdir, entry.artifact_id, entry.stack_name, entry.template_file)

    def store(self, key: str, synthesized: SynthesizedStack, run_values: RunValues) -> None:
        """Copy the assembly in under a temporary name, then rename: concurrent writers of the
        same key race harmlessly, and a reader never sees half an entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{key}.{uuid.uuid4().hex}"
        shutil.copytree(synthesized.directory, staging / "assembly")
        run_values.rewrite(staging / "assembly", run_values.hide)
        entry = _Entry(
            synthesized.artifact_id,
            synthesized.stack_name,
            synthesized.template_file,
            _sha256(staging / "assembly" / synthesized.template_file),
        )
        (staging / "entry.json").write_text(json.dumps(asdict(entry)))
        try:
            staging.rename(self.root / key)
        except OSError:  # another process stored it first
            shutil.rmtree(staging, ignore_errors=True)
        self._prune()

    def _prune(self) -> None:
        entries: list[tuple[float, Path]] = []
        staging: list[tuple[float, Path]] = []
        for path in self.root.iterdir():
            with contextlib.suppress(OSError):  # pruned by another process meanwhile
                if path.is_dir():
                    (staging if path.name.startswith(".") else entries).append((path.stat().st_mtime, path))
        entries.sort(reverse=True)
        abandoned = [path for mtime, path in staging if mtime < time.time() - STALE_STAGING_SECONDS]
        for stale in [path for _, path in entries[MAX_ENTRIES:]] + abandoned:
            shutil.rmtree(stale, ignore_errors=True)
            (self.root / f"{stale.name}.lock").unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
