"""Lambda execution environments: the child processes of the sandbox's Lambda service.

An environment behaves like the Python runtime of AWS Lambda: its environment holds exactly
the function's variables (plus what Lambda itself sets), its code directory comes first on
sys.path like /var/task, the handler module is imported once (the cold start), and then
invocations run one at a time. A handler that overruns its timeout is killed by the
sandbox, as Lambda kills the runtime.

Two ways to start one:
- `--fork-server`: a process that imports the heavy third-party packages once (boto3,
  pydantic, httpx, Powertools) and forks an environment per request. Nothing of llmq or of a
  handler is imported before the fork, and the environment variables are replaced before
  the handler is imported, so each environment still cold-starts its handler under its own
  variables; only the shared libraries' import time is saved (about 1.2 s of CPU each).
- `--connect SOCKET TOKEN`: a fresh interpreter that is already in its environment (the
  fallback where fork is unavailable).

Either way the environment connects to the sandbox's Unix socket and speaks one JSON object
per line: it says "ready" or "init_error", then answers each invocation with its result or
error. Everything the function prints goes to its log file.

Before the handler is imported, the environment installs the sandbox's fault hooks
(llmq_sandbox/doubles/faults.py): botocore event handlers that do nothing unless a job's prompt carries a
crash directive or the invocation was handed an armed call fault.

What a function can import is what it could import on Lambda (`RuntimeImports`): its own code
directory and its layers (PYTHONPATH), the standard library, and the distributions of the
runtime: `[project].dependencies` of pyproject.toml (what the deps layer ships, boto3 included)
and everything they require. The sandbox's venv holds much more (pytest, moto, the CDK, rich)
and the repository root holds `stacks`, `llmq_cli` and `tests`: a handler that imports one of
them fails its init with Runtime.ImportModuleError, as it would on AWS. The fork server narrows
sys.path before it imports the shared libraries, so they too see only what Lambda has.
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Iterable, Iterator
from importlib.machinery import ModuleSpec
from importlib.metadata import Distribution, DistributionFinder, MetadataPathFinder, packages_distributions
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from llmq_sandbox.doubles import faults

# Imported once by the fork server and shared by every environment it forks. None of them
# reads a function's variables at import time; the handlers read theirs after the fork.
PRELOADED = (
    "boto3",
    "botocore.session",
    "httpx",
    "httpcore",
    "pydantic",
    "aws_lambda_powertools",
    "aws_lambda_powertools.event_handler",
    "aws_lambda_powertools.event_handler.openapi.models",
    "aws_lambda_powertools.event_handler.openapi.params",
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.utilities.data_classes",
    "aws_lambda_powertools.utilities.parameters",
    "aws_lambda_powertools.utilities.typing",
)
# The sandbox's own code (llmq_sandbox, and beside it stacks, llmq_cli, tests): the runtime's
# directory, as /var/runtime is on Lambda, but never on a function's sys.path.
RUNTIME_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = RUNTIME_ROOT / "pyproject.toml"
# From python3.12 on the runtime serializes a result with ensure_ascii=False (awslambdaric's
# marshaller): a non-ASCII character weighs its UTF-8 bytes in the response, not a \uXXXX escape.
_UNICODE_RESPONSES_FROM = (3, 12)
_SANDBOX_PACKAGE = "llmq_sandbox"


def _distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """What the Lambda runtime and the deps layer give every function: [project].dependencies."""
    requirements: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return requirements


def runtime_distributions(requirements: Iterable[str]) -> frozenset[str]:
    """The installed distributions `requirements` pull in, extras followed, by normalized name.

    A requirement guarded by an extra is followed only when that extra was asked for. Any other
    marker (a Python version, a platform) is taken as the installer evaluated it: the
    distribution counts when it is installed.
    """
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = list(requirements)
    while pending:
        spec = pending.pop().partition(";")[0]
        named = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
        if named is None:
            continue
        name = _distribution_key(named.group(1))
        extras = frozenset(extra.strip() for extra in (named.group(2) or "").split(",") if extra.strip())
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            distribution = Distribution.from_name(name)
        except ImportError:
            continue  # not installed here: its marker excluded it
        found.add(name)
        for requirement in distribution.requires or []:
            wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement.partition(";")[2])
            if not wanted or extras.intersection(wanted):
                pending.append(requirement)
    return frozenset(found)


def _is_site_path(entry: str) -> bool:
    return bool({"site-packages", "dist-packages"} & set(Path(entry).parts))


def _is_standard_library_path(entry: str) -> bool:
    if not entry or _is_site_path(entry):
        return False
    path = Path(entry).resolve()
    if path.is_relative_to(RUNTIME_ROOT):
        return False
    bases = {Path(sys.base_prefix).resolve(), Path(sys.base_exec_prefix).resolve()}
    return any(path.is_relative_to(base) for base in bases)


class RuntimeImports(importlib.abc.MetaPathFinder):
    """The Lambda runtime's packages, found in the venv by name, and nothing else of it.

    sys.path keeps the function's code, its layers and the standard library only; this finder,
    last on sys.meta_path, adds the runtime's distributions (their modules and their metadata)
    from the venv's site-packages. Any other name in the venv is simply not found, so
    `importlib.util.find_spec` answers None and an optional import falls back, as on Lambda.
    """

    def __init__(self, requirements: Iterable[str]) -> None:
        self.distributions = runtime_distributions(requirements)
        owners = packages_distributions()
        self.packages = frozenset(
            name
            for name, distributions in owners.items()
            if any(_distribution_key(owner) in self.distributions for owner in distributions)
        )
        self.site_dirs = [entry for entry in sys.path if entry and _is_site_path(entry)]

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is not None or fullname not in self.packages:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, self.site_dirs)

    def find_distributions(self, context: DistributionFinder.Context | None = None) -> Iterator[Distribution]:
        context = context or DistributionFinder.Context()
        if context.name is not None and _distribution_key(context.name) not in self.distributions:
            return iter(())
        found = MetadataPathFinder.find_distributions(
            DistributionFinder.Context(name=context.name, path=self.site_dirs)
        )
        return (
            distribution
            for distribution in found
            if _distribution_key(distribution.metadata["Name"] or "") in self.distributions
        )

    def installed_elsewhere(self, name: str) -> bool:
        """Whether `name` is importable from the venv although the runtime does not have it."""
        top = name.partition(".")[0]
        return importlib.machinery.PathFinder.find_spec(top, self.site_dirs) is not None

    def narrow(self, keep_sandbox: bool) -> None:
        """Take sys.path down to the standard library and the function's own PYTHONPATH, and
        forget every module that came from elsewhere (the sandbox's own code too, unless
        `keep_sandbox`), so that importing it again searches, and fails."""
        function_path = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
        sys.path[:] = [
            entry
            for entry in sys.path
            if _is_standard_library_path(entry)
            or (entry in function_path and Path(entry).resolve() != RUNTIME_ROOT)
        ]
        if self not in sys.meta_path:
            sys.meta_path.append(self)
        for name in list(sys.modules):
            top = name.partition(".")[0]
            if self._allowed(top) or (keep_sandbox and top == _SANDBOX_PACKAGE):
                continue
            del sys.modules[name]
        importlib.invalidate_caches()

    def _allowed(self, top: str) -> bool:
        return (
            top in sys.stdlib_module_names
            or top in sys.builtin_module_names
            or top in self.packages
            or top == "__main__"
        )


_runtime_imports: RuntimeImports | None = None


def runtime_imports() -> RuntimeImports:
    global _runtime_imports
    if _runtime_imports is None:
        _runtime_imports = RuntimeImports(runtime_requirements())
    return _runtime_imports


class LambdaContext:
    """The context object the Python runtime passes to a handler."""

    def __init__(self, request_id: str, deadline_ms: int) -> None:
        self.aws_request_id = request_id
        self._deadline_ms = deadline_ms
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        self.invoked_function_arn = os.environ.get("LLMQ_SANDBOX_FUNCTION_ARN", "")
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.identity = None
        self.client_context = None

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "errorType": type(exc).__name__,
        "errorMessage": str(exc),
        "stackTrace": traceback.format_exception(exc),
    }


def _watch_parent(parent: int) -> None:
    """Exit when whoever started this process goes away, even in the middle of a hung invocation."""
    while True:
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(0.5)


class _Channel:
    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._reader: BinaryIO = connection.makefile("rb")

    def send(self, message: dict[str, Any]) -> None:
        self._connection.sendall((json.dumps(message, default=str) + "\n").encode())

    def requests(self) -> Any:
        for line in self._reader:
            if line.strip():
                yield json.loads(line)


def _ensure_ascii() -> bool:
    """Whether the runtime escapes non-ASCII characters in a result (before python3.12)."""
    found = re.search(r"python(\d+)\.(\d+)", os.environ.get("AWS_EXECUTION_ENV", ""))
    return found is None or (int(found.group(1)), int(found.group(2))) < _UNICODE_RESPONSES_FROM


def _invoke(handler: Any, request: dict[str, Any]) -> dict[str, Any]:
    request_id = request["request_id"]
    context = LambdaContext(request_id, int(request["deadline_ms"]))
    # The runtime puts each invocation's X-Ray header in the environment, where the X-Ray SDK
    # (Powertools' Tracer) finds the segment to attach its subsegments to.
    if request.get("trace_id"):
        os.environ["_X_AMZN_TRACE_ID"] = str(request["trace_id"])
    else:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
    print(f"START RequestId: {request_id} Version: $LATEST", flush=True)
    started = time.monotonic()
    faults.begin_invocation(request.get("faults"))
    try:
        payload = handler(request["event"], context)
        # Lambda serializes the result: an unserializable one is an error, and its size in
        # bytes is what the 6 MB limit of a synchronous response applies to.
        size = len(json.dumps(payload, ensure_ascii=_ensure_ascii()).encode())
        reply: dict[str, Any] = {"type": "result", "request_id": request_id, "payload": payload, "size": size}
    except Exception as exc:
        traceback.print_exc()
        reply = {"type": "error", "request_id": request_id, "error": _error(exc)}
    fired = faults.end_invocation()
    if fired:
        reply["faults_fired"] = fired
    duration = (time.monotonic() - started) * 1000
    print(f"END RequestId: {request_id}")
    print(f"REPORT RequestId: {request_id}\tDuration: {duration:.2f} ms", flush=True)
    return reply


def _init_error(exc: BaseException, module_name: str) -> dict[str, Any]:
    """The error of a failed init, named as the Python runtime names it."""
    error = _error(exc)
    if isinstance(exc, ImportError):
        # The runtime reports any import failure of the handler's module this way.
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        why = str(exc)
        if missing and runtime_imports().installed_elsewhere(missing):
            why += (
                f" ({missing.partition('.')[0]} is installed in the sandbox's venv, but it is not in"
                " the function's code, its layers or the Lambda runtime)"
            )
        error.update(
            errorType="Runtime.ImportModuleError",
            errorMessage=f"Unable to import module '{module_name}': {why}",
        )
    return error


def run_environment(socket_path: str, token: str, forked: dict[str, Any] | None = None) -> None:
    """Cold-start the handler named by _HANDLER, then serve invocations until the socket closes.

    `forked` is the fork server's request: the environment to take on first.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(socket_path)
    channel = _Channel(connection)
    channel.send({"type": "hello", "token": token, "pid": os.getpid()})
    started = time.monotonic()
    module_name, _, function_name = os.environ.get("_HANDLER", "").rpartition(".")
    try:
        if forked is not None:
            _become_environment(forked)
            module_name, _, function_name = os.environ["_HANDLER"].rpartition(".")
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
        faults.install()  # before the handler's import, so every client it makes has the hooks
        # From here on only what Lambda has: the sandbox's own modules are forgotten too.
        runtime_imports().narrow(keep_sandbox=False)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            entry
            for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if entry and Path(entry).resolve() != RUNTIME_ROOT
        )
        task_root = os.environ["LAMBDA_TASK_ROOT"]
        if task_root not in sys.path:
            sys.path.insert(0, task_root)
        handler = getattr(importlib.import_module(module_name), function_name)
    except BaseException as exc:  # a ConfigError at import, a SyntaxError, a missing module...
        traceback.print_exc()
        channel.send({"type": "init_error", "error": _init_error(exc, module_name)})
        return
    channel.send({"type": "ready", "init_ms": round((time.monotonic() - started) * 1000)})
    for request in channel.requests():
        channel.send(_invoke(handler, request))


