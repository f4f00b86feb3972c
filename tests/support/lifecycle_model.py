"""What the lifecycle models share: the job model (tests/integration/test_lifecycle_model.py)
and the batch model (tests/integration/test_batch_lifecycle_model.py) drive the real code on
moto with the pieces below, and check it as each write lands.

- an owned clock (`ModelClock`) and an event loop on it (`ModelLoop`), with `asyncio.to_thread`
  run inline (`InlineExecutor`, `inline`);
- a run (`Run`) is one worker invocation; `RUNNING` names it to the provider, which answers
  as the run's step said, or holds the call open (`ScriptedProvider`);
- every applied job write is shown to a `WriteObserver`, which checks the step it took
  (DESIGN §2 transitions, §3 invariants), through an observed DynamoDB client
  (`ObservedDynamoDB`) under the real job repository (`ObservedJobRepository`);
- the AWS faults a step may arm for the coming DynamoDB, SQS and S3 calls, and the lost
  answers botocore sends again (`ObservedJobRepository.next_fault`, `FaultyClient`);
- one moto for a test, two tenants, emptied for each example (the `environment` fixture,
  `reset_stack`), and `LifecycleMachine`, the base of both state machines: it starts runs,
  settles the loop, acknowledges what ended, crashes runs and tears an example down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
from botocore.exceptions import ClientError
from hypothesis import event
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine

from llmq import aws
from llmq import jobs as jobs_module
from llmq.config import LlmqConfig
from llmq.errors import StoreUnavailable
from llmq.execution import Invocation, JobRunner
from llmq.job_codec import from_item as _from_item
from llmq.job_record import JobRecord
from llmq.jobs import JobRepository
from llmq.models import (
    DeliveryAttempt,
    DeliveryStatus,
    ErrorCode,
    JobResult,
    JobStatus,
    Usage,
    WebhookMessage,
)
from llmq.payloads import PayloadStore
from llmq.policy import Claim, ClaimOutcome
from llmq.providers import (
    GenerationRequest,
    PermanentProviderError,
    ProviderTimeout,
    TransientProviderError,
)
from llmq.queues import delivery_round_of
from llmq.reconcile import Reconciler
from llmq.shares import is_share_key
from llmq.telemetry import logger
from llmq.tenants import TenantIdentity, TenantRepository
from llmq.webhooks import WebhookDispatcher
from tests.conftest import MotoStack, create_llmq_resources
from tests.support.stores import counted_after

# A worker invocation's budget; its lease is this plus the configured margin.
WORKER_SECONDS = 60.0
START_EPOCH = 1_780_000_000.0
HOOK_URL = "https://hooks.example.com/llmq"
PUBLIC_ADDRESS = "93.184.216.34"

ENTERPRISE = TenantIdentity(tenant_id="ten_model_ent", tier="enterprise")
FREE = TenantIdentity(tenant_id="ten_model_free", tier="free")
TENANTS = {"enterprise": ENTERPRISE, "free": FREE}

CONFIG = LlmqConfig.model_validate(
    {
        "provider": {
            "base_url": "https://provider.example.com/v1",
            "default_model": "fake-model",
            "models": ["fake-model"],
            "stream": False,
        },
        "max_attempts": 3,
        "lease_margin_seconds": 30,
        "cancel_check_seconds": 5,
        "retry": {"base_seconds": 1, "max_seconds": 8},
        "webhooks": {"schedule_seconds": [1, 2, 4], "jitter_fraction": 0},
        # Short thresholds, so a few clock steps reach every reconciler branch.
        "reconciler": {
            "stale_queued_seconds": 60,
            "expired_lease_grace_seconds": 60,
            "stale_webhook_seconds": 120,
            "sweep_shards": 1,
        },
    }
)

# How the provider answers a call. SUSPEND keeps the call open until `end_run` answers it
# (or crashes the worker: CRASH).
SUCCEED, TRANSIENT, PERMANENT, TIMEOUT, SUSPEND = "succeed", "transient", "permanent", "timeout", "suspend"
CRASH = "crash"
# AWS faults a step may arm for coming DynamoDB calls, as botocore raises them once its own
# tries are spent: a throttle (nothing applied), or a 500 for a call DynamoDB applied on a try
# whose answer was lost (nothing is known to the caller: §3.10's applied-but-unanswered).
THROTTLED, UNANSWERED = "throttled", "unanswered"
# Two more ways a transaction meets a throttle: refused as a whole call (ProvisionedThroughput-
# ExceededException, as a single write is), or applied on a try whose answer was lost and then
# canceled as throttled on botocore's next try (the caller sees only the cancellation).
THROTTLED_CALL, APPLIED_THEN_THROTTLED = "throttled_call", "applied_then_throttled"
FAULTS = [THROTTLED, UNANSWERED, THROTTLED_CALL, APPLIED_THEN_THROTTLED]
ANSWERS = [SUCCEED, TRANSIENT, PERMANENT, TIMEOUT]


# DESIGN §2, plus the lead's documented extension: a queued job whose lane message
# dead-lettered twice without any claim fails as `worker_crashed`.
LEGAL_MOVES = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.EXPIRED, JobStatus.FAILED},
    JobStatus.RUNNING: {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED},
}
# Where a delivery may go without a redelivery request: pending until the dispatcher settles
# it, and a late success may still turn `failed` into `delivered`.
DELIVERY_MOVES: dict[DeliveryStatus | None, set[DeliveryStatus | None]] = {
    None: {DeliveryStatus.PENDING},
    DeliveryStatus.PENDING: {DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.DISABLED},
    DeliveryStatus.FAILED: {DeliveryStatus.DELIVERED, DeliveryStatus.DISABLED},
    DeliveryStatus.DELIVERED: set(),
    DeliveryStatus.DISABLED: set(),
}


# ---- a clock and an event loop that only the steps move -----------------------------------


class ModelClock:
    """Seconds since the epoch; they pass only when a step says so."""

    def __init__(self) -> None:
        self.now = START_EPOCH

    def __call__(self) -> float:
        return self.now

    @property
    def now_ms(self) -> int:
        return int(self.now * 1000)


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """`asyncio.to_thread` runs the call at once on the loop's thread: no thread races a step."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


