"""The local Lambda service: execution environments for the functions of the deployed template.

Each execution environment is a child process (llmq_sandbox/lambda_runtime.py) that imports the
function's handler once under exactly the environment the template gives the function,
then runs invocations one at a time, as a Lambda execution environment does. Why processes
and not threads in this process:
- module state stays per environment, as on Lambda: the Powertools batch processors and
  caches that handlers keep at module level are not shared between concurrent invocations;
- the environment is the function's own (os.environ, read by Powertools and botocore at
  run time as well as by the handler at import), with no lock around a shared os.environ;
- a timeout is a real crash: the process is killed, so a late result can never be written
  back, and the messages of the invocation stay in their queue.

Environments are forked from a fork server that has the shared libraries imported already
(see EnvironmentLauncher), started on demand (the cold start, not counted against the
timeout) and kept warm; a function with reserved concurrency never has more environments
than that.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from llmq_cli.sandbox_state import pid_alive
from llmq_sandbox.doubles.faults import FaultBook
from llmq_sandbox.iam import UNCHECKED, AwsCredentials
from llmq_sandbox.topology import LLMQ_LAYER_DIR, ROOT, FunctionSpec
from stacks.runtime import LAMBDA_PYTHON_VERSION

INIT_TIMEOUT_SECONDS = 60.0
# Lambda gives the Python runtime these; a handler or Powertools may read them.
_LAMBDA_RUNTIME_VARS = {
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "AWS_EXECUTION_ENV": f"AWS_Lambda_python{LAMBDA_PYTHON_VERSION}",
    "TZ": ":UTC",
    "LANG": "en_US.UTF-8",
    "PYTHONUNBUFFERED": "1",
    # No X-Ray daemon here; SAM local does the same.
    "POWERTOOLS_TRACE_DISABLED": "true",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class FunctionStartError(RuntimeError):
    """A function's cold start failed; the message names the function and says why."""


class Outcome(StrEnum):
    OK = "ok"
    ERROR = "error"  # the handler raised
    TIMEOUT = "timeout"  # killed at the function's timeout: a crashed invocation


@dataclass
class InvocationResult:
    function: str
    request_id: str
    outcome: Outcome
    payload: Any = None
    error: dict[str, Any] | None = None
    started_at: float = 0.0
    duration_seconds: float = 0.0
    cold_start: bool = False

    @property
    def error_message(self) -> str:
        return str((self.error or {}).get("errorMessage", ""))


