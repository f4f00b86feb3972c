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
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

from llmq_sandbox.doubles import faults

# Imported once by the fork server and shared by every environment it forks. None of them
# reads a function's variables at import time; the handlers read theirs after the fork.
PRELOADED = (
    "boto3",
    "botocore.session",
    "httpx",
    "pydantic",
    "aws_lambda_powertools",
    "aws_lambda_powertools.event_handler",
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.utilities.data_classes",
    "aws_lambda_powertools.utilities.parameters",
    "aws_lambda_powertools.utilities.typing",
)


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


def _invoke(handler: Any, request: dict[str, Any]) -> dict[str, Any]:
    request_id = request["request_id"]
    context = LambdaContext(request_id, int(request["deadline_ms"]))
    print(f"START RequestId: {request_id} Version: $LATEST", flush=True)
    started = time.monotonic()
    faults.begin_invocation(request.get("faults"))
    try:
        payload = handler(request["event"], context)
        json.dumps(payload)  # Lambda serializes the result; an unserializable one is an error
        reply: dict[str, Any] = {"type": "result", "request_id": request_id, "payload": payload}
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


def run_environment(socket_path: str, token: str, forked: dict[str, Any] | None = None) -> None:
    """Cold-start the handler named by _HANDLER, then serve invocations until the socket closes.

    `forked` is the fork server's request: the environment to take on first.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(socket_path)
    channel = _Channel(connection)
    channel.send({"type": "hello", "token": token, "pid": os.getpid()})
    started = time.monotonic()
    try:
        if forked is not None:
            _become_environment(forked)
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
        faults.install()  # before the handler's import, so every client it makes has the hooks
        task_root = os.environ["LAMBDA_TASK_ROOT"]
        module_name, _, function_name = os.environ["_HANDLER"].rpartition(".")
        sys.path.insert(0, task_root)
        handler = getattr(importlib.import_module(module_name), function_name)
    except BaseException as exc:  # a ConfigError at import, a SyntaxError, a missing module...
        traceback.print_exc()
        channel.send({"type": "init_error", "error": _error(exc)})
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
    for name in PRELOADED:
        importlib.import_module(name)
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
    if argv[:1] == ["--fork-server"]:
        serve_forks()
    elif argv[:1] == ["--connect"] and len(argv) == 3:
        run_environment(argv[1], argv[2])
    else:
        sys.exit("usage: python -m llmq_sandbox.lambda_runtime --fork-server | --connect SOCKET TOKEN")


if __name__ == "__main__":
    main(sys.argv[1:])