async def inline(call: Callable[[], Any]) -> Any:
    """A call the code under test would run in a thread of its own, run at once on the loop."""
    return call()


class ModelLoop(asyncio.SelectorEventLoop):
    """An event loop on the model clock: `asyncio.sleep` ends only once a step moved the clock."""

    def __init__(self, clock: ModelClock) -> None:
        self._model_clock = clock
        super().__init__()
        self.set_default_executor(InlineExecutor())

    def time(self) -> float:
        # Seconds since the example began: near the epoch's 1.78e9, a float cannot hold the
        # loop's 1 ns resolution, and a timer due exactly now would never count as due.
        return self._model_clock.now - START_EPOCH

    def run_until_idle(self) -> None:
        """Run whatever is ready, and what that makes ready, until only future times are left.

        One loop iteration at a time, so the loop never waits in select() for a timer that
        only the model clock can bring. asyncio has no public "nothing is ready", hence the
        private lists.
        """
        for _ in range(10_000):
            self.call_soon(self.stop)
            self.run_forever()
            due = any(not h.cancelled() and h.when() <= self.time() for h in self._scheduled)  # type: ignore[attr-defined]
            if not self._ready and not due:  # type: ignore[attr-defined]
                return
        raise AssertionError("the event loop never went idle")


# ---- what the test plays: the provider, the runs, the observer of writes -----------------------


@dataclass
class ProviderCall:
    job_id: str
    owner: str
    # Read from the job at the moment of the call: had a cancel been recorded?
    cancel_recorded: bool
    answer: str | None = None
    output: str | None = None


@dataclass
class Run:
    """One worker invocation running one lane message."""

    number: int
    owner: str
    body: str
    job_id: str | None
    behaviour: str
    started_at: float
    # (queue url, receipt handle) when the message came from a lane queue.
    receipt: tuple[str, str] | None
    task: asyncio.Task[None] | None = None
    children: set[asyncio.Task[Any]] = field(default_factory=set)
    gate: asyncio.Future[str] | None = None
    claim: Claim | None = None
    crashed: bool = False
    # An armed AWS fault fired while the run started.
    met_a_fault: bool = False
    # acknowledged | retry | poison | crashed, once the run is over.
    result: str | None = None

    @property
    def in_flight(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def waits_on_provider(self) -> bool:
        return self.in_flight and self.gate is not None and not self.gate.done()

    @property
    def lease_expires_ms(self) -> int | None:
        if self.claim is None or self.claim.outcome is not ClaimOutcome.CLAIMED or self.claim.job is None:
            return None
        return self.claim.job.lease_expires_ms


# The run whose task (or a task it started) is running: the provider answers as its step said.
RUNNING: ContextVar[Run | None] = ContextVar("lifecycle_model_run", default=None)


class ScriptedProvider:
    """The provider interface the runner uses, answering as the step that started the run says."""

    def __init__(self, observer: WriteObserver) -> None:
        # Every write is observed, so the observer's copy is the stored job at this moment.
        self.observer = observer
        self.calls: list[ProviderCall] = []

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        run = RUNNING.get()
        assert run is not None, "the provider was called outside a run"
        assert request.job_id is not None
        stored = self.observer.seen.get(request.job_id)
        recorded = stored is None or stored.cancel_requested or stored.status is JobStatus.CANCELED
        call = ProviderCall(job_id=request.job_id, owner=run.owner, cancel_recorded=recorded)
        self.calls.append(call)
        answer = run.behaviour
        if answer == SUSPEND:
            run.gate = asyncio.get_running_loop().create_future()
            answer = await run.gate
        call.answer = answer
        if answer == TRANSIENT:
            raise TransientProviderError("the provider answered 503", status_code=503)
        if answer == PERMANENT:
            raise PermanentProviderError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "the prompt is too long", 400)
        if answer == TIMEOUT:
            raise ProviderTimeout("no answer in time")
        call.output = f"answer #{len(self.calls)} for {request.job_id}"
        return JobResult(
            output=call.output, finish_reason="stop", usage=Usage(input_tokens=3, output_tokens=5)
        )


