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

The clock, the loop, the provider, the write observer, the observed repository and the
AWS faults live in tests/support/lifecycle_model.py, which the batch model
(tests/integration/test_batch_lifecycle_model.py) shares; the rules and checks are here.

A failing example prints as a list of `state.<rule>(...)` calls; `replayed` below runs such
a list as a plain test, and the examples found so far are kept that way at the end.
"""

from __future__ import annotations

import itertools
import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from random import Random
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from standardwebhooks.webhooks import Webhook

from llmq import aws
from llmq.errors import (
    IdempotencyConflict,
    JobNotCancelable,
    JobNotTerminal,
    NoWebhook,
    StoreUnavailable,
)
from llmq.execution import JobRunner, mark_dead_letter
from llmq.intake import JobIntake
from llmq.job_codec import from_item as _from_item
from llmq.job_record import JobRecord
from llmq.models import (
    DeliveryStatus,
    JobRequest,
    JobStatus,
    LaneMessage,
    WebhookEvent,
    WebhookMessage,
)
from llmq.offload import Offload
from llmq.policy import ClaimOutcome
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository, is_share_key
from llmq.sqs_edge import PoisonMessage, RetryLater
from llmq.tenants import TenantIdentity
from llmq.webhooks import OutcomeKind, record_webhook_id
from tests.support.lifecycle_model import (
    ANSWERS,
    CONFIG,
    CRASH,
    FAULTS,
    HOOK_URL,
    PERMANENT,
    SUCCEED,
    SUSPEND,
    TENANTS,
    THROTTLED,
    TIMEOUT,
    TRANSIENT,
    UNANSWERED,
    Environment,
    Letter,
    LifecycleMachine,
    ObservedJobRepository,
    Run,
    ScriptedProvider,
    WriteObserver,
    driven,
    faulty_payloads,
    faulty_sqs,
    lifecycle_environment,  # noqa: F401  (the `environment` fixture: one moto, two tenants)
    note,
)

# 120 under `make test` (about a minute); `make fuzz` runs 2,000.
EXAMPLES = int(os.environ.get("LLMQ_MODEL_EXAMPLES", "120"))
STEPS = 10
MAX_JOBS = 4
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


# ---- the model ---------------------------------------------------------------------------------


@dataclass
class ModelJob:
    id: str
    tenant: TenantIdentity
    lane: str
    body: tuple[Any, ...]


class LifecycleModel(LifecycleMachine):
    """One example: an empty table and queues, a clock at START_EPOCH, up to MAX_JOBS jobs."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self.observer = WriteObserver(self.clock)
        self.jobs = ObservedJobRepository(self.stack.jobs_table, self.clock, self.observer)
        # The system's sends meet the armed faults too; the model's own looks at the queues do not.
        self.queues = QueueRepository(
            self.stack.lane_queue_urls,
            self.stack.webhook_queue_url,
            sqs=faulty_sqs(self.sqs, self.jobs),
        )
        self.looks = QueueRepository(self.stack.lane_queue_urls, self.stack.webhook_queue_url, sqs=self.sqs)
        self.provider = ScriptedProvider(self.observer)
        self.payloads = faulty_payloads(self.stack, self.jobs)
        self.offload = Offload(self.payloads, CONFIG)
        self.intake = JobIntake(
            self.jobs, self.queues, CONFIG, check_webhook_url=lambda url: None, payloads=self.payloads
        )
        self.reconciler = Reconciler(self.jobs, self.queues, CONFIG, offload=self.offload)
        self.receiver_status = 200
        self.posts: list[httpx.Request] = []
        self.dispatcher = self._webhook_dispatcher(CONFIG)
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
            note("a submit answered 503")
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
        self._end_run(pick, how)

    @precondition(lambda self: any(run.waits_on_provider for run in self.runs))
    @rule(pick=st.integers(0, 9), worker=st.integers(0, 2), behaviour=BEHAVIOURS)
    def stall_past_lease(self, pick: int, worker: int, behaviour: str) -> None:
        """A worker holding a call open stalls past its lease (a frozen Lambda, a slow network)
        and SQS hands a copy of its message to another worker."""
        run = self._in_flight(pick)
        expires = run.lease_expires_ms
        if expires is None:
            # (a claim applied with its answer lost, and recognised as the run's own: only the
            # claims that answered are recorded, so its lease is the stored job's; hunt 300)
            stored = self.observer.seen.get(run.job_id or "")
            assert stored is not None and stored.lease_owner == run.owner, (
                "a run waits on the provider without a claim"
            )
            expires = stored.lease_expires_ms
        assert expires is not None
        self.clock.now = max(self.clock.now, expires / 1000 + 1)
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
        faulted = self.jobs.fault is not None
        try:
            after = self.intake.cancel(job.tenant, job.id)
        except StoreUnavailable:
            note("a cancel answered 503")
            return
        except JobNotCancelable:
            assert before.status.is_terminal, f"a {before.status.value} job refused to cancel"
            return
        if before.status is JobStatus.CANCELED:
            # (canceled already: answered as it is, the outcome asked for; hunt 322)
            assert after.status is JobStatus.CANCELED, after
            return
        assert not before.status.is_terminal, f"a {before.status.value} job accepted a cancel"
        if before.status is JobStatus.QUEUED:
            # (a job queued again after an attempt, whose parked result S3 cannot look for now,
            # an AWS fault armed, is asked to cancel, not canceled: `JobIntake._cancel_requeued`)
            assert after.status is JobStatus.CANCELED or (
                faulted and after.status is JobStatus.QUEUED and after.cancel_requested and after.attempts > 0
            ), after
        else:
            assert after.status is JobStatus.RUNNING and after.cancel_requested

    @rule()
    def reconcile(self) -> None:
        """The scheduled reconciler runs (and may stop on an AWS fault, to run again later)."""
        self._reconcile()

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
            note("a dead letter left for another try")
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
        webhook = self._webhook(message)
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

    def _everything_settles(self) -> None:
        """Then, once workers, reconciler and receiver are healthy and time passes, every job
        ends terminal and every subscribed terminal event is delivered (DESIGN §3.6)."""
        for _ in self._recovering(8):  # (the Lambdas that held calls open time out)
            for url, message in self._lane_messages():
                self._start(0, message["Body"], SUCCEED, (url, message["ReceiptHandle"]))
            for message in self._peek(self.stack.webhook_queue_url):
                webhook = self._webhook(message)
                outcome = self._dispatch(webhook, 200, 1)
                if outcome is not None and outcome.kind is not OutcomeKind.RETRY:
                    self.sqs.delete_message(
                        QueueUrl=self.stack.webhook_queue_url, ReceiptHandle=message["ReceiptHandle"]
                    )
            self.lifecycle_holds()
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

    def _start(self, worker: int, body: str, behaviour: str, receipt: tuple[str, str] | None) -> Run:
        number = len(self.runs) + 1
        job_id = _job_id_of(body)
        run = Run(number, f"worker-{worker}/run-{number}", body, job_id, behaviour, self.clock.now, receipt)
        self.runs.append(run)
        faults = self.jobs.fired_in[run.number]
        # Each run is a worker invocation of its own: a runner of its own (a run that waits out
        # a throttle is no sibling of the next run's message).
        runner = JobRunner(
            self.jobs, self.queues, self.provider, CONFIG, rng=Random(7), payloads=self.payloads
        )
        self._launch(run, runner)
        run.claim = self.jobs.claims.get(run.owner)
        note(f"claim {run.claim.outcome.value if run.claim else 'not attempted'}")
        run.met_a_fault = self.jobs.fired_in[run.number] != faults
        # (or waits, in process, for a retry due within a clock's difference: `DUE_TOLERANCE_MS`)
        due_soon = run.claim is not None and run.claim.outcome is ClaimOutcome.NOT_YET_DUE
        if run.in_flight and not run.waits_on_provider and not run.met_a_fault and not due_soon:
            raise AssertionError(f"{run.owner} neither finished nor waits on the provider")
        self._collect()
        return run

    def _failed(self, run: Run, error: BaseException) -> str:
        """A run that ended with an error: its message is shown again, or refused as poison."""
        if isinstance(error, RetryLater):
            return "retry"
        if isinstance(error, StoreUnavailable):
            return "retry"  # a record that failed: SQS shows it again
        if isinstance(error, PoisonMessage):
            assert run.job_id not in self.observer.seen, (
                f"a message for the existing job {run.job_id} was called poison"
            )
            return "poison"
        raise error

    def _dispatch(self, message: WebhookMessage, status: int, attempt: int) -> Any | None:
        before = self.observer.seen.get(message.job_id)
        sent = len(self.posts)
        faults = self.jobs.fired_in[0]
        self.receiver_status = status
        task = self.loop.create_task(self.dispatcher.deliver(message, attempt))
        self.loop.run_until_idle()
        assert task.done(), "a webhook delivery never finished"
        if isinstance(task.exception(), StoreUnavailable):
            note("a webhook delivery failed its record")
            return None  # (a record that failed: SQS shows the message again)
        outcome = task.result()
        note(f"webhook {outcome.kind.value}")
        terminal = message.event is not WebhookEvent.STARTED
        if self.jobs.fired_in[0] != faults:
            return outcome  # (what a faulted read or write decided is checked by the invariants)
        if terminal and before is not None:
            # (a message of a round before the job's latest redelivery is dropped: hunt 211)
            due = (
                before.delivery_status is DeliveryStatus.PENDING
                and before.terminal_event is message.event
                and message.delivery_round >= before.delivery_round
            )
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
        stored = self.observer.seen[payload["data"]["id"]]
        assert stored.ids_by_creation, "a job accepted by this version has ids of its own (hunt 308)"
        assert msg_id == record_webhook_id(stored, payload["type"])
        assert int(timestamp) == int(self.clock.now), "an attempt was not signed afresh"
        expected = Webhook(self.env.secrets[tenant.tenant_id]).sign(
            msg_id, datetime.fromtimestamp(int(timestamp), UTC), request.content.decode()
        )
        assert expected in request.headers["webhook-signature"].split(" "), "the signature does not verify"
        headers = {"retry-after": "1"} if self.receiver_status in (429, 503) else {}
        return httpx.Response(self.receiver_status, headers=headers)

    def _saw_sent(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if (
            context.get("lifecycle_model_queue") in self.stack.lane_queue_urls.values()
            and "MessageId" in parsed
        ):
            self.sent[parsed["MessageId"]] = (context["lifecycle_model_body"], next(self.ticks))

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


def _remember_the_body(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """What a SendMessage carries, for its answer's hook (`LifecycleModel._saw_sent`)."""
    context["lifecycle_model_queue"] = params.get("QueueUrl")
    context["lifecycle_model_body"] = params.get("MessageBody")


def _job_id_of(body: str) -> str | None:
    try:
        return LaneMessage.model_validate_json(body).job_id
    except ValueError:
        return None


@pytest.mark.timeout(120 + 2 * EXAMPLES)
def test_every_interleaving_keeps_the_lifecycle_invariants(environment: Environment) -> None:
    """Given jobs submitted, run, retried, canceled, taken over, dead-lettered, reconciled and
    announced in any order, when each step lands, then DESIGN §2 and §3 hold for every job."""
    run_state_machine_as_test(
        lambda: LifecycleModel(environment),  # type: ignore[arg-type]
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


def replayed(environment: Environment) -> AbstractContextManager[LifecycleModel]:
    """A model to drive by hand, step by step, as hypothesis prints a failing example."""
    return driven(LifecycleModel(environment))


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


def test_a_run_whose_claim_was_applied_with_its_answer_lost_can_stall_past_its_lease(
    environment: Environment,
) -> None:
    """Given a run whose claim DynamoDB applied while its answer was lost, recognised as the
    run's own (the claim's look after contention), waiting on the provider,
    when it stalls past that lease and SQS hands its message to another worker,
    then the model finds the lease on the stored job (hunt 300: it asserted the run had no
    claim, since only claims that answered are recorded), and everything settles."""
    with replayed(environment) as state:
        state.first_jobs(jobs=[("enterprise", 0, "none", None, None)] * 2)
        state.aws_fault(after=0, kind="unanswered", times=1)
        state.run_message(behaviour="suspend", pick=0, source="queue", worker=0)
        state.advance_clock(5)
        state.lifecycle_holds()
        state.stall_past_lease(pick=0, worker=1, behaviour="succeed")
        state.lifecycle_holds()
