"""Batches as a model, checked after every step of random interleavings (hunt 204).

A hypothesis state machine drives real batches on moto: the batch intake, the worker's runner
(expansion, items, results file), cancels, the reconciler, the dead-letter function and the
webhook dispatcher, on the job model's owned clock, scripted provider, observed job repository
and AWS faults (tests/support/lifecycle_model.py, shared with tests/integration/
test_lifecycle_model.py):

- a run takes a visible lane message (an expand message or an item's) and behaves as its step
  says: normal, an error from the provider, a call held open (answered or crashed later by
  `end_run`), or a crash before its k-th AWS call (the invocation dies there: whatever it
  claimed is left to lapse, and nothing more it would write is written);
- SendMessage's DelaySeconds is held on the model clock (moto's would be wall-clock seconds),
  and the message is sent when a step moves the clock past it.

After every step: each item's job moves only as DESIGN §2 allows and never leaves a terminal
state (the job model's WriteObserver); no item is claimed while its batch's cancel is recorded;
each batch's counts are its items' states; a batch leaves a terminal status never; the tenants'
shares count exactly what is active and running, within the caps; no item is called at the
provider more often than it was claimed. When an example ends, time passes and healthy workers,
reconciler and receiver run until nothing is left: every batch has ended (canceled if a cancel
was accepted), its results file holds each item once, the shares are back to 0, and each
subscribed batch event arrived, every copy under one webhook-id.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
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

from llmq import aws
from llmq.batch_intake import BatchIntake
from llmq.batches import BatchRecord, BatchRepository, batch_key, batch_of, is_batch_key, item_job_id
from llmq.batches import _from_item as _batch_from_item
from llmq.errors import BatchNotCancelable, QuotaExceeded, StoreUnavailable
from llmq.execution import JobRunner, mark_dead_letter
from llmq.intake import JobIntake
from llmq.job_record import JobRecord
from llmq.models import BatchRequest, BatchStatus, DeliveryStatus, JobStatus, LaneMessage
from llmq.offload import Offload
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository
from llmq.sqs_edge import PoisonMessage, RetryLater
from llmq.webhooks import record_webhook_id
from tests.support.lifecycle_model import (
    CONFIG,
    CRASH,
    FAULTS,
    HOOK_URL,
    PERMANENT,
    RUNNING,
    SUCCEED,
    SUSPEND,
    TENANTS,
    TIMEOUT,
    TRANSIENT,
    Environment,
    Letter,
    LifecycleMachine,
    ModelClock,
    ObservedDynamoDB,
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

# About 30 s on a 2-core machine; LLMQ_BATCH_MODEL_EXAMPLES and _STEPS to hunt longer.
EXAMPLES = int(os.environ.get("LLMQ_BATCH_MODEL_EXAMPLES", "40"))
STEPS = int(os.environ.get("LLMQ_BATCH_MODEL_STEPS", "15"))
MAX_BATCHES = 3
# Two items a transaction: a batch of five is three chunks, and a crash can fall between.
BATCH_CONFIG = CONFIG.model_copy(update={"batches": CONFIG.batches.model_copy(update={"expand_chunk": 2})})
# What a run does: answer, fail at the provider, hold the call open, or die before its k-th
# AWS call (`crash_after`).
BEHAVIOURS = st.sampled_from([SUCCEED, SUCCEED, SUSPEND, TRANSIENT, PERMANENT, CRASH])
SUBMISSIONS = st.tuples(
    st.sampled_from(sorted(TENANTS)),
    st.integers(2, 5),  # items
    st.booleans(),  # a webhook
    st.booleans(),  # custom_ids of every character allowed
)


class _Crashed(BaseException):
    """The invocation died here: nothing after it runs (not an Exception: no handler of the
    code under test catches it, as none catches a Lambda's end)."""


@dataclass
class BatchRun(Run):
    # Calls to let through before the invocation dies (None: it does not).
    crash_after: int | None = None


@dataclass
class ModelBatch:
    id: str
    tenant: str
    total: int
    custom_ids: list[str | None]
    webhook: bool
    # A cancel the API accepted (answered canceling or canceled, not 409).
    cancel_accepted: bool = False
    statuses: list[BatchStatus] = field(default_factory=list)

    def items(self) -> list[str]:
        return [item_job_id(self.id, index) for index in range(self.total)]


class BatchObserver(WriteObserver):
    """The job model's observer, which also sees each claim's batch: a claim that lands while
    its batch's cancel is recorded is a violation (docs/batches.md: refused in the transaction
    that would have claimed it)."""

    def __init__(self, clock: ModelClock, table: str) -> None:
        super().__init__(clock)
        self.table = table
        self._ddb = aws.client("dynamodb")

    def saw_write(self, new: JobRecord, where: str) -> None:
        old = self.seen.get(new.id)
        super().saw_write(new, where)
        found = batch_of(new.id)
        claimed = new.status is JobStatus.RUNNING and (
            old is None or old.status is not JobStatus.RUNNING or old.lease_owner != new.lease_owner
        )
        if found is None or not claimed:
            return
        item = self._ddb.get_item(TableName=self.table, Key=batch_key(found[0]), ConsistentRead=True).get(
            "Item"
        )
        if item is not None and _batch_from_item(item).cancel_requested:
            self.violations.append(
                f"{new.id}: claimed by {new.lease_owner} after its batch's cancel ({where})"
            )


class _ItemsObserved(ObservedDynamoDB):
    """The job model's observed client, for a table that holds batches too: only jobs are
    read back and shown to the observer (a transaction's count shard, its batch's condition
    check, a batch's own writes are not jobs)."""

    def _shows(self, kind: str, pk: str) -> bool:
        return kind != "ConditionCheck" and pk.startswith("job_")

    def _observed(self, method: Any, kwargs: dict[str, Any]) -> Any:
        pk = (kwargs.get("Item") or kwargs.get("Key") or {}).get("pk", {}).get("S", "")
        if not pk.startswith("job_"):
            return method(**kwargs)
        return super()._observed(method, kwargs)


class BatchJobRepository(ObservedJobRepository):
    """The observed job repository, whose coming calls (DynamoDB's, and SQS's and S3's through
    `FaultyClient`) may also be where a run's invocation dies."""

    def __init__(self, table: str, clock: ModelClock, observer: WriteObserver) -> None:
        super().__init__(table, clock, observer)
        self._ddb = aws.TranslatedClient(_ItemsObserved(aws.client("dynamodb"), self))
        self.config = BATCH_CONFIG

    def next_fault(self, operation: str) -> str | None:
        run = RUNNING.get()
        if isinstance(run, BatchRun):
            if run.crashed:
                raise _Crashed(operation)
            if run.crash_after is not None:
                if run.crash_after <= 0:
                    run.crashed = True
                    note(f"crash at {operation}")
                    raise _Crashed(operation)
                run.crash_after -= 1
        return super().next_fault(operation)


class _ModelSqs:
    """SQS whose delayed sends wait on the model clock (moto's would wait in real seconds), and
    which stamps each message the system sends with a tick of the model's order (`sent`): what
    tells a dead letter's round from another's (`Letter`), as the job model stamps them."""

    def __init__(self, inner: Any, clock: ModelClock) -> None:
        self._inner = inner
        self._clock = clock
        self.delayed: list[tuple[float, int, dict[str, Any]]] = []
        self.ticks = itertools.count()
        self.sent: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def send_message(self, **kwargs: Any) -> Any:
        tick = next(self.ticks)
        delay = int(kwargs.pop("DelaySeconds", 0) or 0)
        if delay > 0:
            self.delayed.append((self._clock.now + delay, tick, kwargs))
            return {"MessageId": f"delayed-{len(self.delayed)}"}
        return self._stamped(self._inner.send_message(**kwargs), tick)

    def send_message_batch(self, **kwargs: Any) -> Any:
        tick = next(self.ticks)
        answer = self._inner.send_message_batch(**kwargs)
        for entry in answer.get("Successful", []):
            self.sent[entry["MessageId"]] = tick
        return answer

    def release(self) -> None:
        due = [entry for entry in self.delayed if entry[0] <= self._clock.now]
        self.delayed = [entry for entry in self.delayed if entry[0] > self._clock.now]
        for _, tick, kwargs in due:
            self._stamped(self._inner.send_message(**kwargs), tick)

    def _stamped(self, answer: Any, tick: int) -> Any:
        self.sent[answer["MessageId"]] = tick
        return answer


class BatchLifecycleModel(LifecycleMachine):
    """One example: an empty table and queues, the clock at the job model's epoch, up to
    MAX_BATCHES batches of the two tenants."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self.observer = BatchObserver(self.clock, self.stack.jobs_table)
        self.jobs = BatchJobRepository(self.stack.jobs_table, self.clock, self.observer)
        self.model_sqs = _ModelSqs(self.sqs, self.clock)
        self.queues = QueueRepository(
            self.stack.lane_queue_urls,
            self.stack.webhook_queue_url,
            sqs=faulty_sqs(self.model_sqs, self.jobs),
        )
        self.payloads = faulty_payloads(self.stack, self.jobs)
        self.offload = Offload(self.payloads, BATCH_CONFIG)
        self.batches = BatchRepository(
            self.stack.jobs_table,
            BATCH_CONFIG,
            dynamodb=_ItemsObserved(aws.client("dynamodb"), self.jobs),
            clock=self.clock,
        )
        # The model's own reads: no fault, no crash.
        self.looks = BatchRepository(
            self.stack.jobs_table, BATCH_CONFIG, dynamodb=aws.client("dynamodb"), clock=self.clock
        )
        self.shares = ShareRepository(self.stack.jobs_table, dynamodb=aws.client("dynamodb"))
        # The free tenant may run two jobs at once, one of them a batch's item: its items meet
        # its cap, and wait (deferred) for a slot.
        self.shares.set_limits(
            TENANTS["free"].tenant_id, max_concurrency=2, reserve=BATCH_CONFIG.batches.interactive_reserve
        )
        job_intake = JobIntake(
            self.jobs, self.queues, BATCH_CONFIG, check_webhook_url=lambda url: None, payloads=self.payloads
        )
        self.intake = BatchIntake(
            job_intake, self.batches, self.jobs, self.queues, self.payloads, BATCH_CONFIG
        )
        self.provider = ScriptedProvider(self.observer)
        self.reconciler = Reconciler(
            self.jobs, self.queues, BATCH_CONFIG, batches=self.batches, offload=self.offload
        )
        self.receiver_status = 200
        # Every POST the receiver saw: (webhook-id, type, batch id).
        self.posts: list[tuple[str, str, str]] = []
        self.dispatcher = self._webhook_dispatcher(BATCH_CONFIG, batches=self.batches)
        self.model_batches: list[ModelBatch] = []
        self.runs: list[BatchRun] = []
        self.letters = 0

    # ---- steps ----------------------------------------------------------------------------

    @initialize(first=SUBMISSIONS)
    def first_batch(self, first: tuple[str, int, bool, bool]) -> None:
        self.submit(*first)

    @precondition(lambda self: len(self.model_batches) < MAX_BATCHES)
    @rule(
        tenant=st.sampled_from(sorted(TENANTS)),
        items=st.integers(2, 5),
        webhook=st.booleans(),
        named=st.booleans(),
    )
    def submit(self, tenant: str, items: int, webhook: bool, named: bool) -> None:
        """A client submits a batch of a few prompts, with or without a webhook."""
        # (every item needs a custom_id: here plain, or of the other characters it may hold)
        custom_ids: list[str | None] = [
            f"ticket.{index}:a@b_{index}" if named else f"item-{index}" for index in range(items)
        ]
        requests = [
            {"custom_id": name, "body": {"prompt": f"say {index}"}} for index, name in enumerate(custom_ids)
        ]
        request = BatchRequest.model_validate(
            {"requests": requests, "webhook": {"url": HOOK_URL} if webhook else None}
        )
        known = {batch.id for batch in self.model_batches}
        try:
            batch, replayed = self.intake.submit(TENANTS[tenant], request, None)
        except StoreUnavailable:
            # Answered 503: a batch the write stored anyway is the system's to run.
            note("a batch submit answered 503")
            for found in self._stored_batches():
                if found.id not in known:
                    self._adopt(found, tenant, custom_ids, webhook)
            return
        except QuotaExceeded:
            raise AssertionError("a batch of a few items was refused by the quota") from None
        assert not replayed
        assert batch.status is BatchStatus.VALIDATING and batch.total == items
        self._adopt(batch, tenant, custom_ids, webhook)

    @rule(pick=st.integers(0, 9), behaviour=BEHAVIOURS, crash_after=st.integers(0, 8))
    def run_message(self, pick: int, behaviour: str, crash_after: int) -> None:
        """A worker invocation takes a visible lane message (an expand message or an item's)."""
        messages = self._lane_messages()
        if not messages:
            return
        url, message = messages[pick % len(messages)]
        self._start(message["Body"], behaviour, (url, message["ReceiptHandle"]), crash_after)

    @precondition(lambda self: any(run.waits_on_provider for run in self.runs))
    @rule(pick=st.integers(0, 9), how=st.sampled_from([SUCCEED, TRANSIENT, PERMANENT, TIMEOUT, CRASH]))
    def end_run(self, pick: int, how: str) -> None:
        """A call held open ends: the provider answers, or the invocation dies."""
        self._end_run(pick, how)

    @rule(pick=st.integers(0, 9))
    def cancel(self, pick: int) -> None:
        """The client cancels a batch: accepted unless it has ended or is writing its results."""
        if not self.model_batches:
            return
        batch = self.model_batches[pick % len(self.model_batches)]
        before = self._batch(batch.id)
        try:
            after = self.intake.cancel(TENANTS[batch.tenant], batch.id)
        except StoreUnavailable:
            note("a batch cancel answered 503")
            # (flagged before it failed? then it was accepted as far as the batch knows)
            if self._batch(batch.id).cancel_requested:
                batch.cancel_accepted = True
            return
        except BatchNotCancelable:
            now = self._batch(batch.id)
            assert now.status.is_terminal or now.status is BatchStatus.FINALIZING, (
                f"a {before.status.value} batch refused a cancel (now {now.status.value})"
            )
            return
        if before.status is BatchStatus.CANCELED:
            # (canceled already: answered as it is, the outcome asked for; hunt 322)
            assert after.status is BatchStatus.CANCELED, after
            return
        assert not before.status.is_terminal, f"a {before.status.value} batch accepted a cancel"
        assert after.cancel_requested
        batch.cancel_accepted = True

    @rule()
    def reconcile(self) -> None:
        """The scheduled reconciler runs (and may stop on an AWS fault)."""
        self._reconcile()

    @rule(seconds=st.sampled_from([1, 5, 30, 61, 95, 200]))
    def advance_clock(self, seconds: int) -> None:
        """Time passes: leases lapse, backoffs and delays end, thresholds pass."""
        self.clock.now += seconds
        self._settle_loop()

    @rule(pick=st.integers(0, 9))
    def dead_letter(self, pick: int) -> None:
        """A visible lane message exhausted its receives: the dead-letter function handles it."""
        messages = self._lane_messages()
        if not messages:
            return
        url, message = messages[pick % len(messages)]
        self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        self._dead_letter(message["Body"], message["MessageId"])

    @rule(pick=st.integers(0, 9), status=st.sampled_from([200, 200, 500, 429]))
    def dispatch_webhook(self, pick: int, status: int) -> None:
        """The dispatcher takes a webhook message; the receiver answers `status`."""
        messages = self._peek(self.stack.webhook_queue_url)
        if messages:
            self._dispatch(messages[pick % len(messages)], status)

    @rule(after=st.integers(0, 3))
    def lose_a_write_answer(self, after: int) -> None:
        """DynamoDB applies a coming write but its answer is lost, and botocore sends it again."""
        self.jobs.lose_answer_after = after

    @rule(after=st.integers(0, 6), kind=st.sampled_from(FAULTS), times=st.integers(1, 8))
    def aws_fault(self, after: int, kind: str, times: int) -> None:
        """DynamoDB, SQS or S3 throttles coming calls, or applies them and loses the answers."""
        self.jobs.fault = (after, kind, times)

    # ---- what must hold after every step -------------------------------------------------------

    @invariant()
    def batches_hold(self) -> None:
        assert not self.observer.violations, "\n".join(self.observer.violations)
        for call in self.provider.calls:
            assert not call.cancel_recorded, f"the provider was called for {call.job_id} after its cancel"
        for batch in self.model_batches:
            stored = self._batch(batch.id)
            if batch.statuses and batch.statuses[-1].is_terminal:
                assert stored.status is batch.statuses[-1], (
                    f"{batch.id} left {batch.statuses[-1].value} for {stored.status.value}"
                )
            if not batch.statuses or batch.statuses[-1] is not stored.status:
                batch.statuses.append(stored.status)
            self._counts_hold(batch, stored)
            for job_id in batch.items():
                job = self.observer.seen.get(job_id)
                calls = sum(1 for call in self.provider.calls if call.job_id == job_id)
                assert calls <= (job.attempts if job else 0), (
                    f"{calls} provider calls for {job.attempts if job else 0} claims of {job_id}"
                )
        self._shares_hold()

    def _counts_hold(self, batch: ModelBatch, stored: BatchRecord) -> None:
        """The batch's counts (its shards, the share's holders, the rest queued) are its items'."""
        counts = self.looks.counts(stored)
        items = [self.observer.seen[job_id] for job_id in batch.items() if job_id in self.observer.seen]
        assert len(items) <= stored.total, f"{batch.id}: items past its total"
        written = {job.id for job in items}
        assert all(item_job_id(batch.id, index) in written for index in range(stored.expanded)), (
            f"{batch.id}: checkpoint at {stored.expanded}, items written {sorted(written)}"
        )
        ended = Counter(job.status for job in items if job.status.is_terminal)
        expected = {
            "succeeded": ended[JobStatus.SUCCEEDED],
            "failed": ended[JobStatus.FAILED],
            "canceled": ended[JobStatus.CANCELED] + stored.unexpanded_canceled,
            "expired": ended[JobStatus.EXPIRED],
            "running": sum(1 for job in items if job.status is JobStatus.RUNNING),
        }
        expected["queued"] = stored.total - sum(expected.values())
        actual = {name: getattr(counts, name) for name in expected}
        assert counts.total == batch.total
        assert actual == expected, f"{batch.id} ({stored.status.value}) counts {actual}, its items {expected}"

    def _shares_hold(self) -> None:
        """DESIGN §3.11: a tenant's share counts its batches' unfinished items as active (those
        not yet written too), its slots are held by exactly its running items, and never more
        of them than its caps."""
        for tenant in {batch.tenant for batch in self.model_batches}:
            identity = TENANTS[tenant]
            state = self.shares.get(identity.tenant_id)
            mine = [batch for batch in self.model_batches if batch.tenant == tenant]
            jobs = [
                self.observer.seen[job_id]
                for batch in mine
                for job_id in batch.items()
                if job_id in self.observer.seen
            ]
            running = {job.id for job in jobs if job.status is JobStatus.RUNNING}
            held = {job_id for holders in state.holders.values() for job_id in holders}
            assert held == running, f"{tenant}: slots held by {sorted(held)}, running {sorted(running)}"
            active = 0
            for batch in mine:
                stored = self._batch(batch.id)
                done = sum(
                    1
                    for job_id in batch.items()
                    if job_id in self.observer.seen and self.observer.seen[job_id].status.is_terminal
                )
                active += stored.total - done - stored.unexpanded_canceled
            assert state.active >= 0 and state.batch_active >= 0, f"{tenant}: a share below 0: {state}"
            assert state.active == active, f"{tenant}: share counts {state.active} active, {active} are"
            assert state.batch_active == active, (
                f"{tenant}: {state.batch_active} batch items active, {active} are"
            )
            default_cap, default_batch_cap = BATCH_CONFIG.concurrency_caps(identity.tier)
            cap = state.max_concurrency or default_cap
            batch_cap = state.max_batch_concurrency or default_batch_cap
            for lane, holders in state.holders.items():
                assert len(holders) <= cap, f"{tenant}: {len(holders)} running in {lane}, cap {cap}"
            for lane, holders in state.batch_holders.items():
                assert len(holders) <= batch_cap, f"{tenant}: {len(holders)} items in {lane}, cap {batch_cap}"

    # ---- the end of an example -----------------------------------------------------------------

    def _everything_settles(self) -> None:
        """Healthy workers, reconciler and receiver, and time: every batch ends, as it should."""
        for _ in self._recovering(12):  # (the invocations holding calls open time out)
            for _ in range(6):  # a batch's expansion, its items, its results file, its end
                messages = self._lane_messages()
                if not messages:
                    break
                for url, message in messages:
                    self._start(message["Body"], SUCCEED, (url, message["ReceiptHandle"]), None)
                self.clock.now += 1
                self._settle_loop()
            for message in self._peek(self.stack.webhook_queue_url):
                self._dispatch(message, 200)
            self.batches_hold()
        for batch in self.model_batches:
            self._ended_well(batch, self._batch(batch.id))
        for tenant in {batch.tenant for batch in self.model_batches}:
            state = self.shares.get(TENANTS[tenant].tenant_id)
            assert (state.active, state.batch_active, state.running) == (0, 0, 0), f"{tenant}: {state}"

    def _ended_well(self, batch: ModelBatch, stored: BatchRecord) -> None:
        if batch.cancel_accepted:
            assert stored.status is BatchStatus.CANCELED, f"{batch.id} canceled, ended {stored.status.value}"
        else:
            assert stored.status in (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELED)
            if stored.status is BatchStatus.CANCELED:
                assert any(error.code == "batch_crashed" for error in stored.errors or []), (
                    f"{batch.id} canceled with no cancel asked and no crash"
                )
        assert stored.final_counts is not None
        assert stored.final_counts.queued == stored.final_counts.running == 0
        if stored.results_key is None:
            assert any(error.code == "batch_crashed" for error in stored.errors or []), (
                f"{batch.id} ended {stored.status.value} without its results file"
            )
        else:
            body = aws.client("s3").get_object(Bucket=self.stack.payload_bucket, Key=stored.results_key)[
                "Body"
            ]
            lines = [json.loads(line) for line in body.read().decode().splitlines() if line.strip()]
            assert [line["job_id"] for line in lines] == batch.items(), f"{batch.id}: results {lines}"
            for line, name in zip(lines, batch.custom_ids, strict=True):
                assert line.get("custom_id") == name, f"{batch.id}: {line} is not named {name}"
                assert line["status"] in ("succeeded", "failed", "canceled", "expired"), line
        posts = [post for post in self.posts if post[2] == batch.id]
        if batch.webhook:
            assert posts, f"{batch.id} ended {stored.status.value} and its webhook never arrived"
            assert stored.delivery_status is DeliveryStatus.DELIVERED, stored.delivery_status
            ids = {post[0] for post in posts}
            assert stored.ids_by_creation, "a batch accepted by this version has ids of its own (hunt 308)"
            assert ids == {record_webhook_id(stored, f"batch.{stored.status.value}")}, f"{batch.id}: {ids}"
        else:
            assert not posts, f"{batch.id} has no webhook, yet {posts} were POSTed"

    def _unsettled(self) -> list[str]:
        left = []
        for batch in self.model_batches:
            stored = self._batch(batch.id)
            if not stored.status.is_terminal:
                left.append(f"{batch.id} still {stored.status.value}")
            elif batch.webhook and stored.delivery_status is not DeliveryStatus.DELIVERED:
                left.append(f"{batch.id} {stored.status.value}, its webhook {stored.delivery_status}")
        return left

    # ---- helpers ---------------------------------------------------------------------------

    def _adopt(self, batch: BatchRecord, tenant: str, custom_ids: list[str | None], webhook: bool) -> None:
        self.model_batches.append(ModelBatch(batch.id, tenant, batch.total, custom_ids, webhook))

    def _batch(self, batch_id: str) -> BatchRecord:
        found = self.looks.find(batch_id)
        assert found is not None, f"{batch_id} is gone"
        return found

    def _stored_batches(self) -> list[BatchRecord]:
        items = aws.client("dynamodb").scan(TableName=self.stack.jobs_table, ConsistentRead=True)["Items"]
        return [
            _batch_from_item(item)
            for item in items
            if is_batch_key(item["pk"]["S"]) and item["pk"]["S"].count("#") == 1
        ]

    def _start(
        self, body: str, behaviour: str, receipt: tuple[str, str] | None, crash_after: int | None
    ) -> BatchRun:
        number = len(self.runs) + 1
        if behaviour == CRASH:
            # (at the provider, if the run gets there first; else before its k-th AWS call)
            behaviour = SUSPEND
        else:
            crash_after = None
        job_id = LaneMessage.model_validate_json(body).job_id
        run = BatchRun(
            number,
            f"worker/run-{number}",
            body,
            job_id,
            behaviour,
            self.clock.now,
            receipt,
            crash_after=crash_after,
        )
        self.runs.append(run)
        runner = JobRunner(
            self.jobs,
            self.queues,
            self.provider,
            BATCH_CONFIG,
            rng=Random(7),
            payloads=self.payloads,
            batches=self.batches,
        )
        assert runner.expander is not None
        runner.expander._clock = self.clock
        self._launch(run, runner)
        if crash_after is not None and run.waits_on_provider:
            self._crash(run)  # it died at the provider
        self._collect()
        return run

    def _settle_loop(self) -> None:
        self.model_sqs.release()  # (delayed sends now due)
        super()._settle_loop()

    def _failed(self, run: Run, error: BaseException) -> str:
        """A run that ended with an error: it died (`_Crashed`), or its message is shown again."""
        if isinstance(error, _Crashed):
            return "crashed"
        if isinstance(error, (RetryLater, StoreUnavailable)):
            return "retry"
        if isinstance(error, PoisonMessage):
            raise AssertionError(f"a lane message of the model was called poison: {error}")
        raise error

    def _dead_letter(self, body: str, message_id: str) -> None:
        self.letters += 1
        sent = self.model_sqs.sent.get(message_id, -1)
        try:
            job_id = LaneMessage.model_validate_json(body).job_id
        except ValueError:
            job_id = ""
        before = self.observer.seen.get(job_id)
        if before is not None and before.status is JobStatus.QUEUED:
            # (what lets a queued item fail as worker_crashed: letters of two rounds)
            letter = Letter(message_id, before.attempts, sent, handled=next(self.model_sqs.ticks))
            self.observer.dead_letters.setdefault(before.id, []).append(letter)
        try:
            mark_dead_letter(
                self.jobs,
                self.queues,
                body,
                message_id,
                (self.batches, BATCH_CONFIG),
                offload=self.offload,
                config=BATCH_CONFIG,
            )
        except (StoreUnavailable, RetryLater):
            # The record stays in the DLQ; SQS's retry of it is a copy sent back to the lane.
            note("a dead letter left for another try")
            copy = self.sqs.send_message(QueueUrl=self._lane_url(body), MessageBody=body)
            self.model_sqs.sent[copy["MessageId"]] = sent  # (the same record: its round)
        except PoisonMessage:
            note("a dead letter set aside as poison")

    def _lane_url(self, body: str) -> str:
        message = LaneMessage.model_validate_json(body)
        return self.stack.lane_queue_urls[message.lane or "high"]

    def _dispatch(self, message: dict[str, Any], status: int) -> None:
        self.receiver_status = status
        task = self.loop.create_task(
            self.dispatcher.handle(
                message["Body"],
                receive_count=int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                message_id=message["MessageId"],
                receipt=message["ReceiptHandle"],
            )
        )
        self.loop.run_until_idle()
        assert task.done(), "a webhook delivery never finished"
        error = task.exception()
        if isinstance(error, (RetryLater, StoreUnavailable)):
            return
        if error is not None:
            raise error
        self.sqs.delete_message(QueueUrl=self.stack.webhook_queue_url, ReceiptHandle=message["ReceiptHandle"])

    def _receive_webhook(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        self.posts.append((request.headers["webhook-id"], payload["type"], payload["data"]["id"]))
        headers = {"retry-after": "1"} if self.receiver_status in (429, 503) else {}
        return httpx.Response(self.receiver_status, headers=headers)


@pytest.mark.timeout(300)
def test_every_interleaving_keeps_the_batch_invariants(environment: Environment) -> None:
    """Given batches submitted, expanded, run, crashed, canceled, dead-lettered, reconciled and
    announced in any order, when each step lands, then docs/batches.md's promises hold."""
    run_state_machine_as_test(
        lambda: BatchLifecycleModel(environment),  # type: ignore[arg-type]
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            # (LLMQ_BATCH_MODEL_HUNT=1: new examples each run, to hunt with; CI replays the same ones)
            derandomize=not os.environ.get("LLMQ_BATCH_MODEL_HUNT"),
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
        ),
    )


# ---- examples the machine found, replayed as plain tests ------------------------------------------


def replayed(environment: Environment) -> AbstractContextManager[BatchLifecycleModel]:
    """A model to drive by hand, step by step, as hypothesis prints a failing example."""
    return driven(BatchLifecycleModel(environment))


def test_the_model_runs_a_batch_to_its_end(environment: Environment) -> None:
    """The model's own check: a batch of three with a webhook, expanded and run by healthy
    workers, completes with its results file and one webhook."""
    with replayed(environment) as state:
        state.first_batch(first=("enterprise", 3, True, True))
        for _ in range(4):
            state.run_message(pick=0, behaviour=SUCCEED, crash_after=0)
            state.batches_hold()
        state.advance_clock(seconds=1)
        for _ in range(4):
            state.run_message(pick=0, behaviour=SUCCEED, crash_after=0)
            state.batches_hold()
        batch = state._batch(state.model_batches[0].id)
        assert batch.expanded == 3, batch
        assert len(state.provider.calls) == 3, state.provider.calls
    assert state._batch(state.model_batches[0].id).status is BatchStatus.COMPLETED
    assert len(state.posts) == 1, state.posts


def test_a_free_tenants_items_wait_for_its_one_batch_slot(environment: Environment) -> None:
    """The model's own check that the cap is reached: the free tenant's batch items take one
    slot at a time; a second item meets the cap and is deferred, and runs once the first ends."""
    with replayed(environment) as state:
        state.first_batch(first=("free", 3, False, False))
        state.run_message(pick=0, behaviour=SUCCEED, crash_after=0)  # the expansion
        state.run_message(pick=0, behaviour=SUSPEND, crash_after=0)  # an item, held at the provider
        state.run_message(pick=1, behaviour=SUCCEED, crash_after=0)  # another: at the cap
        state.batches_hold()
        second = state.runs[-1].job_id
        assert second != state.runs[-2].job_id
        assert second is not None and state.observer.seen[second].status is JobStatus.QUEUED
        share = state.shares.get(TENANTS["free"].tenant_id)
        assert share.running == 1, share
        assert len(state.provider.calls) == 1
        assert state.model_sqs.delayed or state._lane_messages(), "the deferred item has no message"


def test_an_item_dead_lettered_in_two_rounds_before_any_claim_fails_as_worker_crashed(
    environment: Environment,
) -> None:
    """Found by the machine run alone (hunt 244): an item whose message dead-letters, and then
    the copy the dead-letter function sent back dead-letters too, fails `worker_crashed`, as a
    job's does (DESIGN §3.5). The model records each letter with the round of its message, so
    the observer tells this from a failure without two rounds."""
    with replayed(environment) as state:
        state.first_batch(first=("enterprise", 5, False, False))
        state.run_message(behaviour=SUCCEED, crash_after=0, pick=0)  # the expansion: 5 messages
        state.dead_letter(pick=0)  # an item's message: the function sends it a new one
        item = next(iter(state.observer.dead_letters))
        state.dead_letter(pick=4)  # that new message
        assert [letter.sent < letter.handled for letter in state.observer.dead_letters[item]] == [True, True]
        failed = state.observer.seen[item]
        assert (failed.status, failed.error.code if failed.error else None) == (
            JobStatus.FAILED,
            "worker_crashed",
        )
