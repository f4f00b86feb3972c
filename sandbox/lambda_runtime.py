"""One Lambda execution environment: the child process the sandbox's Lambda service starts.

It behaves like the Python runtime of AWS Lambda: the environment holds exactly the
function's variables (plus what Lambda itself sets), the code directory comes first on
sys.path like /var/task, the handler module is imported once (the cold start), and then
invocations run one at a time. A handler that overruns its timeout is killed by the parent,
as Lambda kills the runtime.

The protocol with the parent is one JSON object per line: invocations arrive on stdin;
"ready"/"init_error" and each result go to a private copy of the original stdout. The
function's own prints and logs go to stderr, which the parent points at the function's log.

Only the standard library is imported before the handler, so the cold start costs what the
function's own imports cost.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, TextIO


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
    """Exit when the sandbox goes away, even in the middle of a hung invocation."""
    while True:
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(0.5)


def _send(channel: TextIO, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message, default=str) + "\n")
    channel.flush()


def _load_handler() -> Any:
    task_root = os.environ["LAMBDA_TASK_ROOT"]
    module_name, _, function_name = os.environ["_HANDLER"].rpartition(".")
    sys.path.insert(0, task_root)
    module = importlib.import_module(module_name)
    return getattr(module, function_name)


def _invoke(handler: Any, request: dict[str, Any]) -> dict[str, Any]:
    request_id = request["request_id"]
    context = LambdaContext(request_id, int(request["deadline_ms"]))
    print(f"START RequestId: {request_id} Version: $LATEST", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        payload = handler(request["event"], context)
        reply: dict[str, Any] = {"type": "result", "request_id": request_id, "payload": payload}
        json.dumps(payload)  # Lambda serializes the result; an unserializable one is an error
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        reply = {"type": "error", "request_id": request_id, "error": _error(exc)}
    duration = (time.monotonic() - started) * 1000
    print(f"END RequestId: {request_id}", file=sys.stderr)
    print(f"REPORT RequestId: {request_id}\tDuration: {duration:.2f} ms", file=sys.stderr, flush=True)
    return reply


def main() -> None:
    # The protocol keeps the original stdout; everything the function prints goes to stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    started = time.monotonic()
    try:
        handler = _load_handler()
    except BaseException as exc:  # a ConfigError at import, a SyntaxError, a missing module...
        traceback.print_exc(file=sys.stderr)
        _send(channel, {"type": "init_error", "error": _error(exc)})
        sys.exit(1)
    _send(channel, {"type": "ready", "init_ms": round((time.monotonic() - started) * 1000)})
    for line in sys.stdin:
        if line.strip():
            _send(channel, _invoke(handler, json.loads(line)))


if __name__ == "__main__":
    main()
