"""Fault injection for the sandbox's Lambda environments: crashes and failing AWS calls.

Two kinds of fault, both played inside the forked execution environments (lambda_runtime.py)
through botocore's event hooks, so neither the domain nor the handlers know about them:

- **Crash directives** in a job's prompt, read from the job as claimed (the read after the
  claim's transaction, or the answer of a claim from before tenant shares) by the worker
  environment that claimed it:
  - `[[crash]]` kills the environment (SIGKILL, as an out-of-memory kill does) right after
    the claim, before the provider is called; `[[crash:N]]` only on attempts 1..N;
  - `[[crash_before_complete]]` / `[[crash_before_complete:N]]` kills it after the provider
    answered, just before the result is written: the generation is paid for and lost;
  - `[[overrun]]` / `[[overrun:N]]` freezes it (SIGSTOP) after the claim, so the invocation
    overruns its timeout and the runner kills it, as Lambda does;
  - `[[crash_mid_stream]]` / `[[crash_mid_stream:N]]` kills it right after the second output
    write of a `stream: true` job (llmq.live_output): a reader has seen part of the output
    when the attempt dies.
  A directive is deterministic per attempt (the claim's `attempts`), so a retried job crashes
  on the attempts it names and no others, whichever environment runs it.
- **Call faults**, armed over HTTP (`POST {api_url}/_sandbox/faults`): the next `times` calls
  of one AWS operation made by one function fail with a ClientError before they are sent,
  e.g. `{"function": "api", "operation": "sqs.SendMessage", "times": 1}` loses the enqueue
  that follows a submit's PutItem. `GET` lists the faults with how often each fired,
  `DELETE` disarms them all.

The runner (FaultBook, in the sandbox process) hands each invocation the call faults armed
for its function; the environment reports which fired. A fault with `times` is handed to one
invocation at a time, so concurrent invocations never fire it more than `times` times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import uuid
from dataclasses import asdict, dataclass
from typing import Any

# ---- the runner's side: which call faults are armed ------------------------------------------

_OPERATION = re.compile(r"^[a-z0-9-]+\.[A-Za-z0-9]+$")


class FaultSpecError(ValueError):
    """A fault request the sandbox cannot arm; the message says why."""


@dataclass
class CallFault:
    """The next `times` calls of `operation` ("sqs.SendMessage") by `function` fail."""

    id: str
    function: str
    operation: str
    times: int | None = 1  # None: every call until disarmed
    error_code: str = "ServiceUnavailable"
    fired: int = 0
    in_flight: int = 0

    @classmethod
    def from_request(cls, body: Any, functions: set[str]) -> CallFault:
        if not isinstance(body, dict):
            raise FaultSpecError("the body must be a JSON object")
        unknown = set(body) - {"function", "operation", "times", "error_code"}
        if unknown:
            raise FaultSpecError(f"unknown fields: {sorted(unknown)}")
        function, operation = body.get("function"), body.get("operation")
        if function not in functions:
            raise FaultSpecError(f"function must be one of {sorted(functions)}")
        if not isinstance(operation, str) or not _OPERATION.match(operation):
            raise FaultSpecError('operation must look like "sqs.SendMessage"')
        times = body.get("times", 1)
        if times is not None and (not isinstance(times, int) or times < 1):
            raise FaultSpecError("times must be a positive integer or null")
        error_code = body.get("error_code", "ServiceUnavailable")
        if not isinstance(error_code, str) or not error_code:
            raise FaultSpecError("error_code must be a non-empty string")
        return cls(
            id=f"fault_{uuid.uuid4().hex[:12]}",
            function=str(function),
            operation=operation,
            times=times,
            error_code=error_code,
        )

    @property
    def available(self) -> bool:
        return self.times is None or self.fired + self.in_flight < self.times

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultBook:
    """The call faults armed in a running sandbox; thread-safe."""

    def __init__(self) -> None:
        self._faults: list[CallFault] = []
        self._lock = threading.Lock()

    def add(self, fault: CallFault) -> CallFault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [fault.as_dict() for fault in self._faults]

    def arm(self, function: str) -> list[dict[str, str]]:
        """What one invocation of `function` may fire; each must be settled afterwards."""
        with self._lock:
            armed = [fault for fault in self._faults if fault.function == function and fault.available]
            for fault in armed:
                fault.in_flight += 1
            return [
                {"id": fault.id, "operation": fault.operation, "error_code": fault.error_code}
                for fault in armed
            ]

    def settle(self, armed: list[dict[str, str]], fired: list[str]) -> None:
        with self._lock:
            for fault in self._faults:
                if any(entry["id"] == fault.id for entry in armed):
                    fault.in_flight -= 1
                    fault.fired += fired.count(fault.id)


# ---- the environment's side: botocore hooks ---------------------------------------------------

_CRASH_DIRECTIVE = re.compile(r"\[\[(crash|crash_before_complete|crash_mid_stream|overrun)(?::(\d+))?\]\]")
# An output write: the transaction whose job update moves `stream_seq`.
_OUTPUT_WRITE = "stream_seq = :seq"
# The output writes an attempt makes before `[[crash_mid_stream]]` kills it.
_OUTPUT_WRITES_BEFORE_CRASH = 2
_HOOK_EVENTS = (
    "before-parameter-build",
    "after-call.dynamodb.UpdateItem",
    "after-call.dynamodb.TransactWriteItems",
    "after-call.dynamodb.GetItem",
)


@dataclass(frozen=True)
class CrashPlan:
    """The crash directives of one job's prompt: for each, the last attempt it applies to."""

    after_claim: int | None = None
    before_complete: int | None = None
    overrun: int | None = None
    mid_stream: int | None = None

    @classmethod
    def parse(cls, text: str) -> CrashPlan:
        found: dict[str, int] = {}
        names = {
            "crash": "after_claim",
            "crash_before_complete": "before_complete",
            "overrun": "overrun",
            "crash_mid_stream": "mid_stream",
        }
        for name, times in _CRASH_DIRECTIVE.findall(text):
            found[names[name]] = int(times) if times else sys.maxsize
        return cls(**found)