@dataclass(frozen=True)
class AwsAccess:
    """Where AWS is, and each function's credentials: a session of its own execution role."""

    endpoint_url: str
    region: str
    # By function name; None when moto checks nothing, and any key does.
    role_credentials: Mapping[str, AwsCredentials] | None = None

    def environment(self) -> dict[str, str]:
        """What every environment shares: the endpoint and the region, no credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def credentials(self, spec: FunctionSpec) -> AwsCredentials:
        if self.role_credentials is None:
            return UNCHECKED
        try:
            return self.role_credentials[spec.name]
        except KeyError:
            raise FunctionStartError(
                f"function {spec.name} ({spec.physical_name}): no session of its role {spec.role_arn or '(none)'}"
            ) from None


def function_environment(spec: FunctionSpec, aws: AwsAccess) -> dict[str, str]:
    """The child's whole environment: the template's variables plus what Lambda adds."""
    python_path = [str(spec.code_dir), str(LLMQ_LAYER_DIR), str(ROOT)]
    environment = {
        **_LAMBDA_RUNTIME_VARS,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join(python_path),
        "LAMBDA_TASK_ROOT": str(spec.code_dir),
        "_HANDLER": spec.handler,
        "AWS_LAMBDA_FUNCTION_NAME": spec.physical_name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.physical_name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": f"sandbox/{uuid.uuid4().hex[:12]}",
        "LLMQ_SANDBOX_FUNCTION_ARN": spec.arn,
        **aws.environment(),
        **aws.credentials(spec).environment(),
    }
    if "PYTHONDONTWRITEBYTECODE" in os.environ:
        environment["PYTHONDONTWRITEBYTECODE"] = os.environ["PYTHONDONTWRITEBYTECODE"]
    # The template's variables last: they are the function's, and nothing above may mask them.
    environment.update(spec.environment)
    return environment


@dataclass
class _Connection:
    """An environment that has connected back: its socket, its reader, its pid."""

    socket: socket.socket
    reader: BinaryIO
    pid: int
    process: subprocess.Popen[bytes] | None = None


class EnvironmentLauncher:
    """Starts execution environments and hands each its connection to the sandbox.

    Where the OS has fork, a fork server (lambda_runtime.py --fork-server) imports the shared
    libraries once and forks each environment: a cold start then costs the handler's own
    imports, as on Lambda, instead of 1.5 s of CPU, which matters when ten start at once on
    a two-core laptop. Elsewhere each environment is a fresh interpreter.

    Why not the standard library's `multiprocessing` forkserver with
    `set_forkserver_preload` (issue 11 asked; the home-made part is only `serve_forks` and
    `_fork`, about 40 lines; the socket protocol stays either way, because the fresh-interpreter
    path and every invocation use it):
    - multiprocessing has one fork server per parent process, started lazily with the
      parent's environment at first use. Ours is started per Lambda service with an
      environment of its own (the runtime's variables and the sandbox's AWS access, not the
      operator's shell), so two sandboxes in one process never share one, and an operator's
      credentials never reach a preloaded library.
    - each multiprocessing child runs `spawn.prepare` before the target: it takes the
      parent's sys.path, changes to the parent's working directory and re-imports the
      parent's main module (pytest's, or the CLI's, which imports llmq). An environment
      must instead cold-start with llmq not yet imported, from the function's directory,
      under the function's variables; undoing `prepare` in the target would be more code
      than the fork it replaces.
    - multiprocessing tracks its children and joins or terminates them at exit; ours are
      killed by pid on a timeout, as Lambda kills a runtime, and reaped by the kernel
      (SIGCHLD ignored in the server), so no bookkeeping outlives a killed environment.
    """

    def __init__(self, log_dir: Path, aws: AwsAccess) -> None:
        # A short directory: Unix socket paths are limited to about 100 bytes.
        self._directory = tempfile.mkdtemp(prefix="llmq-")
        self.socket_path = os.path.join(self._directory, "runtime.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(128)
        self._waiting: dict[str, queue.Queue[_Connection]] = {}
        self._lock = threading.Lock()
        self._fork_lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="runtime-accept", daemon=True).start()
        self._log = (log_dir / "runtime.log").open("ab")
        self._server: subprocess.Popen[str] | None = None
        if hasattr(os, "fork"):
            self._server = self._start_fork_server(aws)

    def _start_fork_server(self, aws: AwsAccess) -> subprocess.Popen[str]:
        environment = {
            **_LAMBDA_RUNTIME_VARS,
            **aws.environment(),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
        }
        if "PYTHONDONTWRITEBYTECODE" in os.environ:
            environment["PYTHONDONTWRITEBYTECODE"] = os.environ["PYTHONDONTWRITEBYTECODE"]
        server = subprocess.Popen(
            [sys.executable, "-m", "llmq_sandbox.lambda_runtime", "--fork-server"],
            cwd=ROOT,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        assert server.stdout is not None
        ready = server.stdout.readline()
        if '"ready"' not in ready:
            server.kill()
            raise FunctionStartError(f"the fork server did not start; see {self._log.name}")
        return server

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            reader = connection.makefile("rb")
            try:
                hello = json.loads(reader.readline() or b"{}")
            except ValueError:
                connection.close()
                continue
            with self._lock:
                waiting = self._waiting.pop(str(hello.get("token")), None)
            if waiting is None:
                connection.close()
                continue
            waiting.put(_Connection(connection, reader, int(hello["pid"])))

    def launch(self, spec: FunctionSpec, environment: dict[str, str], log_path: Path) -> _Connection:
        token = uuid.uuid4().hex
        arrived: queue.Queue[_Connection] = queue.Queue()
        with self._lock:
            self._waiting[token] = arrived
        process = None
        if self._server is not None:
            try:
                self._fork(token, environment, spec.code_dir, log_path)
            except FunctionStartError:
                with self._lock:
                    self._waiting.pop(token, None)
                raise
        else:
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "llmq_sandbox.lambda_runtime",
                        "--connect",
                        self.socket_path,
                        token,
                    ],
                    cwd=spec.code_dir,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        try:
            connection = arrived.get(timeout=INIT_TIMEOUT_SECONDS)
        except queue.Empty:
            with self._lock:
                self._waiting.pop(token, None)
            if process is not None:
                process.kill()
            raise FunctionStartError(
                f"function {spec.name} ({spec.physical_name}) did not start within {INIT_TIMEOUT_SECONDS:.0f}s"
            ) from None
        connection.process = process
        return connection

    def _fork(self, token: str, environment: dict[str, str], cwd: Path, log_path: Path) -> None:
        server = self._server
        assert server is not None and server.stdin is not None and server.stdout is not None
        request = {
            "token": token,
            "env": environment,
            "cwd": str(cwd),
            "log": str(log_path),
            "socket": self.socket_path,
        }
        with self._fork_lock:
            try:
                server.stdin.write(json.dumps(request) + "\n")
                server.stdin.flush()
                forked = server.stdout.readline()
            except OSError:
                forked = ""
        if not forked:
            raise FunctionStartError(f"the fork server stopped; see {self._log.name}")

    def close(self) -> None:
        self._closed = True
        if self._server is not None:
            with suppress(OSError):
                if self._server.stdin is not None:
                    self._server.stdin.close()
            try:
                self._server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait(timeout=5)
        with suppress(OSError):
            self._listener.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        self._log.close()


class ExecutionEnvironment:
    """One child process running one function's handler, reached through its connection."""

    def __init__(self, spec: FunctionSpec, connection: _Connection) -> None:
        self.spec = spec
        self._connection = connection
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.alive = True
        self.faults_fired: list[str] = []
        threading.Thread(target=self._read_replies, name=f"{spec.name}-replies", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._connection.pid

    def _read_replies(self) -> None:
        try:
            for line in self._connection.reader:
                try:
                    self._replies.put(json.loads(line))
                except ValueError:
                    continue
        except OSError:
            pass
        self._replies.put(None)

    def wait_ready(self) -> None:
        """Block until the cold start is over; raise FunctionStartError if it failed."""
        try:
            message = self._replies.get(timeout=INIT_TIMEOUT_SECONDS)
        except queue.Empty:
            self.kill()
            raise FunctionStartError(
                f"function {self.spec.name} ({self.spec.physical_name}) did not start within "
                f"{INIT_TIMEOUT_SECONDS:.0f}s"
            ) from None
        if message is not None and message.get("type") == "ready":
            return
        self.kill()
        error = (message or {}).get("error") or {}
        why = f"{error.get('errorType', 'exited')}: {error.get('errorMessage', 'no reason given')}"
        raise FunctionStartError(
            f"function {self.spec.name} ({self.spec.physical_name}) failed its cold start: {why}"
        )

    def invoke(
        self,
        event: Any,
        request_id: str,
        timeout_seconds: float,
        armed: list[dict[str, str]] | None = None,
    ) -> tuple[Outcome, Any]:
        """Run one invocation. `armed`: the call faults it may fire (llmq_sandbox/doubles/faults.py);
        the ones that fired are left in `self.faults_fired`."""
        self.faults_fired = []
        deadline = time.time() + timeout_seconds
        request: dict[str, Any] = {
            "request_id": request_id,
            "event": event,
            "deadline_ms": int(deadline * 1000),
        }
        if armed:
            request["faults"] = armed
        try:
            self._connection.socket.sendall((json.dumps(request) + "\n").encode())
        except OSError:
            self.kill()
            return Outcome.ERROR, {"errorType": "Runtime.ExitError", "errorMessage": "the runtime exited"}
        try:
            reply = self._replies.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            # Lambda stops the runtime at the timeout; whatever the handler was doing is lost.
            self.kill()
            return Outcome.TIMEOUT, {
                "errorType": "Sandbox.Timeout",
                "errorMessage": f"Task timed out after {timeout_seconds:.2f} seconds",
            }
        if reply is None:
            self.kill()
            return Outcome.ERROR, {"errorType": "Runtime.ExitError", "errorMessage": "the runtime exited"}
        self.faults_fired = list(reply.get("faults_fired") or [])
        if reply.get("type") == "result":
            return Outcome.OK, reply.get("payload")
        return Outcome.ERROR, reply.get("error") or {}

    def kill(self) -> None:
        self.alive = False
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with suppress(OSError):
            self._connection.socket.close()
        if self._connection.process is not None:
            with suppress(subprocess.TimeoutExpired):
                self._connection.process.wait(timeout=5)

    def request_stop(self) -> None:
        """Polite first: the end of its input ends the runtime's loop."""
        self.alive = False
        with suppress(OSError):
            self._connection.socket.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.request_stop()
        deadline = time.monotonic() + 1.0
        while pid_alive(self.pid) and time.monotonic() < deadline:
            if self._connection.process is not None and self._connection.process.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()


class FunctionPool:
    """The warm environments of one function, bounded by its concurrency."""

    def __init__(
        self,
        spec: FunctionSpec,
        aws: AwsAccess,
        launcher: EnvironmentLauncher,
        log_path: Path,
        max_environments: int,
        faults: FaultBook | None = None,
    ) -> None:
        self.spec = spec
        self._faults = faults or FaultBook()
        self._aws = aws
        self._launcher = launcher
        self._log_path = log_path
        self._log = log_path.open("ab", buffering=0)
        self._idle: list[ExecutionEnvironment] = []
        self._all: list[ExecutionEnvironment] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_environments)
        self._closed = False

    def _new_environment(self) -> ExecutionEnvironment:
        connection = self._launcher.launch(
            self.spec, function_environment(self.spec, self._aws), self._log_path
        )
        environment = ExecutionEnvironment(self.spec, connection)
        with self._lock:
            self._all.append(environment)
        try:
            environment.wait_ready()
        except FunctionStartError:
            with self._lock:
                self._all.remove(environment)
            raise
        return environment

    def warm_up(self) -> None:
        """Start one environment now: a wiring fault fails the sandbox here, not at first use."""
        environment = self._new_environment()
        with self._lock:
            self._idle.append(environment)

    @contextmanager
    def _environment(self) -> Iterator[tuple[ExecutionEnvironment, bool]]:
        with self._slots:
            with self._lock:
                environment = self._idle.pop() if self._idle else None
            cold = environment is None
            if environment is None:
                environment = self._new_environment()
            try:
                yield environment, cold
            finally:
                with self._lock:
                    if environment.alive and not self._closed:
                        self._idle.append(environment)
                    elif environment in self._all:
                        self._all.remove(environment)

    def invoke(self, event: Any, timeout_seconds: float | None = None) -> InvocationResult:
        request_id = str(uuid.uuid4())
        started = time.time()
        if self._closed:
            return InvocationResult(
                function=self.spec.name,
                request_id=request_id,
                outcome=Outcome.ERROR,
                error={"errorType": "Sandbox.Stopping", "errorMessage": "the sandbox is stopping"},
                started_at=started,
            )
        armed = self._faults.arm(self.spec.name)
        fired: list[str] = []
        try:
            with self._environment() as (environment, cold):
                started = time.time()
                outcome, payload = environment.invoke(
                    event, request_id, timeout_seconds or self.spec.timeout_seconds, armed
                )
                fired = environment.faults_fired
        except FunctionStartError as exc:
            outcome, payload, cold = (
                Outcome.ERROR,
                {"errorType": "Runtime.InitError", "errorMessage": str(exc)},
                True,
            )
        finally:
            self._faults.settle(armed, fired)
        if outcome is Outcome.TIMEOUT:
            self._log.write(f"{request_id} {payload['errorMessage']}\n".encode())
        return InvocationResult(
            function=self.spec.name,
            request_id=request_id,
            outcome=outcome,
            payload=payload if outcome is Outcome.OK else None,
            error=None if outcome is Outcome.OK else payload,
            started_at=started,
            duration_seconds=time.time() - started,
            cold_start=cold,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            environments = list(self._all)
            self._all.clear()
            self._idle.clear()
        for environment in environments:
            environment.request_stop()
        for environment in environments:
            environment.stop()
        self._log.close()


@dataclass
class InvocationRecord:
    """What the sandbox remembers of an invocation, for tests and `GET /_sandbox/invocations`."""

    function: str
    request_id: str
    outcome: str
    trigger: str  # "api", "authorizer", "sqs:<queue name>", "schedule:<rule>"
    started_at: float
    duration_seconds: float
    cold_start: bool
    lane: str | None = None
    message_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    receive_counts: list[int] = field(default_factory=list)
    failed_message_ids: list[str] = field(default_factory=list)
    deleted_message_ids: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class InvocationLog:
    def __init__(self, limit: int = 20_000) -> None:
        self._records: deque[InvocationRecord] = deque(maxlen=limit)
        self._lock = threading.Lock()

    def add(self, record: InvocationRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self, predicate: Callable[[InvocationRecord], bool] | None = None) -> list[InvocationRecord]:
        with self._lock:
            return [record for record in self._records if predicate is None or predicate(record)]


class LambdaService:
    """Every function of the template, by its llmq:function name."""

    def __init__(
        self,
        functions: dict[str, FunctionSpec],
        aws: AwsAccess,
        log_dir: Path,
        default_concurrency: int,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir = log_dir.resolve()
        self.launcher = EnvironmentLauncher(log_dir, aws)
        # Call faults armed over HTTP (POST /_sandbox/faults), handed to each invocation.
        self.faults = FaultBook()
        self.pools = {
            name: FunctionPool(
                spec,
                aws,
                self.launcher,
                log_dir / f"{name}.log",
                spec.reserved_concurrency or default_concurrency,
                self.faults,
            )
            for name, spec in functions.items()
        }
        self.invocations = InvocationLog()

    def warm_up(self) -> None:
        """One cold start per function, in parallel; the first failure is raised with its name."""
        errors: list[FunctionStartError] = []

        def start(pool: FunctionPool) -> None:
            try:
                pool.warm_up()
            except FunctionStartError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(pool,)) for pool in self.pools.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise FunctionStartError("; ".join(sorted(str(error) for error in errors)))

    def invoke(self, function: str, event: Any, timeout_seconds: float | None = None) -> InvocationResult:
        return self.pools[function].invoke(event, timeout_seconds)

    def close(self) -> None:
        threads = [threading.Thread(target=pool.close) for pool in self.pools.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.launcher.close()
