"""AWS faults at the botocore level: throttles, 5xx, and writes applied but never answered.

Real AWS throttles, answers 500, and applies a write whose response is then lost, so that
botocore sends it again. `AwsFaults` plays each of these on the boto3 clients llmq uses (the
ones `llmq.aws.client(service)` caches), through botocore's event hooks, so neither the
domain nor the handlers know about it:

- `throttle`: the call fails with the service's throttling error (DynamoDB's
  `ProvisionedThroughputExceededException`, S3's `SlowDown`, else `ThrottlingException`), as
  botocore raises it once its own retries are spent. Raised from `before-call`: the request
  never reaches moto.
- `server_error`: the same with `InternalServerError`, HTTP 500.
- `applied_retried`: the call reaches moto and is applied, its response is lost, and botocore
  sends the same request again. A `needs-retry.<service>.<Operation>` hook answers 0 (retry
  at once) for the first attempt; it is registered on the operation's own event, so botocore
  calls it before its own retry handler (registered on `needs-retry.<service>`), and
  `first_non_none_response` takes its answer. The caller sees the retry's answer.
- `applied_lost`: the call reaches moto and is applied, and the caller gets a
  `ConnectionClosedError` anyway, as when every one of botocore's tries lost its answer.
  Raised from `after-call`.
- `body_cut`: a call with a streamed body (S3's GetObject) is answered 200, and the body's
  connection breaks off while it is read: botocore's `ResponseStreamingError`, which it does
  not retry (the body is read after the call returned).

A fault targets an operation ("dynamodb.UpdateItem"), optionally within one function: the
handler (or block) runs inside `invocation(function)` or a handler wrapped by
`wrap_handler`, and calls are counted per invocation, so `nth=2` is the second UpdateItem of
each worker invocation. Without a function, calls are counted from the moment of arming,
wherever they come from. From the nth call on, the fault fires until it has fired `times`
times. Every fault that takes effect is recorded in `fired`: a test must check its fault
fired, or it proves nothing.

Calls made outside an invocation (the test's own set-up and assertions, or what the test
does in the Lambda service's place) never count towards a function's fault.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from types import ModuleType
from typing import Any

from botocore.exceptions import ClientError, ConnectionClosedError, ResponseStreamingError

from llmq import aws


class FaultKind(StrEnum):
    THROTTLE = "throttle"
    SERVER_ERROR = "server_error"
    APPLIED_RETRIED = "applied_retried"
    APPLIED_LOST = "applied_lost"
    # DynamoDB: another transaction held the item. TransactWriteItems is canceled with a
    # TransactionConflict reason, a single write answers TransactionConflictException (botocore
    # retries neither). Nothing applied.
    TRANSACTION_CONFLICT = "transaction_conflict"
    BODY_CUT = "body_cut"


# (error code, HTTP status) of each service's throttle, as botocore finally raises it.
_THROTTLES = {
    "dynamodb": ("ProvisionedThroughputExceededException", 400),
    "s3": ("SlowDown", 503),
}
_DEFAULT_THROTTLE = ("ThrottlingException", 400)
_SERVER_ERROR = ("InternalServerError", 500)
_HOOKS = ("before-call", "needs-retry", "after-call")
# Where a fault chosen at before-call waits in botocore's request context for the later hooks.
_CONTEXT_KEY = "llmq_aws_fault"


@dataclass
class AwsFault:
    kind: FaultKind
    operation: str  # "<service>.<Operation>", e.g. "dynamodb.PutItem"
    function: str | None = None
    nth: int = 1
    times: int = 1
    # How often the fault was chosen for a call; `AwsFaults.fired` says how often it took effect.
    chosen: int = 0

    @property
    def service(self) -> str:
        return self.operation.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.operation.split(".", 1)[1]

    @property
    def label(self) -> str:
        where = f"{self.function} " if self.function else ""
        return f"{where}{self.operation} #{self.nth} {self.kind.value}"


@dataclass(frozen=True)
class Fired:
    """One fault taking effect: on which call, and what the caller's last try was answered."""

    fault: AwsFault
    function: str | None
    occurrence: int
    # applied_retried: what the retry answered ("200" or an error code); applied_lost: what
    # the applied call answered before the answer was lost.
    answer: str = ""