class _Environment:
    """This process's invocation-scoped fault state (one invocation at a time, as on Lambda)."""

    def __init__(self) -> None:
        self.armed: list[dict[str, str]] = []
        self.fired: list[str] = []
        # job id -> (its crash plan, the attempt this environment claimed)
        self.claims: dict[str, tuple[CrashPlan, int]] = {}
        # Jobs whose claim transaction this environment just made: the GetItem that follows
        # brings the job as claimed, input included.
        self.claiming: set[str] = set()
        # Output writes per job claimed here (`[[crash_mid_stream]]`).
        self.output_writes: dict[str, int] = {}
        self.lock = threading.Lock()


_STATE = _Environment()


def install() -> None:
    """Add the hooks to every botocore session this process creates from now on.

    Called in an execution environment before its handler is imported: llmq's client
    factory makes its sessions lazily, so each of them gets the hooks.
    """
    from botocore import handlers

    hooks = {
        "before-parameter-build": _before_parameter_build,
        "after-call.dynamodb.UpdateItem": _after_update,
        "after-call.dynamodb.TransactWriteItems": _after_transaction,
        "after-call.dynamodb.GetItem": _after_get,
    }
    for event in _HOOK_EVENTS:
        hook = hooks[event]
        if (event, hook) not in handlers.BUILTIN_HANDLERS:
            handlers.BUILTIN_HANDLERS.append((event, hook))


def begin_invocation(armed: list[dict[str, str]] | None) -> None:
    with _STATE.lock:
        _STATE.armed = list(armed or [])
        _STATE.fired = []


def end_invocation() -> list[str]:
    """The ids of the call faults that fired during the invocation."""
    with _STATE.lock:
        fired, _STATE.armed, _STATE.fired = _STATE.fired, [], []
        return fired


def _say(message: str) -> None:
    # The function's log is its stdout; say what the sandbox did before doing it.
    print(json.dumps({"level": "WARNING", "message": f"sandbox fault: {message}"}), flush=True)


