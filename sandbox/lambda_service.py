"""The local Lambda service: execution environments for the functions of the deployed template.

Each execution environment is a child process (sandbox/lambda_runtime.py) that imports the
function's handler once under exactly the environment the template gives the function,
then runs invocations one at a time, as a Lambda execution environment does. Why processes
and not threads in this process:
- module state stays per environment, as on Lambda: the Powertools batch processors and
  caches that handlers keep at module level are not shared between concurrent invocations;
- the environment is the function's own (os.environ, read by Powertools and botocore at
  run time as well as by the handler at import), with no lock around a shared os.environ;
- a timeout is a real crash: the process is killed, so a late result can never be written
  back, and the messages of the invocation stay in their queue.

An environment is started on demand (the cold start, not counted against the timeout) and
kept warm; a function with reserved concurrency never has more environments than that.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from sandbox.topology import LLMQ_LAYER_DIR, ROOT, FunctionSpec

INIT_TIMEOUT_SECONDS = 60.0
# Lambda gives the Python runtime these; a handler or Powertools may read them.
_LAMBDA_RUNTIME_VARS = {
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "AWS_EXECUTION_ENV": "AWS_Lambda_python3.14",
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
    """What every function shares: where AWS is, and the dummy credentials moto accepts."""

    endpoint_url: str
    region: str

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
        }


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
    }
    if "PYTHONDONTWRITEBYTECODE" in os.environ:
        environment["PYTHONDONTWRITEBYTECODE"] = os.environ["PYTHONDONTWRITEBYTECODE"]
    # The template's variables last: they are the function's, and nothing above may mask them.
    environment.update(spec.environment)
    return environment


class ExecutionEnvironment:
    """One child process running one function's handler."""

    def __init__(self, spec: FunctionSpec, aws: AwsAccess, log: IO[bytes]) -> None:
        self.spec = spec
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.lambda_runtime"],
            cwd=spec.code_dir,
            env=function_environment(spec, aws),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
        )
        self.alive = True
        threading.Thread(target=self._read_replies, name=f"{spec.name}-replies", daemon=True).start()

    def _read_replies(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self._replies.put(json.loads(line))
            except ValueError:
                continue
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

    def invoke(self, event: Any, request_id: str, timeout_seconds: float) -> tuple[Outcome, Any]:
        deadline = time.time() + timeout_seconds
        request = {"request_id": request_id, "event": event, "deadline_ms": int(deadline * 1000)}
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
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
        if reply.get("type") == "result":
            return Outcome.OK, reply.get("payload")
        return Outcome.ERROR, reply.get("error") or {}

    def kill(self) -> None:
        self.alive = False
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        """Polite first: closing stdin ends the runtime's loop."""
        self.alive = False
        if self.process.poll() is None:
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                self.process.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(timeout=5)


class FunctionPool:
    """The warm environments of one function, bounded by its concurrency."""

    def __init__(self, spec: FunctionSpec, aws: AwsAccess, log_path: Path, max_environments: int) -> None:
        self.spec = spec
        self._aws = aws
        self._log = log_path.open("ab", buffering=0)
        self._idle: list[ExecutionEnvironment] = []
        self._all: list[ExecutionEnvironment] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_environments)
        self._closed = False

    def _new_environment(self) -> ExecutionEnvironment:
        environment = ExecutionEnvironment(self.spec, self._aws, self._log)
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
        try:
            with self._environment() as (environment, cold):
                started = time.time()
                outcome, payload = environment.invoke(
                    event, request_id, timeout_seconds or self.spec.timeout_seconds
                )
        except FunctionStartError as exc:
            outcome, payload, cold = Outcome.ERROR, {"errorType": "Runtime.InitError", "errorMessage": str(exc)}, True
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
        self.log_dir = log_dir
        self.pools = {
            name: FunctionPool(
                spec,
                aws,
                log_dir / f"{name}.log",
                spec.reserved_concurrency or default_concurrency,
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
        for pool in self.pools.values():
            pool.close()