@dataclass
class _Invocation:
    function: str
    calls: Counter[str] = field(default_factory=Counter)


_current: ContextVar[_Invocation | None] = ContextVar("llmq_aws_fault_invocation", default=None)


class AwsFaults:
    """Faults armed on the cached llmq clients of the running moto mock; thread-safe."""

    def __init__(self) -> None:
        self.faults: list[AwsFault] = []
        self.fired: list[Fired] = []
        self._lock = threading.Lock()
        # Calls of each armed operation since it was armed, for faults without a function.
        self._calls_since_arming: dict[int, int] = {}
        self._clients: dict[str, Any] = {}
        self._hooked: set[str] = set()

    # ---- arming --------------------------------------------------------------------------

    def arm(
        self,
        kind: FaultKind | str,
        operation: str,
        *,
        function: str | None = None,
        nth: int = 1,
        times: int = 1,
    ) -> AwsFault:
        if operation.count(".") != 1 or nth < 1 or times < 1:
            raise ValueError(f"cannot arm {operation!r} nth={nth} times={times}")
        fault = AwsFault(FaultKind(kind), operation, function, nth, times)
        self._hook(fault.operation)
        with self._lock:
            self.faults.append(fault)
            self._calls_since_arming[id(fault)] = 0
        return fault

    def disarm(self) -> None:
        """Remove every hook; the faults and what fired stay readable."""
        for operation in sorted(self._hooked):
            service, name = operation.split(".", 1)
            events = self._clients[service].meta.events
            for hook in _HOOKS:
                events.unregister(f"{hook}.{service}.{name}", unique_id=_unique_id(hook, operation))
        self._hooked.clear()

    def _hook(self, operation: str) -> None:
        service, name = operation.split(".", 1)
        client = aws.client(service)
        if self._clients.setdefault(service, client) is not client:
            raise RuntimeError(f"llmq's {service} client changed since the first fault was armed")
        if operation in self._hooked:
            return
        handlers = {
            "before-call": self._before_call,
            "needs-retry": self._needs_retry,
            "after-call": self._after_call,
        }
        for hook in _HOOKS:
            client.meta.events.register(
                f"{hook}.{service}.{name}", handlers[hook], unique_id=_unique_id(hook, operation)
            )
        self._hooked.add(operation)

    def still_attached(self) -> bool:
        """False when llmq's clients were replaced (reset_clients) after arming: no fault can fire."""
        return all(aws.client(service) is client for service, client in self._clients.items())

    # ---- scoping calls to a function's invocation ----------------------------------------

    @contextmanager
    def invocation(self, function: str) -> Iterator[None]:
        """Calls made inside (and in the asyncio tasks and threads it starts) are `function`'s."""
        token = _current.set(_Invocation(function))
        try:
            yield
        finally:
            _current.reset(token)

    def wrap_handler(self, function: str, module: ModuleType) -> None:
        """Each call of `module.handler` is one invocation of `function`."""
        original = module.handler

        @functools.wraps(original)
        def handler(event: Any, context: Any) -> Any:
            with self.invocation(function):
                return original(event, context)

        module.handler = handler

    # ---- reading what happened -----------------------------------------------------------

    def fired_for(self, fault: AwsFault) -> list[Fired]:
        with self._lock:
            return [entry for entry in self.fired if entry.fault is fault]

    def unfired(self) -> list[AwsFault]:
        """Faults that have not yet taken effect as often as armed."""
        with self._lock:
            taken = Counter(id(entry.fault) for entry in self.fired)
            return [fault for fault in self.faults if taken[id(fault)] < fault.times]

    # ---- the hooks -----------------------------------------------------------------------

    def _choose(self, operation: str) -> tuple[AwsFault, _Invocation | None, int] | None:
        invocation = _current.get()
        with self._lock:
            if invocation is not None:
                invocation.calls[operation] += 1
            chosen = None
            for fault in self.faults:
                if fault.operation != operation:
                    continue
                if fault.function is None:
                    self._calls_since_arming[id(fault)] += 1
                    occurrence = self._calls_since_arming[id(fault)]
                elif invocation is not None and invocation.function == fault.function:
                    occurrence = invocation.calls[operation]
                else:
                    continue
                if chosen is None and occurrence >= fault.nth and fault.chosen < fault.times:
                    fault.chosen += 1
                    chosen = (fault, invocation, occurrence)
            return chosen

    def _before_call(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        operation = f"{model.service_model.service_name}.{model.name}"
        chosen = self._choose(operation)
        if chosen is None:
            return
        fault, invocation, occurrence = chosen
        function = invocation.function if invocation else None
        if fault.kind in (FaultKind.THROTTLE, FaultKind.SERVER_ERROR):
            code, status = (
                _THROTTLES.get(fault.service, _DEFAULT_THROTTLE)
                if fault.kind is FaultKind.THROTTLE
                else _SERVER_ERROR
            )
            self._record(Fired(fault, function, occurrence, code))
            error: Any = {
                "Error": {"Code": code, "Message": f"injected: {fault.label}"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }
            raise ClientError(error, fault.name)
        if fault.kind is FaultKind.TRANSACTION_CONFLICT and fault.name != "TransactWriteItems":
            # A single write that met a transaction in progress on its item.
            self._record(Fired(fault, function, occurrence, "TransactionConflictException"))
            conflict: Any = {
                "Error": {"Code": "TransactionConflictException", "Message": f"injected: {fault.label}"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(conflict, fault.name)
        if fault.kind is FaultKind.TRANSACTION_CONFLICT:
            items = len(_.get("params", {}).get("TransactItems", [])) or 2
            self._record(Fired(fault, function, occurrence, "TransactionConflict"))
            canceled: Any = {
                "Error": {"Code": "TransactionCanceledException", "Message": f"injected: {fault.label}"},
                "CancellationReasons": [
                    {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"}
                ]
                + [{"Code": "None"}] * (items - 1),
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(canceled, fault.name)
        context[_CONTEXT_KEY] = {
            "fault": fault,
            "function": function,
            "occurrence": occurrence,
            "resent": False,
        }

    def _needs_retry(
        self, attempts: int, request_dict: dict[str, Any], response: Any, **_: Any
    ) -> int | None:
        chosen = request_dict.get("context", {}).get(_CONTEXT_KEY)
        if chosen is None or chosen["fault"].kind is not FaultKind.APPLIED_RETRIED:
            return None
        if attempts == 1 and response is not None:
            chosen["resent"] = True
            return 0  # the answer is lost: botocore sends the same request again, at once
        return None

    def _after_call(
        self, http_response: Any, parsed: dict[str, Any], context: dict[str, Any], **_: Any
    ) -> None:
        chosen = context.pop(_CONTEXT_KEY, None)
        if chosen is None:
            return
        fault: AwsFault = chosen["fault"]
        answer = str(parsed.get("Error", {}).get("Code") or http_response.status_code)
        if fault.kind is FaultKind.APPLIED_RETRIED:
            # Only a request applied and then sent again counts; otherwise the fault stays unfired.
            if chosen["resent"]:
                self._record(Fired(fault, chosen["function"], chosen["occurrence"], answer))
            return
        self._record(Fired(fault, chosen["function"], chosen["occurrence"], answer))
        if fault.kind is FaultKind.BODY_CUT:
            parsed["Body"] = _CutBody(parsed["Body"])
            return
        raise ConnectionClosedError(endpoint_url=f"https://{fault.service}.injected.test/")

    def _record(self, entry: Fired) -> None:
        with self._lock:
            self.fired.append(entry)


def _unique_id(hook: str, operation: str) -> str:
    return f"llmq-aws-faults-{hook}-{operation}"


class _CutBody:
    """A streamed body whose connection breaks off before its first byte is read."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def _cut(self) -> ResponseStreamingError:
        return ResponseStreamingError(error="Connection broken: IncompleteRead(0 bytes read) (injected)")

    def read(self, *_: Any) -> bytes:
        raise self._cut()

    def iter_chunks(self, *_: Any) -> Iterator[bytes]:
        raise self._cut()
        yield b""  # (a generator, as botocore's is)

    def close(self) -> None:
        self._real.close()