def _die(message: str) -> None:
    _say(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _call_fault(event_name: str) -> dict[str, str] | None:
    with _STATE.lock:
        for fault in _STATE.armed:
            if (
                event_name == f"before-parameter-build.{fault['operation']}"
                and fault["id"] not in _STATE.fired
            ):
                _STATE.fired.append(fault["id"])
                return fault
    return None


def _before_parameter_build(
    params: dict[str, Any], context: dict[str, Any], event_name: str, **_: Any
) -> None:
    fault = _call_fault(event_name)
    if fault is not None:
        from botocore.exceptions import ClientError

        operation = fault["operation"].split(".", 1)[1]
        _say(f"{fault['operation']} fails with {fault['error_code']} ({fault['id']})")
        error: dict[str, Any] = {
            "Error": {"Code": fault["error_code"], "Message": f"sandbox fault {fault['id']}"},
            "ResponseMetadata": {"HTTPStatusCode": 503},
        }
        raise ClientError(error, operation)  # type: ignore[arg-type]
    if event_name == "before-parameter-build.dynamodb.UpdateItem":
        context["sandbox_update_expression"] = params.get("UpdateExpression", "")
        _maybe_crash_before_complete(params)
    if event_name == "before-parameter-build.dynamodb.TransactWriteItems":
        # The job's write is the first item of llmq's transactions (the share's comes second).
        first: dict[str, Any] = next(iter((params.get("TransactItems") or [{}])[0].values()), {})
        context["sandbox_update_expression"] = first.get("UpdateExpression", "")
        context["sandbox_job_id"] = str((first.get("Key") or {}).get("pk", {}).get("S", ""))
        _maybe_crash_before_complete(first)


def _maybe_crash_before_complete(params: dict[str, Any]) -> None:
    values = params.get("ExpressionAttributeValues") or {}
    if values.get(":status") != {"S": "succeeded"} or ":owner" not in values:
        return
    job_id = str((params.get("Key") or {}).get("pk", {}).get("S", ""))
    with _STATE.lock:
        plan, attempt = _STATE.claims.get(job_id, (CrashPlan(), 0))
    if plan.before_complete is not None and attempt <= plan.before_complete:
        _die(f"worker killed before completing {job_id} (attempt {attempt})")


def _after_transaction(http_response: Any, context: dict[str, Any], **_: Any) -> None:
    """A claim transaction (the one write that adds to `attempts`) that succeeded: the job's
    GetItem that follows decides, from the prompt, whether to crash."""
    if getattr(http_response, "status_code", 500) >= 300:
        return
    if _OUTPUT_WRITE in str(context.get("sandbox_update_expression", "")):
        _after_output_write(str(context.get("sandbox_job_id", "")))
        return
    if "ADD attempts" in str(context.get("sandbox_update_expression", "")):
        with _STATE.lock:
            _STATE.claiming.add(str(context.get("sandbox_job_id", "")))


def _after_output_write(job_id: str) -> None:
    with _STATE.lock:
        plan, attempt = _STATE.claims.get(job_id, (CrashPlan(), 0))
        writes = _STATE.output_writes[job_id] = _STATE.output_writes.get(job_id, 0) + 1
    if plan.mid_stream is not None and attempt <= plan.mid_stream and writes >= _OUTPUT_WRITES_BEFORE_CRASH:
        _die(f"worker killed mid-stream on {job_id} (attempt {attempt}, after {writes} output writes)")


def _after_get(parsed: dict[str, Any], **_: Any) -> None:
    item = parsed.get("Item") or {}
    job_id = str(item.get("pk", {}).get("S", ""))
    with _STATE.lock:
        if job_id not in _STATE.claiming:
            return
        _STATE.claiming.discard(job_id)
    _after_claim(item)


def _after_update(parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """After a claim of a job from before shares (an UpdateItem that adds to `attempts`)."""
    if "ADD attempts" not in str(context.get("sandbox_update_expression", "")):
        return
    _after_claim(parsed.get("Attributes") or {})


def _after_claim(attributes: dict[str, Any]) -> None:
    """Crash, or freeze, after a claim if the job's prompt says so for this attempt."""
    job_id = str(attributes.get("pk", {}).get("S", ""))
    attempt = int(attributes.get("attempts", {}).get("N", "0"))
    plan = CrashPlan.parse(str(attributes.get("input", {}).get("S", "")))
    if plan == CrashPlan():
        return
    with _STATE.lock:
        _STATE.claims[job_id] = (plan, attempt)
    if plan.after_claim is not None and attempt <= plan.after_claim:
        _die(f"worker killed after claiming {job_id} (attempt {attempt})")
    if plan.overrun is not None and attempt <= plan.overrun:
        _say(f"worker frozen after claiming {job_id} (attempt {attempt}) until its timeout")
        # The whole environment stops, as a hung runtime does: freezing only this thread (the
        # AWS call's) would be a call that never answers, which the worker stops waiting for.
        os.kill(os.getpid(), signal.SIGSTOP)