def _become_environment(request: dict[str, Any]) -> None:
    """In a freshly forked child: take the function's variables, log file and directories."""
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    os.chdir(request["cwd"])
    # PYTHONPATH is read when an interpreter starts; this one started as the fork server.
    sys.path[0:0] = [path for path in request["env"].get("PYTHONPATH", "").split(os.pathsep) if path]


def serve_forks() -> None:
    """Fork one environment per request line on stdin; answer each with the child's pid."""
    # The shared libraries are imported as a function would import them: from the runtime's
    # distributions only (an optional dependency the venv has and Lambda has not stays absent).
    runtime_imports().narrow(keep_sandbox=True)
    for name in PRELOADED:
        importlib.import_module(name)
    # Out of the collector's sight in every environment forked from here: a full collection in
    # a function walks its own objects, not every preloaded module's (nor copies their pages).
    gc.collect()
    gc.freeze()
    # Children are reaped by the kernel; the sandbox kills them by pid when they time out.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print(json.dumps({"type": "ready"}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_environment(request["socket"], request["token"], forked=request)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(json.dumps({"type": "forked", "token": request["token"], "pid": pid}), flush=True)


def main(argv: list[str]) -> None:
    # Ctrl-C at the terminal of a sandbox in the foreground (`make dev`) reaches its whole process
    # group: the sandbox stops its environments itself, and one cut by the key instead printed a
    # KeyboardInterrupt traceback in its function's log, mid-handler, as if it crashed (hunt 320).
    # (Forked environments inherit it from the fork server.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if argv[:1] == ["--fork-server"]:
        serve_forks()
    elif argv[:1] == ["--connect"] and len(argv) == 3:
        run_environment(argv[1], argv[2])
    else:
        sys.exit("usage: python -m llmq_sandbox.lambda_runtime --fork-server | --connect SOCKET TOKEN")


if __name__ == "__main__":
    main(sys.argv[1:])