@dataclass(frozen=True)
class Letter:
    """A DLQ record handled for a queued job (`WriteObserver.dead_letters`)."""

    message_id: str
    attempts: int
    sent: int
    handled: int


class WriteObserver:
    """Sees the job as every applied write left it, and checks the step it took."""

    def __init__(self, clock: ModelClock) -> None:
        self.clock = clock
        self.seen: dict[str, JobRecord] = {}
        self.violations: list[str] = []
        # Claims that took a running job over from another owner: its lease had lapsed.
        self.lapses: Counter[str] = Counter()
        # Per job, the DLQ messages handled while it was queued: each with the job's attempt
        # count then (from the model's own steps, not from what the job stores), when its
        # message was sent and when the letter was handled (the job model's `ticks`).
        self.dead_letters: dict[str, list[Letter]] = {}
        self.redelivering = False

    def saw_write(self, new: JobRecord, where: str) -> None:
        old = self.seen.get(new.id)
        for problem in self._problems(old, new):
            self.violations.append(f"{new.id}: {problem} ({where})")
        self.seen[new.id] = new

    def _problems(self, old: JobRecord | None, new: JobRecord) -> Iterator[str]:
        yield from _lease_problems(new)
        yield from self._delivery_shape(new)
        if old is None:
            if new.status is not JobStatus.QUEUED or new.attempts != 0:
                yield f"created as {new.status.value} with {new.attempts} attempts"
            return
        yield from self._status_move(old, new)
        if old.status.is_terminal:
            for name in ("status", "result", "result_ref", "error", "finished_ms"):
                if getattr(old, name) != getattr(new, name):
                    yield f"terminal job changed its {name}: {getattr(old, name)!r} -> {getattr(new, name)!r}"
        # (a claim handed back before the provider was called refunds its attempt)
        refunded = (
            old.status is JobStatus.RUNNING
            and new.status is JobStatus.QUEUED
            and (new.last_write or "").endswith("#release")
            and new.attempts == old.attempts - 1
        )
        if (new.attempts < old.attempts and not refunded) or new.attempts > CONFIG.max_attempts:
            yield f"attempts went {old.attempts} -> {new.attempts} (max {CONFIG.max_attempts})"
        if old.cancel_requested and not new.cancel_requested:
            yield "a recorded cancel request was forgotten"
        yield from self._delivery_move(old, new)

    def _status_move(self, old: JobRecord, new: JobRecord) -> Iterator[str]:
        if old.status is not new.status:
            note(f"transition {old.status.value} -> {new.status.value}")
        if old.status is new.status:
            if (
                new.status is JobStatus.RUNNING
                and old.lease_owner != new.lease_owner
                and new.lease_owner is not None
            ):
                self.lapses[new.id] += 1
                note("a lapsed lease taken over")
                if old.lease_expires_ms is not None and old.lease_expires_ms >= self.clock.now_ms:
                    yield f"{new.lease_owner} took over a live lease of {old.lease_owner}"
            return
        if (
            old.status is JobStatus.RUNNING
            and new.status is JobStatus.QUEUED
            and (new.last_write or "").startswith("recover#")
        ):
            # The reconciler recovered a job whose worker vanished: a lapsed lease, like a takeover.
            self.lapses[new.id] += 1
            note("a lapsed lease recovered")
            if old.lease_expires_ms is not None and old.lease_expires_ms >= self.clock.now_ms:
                yield f"recovered from a live lease of {old.lease_owner}"
        if new.status not in LEGAL_MOVES.get(old.status, set()):
            yield f"illegal transition {old.status.value} -> {new.status.value}"
        elif old.status is JobStatus.QUEUED and new.status is JobStatus.FAILED:
            letters = self.dead_letters.get(new.id, [])
            # "Twice without any claim": two DLQ messages at the current attempt count, the
            # second's message sent after the first letter was handled. Copies of messages in
            # flight together are one round, by when the model saw them sent, not by any tag.
            unclaimed = [letter for letter in letters if letter.attempts == new.attempts]
            code = new.error.code if new.error else None
            two_rounds = any(
                later.sent > first.handled
                for first in unclaimed
                for later in unclaimed
                if later.message_id != first.message_id
            )
            if code is not ErrorCode.WORKER_CRASHED or not two_rounds:
                yield (
                    f"queued -> failed ({code}) without dead letters of two rounds since its last claim "
                    f"(its letters: {letters}; attempts now {new.attempts})"
                )

    def _delivery_shape(self, new: JobRecord) -> Iterator[str]:
        event = new.terminal_event
        wanted = event is not None and new.wants(event)
        if wanted and new.delivery_status is None:
            yield f"{new.status.value} with a subscribed {event} but no delivery record"
        if not wanted and new.delivery_status is not None:
            yield f"{new.status.value} has delivery {new.delivery_status} for an event nobody subscribed"

    def _delivery_move(self, old: JobRecord, new: JobRecord) -> Iterator[str]:
        before, after = old.delivery_status, new.delivery_status
        if before is after:
            return
        if self.redelivering and after is DeliveryStatus.PENDING:
            return
        if after not in DELIVERY_MOVES[before]:
            yield f"delivery went {before} -> {after} without a redelivery request"


