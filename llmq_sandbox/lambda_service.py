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

# Lambda's init phase (extensions, runtime, the handler's static code) may take 10 s. One that
# takes longer is stopped and retried when the first invocation arrives, and that second init
# counts against the invocation's timeout (lambda-runtime-environment.html, "Init phase").
INIT_TIMEOUT_SECONDS = 10.0
# How long a started process may take to connect back, before its init even begins.
_CONNECT_TIMEOUT_SECONDS = 60.0
# A synchronous invocation carries at most 6 MB each way (Lambda quotas, "Invocation
# payload"); the figures are those of Lambda's own errors.
MAX_REQUEST_BYTES = 6 * 1024 * 1024
MAX_RESPONSE_BYTES = 6 * 1024 * 1024 + 100
# ColdStarts: the machine's CPU is full past this busy share, the sandbox's process past this
# share of one core (the rest of its time it waits for the interpreter's lock), read over
# windows of this length.
_FULL_CPU = 0.9
_FULL_SANDBOX_PROCESS = 0.7
_CPU_WINDOW_SECONDS = 0.5
# How often a running environment's memory is read.
_MEMORY_WATCH_SECONDS = 0.15
# Lambda gives the Python runtime these; a handler or Powertools may read them.
_LAMBDA_RUNTIME_VARS = {
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
    "AWS_EXECUTION_ENV": f"AWS_Lambda_python{LAMBDA_PYTHON_VERSION}",
    "TZ": ":UTC",
    "LANG": "en_US.UTF-8",
    "PYTHONUNBUFFERED": "1",
    # Every function is deployed with Tracing: Active. Lambda then sets these, the X-Ray SDK
    # logs (instead of raising) when it finds no segment, and Powertools' Tracer is on; the
    # daemon's address is the launcher's UDP sink (EnvironmentLauncher.xray).
    "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class FunctionStartError(RuntimeError):
    """A function's cold start failed; the message names the function and says why."""


class Outcome(StrEnum):
    OK = "ok"
    ERROR = "error"  # the handler raised
    TIMEOUT = "timeout"  # killed at the function's timeout: a crashed invocation
    THROTTLED = "throttled"  # no concurrency left: the invocation never ran


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

    def record(self, trigger: str, **details: Any) -> InvocationRecord:
        """What the sandbox remembers of this invocation, with what its trigger adds."""
        return InvocationRecord(
            function=self.function,
            request_id=self.request_id,
            outcome=self.outcome.value,
            trigger=trigger,
            started_at=self.started_at,
            duration_seconds=self.duration_seconds,
            cold_start=self.cold_start,
            error=self.error_message or None,
            **details,
        )


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


def _bytecode_settings() -> dict[str, str]:
    """Where the sandbox's Python keeps bytecode (the Makefile sets PYTHONPYCACHEPREFIX, outside
    the tree), or that it keeps none: an environment compiles what it imports only the first
    time, not at every cold start."""
    names = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    return {name: os.environ[name] for name in names if name in os.environ}


def function_environment(spec: FunctionSpec, aws: AwsAccess, *, provisioned: bool = False) -> dict[str, str]:
    """The child's whole environment: the template's variables plus what Lambda adds
    (AWS_LAMBDA_INITIALIZATION_TYPE tells a provisioned environment from one started on demand).

    Its PYTHONPATH is the function's code and the llmq layer, as /var/task and /opt/python are
    on Lambda: not the repository root (lambda_runtime.RuntimeImports keeps the venv out too).
    """
    python_path = [str(spec.code_dir), str(LLMQ_LAYER_DIR)]
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
        "AWS_LAMBDA_INITIALIZATION_TYPE": "provisioned-concurrency" if provisioned else "on-demand",
        **aws.environment(),
        **aws.credentials(spec).environment(),
    }
    environment.update(_bytecode_settings())
    # The template's variables last: they are the function's, and nothing above may mask them.
    environment.update(spec.environment)
    return environment


