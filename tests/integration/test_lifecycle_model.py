"""The job lifecycle as a model, checked after every step of random interleavings (issue #10).

A hypothesis state machine drives the real intake, job and queue repositories, runner,
reconciler, dead-letter function and webhook dispatcher on moto. The test owns the clock, the
provider and the webhook receiver, so every interleaving is deterministic and replayable:

- the clock is a number the steps move; the repositories, the dispatcher and the event loop
  all read it, so a worker's cancel check fires only when a step lets time pass;
- `asyncio.to_thread` runs inline (the loop's default executor), so no thread races a step;
- a run may stop inside the provider call, and any other step may happen before it answers:
  a cancel, another worker's claim after the lease lapsed, a reconciler pass, a dead letter.

Every write DynamoDB applies is checked as it lands (DESIGN §2 transitions, §3 invariants),
and after every step the jobs are checked against the model: leases, provider calls, webhook
deliveries. A step may arm a lost answer: DynamoDB applies a write, its answer is lost, and
botocore sends it again (§3.10); or an AWS fault for the coming DynamoDB, SQS or S3 calls, as
the caller finally sees it: a throttle (nothing applied; a transaction canceled as throttled, or
refused as a call), a 500 for a call applied on a try whose answer was lost, or a transaction
applied on such a try and canceled as throttled on the next. Payloads live on moto's S3, so a
result whose write failed for its whole budget is parked there. A run that meets one may wait out a backoff, so
a run in flight is not always at the provider; each run is an invocation of its own, with a
runner of its own. When an example ends without a failure, time passes and
healthy workers, reconciler and receiver run until nothing is left: no job hangs, no
subscribed terminal event stays undelivered, and the table holds what the model saw written.

A failing example prints as a list of `state.<rule>(...)` calls; `replayed` below runs such
a list as a plain test, and the examples found so far are kept that way at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from random import Random
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from standardwebhooks.webhooks import Webhook

from llmq import aws
from llmq import jobs as jobs_module
from llmq.config import LlmqConfig
from llmq.errors import (
    IdempotencyConflict,
    JobNotCancelable,
    JobNotTerminal,
    NoWebhook,
    StoreUnavailable,
)
from llmq.execution import Invocation, JobRunner, mark_dead_letter
from llmq.intake import JobIntake
from llmq.job_codec import from_item as _from_item
from llmq.job_record import JobRecord
from llmq.jobs import JobRepository
from llmq.models import (
    DeliveryAttempt,
    DeliveryStatus,
    ErrorCode,
    JobRequest,
    JobResult,
    JobStatus,
    LaneMessage,
    Usage,
    WebhookEvent,
    WebhookMessage,
)
from llmq.offload import Offload
from llmq.payloads import PayloadStore
from llmq.policy import Claim, ClaimOutcome
from llmq.providers import (
    GenerationRequest,
    PermanentProviderError,
    ProviderTimeout,
    TransientProviderError,
)
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository, is_share_key
from llmq.sqs_edge import PoisonMessage, RetryLater
from llmq.telemetry import logger
from llmq.tenants import TenantIdentity, TenantRepository
from llmq.webhooks import OutcomeKind, WebhookDispatcher, webhook_id
from tests.conftest import MotoStack, create_llmq_resources
from tests.support.stores import counted_after

# 120 under `make test` (about a minute); `make fuzz` runs 2,000.
EXAMPLES = int(os.environ.get("LLMQ_MODEL_EXAMPLES", "120"))
STEPS = 10
MAX_JOBS = 4
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
# A call held open is what lets other steps interleave with a run, so it comes up often.
BEHAVIOURS = st.sampled_from([SUSPEND, SUCCEED, SUSPEND, TRANSIENT, PERMANENT, TIMEOUT])

PROMPTS = ["Summarise the quarterly report", "Translate the memo into French"]
WEBHOOKS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "terminal": {"url": HOOK_URL},
    # Only two terminal events: a failed or expired job of this kind announces nothing.
    "started": {"url": HOOK_URL, "events": ["job.started", "job.succeeded", "job.canceled"]},
}
# Mostly none: a job past its deadline only expires, and the rest of the example is lost on it.
DEADLINES = [None, None, None, 30, 300]
KEYS = [None, "key-a", "key-b"]
SUBMISSIONS = st.tuples(
    st.sampled_from(sorted(TENANTS)),
    st.integers(0, len(PROMPTS) - 1),
    st.sampled_from(sorted(WEBHOOKS)),
    st.sampled_from(DEADLINES),
    st.sampled_from(KEYS),
)

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


async def _inline(call: Callable[[], Any]) -> Any:
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
_RUNNING: ContextVar[Run | None] = ContextVar("lifecycle_model_run", default=None)


class ScriptedProvider:
    """The provider interface the runner uses, answering as the step that started the run says."""

    def __init__(self, observer: WriteObserver) -> None:
        # Every write is observed, so the observer's copy is the stored job at this moment.
        self.observer = observer
        self.calls: list[ProviderCall] = []

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        run = _RUNNING.get()
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
        # message was sent and when the letter was handled (`LifecycleModel.ticks`).
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
            _note(f"transition {old.status.value} -> {new.status.value}")
        if old.status is new.status:
            if (
                new.status is JobStatus.RUNNING
                and old.lease_owner != new.lease_owner
                and new.lease_owner is not None
            ):
                self.lapses[new.id] += 1
                _note("a lapsed lease taken over")
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
            _note("a lapsed lease recovered")
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


def _note(what: str) -> None:
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


class _ObservedDynamoDB:
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
            (action,) = entry.values()
            key = action.get("Key") or {"pk": action["Item"]["pk"]}
            if is_share_key(key["pk"]["S"]):
                continue
            item = self._inner.get_item(TableName=action["TableName"], Key=key, ConsistentRead=True)["Item"]
            self._repository.observer.saw_write(_from_item(item), _writer())
        return response

    def _observed(self, method: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        response = method(**kwargs)  # a refused condition raises: nothing was written
        written = kwargs["Item"] if "Item" in kwargs else response["Attributes"]
        self._repository.observer.saw_write(_from_item(written), _writer())
        return response


class _FaultyClient:
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
    response: Any = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError({**response, **extra}, _operation_name(operation))


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


def _writer() -> str:
    """The chain of repository methods that made the write, for the failure message."""
    names = []
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
        self._ddb = aws.TranslatedClient(_ObservedDynamoDB(self._ddb._client, self))
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
        running = _RUNNING.get()
        self.fired_in[running.number if running is not None else 0] += 1
        _note(f"aws fault {kind} at {operation}")
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


# ---- the model ---------------------------------------------------------------------------------


@dataclass
class ModelJob:
    id: str
    tenant: TenantIdentity
    lane: str
    body: tuple[Any, ...]


@dataclass
class Environment:
    """What every example shares: one moto, its tables and queues, two tenants."""

    stack: MotoStack
    secrets: dict[str, str]


class LifecycleModel(RuleBasedStateMachine):
    """One example: an empty table and queues, a clock at START_EPOCH, up to MAX_JOBS jobs."""

    def __init__(self, env: Environment) -> None:
        super().__init__()
        self.env = env
        self.stack = env.stack
        self.sqs = aws.client("sqs")
        _reset(self.stack)
        self.clock = ModelClock()
        self.loop = ModelLoop(self.clock)
        self.observer = WriteObserver(self.clock)
        self.jobs = ObservedJobRepository(self.stack.jobs_table, self.clock, self.observer)
        # The system's sends meet the armed faults too; the model's own looks at the queues do not.
        self.queues = QueueRepository(
            self.stack.lane_queue_urls,
            self.stack.webhook_queue_url,
            sqs=_FaultyClient(self.sqs, self.jobs, ("RequestThrottled", 400)),
        )
        self.looks = QueueRepository(self.stack.lane_queue_urls, self.stack.webhook_queue_url, sqs=self.sqs)
        self.provider = ScriptedProvider(self.observer)
        # Payloads on moto's S3 (inputs too large for an item, results parked when their write
        # failed for its whole budget), meeting the armed faults too.
        self.payloads = PayloadStore(
            self.stack.payload_bucket,
            s3=_FaultyClient(
                aws.client("s3"), self.jobs, ("SlowDown", 503), frozenset({"put_object", "delete_object"})
            ),
        )
        self.offload = Offload(self.payloads, CONFIG)
        self.intake = JobIntake(
            self.jobs, self.queues, CONFIG, check_webhook_url=lambda url: None, payloads=self.payloads
        )
        self.reconciler = Reconciler(self.jobs, self.queues, CONFIG, offload=self.offload)
        self.receiver_status = 200
        self.posts: list[httpx.Request] = []
        self.dispatcher = WebhookDispatcher(
            self.jobs,
            TenantRepository(self.stack.tenants_table, dynamodb=aws.client("dynamodb")),
            CONFIG,
            "https://api.example.com",
            transport_factory=lambda target: httpx.MockTransport(self._receive_webhook),
            resolver=lambda host, port: [PUBLIC_ADDRESS],
            clock=self.clock,
            rng=lambda: 0.5,
        )
        # (its send-time lookups inline too)
        self.dispatcher._look_up = _inline
        self.model_jobs: list[ModelJob] = []
        self.keys: dict[tuple[str, str], ModelJob] = {}
        self.runs: list[Run] = []
        # Every DLQ record handled so far: (body, message id, when its message was sent).
        self.letters: list[tuple[str, str, int]] = []
        # The order of events a letter's round depends on: each lane message the system sends
        # and each letter handled takes the next tick. Every lane message sent: (body, tick).
        self.ticks = itertools.count()
        self.sent: dict[str, tuple[str, int]] = {}
        for event_name, hook in (
            ("provide-client-params.sqs.SendMessage", _remember_the_body),
            ("after-call.sqs.SendMessage", self._saw_sent),
        ):
            self.sqs.meta.events.unregister(event_name, unique_id=f"lifecycle-model-{event_name}")
            self.sqs.meta.events.register(event_name, hook, unique_id=f"lifecycle-model-{event_name}")

    # ---- steps ----------------------------------------------------------------------------

    @initialize(jobs=st.lists(SUBMISSIONS, min_size=1, max_size=3))
    def first_jobs(self, jobs: list[tuple[str, int, str, int | None, str | None]]) -> None:
        for submission in jobs:
            self.submit(*submission)

    @precondition(lambda self: len(self.model_jobs) < MAX_JOBS)
    @rule(
        tenant=st.sampled_from(sorted(TENANTS)),
        prompt=st.integers(0, len(PROMPTS) - 1),
        webhook=st.sampled_from(sorted(WEBHOOKS)),
        deadline=st.sampled_from(DEADLINES),
        key=st.sampled_from(KEYS),
    )
    def submit(self, tenant: str, prompt: int, webhook: str, deadline: int | None, key: str | None) -> None:
        """Given an Idempotency-Key used before, a replay of the same body returns the original job
        and enqueues nothing, and a different body is refused; otherwise a new job is queued."""
        body = (prompt, webhook, deadline)
        request = JobRequest.model_validate(
            {"prompt": PROMPTS[prompt], "webhook": WEBHOOKS[webhook], "deadline_seconds": deadline}
        )
        earlier = self.keys.get((tenant, key)) if key else None
        depth = self._lane_depths() if earlier else None
        known = set(self.observer.seen)
        try:
            submission = self.intake.submit(TENANTS[tenant], request, key)
        except IdempotencyConflict:
            assert earlier is not None and earlier.body != body, "a first use of a key was refused"
            return
        except StoreUnavailable:
            # The client was told 503. A job the write made anyway is the system's to end; its
            # key replays it.
            _note("a submit answered 503")
            for job_id in set(self.observer.seen) - known:
                job = ModelJob(job_id, TENANTS[tenant], self.observer.seen[job_id].lane, body)
                self.model_jobs.append(job)
                if key:
                    self.keys[(tenant, key)] = job
            return
        if earlier is not None:
            assert earlier.body == body, "the same key with a different body was accepted"
            assert submission.replayed and submission.job.id == earlier.id
            assert submission.job == self.observer.seen[earlier.id], "a replay returned another state"
            assert self._lane_depths() == depth, "a replay enqueued a message"
            return
        assert not submission.replayed
        job = ModelJob(submission.job.id, TENANTS[tenant], submission.job.lane, body)
        assert self.observer.seen[job.id].status is JobStatus.QUEUED
        self.model_jobs.append(job)
        if key:
            self.keys[(tenant, key)] = job

    @rule(
        worker=st.integers(0, 2),
        # Mostly real messages; now and then one naming no job.
        source=st.sampled_from(["queue", "queue", "queue", "unknown"]),
        pick=st.integers(0, 9),
        behaviour=BEHAVIOURS,
    )
    def run_message(self, worker: int, source: str, pick: int, behaviour: str) -> None:
        """A worker runs a message from a lane queue (or one naming no job). The provider answers
        as told, or holds the call open until `end_run`."""
        receipt = None
        if source == "queue":
            picked = self._pick_lane_message(pick)
            if picked is None:
                return
            url, message = picked
            body, receipt = message["Body"], (url, message["ReceiptHandle"])
        else:
            body = LaneMessage(job_id="job_never_submitted", lane="high").model_dump_json()
        run = self._start(worker, body, behaviour, receipt)
        if source == "unknown" and not run.met_a_fault:
            assert run.result == "poison", "a message naming no job was not refused as poison"

    @rule(worker=st.integers(0, 2), pick=st.integers(0, 9), behaviour=BEHAVIOURS)
    def run_duplicate(self, worker: int, pick: int, behaviour: str) -> None:
        """SQS delivers at least once: a worker runs another copy of a job's lane message."""
        job = self._job(pick)
        self._start(worker, LaneMessage(job_id=job.id, lane=job.lane).model_dump_json(), behaviour, None)

    @precondition(lambda self: any(run.waits_on_provider for run in self.runs))
    @rule(pick=st.integers(0, 9), how=st.sampled_from([*ANSWERS, CRASH]))
    def end_run(self, pick: int, how: str) -> None:
        """A call held open ends: the provider answers, or the worker's Lambda dies and writes
        nothing more."""
        run = self._in_flight(pick)
        if how == CRASH:
            self._crash(run)
            return
        assert run.gate is not None
        run.gate.set_result(how)
        self._settle_loop()

    @precondition(lambda self: any(run.waits_on_provider for run in self.runs))
    @rule(pick=st.integers(0, 9), worker=st.integers(0, 2), behaviour=BEHAVIOURS)
    def stall_past_lease(self, pick: int, worker: int, behaviour: str) -> None:
        """A worker holding a call open stalls past its lease (a frozen Lambda, a slow network)
        and SQS hands a copy of its message to another worker."""
        run = self._in_flight(pick)
        assert run.lease_expires_ms is not None, "a run waits on the provider without a claim"
        self.clock.now = max(self.clock.now, run.lease_expires_ms / 1000 + 1)
        self._settle_loop()
        self._start(worker, run.body, behaviour, None)

    @rule(seconds=st.sampled_from([5, 95, 30, 200, 1, 61]))
    def advance_clock(self, seconds: int) -> None:
        """Time passes: leases lapse, backoffs end, deadlines pass, running workers check for a cancel."""
        self.clock.now += seconds
        self._settle_loop()

    @rule(pick=st.integers(0, 9))
    def cancel(self, pick: int) -> None:
        """The client cancels: a queued job is canceled at once, a running one is asked to stop,
        a finished one answers 409."""
        job = self._job(pick)
        before = self.observer.seen[job.id]
        try:
            after = self.intake.cancel(job.tenant, job.id)
        except StoreUnavailable:
            _note("a cancel answered 503")
            return
        except JobNotCancelable:
            assert before.status.is_terminal, f"a {before.status.value} job refused to cancel"
            return
        assert not before.status.is_terminal, f"a {before.status.value} job accepted a cancel"
        if before.status is JobStatus.QUEUED:
            assert after.status is JobStatus.CANCELED
        else:
            assert after.status is JobStatus.RUNNING and after.cancel_requested

    @rule()
    def reconcile(self) -> None:
        """The scheduled reconciler runs (and may stop on an AWS fault, to run again later)."""
        try:
            self.reconciler.run()
        except StoreUnavailable:
            _note("a reconciler run cut short")

    @rule(source=st.sampled_from(["queue", "copy", "job", "again", "garbage"]), pick=st.integers(0, 9))
    def dead_letter(self, source: str, pick: int) -> None:
        """A lane message exhausted its receives and the dead-letter function handles it: one
        taken from a lane queue, a duplicate of any lane message ever sent (SQS delivers at
        least once, and a copy may outlive the original), a copy naming a job as its first
        message did, a DLQ record handled again, or a body that is not a lane message."""
        sent = -1  # a copy of the job's first message: sent before anything the model saw
        if source == "queue":
            picked = self._pick_lane_message(pick)
            if picked is None:
                return
            url, message = picked
            self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            body, message_id = message["Body"], message["MessageId"]
            sent = self.sent.get(message_id, ("", -1))[1]
        elif source == "copy":
            if not self.sent:
                return
            body, sent = list(self.sent.values())[pick % len(self.sent)]
            message_id = f"dlq-copy-{len(self.letters) + 1}"
        elif source == "job":
            job = self._job(pick)
            body = LaneMessage(job_id=job.id, lane=job.lane).model_dump_json()
            message_id = f"dlq-copy-{len(self.letters) + 1}"
        elif source == "again":
            if not self.letters:
                return
            body, message_id, sent = self.letters[pick % len(self.letters)]
        else:
            body, message_id = "{not a lane message", "dlq-garbage"
        self.letters.append((body, message_id, sent))
        job_id = _job_id_of(body)
        before = self.observer.seen.get(job_id or "")
        if before is not None and before.status is JobStatus.QUEUED:
            letter = Letter(message_id, before.attempts, sent, handled=next(self.ticks))
            self.observer.dead_letters.setdefault(before.id, []).append(letter)
        names_a_job = before is not None
        try:
            mark_dead_letter(self.jobs, self.queues, body, message_id, offload=self.offload, config=CONFIG)
        except (StoreUnavailable, RetryLater):
            _note("a dead letter left for another try")
            return  # (the record stays in the DLQ: `again` handles it later)
        except PoisonMessage:
            assert not names_a_job, "a dead letter naming a real job was called poison"
            return
        assert names_a_job, "a dead letter naming no job was not kept for a human"

    @rule(pick=st.integers(0, 9))
    def redeliver(self, pick: int) -> None:
        """The client asks for the terminal event again: only a finished, subscribed job may."""
        job = self._job(pick)
        before = self.observer.seen[job.id]
        try:
            after = self.intake.redeliver(job.tenant, job.id)
        except StoreUnavailable:
            return
        except JobNotTerminal:
            assert not before.status.is_terminal
            return
        except NoWebhook:
            event = before.terminal_event
            assert event is not None and not before.wants(event)
            return
        assert after.delivery_status is DeliveryStatus.PENDING and after.delivery_attempts == 0

    @rule(
        pick=st.integers(0, 9),
        status=st.sampled_from([DeliveryStatus.DELIVERED, DeliveryStatus.PENDING, DeliveryStatus.FAILED]),
    )
    def late_delivery_outcome(self, pick: int, status: DeliveryStatus) -> None:
        """A duplicate or late dispatcher records an outcome: only a pending delivery moves,
        and a late success may still turn `failed` into `delivered`."""
        job = self._job(pick)
        before = self.observer.seen[job.id].delivery_status
        code = 200 if status is DeliveryStatus.DELIVERED else 503
        try:
            applied = self.jobs.record_delivery(
                job.id, status, code, 1.0 if status is DeliveryStatus.PENDING else None
            )
        except StoreUnavailable:
            return
        expected = before is DeliveryStatus.PENDING or (
            before is DeliveryStatus.FAILED and status is DeliveryStatus.DELIVERED
        )
        assert applied == expected, f"record_delivery({status}) on a {before} delivery answered {applied}"

    @rule(pick=st.integers(0, 9), status=st.sampled_from([200, 500, 410, 429]), attempt=st.integers(1, 4))
    def dispatch_webhook(self, pick: int, status: int, attempt: int) -> None:
        """The dispatcher takes a webhook message; the receiver answers `status`."""
        messages = self._peek(self.stack.webhook_queue_url)
        if not messages:
            return
        message = messages[pick % len(messages)]
        webhook = WebhookMessage.model_validate_json(message["Body"])
        outcome = self._dispatch(webhook, status, attempt)
        if outcome is not None and outcome.kind is not OutcomeKind.RETRY:
            self.sqs.delete_message(
                QueueUrl=self.stack.webhook_queue_url, ReceiptHandle=message["ReceiptHandle"]
            )

    @rule(after=st.integers(0, 3))
    def lose_a_write_answer(self, after: int) -> None:
        """DynamoDB applies a coming write (the one after `after` others) but its answer is lost,
        and botocore sends it again: the writer must carry on as if it had succeeded."""
        self.jobs.lose_answer_after = after

    # Up to a dozen calls: enough to outlast a transaction's own tries (`jobs._transact`) and
    # reach the worker's write-back budget, its parking in S3 and the reconciler's recovery.
    @rule(after=st.integers(0, 6), kind=st.sampled_from(FAULTS), times=st.integers(1, 12))
    def aws_fault(self, after: int, kind: str, times: int) -> None:
        """DynamoDB, SQS or S3 throttles `times` coming calls (the ones after `after` others),
        or applies each and loses every try's answer: botocore gives up and the caller gets
        the error (DESIGN §3.10). Whatever meets it must leave a state the system recovers from."""
        self.jobs.fault = (after, kind, times)

    # ---- what must hold after every step -----------------------------------------------------

    @invariant()
    def lifecycle_holds(self) -> None:
        assert not self.observer.violations, "\n".join(self.observer.violations)
        now_ms = self.clock.now_ms
        for run in self.runs:
            expires = run.lease_expires_ms
            # (a run whose own write is the job's last, applied but unanswered, acts on no lease
            # while it waits to write it again)
            stored = self.observer.seen.get(run.job_id or "")
            own_last = stored is not None and (stored.last_write or "").startswith(f"{run.owner}#")
            if (
                run.in_flight
                and not own_last
                and expires is not None
                and expires >= now_ms
                and run.job_id is not None
            ):
                holder = self.observer.seen[run.job_id]
                assert holder.status is JobStatus.RUNNING and holder.lease_owner == run.owner, (
                    f"{run.owner} believes it holds a live lease on {run.job_id}, "
                    f"but the job is {holder.status.value} leased to {holder.lease_owner}"
                )
        for call in self.provider.calls:
            assert not call.cancel_recorded, f"the provider was called for {call.job_id} after its cancel"
        self._shares_hold()
        for job in self.model_jobs:
            stored = self.observer.seen[job.id]
            self._check_spend(stored)
            recorded = self.jobs.recorded_deliveries[job.id]
            assert stored.delivery_attempts == recorded, (
                f"{job.id} shows {stored.delivery_attempts} delivery attempts; {recorded} were recorded"
            )

    def _check_spend(self, job: JobRecord) -> None:
        calls = [call for call in self.provider.calls if call.job_id == job.id]
        assert len(calls) <= job.attempts, (
            f"{len(calls)} provider calls for {job.attempts} claims of {job.id}"
        )
        if job.status is not JobStatus.SUCCEEDED:
            return
        outputs = {call.output for call in calls if call.answer == SUCCEED}
        assert job.result is not None and job.result.output in outputs, "succeeded with no answer to show"
        retried = sum(1 for call in calls if call.answer == TRANSIENT)
        lapses = self.observer.lapses[job.id]
        assert len(calls) <= 1 + retried + lapses, (
            f"{job.id} succeeded after {len(calls)} provider calls, "
            f"with {retried} transient failures and {lapses} lapsed leases"
        )

    def teardown(self) -> None:
        try:
            if sys.exc_info()[1] is None:
                self._everything_settles()
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_idle()
            self.loop.close()

    def _everything_settles(self) -> None:
        """Then, once workers, reconciler and receiver are healthy and time passes, every job
        ends terminal and every subscribed terminal event is delivered (DESIGN §3.6)."""
        self.jobs.fault = None
        self.jobs.lose_answer_after = None
        for run in [run for run in self.runs if run.in_flight]:
            self._crash(run)  # the Lambdas that held calls open time out
        for _ in range(8):
            if not self._unsettled():
                break
            self.clock.now += 400
            self._settle_loop()
            self.reconciler.run()
            for url, message in self._lane_messages():
                self._start(0, message["Body"], SUCCEED, (url, message["ReceiptHandle"]))
            for message in self._peek(self.stack.webhook_queue_url):
                webhook = WebhookMessage.model_validate_json(message["Body"])
                outcome = self._dispatch(webhook, 200, 1)
                if outcome is not None and outcome.kind is not OutcomeKind.RETRY:
                    self.sqs.delete_message(
                        QueueUrl=self.stack.webhook_queue_url, ReceiptHandle=message["ReceiptHandle"]
                    )
            self.lifecycle_holds()
        assert not self._unsettled(), f"left behind after the system recovered: {self._unsettled()}"
        assert self._stored() == self.observer.seen, "a job changed without an observed write"

    def _stored(self) -> dict[str, JobRecord]:
        ddb = aws.client("dynamodb")
        items = ddb.scan(TableName=self.stack.jobs_table, ConsistentRead=True).get("Items", [])
        jobs = [item for item in items if not is_share_key(item["pk"]["S"])]
        return {record.id: record for record in map(_from_item, jobs)}

    def _shares_hold(self) -> None:
        """DESIGN §3.11: each tenant's share counts exactly its queued and running jobs, and its
        slots are held by exactly its running jobs, whatever crashed or was sent twice."""
        shares = ShareRepository(self.stack.jobs_table, dynamodb=aws.client("dynamodb"))
        for identity in {job.tenant for job in self.model_jobs}:
            mine = [self.observer.seen[job.id] for job in self.model_jobs if job.tenant == identity]
            state = shares.get(identity.tenant_id)
            active = sum(1 for job in mine if not job.status.is_terminal)
            running = {job.id for job in mine if job.status is JobStatus.RUNNING}
            held = {job_id for jobs in state.holders.values() for job_id in jobs}
            assert state.active == active, (
                f"{identity.tenant_id}: share counts {state.active} active, {active} are"
            )
            assert held == running, (
                f"{identity.tenant_id}: slots held by {sorted(held)}, running {sorted(running)}"
            )

    def _unsettled(self) -> list[str]:
        left = []
        for job in self.model_jobs:
            stored = self.observer.seen[job.id]
            if not stored.status.is_terminal:
                left.append(f"{job.id} still {stored.status.value}")
            elif stored.delivery_status is DeliveryStatus.PENDING:
                left.append(f"{job.id} {stored.status.value} with its webhook still pending")
        return left

    # ---- helpers --------------------------------------------------------------------------

    def _job(self, pick: int) -> ModelJob:
        return self.model_jobs[pick % len(self.model_jobs)]

    def _in_flight(self, pick: int) -> Run:
        runs = [run for run in self.runs if run.waits_on_provider]
        return runs[pick % len(runs)]

    def _start(self, worker: int, body: str, behaviour: str, receipt: tuple[str, str] | None) -> Run:
        number = len(self.runs) + 1
        job_id = _job_id_of(body)
        run = Run(number, f"worker-{worker}/run-{number}", body, job_id, behaviour, self.clock.now, receipt)
        self.runs.append(run)
        invocation = Invocation(
            owner=run.owner,
            remaining_seconds=lambda: max(0.0, run.started_at + WORKER_SECONDS - self.clock.now),
        )
        before = asyncio.all_tasks(self.loop)
        faults = self.jobs.fired_in[run.number]
        # Each run is a worker invocation of its own: a runner of its own (a run that waits out
        # a throttle is no sibling of the next run's message).
        runner = JobRunner(  # type: ignore[arg-type]
            self.jobs, self.queues, self.provider, CONFIG, rng=Random(7), payloads=self.payloads
        )
        # (its own threads too, for output writes and job.started sends: inline, as to_thread's)
        runner._output_threads = InlineExecutor()
        runner._cancel_threads = InlineExecutor()
        run.task = self.loop.create_task(self._as_run(run, runner.run(body, invocation)))
        self.loop.run_until_idle()
        run.claim = self.jobs.claims.get(run.owner)
        _note(f"claim {run.claim.outcome.value if run.claim else 'not attempted'}")
        run.children = asyncio.all_tasks(self.loop) - before - {run.task}
        run.met_a_fault = self.jobs.fired_in[run.number] != faults
        if run.in_flight and not run.waits_on_provider and not run.met_a_fault:
            raise AssertionError(f"{run.owner} neither finished nor waits on the provider")
        self._collect()
        return run

    @staticmethod
    async def _as_run(run: Run, work: Coroutine[Any, Any, None]) -> None:
        """The run's work, with the run named for the provider (its tasks inherit the name)."""
        _RUNNING.set(run)
        await work

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
        """Runs that ended: acknowledge their message as the worker's batch response would."""
        for run in self.runs:
            if run.result is not None or run.task is None or not run.task.done():
                continue
            if run.task.cancelled():
                assert run.crashed, f"{run.owner} was cancelled without a crash"
                run.result = "crashed"
                continue
            error = run.task.exception()
            if isinstance(error, RetryLater):
                run.result = "retry"
            elif isinstance(error, StoreUnavailable):
                run.result = "retry"  # a record that failed: SQS shows it again
            elif isinstance(error, PoisonMessage):
                run.result = "poison"
                assert run.job_id not in self.observer.seen, (
                    f"a message for the existing job {run.job_id} was called poison"
                )
            elif error is not None:
                raise error
            else:
                run.result = "acknowledged"
                if run.receipt is not None:
                    self.sqs.delete_message(QueueUrl=run.receipt[0], ReceiptHandle=run.receipt[1])

    def _dispatch(self, message: WebhookMessage, status: int, attempt: int) -> Any | None:
        before = self.observer.seen.get(message.job_id)
        sent = len(self.posts)
        faults = self.jobs.fired_in[0]
        self.receiver_status = status
        task = self.loop.create_task(self.dispatcher.deliver(message, attempt))
        self.loop.run_until_idle()
        assert task.done(), "a webhook delivery never finished"
        if isinstance(task.exception(), StoreUnavailable):
            _note("a webhook delivery failed its record")
            return None  # (a record that failed: SQS shows the message again)
        outcome = task.result()
        _note(f"webhook {outcome.kind.value}")
        terminal = message.event is not WebhookEvent.STARTED
        if self.jobs.fired_in[0] != faults:
            return outcome  # (what a faulted read or write decided is checked by the invariants)
        if terminal and before is not None:
            due = before.delivery_status is DeliveryStatus.PENDING and before.terminal_event is message.event
            if due and before.webhook_gone:
                # 410 Gone to its job.started: nothing more is POSTed, the delivery is disabled.
                assert len(self.posts) == sent, f"{message.event} POSTed after the receiver answered 410"
                assert self.observer.seen[message.job_id].delivery_status is DeliveryStatus.DISABLED
                return outcome
            assert (len(self.posts) > sent) == due, (
                f"{message.event} for a {before.status.value} job with delivery {before.delivery_status}: "
                f"{'sent' if len(self.posts) > sent else 'not sent'}"
            )
            if due:
                expected = _recorded_delivery(status, attempt)
                assert self.observer.seen[message.job_id].delivery_status is expected
        return outcome

    def _receive_webhook(self, request: httpx.Request) -> httpx.Response:
        """The integrator's receiver: it checks the signature, then answers as the step says.

        The reference library signs what it expects; its `verify` would also hold the timestamp
        to the wall clock, which the model clock is not.
        """
        self.posts.append(request)
        payload = json.loads(request.content)
        tenant = next(job.tenant for job in self.model_jobs if job.id == payload["data"]["id"])
        msg_id, timestamp = request.headers["webhook-id"], request.headers["webhook-timestamp"]
        assert msg_id == webhook_id(payload["data"]["id"], payload["type"])
        assert int(timestamp) == int(self.clock.now), "an attempt was not signed afresh"
        expected = Webhook(self.env.secrets[tenant.tenant_id]).sign(
            msg_id, datetime.fromtimestamp(int(timestamp), UTC), request.content.decode()
        )
        assert expected in request.headers["webhook-signature"].split(" "), "the signature does not verify"
        headers = {"retry-after": "1"} if self.receiver_status in (429, 503) else {}
        return httpx.Response(self.receiver_status, headers=headers)

    def _peek(self, url: str) -> list[dict[str, Any]]:
        """Up to ten messages of a queue, left visible: a step picks the one it handles."""
        response = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        return list(response.get("Messages", []))

    def _saw_sent(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if (
            context.get("lifecycle_model_queue") in self.stack.lane_queue_urls.values()
            and "MessageId" in parsed
        ):
            self.sent[parsed["MessageId"]] = (context["lifecycle_model_body"], next(self.ticks))

    def _lane_messages(self) -> list[tuple[str, dict[str, Any]]]:
        return [(url, message) for url in self.stack.lane_queue_urls.values() for message in self._peek(url)]

    def _pick_lane_message(self, pick: int) -> tuple[str, dict[str, Any]] | None:
        messages = self._lane_messages()
        return messages[pick % len(messages)] if messages else None

    def _lane_depths(self) -> dict[str, int]:
        return {lane: self.looks.lane_depth(lane) for lane in self.stack.lane_queue_urls}


def _recorded_delivery(status: int, attempt: int) -> DeliveryStatus:
    if 200 <= status < 300:
        return DeliveryStatus.DELIVERED
    if status == 410:
        return DeliveryStatus.DISABLED
    exhausted = attempt > len(CONFIG.webhooks.schedule_seconds)
    return DeliveryStatus.FAILED if exhausted else DeliveryStatus.PENDING


@dataclass(frozen=True)
class Letter:
    """A DLQ record handled for a queued job (`WriteObserver.dead_letters`)."""

    message_id: str
    attempts: int
    sent: int
    handled: int


def _remember_the_body(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """What a SendMessage carries, for its answer's hook (`LifecycleModel._saw_sent`)."""
    context["lifecycle_model_queue"] = params.get("QueueUrl")
    context["lifecycle_model_body"] = params.get("MessageBody")


def _job_id_of(body: str) -> str | None:
    try:
        return LaneMessage.model_validate_json(body).job_id
    except ValueError:
        return None


def _reset(stack: MotoStack) -> None:
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


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[Environment]:
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


@pytest.mark.timeout(120 + 2 * EXAMPLES)
def test_every_interleaving_keeps_the_lifecycle_invariants(environment: Environment) -> None:
    """Given jobs submitted, run, retried, canceled, taken over, dead-lettered, reconciled and
    announced in any order, when each step lands, then DESIGN §2 and §3 hold for every job."""
    run_state_machine_as_test(
        lambda: LifecycleModel(environment),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            # No explain phase: on Python 3.11 it traces every line, and a failure took minutes.
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        ),
    )


# ---- examples the machine found, replayed as plain tests ------------------------------------------


@contextmanager
def replayed(environment: Environment) -> Iterator[LifecycleModel]:
    """A model to drive by hand, step by step, as hypothesis prints a failing example."""
    state = LifecycleModel(environment)
    try:
        yield state
    finally:
        state.teardown()


def test_a_dead_letter_whose_answer_was_lost_counts_once(environment: Environment) -> None:
    """Given a queued job that no worker has claimed yet,
    when its message dead-letters and DynamoDB applies the dead-letter note but the answer is
    lost (botocore sends the write again),
    then the note counts once: the job is sent again and stays queued, not failed as
    `worker_crashed` after a single dead letter (DESIGN §3.10)."""
    with replayed(environment) as state:
        state.first_jobs(jobs=[("enterprise", 0, "none", None, None)])
        state.lose_a_write_answer(after=0)
        state.dead_letter(source="queue", pick=0)
        job = state.observer.seen[state.model_jobs[0].id]
        assert job.status is JobStatus.QUEUED, job.error
        assert len(state._lane_messages()) == 1, "the job's message was not sent again"
        state.lifecycle_holds()


def test_a_410_to_job_started_disables_the_terminal_event_and_everything_still_settles(
    environment: Environment,
) -> None:
    """Given a job subscribed to job.started, whose worker is suspended mid-run,
    when its job.started webhook is answered 410 Gone,
    then its terminal event is never POSTed and its delivery ends disabled, and the rest of the
    system settles as ever (README: 410 stops delivery for that job).

    Found by the machine as:
        state.first_jobs(jobs=[('enterprise', 0, 'started', None, None),
         ('enterprise', 0, 'none', None, None)])
        state.run_message(behaviour='suspend', pick=0, source='queue', worker=0)
        state.dispatch_webhook(attempt=1, pick=0, status=410)
    """
    with replayed(environment) as state:
        state.first_jobs(
            jobs=[("enterprise", 0, "started", None, None), ("enterprise", 0, "none", None, None)]
        )
        state.run_message(behaviour="suspend", pick=0, source="queue", worker=0)
        state.dispatch_webhook(attempt=1, pick=0, status=410)
        state.lifecycle_holds()
        job_id = state.model_jobs[0].id
        assert state.observer.seen[job_id].webhook_gone
    # (teardown settles everything: the terminal event is then recorded disabled, never POSTed)
    assert state.observer.seen[job_id].delivery_status is DeliveryStatus.DISABLED


@pytest.mark.parametrize("outcome", [DeliveryStatus.DELIVERED, DeliveryStatus.FAILED, DeliveryStatus.PENDING])
def test_a_delivery_outcome_whose_answer_was_lost_is_recorded_once(
    environment: Environment, outcome: DeliveryStatus
) -> None:
    """Given a canceled job whose `job.canceled` webhook is pending,
    when the dispatcher records an attempt's outcome and DynamoDB applies the write but its
    answer is lost (botocore sends it again),
    then the dispatcher is told the outcome was recorded, and the delivery shows one attempt
    (DESIGN §3.10: a write recognises its own earlier success).

    Found by the machine as:
        state.first_jobs(jobs=[('enterprise', 0, 'started', None, None)])
        state.cancel(pick=0)
        state.lose_a_write_answer(after=0)
        state.late_delivery_outcome(pick=0, status=DeliveryStatus.DELIVERED)
    """
    with replayed(environment) as state:
        state.first_jobs(jobs=[("enterprise", 0, "started", None, None)])
        state.cancel(pick=0)
        job_id = state.model_jobs[0].id
        assert state.observer.seen[job_id].delivery_status is DeliveryStatus.PENDING
        state.lose_a_write_answer(after=0)
        recorded = state.jobs.record_delivery(
            job_id, outcome, 200 if outcome is DeliveryStatus.DELIVERED else 503, 1.0
        )
        job = state.observer.seen[job_id]
        assert job.delivery_status is outcome
        assert recorded, "the write was applied, yet the dispatcher hears another delivery settled it"
        assert job.delivery_attempts == 1, f"one attempt shows as {job.delivery_attempts}"


def test_a_job_claimed_since_its_first_dead_letter_is_not_failed_as_never_claimed(
    environment: Environment,
) -> None:
    """Given a job whose first lane message dead-lettered before any claim, and was sent again,
    when a worker claims it and the provider answers 503 (the job goes back to queued, attempt 1),
    and later that message dead-letters too,
    then the job is not failed as `worker_crashed` "no worker could claim the job": a worker did,
    and the documented rule is two dead letters *without any claim*.

    Found by the machine as:
        state.first_jobs(jobs=[('enterprise', 0, 'none', None, None)])
        state.dead_letter(pick=0, source='queue')
        state.run_message(behaviour='transient', pick=0, source='queue', worker=0)
        state.dead_letter(pick=0, source='queue')
    """
    with replayed(environment) as state:
        state.first_jobs(jobs=[("enterprise", 0, "none", None, None)])
        state.dead_letter(source="queue", pick=0)
        state.run_message(worker=0, source="queue", pick=0, behaviour=TRANSIENT)
        job_id = state.model_jobs[0].id
        assert state.observer.seen[job_id].status is JobStatus.QUEUED
        assert state.observer.seen[job_id].attempts == 1
        state.dead_letter(source="queue", pick=0)
        job = state.observer.seen[job_id]
        assert job.status is not JobStatus.FAILED, f"failed after a claim: {job.error}"
        state.lifecycle_holds()


@pytest.mark.parametrize("kind", [THROTTLED, UNANSWERED])
def test_a_claim_that_meets_an_aws_fault_runs_the_job_once(environment: Environment, kind: str) -> None:
    """Given a queued job,
    when DynamoDB throttles the worker's claim, or applies it and loses every try's answer
    (botocore gives up: DESIGN §3.10), and time passes,
    then the claim is tried again (by the transaction's own tries, or the worker's), is
    recognised as the worker's own if it was applied, the provider is called once, and the job
    succeeds with its tenant's slot given back."""
    with replayed(environment) as state:
        state.first_jobs(jobs=[("enterprise", 0, "none", None, None)])
        state.aws_fault(after=0, kind=kind, times=1)
        state.run_message(behaviour="succeed", pick=0, source="queue", worker=0)
        assert state.jobs.faults_fired == 1, "the fault never fired"
        state.advance_clock(seconds=1)
        state.lifecycle_holds()
        job = state.observer.seen[state.model_jobs[0].id]
        assert job.status is JobStatus.SUCCEEDED, job.status
        assert job.attempts == 1
        assert [call.answer for call in state.provider.calls] == [SUCCEED]