def note(what: str) -> None:
    """Count what an example reached (`--hypothesis-show-statistics`); a replayed list of steps
    runs outside hypothesis, where there is nothing to count it in."""
    if currently_in_test_context():
        event(what)


def _lease_problems(job: JobRecord) -> Iterator[str]:
    if job.status is JobStatus.RUNNING and (job.lease_owner is None or job.lease_expires_ms is None):
        yield "running without a lease"
    if job.status is not JobStatus.RUNNING and (
        job.lease_owner is not None or job.lease_expires_ms is not None
    ):
        yield f"{job.status.value} but still leased to {job.lease_owner}"


# ---- the AWS clients the system is given: observed, and meeting the armed faults --------------


class ObservedDynamoDB:
    """The repository's DynamoDB client, telling the observer about every applied write.

    Every update asks for the item as written (the repository ignores an answer it did not
    ask for) and reads it with the repository's own `_from_item`: observing costs no extra
    read, and moto answers slowly, so speed buys examples.
    An armed write is applied and then sent again, as botocore retries a write whose answer
    was lost (DESIGN §3.10): the repository sees only the second answer.
    """

    def __init__(self, inner: Any, repository: ObservedJobRepository) -> None:
        self._inner = inner
        self._repository = repository

    def __getattr__(self, operation: str) -> Any:
        method = getattr(self._inner, operation)
        if operation == "transact_write_items":

            def transact(**kwargs: Any) -> Any:
                fault = self._repository.next_fault(operation)
                if fault == THROTTLED:
                    raise _throttled_transaction(len(kwargs["TransactItems"]))
                if fault == THROTTLED_CALL:
                    raise _throttled(operation)
                if fault == UNANSWERED:
                    self._observed_transaction(method, kwargs)  # applied
                    raise _server_error(operation)  # and every try's answer lost
                if fault == APPLIED_THEN_THROTTLED:
                    self._observed_transaction(method, kwargs)  # applied, its answer lost
                    raise _throttled_transaction(len(kwargs["TransactItems"]))
                if self._repository.answer_lost():
                    self._observed_transaction(method, kwargs)  # applied; its answer never arrives
                return self._observed_transaction(method, kwargs)

            return transact
        if operation not in ("put_item", "update_item"):
            if not callable(method) or operation.startswith(("get_paginator", "can_", "meta")):
                return method

            def call(**kwargs: Any) -> Any:
                fault = self._repository.next_fault(operation)
                if fault in (THROTTLED, THROTTLED_CALL):
                    raise _throttled(operation)
                if fault in (UNANSWERED, APPLIED_THEN_THROTTLED):
                    if operation == "delete_item":
                        method(**kwargs)  # applied
                    raise _server_error(operation)
                return method(**kwargs)

            return call

        def write(**kwargs: Any) -> Any:
            if operation == "update_item":
                kwargs = {"ReturnValues": "ALL_NEW", **kwargs}
            fault = self._repository.next_fault(operation)
            if fault in (THROTTLED, THROTTLED_CALL):
                raise _throttled(operation)
            if fault == UNANSWERED:
                self._observed(method, kwargs)  # applied
                raise _server_error(operation)  # and every try's answer lost
            if fault == APPLIED_THEN_THROTTLED:
                self._observed(method, kwargs)  # applied, its answer lost
                raise _throttled(operation)  # and botocore's next try throttled
            if self._repository.answer_lost():
                self._observed(method, kwargs)  # applied; its answer never arrives
            return self._observed(method, kwargs)

        return write

    def _observed_transaction(self, method: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """A transaction returns no item: the job it wrote is read back (a test-only read)."""
        response = method(**kwargs)  # a refused condition raises: nothing was written
        for entry in kwargs["TransactItems"]:
            ((kind, action),) = entry.items()
            key = action.get("Key") or {"pk": action["Item"]["pk"]}
            if not self._shows(kind, key["pk"]["S"]):
                continue
            item = self._inner.get_item(TableName=action["TableName"], Key=key, ConsistentRead=True)["Item"]
            self._repository.observer.saw_write(_from_item(item), writer())
        return response

    def _shows(self, kind: str, pk: str) -> bool:
        """Whether a transaction's entry (`kind`: Put, Update, ...) wrote a job to read back."""
        return not is_share_key(pk)

    def _observed(self, method: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        response = method(**kwargs)  # a refused condition raises: nothing was written
        written = kwargs["Item"] if "Item" in kwargs else response["Attributes"]
        self._repository.observer.saw_write(_from_item(written), writer())
        return response


class FaultyClient:
    """The system's SQS or S3 client, meeting the faults armed for the coming calls as
    DynamoDB's do: a throttle (the service's own code) applies nothing; an unanswered call is
    applied (each of `applies`, or every call when None), and the caller told it failed."""

    def __init__(
        self,
        inner: Any,
        repository: ObservedJobRepository,
        throttle: tuple[str, int],
        applies: frozenset[str] | None = None,
    ) -> None:
        self._inner = inner
        self._repository = repository
        self._service = inner.meta.service_model.service_name
        self._throttle = throttle
        self._applies = applies

    def __getattr__(self, operation: str) -> Any:
        method = getattr(self._inner, operation)
        if not callable(method) or operation.startswith(("get_paginator", "can_", "generate_presigned")):
            return method

        def call(**kwargs: Any) -> Any:
            fault = self._repository.next_fault(f"{self._service}.{operation}")
            if fault in (THROTTLED, THROTTLED_CALL):
                raise _aws_error(*self._throttle, operation)
            if fault in (UNANSWERED, APPLIED_THEN_THROTTLED):
                if self._applies is None or operation in self._applies:
                    method(**kwargs)  # applied
                raise _server_error(operation)
            return method(**kwargs)

        return call


def _aws_error(code: str, status: int, operation: str, **extra: Any) -> ClientError:
    """An error as botocore raises it once its own tries of the call are spent."""
    response: Any = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
        **extra,
    }
    return ClientError(response, _operation_name(operation))


def _throttled(operation: str) -> ClientError:
    """A throttle: nothing applied."""
    return _aws_error("ProvisionedThroughputExceededException", 400, operation)


def _throttled_transaction(entries: int) -> ClientError:
    """A transaction DynamoDB canceled for a throttle on its items: nothing applied."""
    reasons = [{"Code": "ThrottlingError"}] * entries
    return _aws_error(
        "TransactionCanceledException", 400, "transact_write_items", CancellationReasons=reasons
    )


def _server_error(operation: str) -> ClientError:
    """A 500 after botocore's tries: the first of which the service may have applied."""
    return _aws_error("InternalServerError", 500, operation)


def _operation_name(operation: str) -> str:
    return "".join(part.title() for part in operation.split("_"))


def writer() -> str:
    """The chain of repository methods that made the write, for the failure message."""
    names: list[str] = []
    frame = sys._getframe(2)
    while frame is not None and len(names) < 4:
        if frame.f_code.co_filename.endswith(os.path.join("llmq", "jobs.py")):
            names.append(frame.f_code.co_name)
        frame = frame.f_back  # type: ignore[assignment]
    return " <- ".join(names) or "?"


class ObservedJobRepository(JobRepository):
    """The real repository; its writes are observed, its claims and delivery records counted."""

    def __init__(self, table: str, clock: ModelClock, observer: WriteObserver) -> None:
        super().__init__(table, CONFIG, dynamodb=aws.client("dynamodb"), clock=clock)
        # (under the translation to StoreUnavailable, where botocore's own errors surface)
        self._ddb = aws.TranslatedClient(ObservedDynamoDB(self._ddb._client, self))
        self.observer = observer
        self.claims: dict[str, Claim] = {}
        # Delivery attempts the repository said it recorded since the last redelivery.
        self.recorded_deliveries: Counter[str] = Counter()
        # Writes to let through before one whose answer is lost; None: none armed.
        self.lose_answer_after: int | None = None
        # An AWS fault armed for coming DynamoDB calls: (calls to let through, kind, times).
        self.fault: tuple[int, str, int] | None = None
        self.faults_fired = 0
        # Faults met, by the number of the run that met them (0: any other step's calls).
        self.fired_in: Counter[int] = Counter()

    def next_fault(self, operation: str) -> str | None:
        """The fault the coming call meets, if one is armed and due."""
        if self.fault is None:
            return None
        after, kind, times = self.fault
        if after > 0:
            self.fault = (after - 1, kind, times)
            return None
        self.fault = (0, kind, times - 1) if times > 1 else None
        self.faults_fired += 1
        # (which run met it: a run's tasks inherit its name; None for every other step's calls)
        running = RUNNING.get()
        self.fired_in[running.number if running is not None else 0] += 1
        note(f"aws fault {kind} at {operation}")
        return kind

    def answer_lost(self) -> bool:
        if self.lose_answer_after is None:
            return False
        if self.lose_answer_after > 0:
            self.lose_answer_after -= 1
            return False
        self.lose_answer_after = None
        return True

    def record_delivery(
        self,
        job_id: str,
        status: DeliveryStatus,
        status_code: int | None,
        next_attempt_in_seconds: float | None = None,
        previous_attempts: int | None = None,
        next_attempt_at_ms: int | None = None,
        attempt: DeliveryAttempt | None = None,
        log_seq: int = 0,
        carrier: str | None = None,
        expires_at: int | None = None,
        created_ms: int | None = None,
    ) -> bool:
        before = self.observer.seen.get(job_id)
        try:
            recorded = super().record_delivery(
                job_id,
                status,
                status_code,
                next_attempt_in_seconds,
                previous_attempts=previous_attempts,
                next_attempt_at_ms=next_attempt_at_ms,
                attempt=attempt,
                log_seq=log_seq,
                carrier=carrier,
                expires_at=expires_at,
                created_ms=created_ms,
            )
        except StoreUnavailable:
            if self.observer.seen.get(job_id) is not before:  # applied, its answer lost
                self.recorded_deliveries[job_id] = counted_after(
                    self.recorded_deliveries[job_id], status, attempt
                )
            raise
        if recorded:
            # (as the in-memory store counts: a final answer counts its own attempt once)
            self.recorded_deliveries[job_id] = counted_after(
                self.recorded_deliveries[job_id], status, attempt
            )
        return recorded

    def claim(
        self, job_id: str, owner: str, lease_seconds: float, tenant: tuple[str, str] | None = None
    ) -> Claim:
        claim = super().claim(job_id, owner, lease_seconds, tenant)
        self.claims[owner] = claim
        return claim

    def mark_delivery_pending(
        self, job_id: str, tenant_id: str, *, read: JobRecord | None = None
    ) -> JobRecord:
        self.observer.redelivering = True
        before = self.observer.seen.get(job_id)
        try:
            pending = super().mark_delivery_pending(job_id, tenant_id, read=read)
        except StoreUnavailable:
            if self.observer.seen.get(job_id) is not before:  # applied, its answer lost
                self.recorded_deliveries[job_id] = 0
            raise
        finally:
            self.observer.redelivering = False
        self.recorded_deliveries[job_id] = 0
        return pending


# ---- one moto for a test, emptied for each example ---------------------------------------------


@dataclass
class Environment:
    """What every example shares: one moto, its tables and queues, two tenants."""

    stack: MotoStack
    secrets: dict[str, str]


def reset_stack(stack: MotoStack) -> None:
    """A fresh example: no jobs, no messages."""
    ddb, sqs = aws.client("dynamodb"), aws.client("sqs")
    for page in ddb.get_paginator("scan").paginate(TableName=stack.jobs_table, ProjectionExpression="pk"):
        for item in page.get("Items", []):
            ddb.delete_item(TableName=stack.jobs_table, Key={"pk": item["pk"]})
    for url in [*stack.lane_queue_urls.values(), stack.webhook_queue_url]:
        sqs.purge_queue(QueueUrl=url)
    s3 = aws.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.payload_bucket):
        for found in page.get("Contents", []):
            s3.delete_object(Bucket=stack.payload_bucket, Key=found["Key"])