class XRaySink:
    """A UDP port where the X-Ray daemon would listen: the SDK's segments land here, counted.

    Lambda runs the daemon beside every function with active tracing; here nothing forwards
    the segments, but the X-Ray SDK sends them exactly as it would (and a test can see them).
    """

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        host, port = self._socket.getsockname()
        self.address = f"{host}:{port}"
        self.segments: deque[dict[str, Any]] = deque(maxlen=1000)
        threading.Thread(target=self._receive, name="xray-sink", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                datagram = self._socket.recv(65536)
            except OSError:
                return
            # The SDK sends a JSON header line, then the segment document.
            _, _, document = datagram.partition(b"\n")
            with suppress(ValueError):
                self.segments.append(json.loads(document))

    def close(self) -> None:
        with suppress(OSError):
            self._socket.close()


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
        self.xray = XRaySink()
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
        environment.update(_bytecode_settings())
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
        environment = {"AWS_XRAY_DAEMON_ADDRESS": self.xray.address, **environment}
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
            # A fresh interpreter finds the runtime (llmq_sandbox) beside the function's path;
            # the runtime takes the repository root off sys.path before the handler's import.
            fresh = {**environment, "PYTHONPATH": os.pathsep.join([environment["PYTHONPATH"], str(ROOT)])}
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
                    env=fresh,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        try:
            connection = arrived.get(timeout=_CONNECT_TIMEOUT_SECONDS)
        except queue.Empty:
            with self._lock:
                self._waiting.pop(token, None)
            if process is not None:
                process.kill()
            raise FunctionStartError(
                f"function {spec.name} ({spec.physical_name}) did not connect within {_CONNECT_TIMEOUT_SECONDS:.0f}s"
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

    @property
    def alive(self) -> bool:
        """The fork server runs (without it no environment can start, and each running one
        exits with it: hunt 320); always, without one."""
        return self._server is None or self._server.poll() is None

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
        self.xray.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        self._log.close()


class _Waited(StrEnum):
    TIMED_OUT = "timed out"
    OUT_OF_MEMORY = "out of memory"


def resident_bytes(pid: int) -> int | None:
    """The process's resident set (VmRSS), or None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def payload_bytes(payload: Any) -> int:
    """A payload's size as JSON in UTF-8, the measure of Lambda's payload quotas."""
    return len(json.dumps(payload, ensure_ascii=False).encode())


def _trace_header() -> str:
    """An X-Ray trace header as Lambda hands one to each invocation of an active function."""
    return f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Parent={uuid.uuid4().hex[:16]};Sampled=1"


class ExecutionEnvironment:
    """One child process running one function's handler, reached through its connection.

    What Lambda enforces on an environment, this one does too:
    - the init phase gets INIT_TIMEOUT_SECONDS; past that the process is stopped, and the first
      invocation starts it again (`relaunch`) under its own timeout, as Lambda retries an init;
    - its memory: while it initializes or runs, its resident set is read every
      _MEMORY_WATCH_SECONDS, and past the function's memory_mb it is killed (Runtime.OutOfMemory).
      The resident set of a forked child counts the pages it shares with the fork server (the
      preloaded libraries), as a Lambda process counts the libraries it loaded itself; a
      spike shorter than the interval can pass unseen, where Lambda's cgroup would not let it;
    - the 6 MB of a synchronous invocation, each way.
    """

    def __init__(
        self, spec: FunctionSpec, connection: _Connection, relaunch: Callable[[], _Connection] | None = None
    ) -> None:
        self.spec = spec
        self._relaunch = relaunch
        self.alive = True
        self.faults_fired: list[str] = []
        self._init_started = time.monotonic()
        # The init ran out of its 10 s: the next invocation runs it again first.
        self.init_suppressed = False
        self._attach(connection)

    def _attach(self, connection: _Connection) -> None:
        self._connection = connection
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(
            target=self._read_replies,
            args=(connection, self._replies),
            name=f"{self.spec.name}-replies",
            daemon=True,
        ).start()

    @property
    def pid(self) -> int:
        return self._connection.pid

    def exited_while_idle(self) -> bool:
        """Its process ended between invocations (killed, out of memory on the way to idle, its
        fork server gone): its connection's end is all its replies hold. Not one whose init was
        stopped for its timeout on purpose, which the next invocation starts again (review 278)."""
        return not self.init_suppressed and bool(self._replies.queue) and self._replies.queue[0] is None

    @property
    def memory_limit_bytes(self) -> int:
        return self.spec.memory_mb * 1024 * 1024

    @staticmethod
    def _read_replies(connection: _Connection, replies: queue.Queue[dict[str, Any] | None]) -> None:
        try:
            for line in connection.reader:
                try:
                    replies.put(json.loads(line))
                except ValueError:
                    continue
        except OSError:
            pass
        replies.put(None)

    def _await(self, deadline: float) -> dict[str, Any] | _Waited | None:
        """The next message, watching the process's memory until the monotonic `deadline`."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return _Waited.TIMED_OUT
            try:
                return self._replies.get(timeout=min(_MEMORY_WATCH_SECONDS, left))
            except queue.Empty:
                used = resident_bytes(self.pid)
                if used is not None and used > self.memory_limit_bytes:
                    return _Waited.OUT_OF_MEMORY

    def _out_of_memory(self, request_id: str) -> dict[str, Any]:
        self.kill()
        return {
            "errorType": "Runtime.OutOfMemory",
            "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: signal: killed",
        }

    def _start_failure(self, message: dict[str, Any] | None) -> FunctionStartError:
        self.kill()
        error = (message or {}).get("error") or {}
        why = f"{error.get('errorType', 'exited')}: {error.get('errorMessage', 'no reason given')}"
        return FunctionStartError(
            f"function {self.spec.name} ({self.spec.physical_name}) failed its cold start: {why}"
        )

    def wait_ready(self) -> None:
        """Block until the cold start is over; raise FunctionStartError if it failed.

        An init that outlasts INIT_TIMEOUT_SECONDS is stopped and left to the first
        invocation to retry (without a way to start again, it is a failure)."""
        message = self._await(self._init_started + INIT_TIMEOUT_SECONDS)
        if message is _Waited.TIMED_OUT:
            if self._relaunch is None:
                self.kill()
                raise FunctionStartError(
                    f"function {self.spec.name} ({self.spec.physical_name}) did not start within "
                    f"{INIT_TIMEOUT_SECONDS:.0f}s"
                )
            self._stop_process()
            self.init_suppressed = True
            return
        if message is _Waited.OUT_OF_MEMORY:
            raise self._start_failure({"error": self._out_of_memory("init")})
        if isinstance(message, dict) and message.get("type") == "ready":
            return
        raise self._start_failure(message)

    def _retry_init(self, request_id: str, deadline: float) -> tuple[Outcome, Any] | None:
        """The init again, inside the invocation and under its deadline; an outcome if it failed."""
        assert self._relaunch is not None
        try:
            self._attach(self._relaunch())
        except FunctionStartError as exc:
            self.kill()
            return Outcome.ERROR, {"errorType": "Runtime.InitError", "errorMessage": str(exc)}
        self.init_suppressed = False
        message = self._await(deadline)
        if message is _Waited.TIMED_OUT:
            return None  # the invocation times out: the caller says so
        if message is _Waited.OUT_OF_MEMORY:
            return Outcome.ERROR, self._out_of_memory(request_id)
        if isinstance(message, dict) and message.get("type") == "ready":
            return Outcome.OK, None
        error = self._start_failure(message)
        return Outcome.ERROR, {"errorType": "Runtime.InitError", "errorMessage": str(error)}

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
        if payload_bytes(event) > MAX_REQUEST_BYTES:
            # Refused by the Invoke API before any environment sees it.
            return Outcome.ERROR, {
                "errorType": "RequestEntityTooLargeException",
                "errorMessage": f"Request must be smaller than {MAX_REQUEST_BYTES} bytes for the InvokeFunction operation",
            }
        deadline = time.time() + timeout_seconds
        watch_until = time.monotonic() + timeout_seconds
        timed_out = {
            "errorType": "Sandbox.Timeout",
            "errorMessage": f"Task timed out after {timeout_seconds:.2f} seconds",
        }
        if self.init_suppressed:
            retried = self._retry_init(request_id, watch_until)
            if retried is None:
                self.kill()
                return Outcome.TIMEOUT, timed_out
            if retried[0] is not Outcome.OK:
                return retried
        request: dict[str, Any] = {
            "request_id": request_id,
            "event": event,
            "deadline_ms": int(deadline * 1000),
            "trace_id": _trace_header(),
        }
        if armed:
            request["faults"] = armed
        try:
            self._connection.socket.sendall((json.dumps(request) + "\n").encode())
        except OSError:
            self.kill()
            return Outcome.ERROR, {"errorType": "Runtime.ExitError", "errorMessage": "the runtime exited"}
        reply = self._await(watch_until)
        if reply is _Waited.TIMED_OUT:
            # Lambda stops the runtime at the timeout; whatever the handler was doing is lost.
            self.kill()
            return Outcome.TIMEOUT, timed_out
        if reply is _Waited.OUT_OF_MEMORY:
            return Outcome.ERROR, self._out_of_memory(request_id)
        if not isinstance(reply, dict):
            self.kill()
            return Outcome.ERROR, {"errorType": "Runtime.ExitError", "errorMessage": "the runtime exited"}
        self.faults_fired = list(reply.get("faults_fired") or [])
        if reply.get("type") == "result":
            if int(reply.get("size") or 0) > MAX_RESPONSE_BYTES:
                return Outcome.ERROR, {
                    "errorType": "Function.ResponseSizeTooLarge",
                    "errorMessage": f"Response payload size exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes).",
                }
            return Outcome.OK, reply.get("payload")
        return Outcome.ERROR, reply.get("error") or {}

    def _stop_process(self) -> None:
        """Kill the process of this environment, keeping the environment itself (a retried init)."""
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with suppress(OSError):
            self._connection.socket.close()
        if self._connection.process is not None:
            with suppress(subprocess.TimeoutExpired):
                self._connection.process.wait(timeout=5)

    def kill(self) -> None:
        self.alive = False
        self._stop_process()

    def request_stop(self) -> None:
        """Polite first: the end of its input ends the runtime's loop."""
        self.alive = False
        with suppress(OSError):
            self._connection.socket.shutdown(socket.SHUT_WR)

    def stop(self, deadline: float | None = None) -> None:
        """Asked to stop, then killed at the monotonic `deadline` (a second from now by default)."""
        self.request_stop()
        deadline = deadline if deadline is not None else time.monotonic() + 1.0
        while pid_alive(self.pid) and time.monotonic() < deadline:
            if self._connection.process is not None and self._connection.process.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()


class FunctionThrottled(Exception):
    """Every unit of the function's concurrency is in use (Lambda's TooManyRequestsException)."""


class _Stopping(Exception):
    """The sandbox is stopping: no invocation starts any more."""


# What Lambda answers a throttled invoke (429); a poller leaves the batch on its queue.
THROTTLED_ERROR = {"errorType": "TooManyRequestsException", "errorMessage": "Rate Exceeded."}
_STOPPING_ERROR = {"errorType": "Sandbox.Stopping", "errorMessage": "the sandbox is stopping"}


class ColdStarts:
    """When this machine starts an environment: a few at a time, and not while its CPU is full.

    On Lambda each new environment initialises on hardware of its own, so a burst of
    concurrent requests costs each of them one cold start. Here they all share the sandbox's
    few cores, and a new api environment costs about 0.6 s of CPU (its init, then what its
    first request builds) against 10 ms for a request in a warm one. Started on demand as
    Lambda does, a burst of 20 submits a second started dozens at once: each took that many
    times as long, the warm environments and moto waited on the same cores meanwhile, slower
    requests made the next ones find no warm environment, and the submit p99 reached 20 s. So:
    - at most `limit` environments start at once (by default one per core);
    - a function starts environments on demand, as on Lambda, up to `on_demand` of them
      (4 by default); past that, only while the CPU has room (`room`: by default below 90% of
      the machine and 70% of one core for the sandbox's own process over the last half
      second, CpuLoad), or for an invocation that has waited `patience_seconds` (5 s) while
      none of the function's environments came free (they are held long: long-polls, a
      worker on a slow provider). Meanwhile it waits, in order of arrival, for a busy
      environment to be released: a function's invocations are mostly short, and on a full
      CPU another environment would only share the same cores, so under a load beyond the
      machine requests queue here, as they would behind any server at its capacity.

    What stays as on Lambda: an environment runs one invocation at a time; a function never
    has more environments than its concurrency; an invoke is throttled only when all of its
    concurrency is in use. What differs: past `on_demand`, on a full machine, an invocation
    may wait for an environment that was busy when it arrived, instead of cold-starting one
    (fewer report `cold_start`).

    Every pool's condition shares `lock`: a released environment wakes the waiters of its own
    function (the first in line takes it), a finished start those of every function.
    """

    def __init__(
        self,
        limit: int | None = None,
        on_demand: int = 4,
        patience_seconds: float = 5.0,
        room: Callable[[], bool] | None = None,
    ) -> None:
        self.limit = max(1, limit if limit is not None else os.cpu_count() or 1)
        self.on_demand = on_demand
        self.patience_seconds = patience_seconds
        self.active = 0
        self.lock = threading.Lock()
        self._waiters: list[threading.Condition] = []
        self.room = room or CpuLoad().has_room

    def condition(self) -> threading.Condition:
        """A pool's condition, on the shared lock."""
        changed = threading.Condition(self.lock)
        self._waiters.append(changed)
        return changed

    def started(self) -> None:
        """A start slot is free (call with `lock` held): any function's waiter may take it."""
        self.active -= 1
        for changed in self._waiters:
            changed.notify_all()


class CpuLoad:
    """How busy the machine's CPU and the sandbox's own process were since the last reading,
    read at most every _CPU_WINDOW_SECONDS (the machine's from /proc/stat; where there is none,
    it counts as idle). The sandbox's process (the gateway, the pollers, this service) runs
    Python under one lock, so it is full at one core's worth, however many the machine has.
    moto runs in a process of its own, which this does not read: at 50 jobs/s it can be full
    while the machine is not (holding starts back on its share showed no gain beyond the
    noise of two runs of the 50 jobs/s point)."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), *self._read())
        self._shares = (0.0, 0.0)
        self._lock = threading.Lock()

    @staticmethod
    def _read() -> tuple[int, int, float]:
        own = sum(os.times()[:2])
        try:
            with open("/proc/stat", "rb") as stat:
                fields = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return 0, 0, own
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        return sum(fields), idle, own

    def has_room(self) -> bool:
        machine, sandbox = self.busy()
        return machine < _FULL_CPU and sandbox < _FULL_SANDBOX_PROCESS

    def busy(self) -> tuple[float, float]:
        """(the machine's busy share of all its cores, this process's share of one core)."""
        now = time.monotonic()
        with self._lock:
            elapsed = now - self._last[0]
            if elapsed >= _CPU_WINDOW_SECONDS:
                total, idle, own = self._read()
                spent, rested = total - self._last[1], idle - self._last[2]
                machine = 1.0 - rested / spent if spent > 0 else 0.0
                self._shares = (machine, (own - self._last[3]) / elapsed)
                self._last = (now, total, idle, own)
            return self._shares


class FunctionPool:
    """The warm environments of one function, bounded by its concurrency.

    The concurrency is the template's reserved concurrency, or the runner's
    default_function_concurrency for a function without one (on AWS such functions share the
    account's unreserved pool; here each has that many of its own). An invoke that finds every
    unit in use either waits for one (`throttle=False`) or is throttled at once
    (`throttle=True`: the gateway's synchronous invokes, whose client then gets a 5xx, and an
    event source mapping, whose batch then stays on its queue, as Lambda's pollers do). An
    invoke that finds no warm environment starts one, when `ColdStarts` lets it.
    """

    def __init__(
        self,
        spec: FunctionSpec,
        aws: AwsAccess,
        launcher: EnvironmentLauncher,
        log_path: Path,
        max_environments: int,
        faults: FaultBook | None = None,
        cold_starts: ColdStarts | None = None,
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
        self._starts = cold_starts or ColdStarts()
        self._max = max_environments
        self._busy = 0  # units of concurrency in use: invocations running or starting
        self._released = 0  # units given back so far
        self._queue: deque[object] = deque()  # invocations waiting, in order of arrival
        self._changed = self._starts.condition()
        self._closed = False
        # The provisioned environments: one that dies is replaced in the background, as
        # Lambda keeps the provisioned number initialised.
        self._provisioned: set[ExecutionEnvironment] = set()

    def _new_environment(self, *, provisioned: bool = False) -> ExecutionEnvironment:
        def launch() -> _Connection:
            return self._launcher.launch(
                self.spec, function_environment(self.spec, self._aws, provisioned=provisioned), self._log_path
            )

        environment = ExecutionEnvironment(self.spec, launch(), relaunch=launch)
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
        """Start the function's provisioned environments now, or one started as on demand
        when it has none: a wiring fault fails the sandbox here, not at first use. As on
        Lambda, a provisioned environment runs its init (and llmq's warm-up in it) before any
        request, and is kept; those past them start on demand."""
        provisioned = min(self.spec.provisioned_environments, self._max)
        for _ in range(max(1, provisioned)):
            environment = self._new_environment(provisioned=provisioned > 0)
            with self._changed:
                if provisioned:
                    self._provisioned.add(environment)
                self._idle.append(environment)

    def _replace_provisioned(self) -> None:
        """In the background, a provisioned environment in place of one that died; it holds a
        unit of the function's concurrency while it starts (taken by the caller, with the lock)."""
        environment = None
        try:
            environment = self._new_environment(provisioned=True)
            with self._changed:
                self._provisioned.add(environment)
        except FunctionStartError as exc:
            self._log.write(f"[sandbox] a provisioned environment did not start again: {exc}\n".encode())
        finally:
            self._release(environment)

    def _acquire(self, throttle: bool) -> ExecutionEnvironment | None:
        """A unit of concurrency, with a warm environment or (None) the right to start one.

        Waiters are served in order of arrival (one that came later never takes the
        environment an earlier one waits for), so a wait is bounded by the invocations ahead.
        """
        ticket = object()
        patient_until = time.monotonic() + self._starts.patience_seconds
        with self._changed:
            released_when_came = self._released
            self._queue.append(ticket)
            try:
                while True:
                    if self._closed:
                        raise _Stopping(self.spec.name)
                    self._drop_exited_idle()
                    if self._busy >= self._max and not self._idle:
                        if throttle:
                            raise FunctionThrottled(self.spec.name)
                    elif self._queue[0] is ticket:
                        if self._idle:
                            self._busy += 1
                            return self._idle.pop()
                        # Patience: nothing of this function came free while this one waited, so
                        # what holds its environments holds them long (a long-poll).
                        held = time.monotonic() >= patient_until and self._released == released_when_came
                        if self._starts.active < self._starts.limit and (
                            self._busy < self._starts.on_demand or held or self._starts.room()
                        ):
                            self._starts.active += 1
                            self._busy += 1
                            return None
                    # Woken by a release, a finished start or the one ahead leaving; the timeout
                    # looks at the CPU again.
                    self._changed.wait(timeout=_CPU_WINDOW_SECONDS)
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()

    def _release(self, environment: ExecutionEnvironment | None) -> None:
        with self._changed:
            self._busy -= 1
            self._released += 1
            if environment is not None and environment.alive and not self._closed:
                self._idle.append(environment)
            elif environment is not None:
                self._forget(environment)
            self._changed.notify_all()

    def _drop_exited_idle(self) -> None:
        """(holding `_changed`) Idle environments whose process ended between invocations are
        dropped, and a provisioned one replaced: Lambda never hands an invocation an environment
        that is gone, it starts another (hunt 320: the next invocation failed
        `Runtime.ExitError` at once)."""
        for environment in [idle for idle in self._idle if idle.exited_while_idle()]:
            self._idle.remove(environment)
            environment.kill()
            self._forget(environment)

    def _forget(self, environment: ExecutionEnvironment) -> None:
        """(holding `_changed`) An environment no longer usable; a provisioned one is replaced."""
        with self._lock:
            if environment in self._all:
                self._all.remove(environment)
        if environment in self._provisioned:
            self._provisioned.discard(environment)
            if not self._closed:
                self._busy += 1
                threading.Thread(
                    target=self._replace_provisioned, name=f"provision-{self.spec.name}", daemon=True
                ).start()

    def _start(self) -> ExecutionEnvironment:
        try:
            return self._new_environment()
        finally:
            with self._changed:
                self._starts.started()

    @contextmanager
    def _environment(self, throttle: bool = False) -> Iterator[tuple[ExecutionEnvironment, bool]]:
        environment = self._acquire(throttle)
        cold = environment is None
        try:
            if environment is None:
                environment = self._start()
            yield environment, cold
        finally:
            self._release(environment)

    def invoke(
        self, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
    ) -> InvocationResult:
        """Run one invocation; with `throttle`, answer THROTTLED instead of waiting for a slot."""
        request_id = str(uuid.uuid4())
        started = time.time()
        if self._closed:
            return self._stopping(request_id, started)
        # Armed once an environment is this invocation's: one that waits for it or is throttled
        # holds no fault another invocation could fire meanwhile.
        armed: list[dict[str, str]] = []
        fired: list[str] = []
        try:
            with self._environment(throttle) as (environment, cold):
                armed = self._faults.arm(self.spec.name)
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
        except FunctionThrottled:
            outcome, payload, cold = Outcome.THROTTLED, dict(THROTTLED_ERROR), False
        except _Stopping:
            outcome, payload, cold = Outcome.ERROR, dict(_STOPPING_ERROR), False
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

    def _stopping(self, request_id: str, started: float) -> InvocationResult:
        return InvocationResult(
            function=self.spec.name,
            request_id=request_id,
            outcome=Outcome.ERROR,
            error=dict(_STOPPING_ERROR),
            started_at=started,
        )

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._idle.clear()
            self._changed.notify_all()
        with self._lock:
            environments = list(self._all)
            self._all.clear()
        for environment in environments:
            environment.request_stop()
        # (one second for them all, not each: busy ones, which ignore Ctrl-C, are killed together)
        deadline = time.monotonic() + 1.0
        for environment in environments:
            environment.stop(deadline)
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
        cold_starts: ColdStarts | None = None,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir = log_dir.resolve()
        self.launcher = EnvironmentLauncher(log_dir, aws)
        # Call faults armed over HTTP (POST /_sandbox/faults), handed to each invocation.
        self.faults = FaultBook()
        self.cold_starts = cold_starts or ColdStarts()
        self.pools = {
            name: FunctionPool(
                spec,
                aws,
                self.launcher,
                log_dir / f"{name}.log",
                spec.reserved_concurrency or default_concurrency,
                self.faults,
                self.cold_starts,
            )
            for name, spec in functions.items()
        }
        self.invocations = InvocationLog()

    def warm_up(self) -> None:
        """Each function's provisioned environments, or one started as on demand, the functions
        in parallel; the first failure is raised with its name."""
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

    def invoke(
        self, function: str, event: Any, timeout_seconds: float | None = None, *, throttle: bool = False
    ) -> InvocationResult:
        return self.pools[function].invoke(event, timeout_seconds, throttle=throttle)

    @property
    def alive(self) -> bool:
        """Environments can start (`EnvironmentLauncher.alive`)."""
        return self.launcher.alive

    def close(self) -> None:
        threads = [threading.Thread(target=pool.close) for pool in self.pools.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.launcher.close()