@pytest.fixture(name="environment")
def lifecycle_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[Environment]:
    """One moto for the whole run; each example empties the table and the queues."""
    from moto import mock_aws

    from llmq_sandbox.moto_fidelity import make_moto_strict

    # Each example purges the queues; AWS allows one purge a minute, and moto enforces it.
    monkeypatch.setenv("MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR", "false")
    # A transaction's own tries pause in real time (the model's clock does not reach them):
    # none here, or a dozen throttled calls would cost the examples seconds.
    monkeypatch.setattr(jobs_module, "_CONFLICT_PAUSE_SECONDS", 0.0)
    # Thousands of steps: keep the warnings, drop the per-job info lines.
    level = logger.log_level
    logger.setLevel(logging.WARNING)
    make_moto_strict()
    with mock_aws():
        aws.reset_clients()
        # Steps peek at queues without deleting; no message should reach a DLQ by being looked at.
        stack = create_llmq_resources(["high", "low"], max_receive_count=1000)
        tenants = TenantRepository(stack.tenants_table, dynamodb=aws.client("dynamodb"))
        secrets = {}
        for name, identity in TENANTS.items():
            created = tenants.create(name, identity.tier, tenant_id=identity.tenant_id)
            secrets[identity.tenant_id] = created.tenant.webhook_secrets[0]
        yield Environment(stack, secrets)
    aws.reset_clients()
    logger.setLevel(level)


# ---- the base of both state machines -------------------------------------------------------------


def faulty_sqs(sqs: Any, repository: ObservedJobRepository) -> FaultyClient:
    """The system's SQS client, meeting the faults armed in `repository`."""
    return FaultyClient(sqs, repository, ("RequestThrottled", 400))


def faulty_payloads(stack: MotoStack, repository: ObservedJobRepository) -> PayloadStore:
    """Payloads on moto's S3 (inputs too large for an item, results parked when their write
    failed for its whole budget), meeting the faults armed in `repository` too."""
    return PayloadStore(
        stack.payload_bucket,
        s3=FaultyClient(
            aws.client("s3"), repository, ("SlowDown", 503), frozenset({"put_object", "delete_object"})
        ),
    )


class LifecycleMachine(RuleBasedStateMachine):
    """One example's clock, loop and runs on a freshly emptied moto; the rules and invariants
    are each model's own. A model sets `jobs`, `observer`, `reconciler` and `runs`, and says
    what a run that ended with an error leaves (`_failed`), what its receiver answers
    (`_receive_webhook`), what is not yet settled (`_unsettled`) and what must hold once the
    system recovers (`_everything_settles`)."""

    jobs: ObservedJobRepository
    observer: WriteObserver
    reconciler: Reconciler
    runs: Sequence[Run]

    def __init__(self, env: Environment) -> None:
        super().__init__()
        self.env = env
        self.stack = env.stack
        self.sqs = aws.client("sqs")
        reset_stack(self.stack)
        self.clock = ModelClock()
        self.loop = ModelLoop(self.clock)

    def _webhook_dispatcher(self, config: LlmqConfig, **extra: Any) -> WebhookDispatcher:
        """The real dispatcher, POSTing to `_receive_webhook` on the model clock."""
        dispatcher = WebhookDispatcher(
            self.jobs,
            TenantRepository(self.stack.tenants_table, dynamodb=aws.client("dynamodb")),
            config,
            "https://api.example.com",
            transport_factory=lambda target: httpx.MockTransport(self._receive_webhook),
            resolver=lambda host, port: [PUBLIC_ADDRESS],
            clock=self.clock,
            rng=lambda: 0.5,
            **extra,
        )
        # (its send-time lookups inline too)
        dispatcher._look_up = inline
        return dispatcher

    @abstractmethod
    def _receive_webhook(self, request: httpx.Request) -> httpx.Response: ...

    # ---- runs ------------------------------------------------------------------------------

    def _launch(self, run: Run, runner: JobRunner) -> None:
        """Start the run's invocation of `runner` and run the loop until it finishes or waits
        (on the provider, a backoff, the clock)."""
        invocation = Invocation(
            owner=run.owner,
            remaining_seconds=lambda: max(0.0, run.started_at + WORKER_SECONDS - self.clock.now),
        )
        before = asyncio.all_tasks(self.loop)
        # (its own threads too, for output writes and job.started sends: inline, as to_thread's)
        runner._output_threads = InlineExecutor()
        runner._cancel_threads = InlineExecutor()
        run.task = self.loop.create_task(self._as_run(run, runner.run(run.body, invocation)))
        self.loop.run_until_idle()
        run.children = asyncio.all_tasks(self.loop) - before - {run.task}

    @staticmethod
    async def _as_run(run: Run, work: Coroutine[Any, Any, None]) -> None:
        """The run's work, with the run named for the provider (its tasks inherit the name)."""
        RUNNING.set(run)
        await work

    def _in_flight(self, pick: int) -> Run:
        runs = [run for run in self.runs if run.waits_on_provider]
        return runs[pick % len(runs)]

    def _end_run(self, pick: int, how: str) -> None:
        """A call held open ends: the provider answers `how`, or (CRASH) the invocation dies."""
        run = self._in_flight(pick)
        if how == CRASH:
            self._crash(run)
            return
        assert run.gate is not None
        run.gate.set_result(how)
        self._settle_loop()

    def _crash(self, run: Run) -> None:
        run.crashed = True
        for task in {run.task, *run.children}:
            if task is not None:
                task.cancel()
        self._settle_loop()

    def _settle_loop(self) -> None:
        self.loop.run_until_idle()
        self._collect()

    def _collect(self) -> None:
        """Runs that ended: their message is acknowledged as the worker's answer would have it."""
        for run in self.runs:
            if run.result is not None or run.task is None or not run.task.done():
                continue
            if run.task.cancelled():
                assert run.crashed, f"{run.owner} was cancelled without a crash"
                run.result = "crashed"
                continue
            error = run.task.exception()
            if error is not None:
                run.result = self._failed(run, error)
                continue
            run.result = "acknowledged"
            if run.receipt is not None:
                self.sqs.delete_message(QueueUrl=run.receipt[0], ReceiptHandle=run.receipt[1])

    @abstractmethod
    def _failed(self, run: Run, error: BaseException) -> str:
        """What a run that ended with `error` leaves (retry, poison, crashed), or raise it."""

    # ---- the end of an example -------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if sys.exc_info()[1] is None:
                self._everything_settles()
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_idle()
            self.loop.close()

    @abstractmethod
    def _everything_settles(self) -> None: ...

    @abstractmethod
    def _unsettled(self) -> list[str]:
        """What has not ended yet, or not been announced."""

    def _recovering(self, rounds: int) -> Iterator[None]:
        """The system recovers: no more faults or lost answers, the invocations holding calls
        open time out, and while anything is unsettled (for `rounds` at most) 400 s pass, the
        loop settles and the reconciler runs; the model's healthy workers and receiver take
        each round from there. Once the rounds end, nothing may be left unsettled."""
        self.jobs.fault = None
        self.jobs.lose_answer_after = None
        for run in [run for run in self.runs if run.in_flight]:
            self._crash(run)
        for _ in range(rounds):
            if not self._unsettled():
                break
            self.clock.now += 400
            self._settle_loop()
            self.reconciler.run()
            yield
        assert not self._unsettled(), f"left behind after the system recovered: {self._unsettled()}"

    def _reconcile(self) -> None:
        """The scheduled reconciler runs (and may stop on an AWS fault, to run again later)."""
        try:
            self.reconciler.run()
        except StoreUnavailable:
            note("a reconciler run cut short")

    # ---- looks at the queues (visible messages, left visible) --------------------------------

    def _peek(self, url: str) -> list[dict[str, Any]]:
        """Up to ten messages of a queue, left visible: a step picks the one it handles."""
        response = self.sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, MessageAttributeNames=["All"]
        )
        return list(response.get("Messages", []))

    @staticmethod
    def _webhook(message: dict[str, Any]) -> WebhookMessage:
        """A received webhooks message as the dispatcher's handler reads it: its body, and its
        round from its message attribute."""
        webhook = WebhookMessage.model_validate_json(message["Body"])
        return webhook.model_copy(
            update={"delivery_round": delivery_round_of(message.get("MessageAttributes"))}
        )

    def _lane_messages(self) -> list[tuple[str, dict[str, Any]]]:
        return [(url, message) for url in self.stack.lane_queue_urls.values() for message in self._peek(url)]


Machine = TypeVar("Machine", bound=LifecycleMachine)


@contextmanager
def driven(state: Machine) -> Iterator[Machine]:
    """A model to drive by hand, step by step, as hypothesis prints a failing example; torn
    down (settled and checked, unless the block failed) at the end."""
    try:
        yield state
    finally:
        state.teardown()
