"""One contract, two stores: the in-memory fake the unit tests use and the DynamoDB repository.

Each case runs against both, the repository under in-process moto, so a fake that drifts
from the conditional writes it stands for fails here, not in a green unit test. It lives with
the integration suite because its moto tables come from the synthesized app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import boto3
import pytest
from moto import mock_aws

from llmq import aws
from llmq.config import LlmqConfig
from llmq.errors import CancelRequested, LeaseLost, ReadCutShort, StoreUnavailable
from llmq.job_record import JobRecord
from llmq.jobs import SWEEP_RECOVERED_MS, JobRepository, SweepPass
from llmq.live_output import OutputChunk, chunk_pk
from llmq.models import (
    DeliveryAttempt,
    DeliveryStatus,
    ErrorCode,
    JobError,
    JobResult,
    JobStatus,
    OutputDelta,
    WebhookEvent,
)
from llmq.policy import ClaimOutcome
from llmq.ports import JobStore
from llmq_sandbox.moto_fidelity import make_moto_strict
from tests.conftest import REGION, create_llmq_resources
from tests.support.stores import ROOMY, Clock, InMemoryJobs, job_record

LEASE_SECONDS = 60.0
ERROR = JobError(code=ErrorCode.PROVIDER_UNAVAILABLE, message="busy", retryable=True)


@dataclass
class Subject:
    jobs: JobStore
    clock: Clock

    def created(self, **changes: object) -> str:
        record = job_record(self.jobs.now_ms(), **changes)
        assert not self.jobs.create(record, ROOMY).replayed
        return record.id

    def status(self, job_id: str = "job_1") -> JobStatus:
        found = self.jobs.find(job_id)
        assert found is not None
        return found.status


@pytest.fixture(scope="module")
def jobs_table() -> Iterator[str]:
    """One in-process moto for the module (creating the tables costs seconds); emptied per case."""
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.setenv(name, "testing")
        env.setenv("AWS_REGION", REGION)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        make_moto_strict()
        with mock_aws():
            aws.reset_clients()
            yield create_llmq_resources(["high", "low"]).jobs_table
        aws.reset_clients()


@pytest.fixture(params=["memory", "dynamodb"])
def subject(request: pytest.FixtureRequest) -> Subject:
    clock, config = Clock(), LlmqConfig()
    if request.param == "memory":
        return Subject(InMemoryJobs(config, clock), clock)
    table = request.getfixturevalue("jobs_table")
    ddb = aws.client("dynamodb")
    for item in ddb.scan(TableName=table, ProjectionExpression="pk")["Items"]:
        ddb.delete_item(TableName=table, Key={"pk": item["pk"]})
    return Subject(JobRepository(table, config, dynamodb=ddb, clock=clock), clock)


def test_a_replayed_create_returns_the_stored_job(subject: Subject) -> None:
    subject.created()
    replay = subject.jobs.create(job_record(subject.jobs.now_ms(), request_hash="other"), ROOMY)
    assert (replay.replayed, replay.job.request_hash) == (True, "h")


def test_a_queued_job_is_claimed_once_and_a_live_lease_refuses_the_next_claim(subject: Subject) -> None:
    job_id = subject.created()
    first = subject.jobs.claim(job_id, "w1", LEASE_SECONDS)
    second = subject.jobs.claim(job_id, "w2", LEASE_SECONDS)
    assert first.claimed and first.job is not None and first.job.attempts == 1
    assert (second.claimed, second.outcome) == (False, ClaimOutcome.LEASED_ELSEWHERE)
    found = subject.jobs.find(job_id)
    assert found is not None and found.lease_owner == "w1"


def test_a_claim_retried_by_its_owner_is_recognised(subject: Subject) -> None:
    job_id = subject.created()
    subject.jobs.claim(job_id, "w1", LEASE_SECONDS)
    again = subject.jobs.claim(job_id, "w1", LEASE_SECONDS)
    assert again.claimed and again.job is not None and again.job.attempts == 1


def test_a_lapsed_lease_is_taken_over(subject: Subject) -> None:
    job_id = subject.created()
    subject.jobs.claim(job_id, "w1", LEASE_SECONDS)
    subject.clock.advance(LEASE_SECONDS + 1)
    taken = subject.jobs.claim(job_id, "w2", LEASE_SECONDS)
    assert taken.claimed and taken.job is not None
    assert (taken.job.lease_owner, taken.job.attempts) == ("w2", 2)


def test_only_the_lease_holder_completes_and_its_retry_is_recognised(subject: Subject) -> None:
    job_id = subject.created()
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    with pytest.raises(LeaseLost):
        subject.jobs.complete(claimed, "w2", result=JobResult(output="theirs"))
    done = subject.jobs.complete(claimed, "w1", result=JobResult(output="ours"))
    again = subject.jobs.complete(claimed, "w1", result=JobResult(output="ours"))
    assert (done.status, again.status, again.result) == (
        JobStatus.SUCCEEDED,
        JobStatus.SUCCEEDED,
        JobResult(output="ours"),
    )


def test_a_terminal_job_never_moves(subject: Subject) -> None:
    job_id = subject.created(deadline_ms=subject.jobs.now_ms() + 1000)
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    done = subject.jobs.fail_leased(claimed, "w1", ERROR)
    subject.clock.advance(LEASE_SECONDS + 5)
    assert subject.jobs.claim(job_id, "w2", LEASE_SECONDS).outcome is ClaimOutcome.TERMINAL
    assert subject.jobs.expire(done, ERROR) is None
    assert subject.jobs.fail_unleased(done, ERROR) is None
    assert subject.jobs.cancel_queued(done, "cancel#1") is None
    assert subject.jobs.request_cancel(done) is None
    assert subject.status(job_id) is JobStatus.FAILED


def test_cancel_of_a_queued_job_ends_canceled_and_its_retry_is_recognised(subject: Subject) -> None:
    job_id = subject.created()
    queued = subject.jobs.find(job_id)
    assert queued is not None
    canceled = subject.jobs.cancel_queued(queued, "cancel#1")
    again = subject.jobs.cancel_queued(queued, "cancel#1")
    assert canceled is not None and canceled.status is JobStatus.CANCELED
    assert again is not None and again.status is JobStatus.CANCELED
    assert subject.jobs.cancel_queued(queued, "cancel#2") is None


def test_a_running_job_asked_to_cancel_cannot_be_requeued(subject: Subject) -> None:
    job_id = subject.created()
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    flagged = subject.jobs.request_cancel(claimed)
    assert flagged is not None and flagged.cancel_requested
    assert subject.jobs.is_cancel_requested(job_id)
    with pytest.raises(CancelRequested):
        subject.jobs.requeue(claimed, "w1", ERROR, 5)
    assert subject.jobs.cancel_leased(claimed, "w1").status is JobStatus.CANCELED


def test_a_running_job_asked_to_cancel_cannot_be_failed_over_its_cancel(subject: Subject) -> None:
    job_id = subject.created()
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None and subject.jobs.request_cancel(claimed) is not None
    # A failure is refused over the cancel, the lease still ours; another worker's is refused
    # as a lost lease, whatever the flag
    with pytest.raises(CancelRequested):
        subject.jobs.fail_leased(claimed, "w1", ERROR)
    with pytest.raises(LeaseLost):
        subject.jobs.fail_leased(claimed, "w2", ERROR)
    assert subject.status(job_id) is JobStatus.RUNNING
    # And a failure an earlier attempt parked, recorded once the lease lapsed, ends it canceled
    subject.clock.advance(LEASE_SECONDS + 1)
    ended = subject.jobs.end_with_parked(claimed, error=ERROR)
    assert ended is not None and ended.status is JobStatus.CANCELED
    assert subject.status(job_id) is JobStatus.CANCELED


def test_a_requeued_job_waits_out_its_delay_and_keeps_its_attempt(subject: Subject) -> None:
    job_id = subject.created()
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    requeued = subject.jobs.requeue(claimed, "w1", ERROR, 30)
    assert subject.jobs.requeue(claimed, "w1", ERROR, 30).status is JobStatus.QUEUED  # its own retry
    early = subject.jobs.claim(job_id, "w2", LEASE_SECONDS)
    subject.clock.advance(31)
    late = subject.jobs.claim(job_id, "w2", LEASE_SECONDS)
    assert (requeued.status, requeued.attempts) == (JobStatus.QUEUED, 1)
    assert (early.outcome, late.claimed) == (ClaimOutcome.NOT_YET_DUE, True)
    assert late.job is not None and late.job.attempts == 2


def test_a_queued_job_expires_only_once_its_deadline_passed(subject: Subject) -> None:
    job_id = subject.created(deadline_ms=subject.jobs.now_ms() + 10_000)
    queued = subject.jobs.find(job_id)
    assert queued is not None
    assert subject.jobs.expire(queued, ERROR) is None
    subject.clock.advance(11)
    expired = subject.jobs.expire(queued, ERROR)
    assert expired is not None and expired.status is JobStatus.EXPIRED


def test_a_delivery_moves_only_while_pending_and_a_late_success_still_counts(subject: Subject) -> None:
    job_id = subject.created(webhook_url="https://hooks.example.com/x", webhook_events=[WebhookEvent.FAILED])
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    failed = subject.jobs.fail_leased(claimed, "w1", ERROR)
    assert failed.delivery_status is DeliveryStatus.PENDING
    assert subject.jobs.record_delivery(job_id, DeliveryStatus.FAILED, 500)
    assert not subject.jobs.record_delivery(job_id, DeliveryStatus.PENDING, 500, 5)
    assert subject.jobs.record_delivery(job_id, DeliveryStatus.DELIVERED, 200)
    found = subject.jobs.find(job_id)
    assert found is not None and (found.delivery_status, found.delivery_attempts) == (
        DeliveryStatus.DELIVERED,
        2,
    )


def _failed_with_a_pending_webhook(subject: Subject) -> str:
    """A job that failed with its job.failed webhook pending, no attempt counted yet."""
    job_id = subject.created(webhook_url="https://hooks.example.com/x", webhook_events=[WebhookEvent.FAILED])
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    subject.jobs.fail_leased(claimed, "w1", ERROR)
    return job_id


def _record_attempt(subject: Subject, job_id: str, status: DeliveryStatus, code: int, attempt: int) -> bool:
    """The dispatcher's record of attempt `attempt`, answered `code`, read after the one before."""
    entry = DeliveryAttempt(attempt=attempt, at="2026-12-02T10:00:00.000Z", status_code=code, latency_ms=3)
    return subject.jobs.record_delivery(
        job_id, status, code, 1.0, previous_attempts=attempt - 1, attempt=entry, log_seq=attempt - 1
    )


def _delivery(subject: Subject, job_id: str) -> tuple[DeliveryStatus | None, int]:
    found = subject.jobs.find(job_id)
    assert found is not None
    return found.delivery_status, found.delivery_attempts


@pytest.mark.parametrize(("counted_meanwhile", "expected"), [(3, 3), (4, 4)])
def test_a_success_counts_its_own_attempt_once_and_never_below_a_later_one(
    subject: Subject, counted_meanwhile: int, expected: int
) -> None:
    # Given a job whose delivery counted two failed attempts
    job_id = _failed_with_a_pending_webhook(subject)
    for n in range(1, counted_meanwhile + 1):
        assert _record_attempt(subject, job_id, DeliveryStatus.PENDING, 500, n)
    # When attempt 3's other POST (its message handed over twice) was answered 200, and its
    # twin counted attempt 3 failed first (and maybe a later copy counted attempt 4 too)
    assert _record_attempt(subject, job_id, DeliveryStatus.DELIVERED, 200, 3)
    # Then the delivery is delivered, and counts what the receiver saw as rounds
    assert _delivery(subject, job_id) == (DeliveryStatus.DELIVERED, expected)


def test_a_410_counts_its_own_attempt_once_and_a_late_success_counts_once_in_a_new_round(
    subject: Subject,
) -> None:
    # Given a job whose delivery counted attempts 1 and 2, and its twin's 500 for attempt 3
    job_id = _failed_with_a_pending_webhook(subject)
    for n in (1, 2, 3):
        assert _record_attempt(subject, job_id, DeliveryStatus.PENDING, 500, n)
    # When attempt 3's other POST is answered 410 Gone
    assert _record_attempt(subject, job_id, DeliveryStatus.DISABLED, 410, 3)
    # Then the delivery is disabled after three attempts, as the receiver saw them
    assert _delivery(subject, job_id) == (DeliveryStatus.DISABLED, 3)
    # And a 410 to the last attempt, beside its twin's give-up, still turns it disabled
    subject.jobs.mark_delivery_pending(job_id, "ten_acme")
    assert _record_attempt(subject, job_id, DeliveryStatus.FAILED, 500, 1)
    assert _record_attempt(subject, job_id, DeliveryStatus.DISABLED, 410, 1)
    assert _delivery(subject, job_id) == (DeliveryStatus.DISABLED, 1)
    # And in a redelivery's round, after its attempt 1, a late 200 to the old round's attempt 4
    # counts as one more attempt of the new round, not as the old round's number
    subject.jobs.mark_delivery_pending(job_id, "ten_acme")
    assert _record_attempt(subject, job_id, DeliveryStatus.PENDING, 500, 1)
    assert _record_attempt(subject, job_id, DeliveryStatus.DELIVERED, 200, 4)
    assert _delivery(subject, job_id) == (DeliveryStatus.DELIVERED, 2)


def test_a_late_answer_of_the_round_before_a_redelivery_keeps_the_new_rounds_attempt_in_the_log(
    subject: Subject,
) -> None:
    """Hunt 207: a late answer counted as one of a redelivery's round went into the log slot of
    the sequence it read before the redelivery, where the new round's attempt was by then: the
    latest failure, the one an integrator looks at, vanished from `GET .../webhook`."""
    job_id = _failed_with_a_pending_webhook(subject)

    def record(status: DeliveryStatus, code: int, attempt: int, previous: int, log_seq: int) -> bool:
        entry = DeliveryAttempt(
            attempt=attempt, at="2026-12-02T10:00:00.000Z", status_code=code, latency_ms=3
        )
        return subject.jobs.record_delivery(
            job_id, status, code, 1.0, previous_attempts=previous, attempt=entry, log_seq=log_seq
        )

    def logged() -> list[tuple[int, int | None]]:
        found = subject.jobs.find(job_id)
        assert found is not None
        return [(entry.attempt, entry.status_code) for entry in found.delivery_log]

    # Given two failed attempts, and a third whose POST is slow to be answered (it read the
    # log's sequence, 2)
    assert record(DeliveryStatus.PENDING, 500, 1, 0, 0)
    assert record(DeliveryStatus.PENDING, 500, 2, 1, 1)
    # When a redelivery starts a new round, whose first attempt fails
    subject.jobs.mark_delivery_pending(job_id, "ten_acme")
    assert record(DeliveryStatus.PENDING, 500, 1, 0, 2)
    # And then the old third attempt is answered 200
    assert record(DeliveryStatus.DELIVERED, 200, 3, 2, 2)
    # Then it counts as the new round's second attempt, and the log keeps every attempt, in order
    assert _delivery(subject, job_id) == (DeliveryStatus.DELIVERED, 2)
    assert logged() == [(1, 500), (2, 500), (1, 500), (3, 200)]


def _recorded(
    subject: Subject,
    job_id: str,
    status: DeliveryStatus,
    code: int,
    attempt: int,
    previous: int,
    log_seq: int,
) -> bool:
    """The dispatcher's record of attempt `attempt`, answered `code`, as read: the count
    `previous` and the log's sequence `log_seq`."""
    entry = DeliveryAttempt(attempt=attempt, at="2026-12-02T10:00:00.000Z", status_code=code, latency_ms=3)
    return subject.jobs.record_delivery(
        job_id, status, code, 1.0, previous_attempts=previous, attempt=entry, log_seq=log_seq
    )


def _logged(subject: Subject, job_id: str) -> list[tuple[int, int | None]]:
    found = subject.jobs.find(job_id)
    assert found is not None
    return [(entry.attempt, entry.status_code) for entry in found.delivery_log]


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (DeliveryStatus.DELIVERED, 200, (DeliveryStatus.DELIVERED, 3)),
        (DeliveryStatus.PENDING, 500, (DeliveryStatus.PENDING, 3)),
    ],
)
def test_a_late_answer_whose_number_fits_the_new_rounds_count_is_logged_after_the_new_rounds_attempts(
    subject: Subject, status: DeliveryStatus, code: int, expected: tuple[DeliveryStatus, int]
) -> None:
    """Review 209: the old round's attempt 3, read at count 2 and log sequence 2, is answered
    after a redelivery's round counted two attempts: its count fits, so the write was accepted
    at once and logged into slot 2, over the new round's first attempt."""
    job_id = _failed_with_a_pending_webhook(subject)
    # Given two failed attempts, and a third whose POST is slow to be answered
    assert _recorded(subject, job_id, DeliveryStatus.PENDING, 500, 1, 0, 0)
    assert _recorded(subject, job_id, DeliveryStatus.PENDING, 500, 2, 1, 1)
    # When a redelivery's round fails twice meanwhile
    subject.jobs.mark_delivery_pending(job_id, "ten_acme")
    assert _recorded(subject, job_id, DeliveryStatus.PENDING, 502, 1, 0, 2)
    assert _recorded(subject, job_id, DeliveryStatus.PENDING, 503, 2, 1, 3)
    # And then the old third attempt is answered
    assert _recorded(subject, job_id, status, code, 3, 2, 2)
    # Then it counts as the new round's third, and the log keeps every attempt, in order
    assert _delivery(subject, job_id) == expected
    assert _logged(subject, job_id) == [(1, 500), (2, 500), (1, 502), (2, 503), (3, code)]


def test_both_copies_of_one_attempt_are_logged_when_one_failed_and_the_other_succeeded(
    subject: Subject,
) -> None:
    """One receive handed over twice: both copies POST attempt 2, read at log sequence 1; the
    receiver fails one and takes the other. Each answer is an entry of its own."""
    job_id = _failed_with_a_pending_webhook(subject)
    assert _recorded(subject, job_id, DeliveryStatus.PENDING, 500, 1, 0, 0)
    # When one copy records attempt 2 failed, and then the other its success
    assert _recorded(subject, job_id, DeliveryStatus.PENDING, 500, 2, 1, 1)
    assert _recorded(subject, job_id, DeliveryStatus.DELIVERED, 200, 2, 1, 1)
    # Then the delivery counts two attempts, and logs three answers
    assert _delivery(subject, job_id) == (DeliveryStatus.DELIVERED, 2)
    assert _logged(subject, job_id) == [(1, 500), (2, 500), (2, 200)]


@pytest.fixture
def dynamodb_subject(request: pytest.FixtureRequest) -> Subject:
    """The DynamoDB repository alone: what the in-memory fake cannot interleave."""
    table = request.getfixturevalue("jobs_table")
    clock, ddb = Clock(), aws.client("dynamodb")
    for item in ddb.scan(TableName=table, ProjectionExpression="pk")["Items"]:
        ddb.delete_item(TableName=table, Key={"pk": item["pk"]})
    return Subject(JobRepository(table, LlmqConfig(), dynamodb=ddb, clock=clock), clock)


@contextmanager
def _updates_seen(client: Any, before_each: Callable[[dict[str, Any]], None]) -> Iterator[list[str]]:
    """The ConditionExpression of each UpdateItem `client` sends, with `before_each` run first."""
    conditions: list[str] = []

    def seen(params: dict[str, Any], **_: Any) -> None:
        conditions.append(params.get("ConditionExpression", ""))
        before_each(params)

    client.meta.events.register("provide-client-params.dynamodb.UpdateItem", seen, unique_id="r210")
    try:
        yield conditions
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.UpdateItem", unique_id="r210")


@pytest.mark.parametrize("moves", [1, 5])
def test_a_success_follows_a_log_that_moves_on_before_each_of_its_writes(
    dynamodb_subject: Subject, moves: int
) -> None:
    """Review 210: a write that follows the moved log gave up after four tries, and a success
    was then taken for another copy's outcome (the job stayed pending; its next attempt POSTed
    again). Each move is another writer's accepted entry, so following it always ends."""
    subject = dynamodb_subject
    job_id = _failed_with_a_pending_webhook(subject)
    assert isinstance(subject.jobs, JobRepository)
    other = JobRepository(
        subject.jobs.table_name, LlmqConfig(), dynamodb=boto3.client("dynamodb"), clock=subject.clock
    )
    interleaved: list[int] = []

    def a_redelivery_fails_first(params: dict[str, Any]) -> None:
        # (before each try of the write under test: a redelivery, whose attempt 1 fails)
        if ":log_at" in params.get("ConditionExpression", "") and len(interleaved) < moves:
            found = other.find(job_id)
            assert found is not None
            other.mark_delivery_pending(job_id, "ten_acme")
            entry = DeliveryAttempt(attempt=1, at="2026-12-02T10:00:00.000Z", status_code=500, latency_ms=3)
            assert other.record_delivery(
                job_id,
                DeliveryStatus.PENDING,
                500,
                1.0,
                previous_attempts=0,
                attempt=entry,
                log_seq=found.delivery_log_seq,
            )
            interleaved.append(found.delivery_log_seq)

    # When attempt 1 is answered 200, read at count 0 and the log's sequence 0, and the log moves
    # on before each of its writes `moves` times
    with _updates_seen(aws.client("dynamodb"), a_redelivery_fails_first) as conditions:
        assert _recorded(subject, job_id, DeliveryStatus.DELIVERED, 200, 1, 0, 0)
    # Then it is recorded, as the latest round's first attempt, after every entry logged before it
    assert interleaved == list(range(moves))
    assert len(conditions) == moves + 1
    assert _delivery(subject, job_id) == (DeliveryStatus.DELIVERED, 1)
    assert _logged(subject, job_id) == [(1, 500)] * moves + [(1, 200)]


def test_a_copys_refused_failure_costs_one_write(dynamodb_subject: Subject) -> None:
    """Review 210: a copy whose count was taken by its twin was refused on the count and the
    log at once, and followed the log into a second write doomed by the count."""
    subject = dynamodb_subject
    job_id = _failed_with_a_pending_webhook(subject)
    assert _recorded(subject, job_id, DeliveryStatus.PENDING, 500, 1, 0, 0)
    # When the twin copy of attempt 1 records its 500 as well, read at count 0 and sequence 0
    with _updates_seen(aws.client("dynamodb"), lambda _: None) as conditions:
        assert not _recorded(subject, job_id, DeliveryStatus.PENDING, 500, 1, 0, 0)
    # Then it is refused in one write, and the delivery counts and logs one attempt
    assert len(conditions) == 1
    assert _delivery(subject, job_id) == (DeliveryStatus.PENDING, 1)
    assert _logged(subject, job_id) == [(1, 500)]


def test_the_delivery_log_keeps_the_latest_ten_attempts_across_a_redelivery(subject: Subject) -> None:
    job_id = subject.created(webhook_url="https://hooks.example.com/x", webhook_events=[WebhookEvent.FAILED])
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    subject.jobs.fail_leased(claimed, "w1", ERROR)

    def log(attempt: int, status: DeliveryStatus, previous: int) -> None:
        found = subject.jobs.find(job_id)
        assert found is not None
        entry = DeliveryAttempt(attempt=attempt, at="2026-12-02T10:00:00.000Z", status_code=500, latency_ms=3)
        assert subject.jobs.record_delivery(
            job_id,
            status,
            500,
            1.0,
            previous_attempts=previous,
            attempt=entry,
            log_seq=found.delivery_log_seq,
        )

    for n in range(1, 9):
        log(n, DeliveryStatus.FAILED if n == 8 else DeliveryStatus.PENDING, n - 1)
    subject.jobs.mark_delivery_pending(job_id, "ten_acme")
    for n in range(1, 4):
        log(n, DeliveryStatus.PENDING, n - 1)
    found = subject.jobs.find(job_id)
    assert found is not None
    assert [entry.attempt for entry in found.delivery_log] == [*range(2, 9), 1, 2, 3]
    assert found.delivery_log_seq == 11


def test_the_sweep_index_holds_unfinished_jobs_until_they_finish(subject: Subject) -> None:
    job_id = subject.created()
    stale = LlmqConfig().reconciler.stale_queued_seconds
    assert list(subject.jobs.sweep(subject.jobs.now_ms(), 10)) == []
    subject.clock.advance(stale + 1)
    due = list(subject.jobs.sweep(subject.jobs.now_ms(), 10))
    assert [(entry.job_id, entry.status) for entry in due] == [(job_id, JobStatus.QUEUED)]
    assert subject.jobs.count_unfinished() == {"high": 1}
    assert subject.jobs.postpone_sweep(job_id, 60)
    assert list(subject.jobs.sweep(subject.jobs.now_ms(), 10)) == []
    queued = subject.jobs.find(job_id)
    assert queued is not None
    subject.jobs.cancel_queued(queued, "cancel#1")
    assert not subject.jobs.postpone_sweep(job_id, 60)
    assert subject.jobs.count_unfinished() == {}


def test_the_sweeps_three_passes_read_each_due_entry_once(subject: Subject) -> None:
    """`SweepPass`: the reconciler reads the lapsed leases, then what cannot wait for a lane's
    backlog, then the backlog: each due entry in exactly one of them."""
    # Given, all due: a stale queued job, one past its deadline, a crashed worker's and an
    # ended job with its webhook pending
    failed = _failed_with_a_pending_webhook(subject)
    waiting = subject.created(id="job_waiting")
    late = subject.created(id="job_late", deadline_ms=subject.jobs.now_ms() + 1_000)
    crashed = subject.created(id="job_crashed")
    assert subject.jobs.claim(crashed, "w1", LEASE_SECONDS).job is not None
    thresholds = LlmqConfig().reconciler
    subject.clock.advance(max(thresholds.stale_queued_seconds, thresholds.stale_webhook_seconds) + 1)
    now = subject.jobs.now_ms()

    def swept(only: SweepPass | None) -> set[str]:
        return {entry.job_id for entry in subject.jobs.sweep(now, 10, only)}

    # Then each pass reads its own, and together they read what the whole index holds
    assert swept(SweepPass.LAPSED) == {crashed}
    assert swept(SweepPass.URGENT) == {late, failed}
    assert swept(SweepPass.BACKLOG) == {waiting}
    assert swept(None) == {waiting, late, crashed, failed}


@pytest.mark.parametrize("queued_by", ["accept", "requeue", "recover", "postpone"])
def test_a_queued_job_is_due_for_the_sweep_by_its_deadline(subject: Subject, queued_by: str) -> None:
    # A job with a deadline 200 s away (sooner than it would be stale: 300 s), queued by each
    # write that queues it, or left queued by the reconciler's postpone
    deadline_ms = subject.jobs.now_ms() + 200_000
    job_id = subject.created(deadline_ms=deadline_ms)
    if queued_by in ("requeue", "recover"):
        claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
        assert claimed is not None
        if queued_by == "requeue":
            assert subject.jobs.requeue(claimed, "w1", ERROR, 30).status is JobStatus.QUEUED
        else:
            subject.clock.advance(LEASE_SECONDS + 1)
            assert subject.jobs.recover(claimed) is not None
            # (at the front until the reconciler sent its message, then postponed as it does)
            assert [entry.job_id for entry in subject.jobs.sweep(SWEEP_RECOVERED_MS, 10)] == [job_id]
            assert subject.jobs.postpone_sweep(
                job_id, 300, status=JobStatus.QUEUED, seen_at=SWEEP_RECOVERED_MS, not_after_ms=deadline_ms
            )
    if queued_by == "postpone":
        assert subject.jobs.postpone_sweep(job_id, 600, status=JobStatus.QUEUED, not_after_ms=deadline_ms)
    # The sweep finds it at its deadline, not a moment before
    assert list(subject.jobs.sweep(deadline_ms - 1, 10)) == []
    assert [entry.job_id for entry in subject.jobs.sweep(deadline_ms, 10)] == [job_id]


# ---- live output (llmq.live_output) ---------------------------------------------------------


def _chunk(seq: int, delta: str, attempt: int = 1, reset: bool = False) -> OutputChunk:
    return OutputChunk(
        seq=seq, delta=delta, attempt=attempt, reset=reset, tokens=seq, partial=delta[:4], truncated=False
    )


def test_output_chunks_are_written_in_order_under_the_lease_and_read_back(subject: Subject) -> None:
    job_id = subject.created(stream=True)
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    # Non-ASCII text, an emoji included, round-trips as written
    subject.jobs.write_output(claimed, "w1", _chunk(1, "Grüße "))
    subject.jobs.write_output(claimed, "w1", _chunk(2, "日本語 🎉"))
    # A retry of a write that was applied (its answer lost) is recognised, not doubled
    subject.jobs.write_output(claimed, "w1", _chunk(2, "日本語 🎉"))
    deltas = subject.jobs.read_output(claimed, 1, 5)
    assert [(delta.seq, delta.delta) for delta in deltas] == [(1, "Grüße "), (2, "日本語 🎉")]
    head = subject.jobs.output_head(job_id)
    assert head is not None and (head.status, head.stream_seq, head.tenant_id) == (
        JobStatus.RUNNING,
        2,
        "ten_acme",
    )
    found = subject.jobs.find(job_id)
    assert found is not None and (found.stream_seq, found.progress_tokens, found.output_partial) == (
        2,
        2,
        "日本語 ",
    )
    # And reads stop at the first chunk that is not there
    assert [delta.seq for delta in subject.jobs.read_output(claimed, 2, 9)] == [2]
    assert subject.jobs.read_output(claimed, 3, 9) == []


def test_output_past_its_ttl_is_skipped_and_the_oldest_chunk_left_read_first(subject: Subject) -> None:
    # Given a first attempt's chunks, then a takeover a chunk's TTL later whose chunks follow
    job_id = subject.created(stream=True, expires_at=subject.jobs.now_ms() // 1000 + 7 * 86_400)
    first = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert first is not None
    subject.jobs.write_output(first, "w1", replace(_chunk(1, "a"), opens=True))
    subject.jobs.write_output(first, "w1", _chunk(2, "b"))
    # (the job keeps its current attempt's first chunk)
    assert subject.jobs.find(job_id).stream_from == 1  # type: ignore[union-attr]
    subject.clock.advance(LlmqConfig().streaming.chunk_ttl_seconds + 1)
    taken = subject.jobs.claim(job_id, "w2", LEASE_SECONDS).job
    assert taken is not None and taken.attempts == 2
    subject.jobs.write_output(taken, "w2", replace(_chunk(3, "A", attempt=2, reset=True), opens=True))
    subject.jobs.write_output(taken, "w2", _chunk(4, "B", attempt=2))
    assert subject.jobs.find(job_id).stream_from == 3  # type: ignore[union-attr]
    # Then a read from the start skips the expired chunks and reads the fresh ones, in order
    assert [(delta.seq, delta.delta, delta.reset) for delta in subject.jobs.read_output(taken, 1, 9)] == [
        (3, "A", True),
        (4, "B", False),
    ]
    assert [delta.seq for delta in subject.jobs.read_output(taken, 4, 9)] == [4]
    assert subject.jobs.read_output(taken, 5, 9) == []


class _LeavesUnread:
    """A store whose reads of the chunks `unread` (by seq) are throttled, however often asked:
    the repository's BatchGetItem leaves them in UnprocessedKeys; the fake, its `unread_chunks`."""

    def __init__(self, subject: Subject) -> None:
        self.jobs = subject.jobs
        self.unread: set[int] = set()
        self._job: JobRecord | None = None
        self._client: Any = None
        if isinstance(subject.jobs, JobRepository):
            self._client, subject.jobs._ddb = subject.jobs._ddb, self

    def read_output(self, job: JobRecord, first: int, last: int, **limit: int) -> list[OutputDelta]:
        self._job = job
        if self._client is None:
            self.jobs.unread_chunks = {(job.id, seq) for seq in self.unread}  # type: ignore[attr-defined]
        return list(self.jobs.read_output(job, first, last, **limit))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        assert self._job is not None
        unread = {chunk_pk(self._job, seq) for seq in self.unread}
        response = dict(self._client.batch_get_item(RequestItems=RequestItems))
        left: dict[str, Any] = {}
        for table, answered in response.get("Responses", {}).items():
            response["Responses"][table] = [item for item in answered if item["pk"]["S"] not in unread]
            keys = [key for key in RequestItems[table]["Keys"] if key["pk"]["S"] in unread]
            if keys:
                left[table] = {**RequestItems[table], "Keys": keys}
        response["UnprocessedKeys"] = left
        return response


def test_a_chunk_a_throttled_read_left_unread_is_never_skipped_as_expired(subject: Subject) -> None:
    # Given a first attempt's 150 chunks past their TTL, and a takeover's three fresh ones
    job_id = subject.created(stream=True, expires_at=subject.jobs.now_ms() // 1000 + 7 * 86_400)
    first = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert first is not None
    for seq in range(1, 151):
        subject.jobs.write_output(first, "w1", _chunk(seq, "old"))
    subject.clock.advance(LlmqConfig().streaming.chunk_ttl_seconds + 1)
    taken = subject.jobs.claim(job_id, "w2", LEASE_SECONDS).job
    assert taken is not None
    for seq, text in ((151, "a"), (152, "b"), (153, "c")):
        subject.jobs.write_output(taken, "w2", _chunk(seq, text, attempt=2, reset=seq == 151))
    jobs = _LeavesUnread(subject)
    # When nothing is left unread, a read from the start skips two pages of expired chunks
    assert [delta.seq for delta in jobs.read_output(taken, 1, 153)] == [151, 152, 153]
    # When the first fresh chunk is left unread (past the expired ones), nothing is skipped
    # past it: the read says AWS is busy
    jobs.unread = {151}
    with pytest.raises(StoreUnavailable):
        jobs.read_output(taken, 1, 153)
    # When a later one is, the run ends before it
    jobs.unread = {152}
    assert [delta.seq for delta in jobs.read_output(taken, 1, 153)] == [151]
    # And a page limit bounds what one read returns (and reads)
    jobs.unread = set()
    assert [delta.seq for delta in jobs.read_output(taken, 150, 153, limit=2)] == [151]
    assert [delta.seq for delta in jobs.read_output(taken, 152, 153, limit=2)] == [152, 153]


def test_a_follower_of_a_job_awaiting_its_retry_past_the_ttl_reads_a_page_at_most_a_response(
    subject: Subject,
) -> None:
    # Given a first attempt's 300 chunks, the job sent back to wait past their TTL
    from llmq.intake import JobIntake
    from llmq.models import JobError
    from llmq.tenants import TenantIdentity
    from tests.support.stores import InMemoryQueues

    job_id = subject.created(stream=True, expires_at=subject.jobs.now_ms() // 1000 + 7 * 86_400)
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    for seq in range(1, 301):
        subject.jobs.write_output(claimed, "w1", replace(_chunk(seq, "x"), opens=seq == 1))
    error = JobError(code="provider_unavailable", message="busy", retryable=True)
    subject.jobs.requeue(claimed, "w1", error, 86_400)
    subject.clock.advance(LlmqConfig().streaming.chunk_ttl_seconds + 1)
    asked: list[int] = []
    real = subject.jobs.read_output

    def counted(job: JobRecord, first: int, last: int, **limit: int) -> list[OutputDelta]:
        asked.append(min(last, first + limit.get("limit", 100) - 1) - first + 1)
        return real(job, first, last, **limit)

    subject.jobs.read_output = counted  # type: ignore[method-assign]
    intake = JobIntake(subject.jobs, InMemoryQueues(), LlmqConfig(), lambda url: None, sleep=lambda s: None)
    tenant = TenantIdentity(tenant_id="ten_acme", tier="enterprise")
    # When a new follower asks three times, served nothing of the abandoned attempt
    for _ in range(3):
        body = intake.output_events(tenant, job_id, seen=0, wait_seconds=0)
        assert "output.delta" not in body and "event: status" in body
    # Then each response read one page at most, not every expired chunk
    assert len(asked) == 3 and max(asked) <= 100


def test_an_output_write_tells_its_worker_of_a_cancel_or_a_lost_lease(subject: Subject) -> None:
    job_id = subject.created(stream=True)
    claimed = subject.jobs.claim(job_id, "w1", LEASE_SECONDS).job
    assert claimed is not None
    subject.jobs.write_output(claimed, "w1", _chunk(1, "a"))
    # Another worker's write is refused as a lost lease, and writes nothing
    with pytest.raises(LeaseLost):
        subject.jobs.write_output(claimed, "w2", _chunk(2, "theirs"))
    # After the client asked to cancel, the holder's next write is refused as a cancel
    assert subject.jobs.request_cancel(claimed) is not None
    with pytest.raises(CancelRequested):
        subject.jobs.write_output(claimed, "w1", _chunk(2, "b"))
    assert [delta.delta for delta in subject.jobs.read_output(claimed, 1, 5)] == ["a"]
    # And once the job has ended, no write lands
    subject.jobs.cancel_leased(claimed, "w1")
    with pytest.raises(LeaseLost):
        subject.jobs.write_output(claimed, "w1", _chunk(2, "late"))
    assert subject.jobs.read_output(claimed, 2, 5) == []


def test_what_a_terminal_write_returns_is_the_job_stored_as_its_webhook_shows_it(subject: Subject) -> None:
    """The record a terminal write returns travels in the webhook message (`job_snapshot`):
    the webhook must show what GET /v1/jobs/{id} shows."""
    from llmq.job_record import JobRecord
    from llmq.models import TERMINAL_EVENTS
    from llmq.queues import job_snapshot

    hook = {"webhook_url": "https://hooks.example.com/x", "webhook_events": list(TERMINAL_EVENTS)}

    def shown(record: JobRecord) -> dict[str, object]:
        return record.to_job(api_base="https://api.llmq.test").model_dump(mode="json")

    ended = []
    # A job canceled while it ran, as the worker's watcher ends it
    running = subject.jobs.claim(subject.created(job_id="job_canceled", **hook), "w1", LEASE_SECONDS).job
    assert running is not None and subject.jobs.request_cancel(running) is not None
    ended.append(subject.jobs.cancel_leased(running, "w1"))
    # A job that succeeded, and one that failed
    for finish in ("complete", "fail"):
        claimed = subject.jobs.claim(subject.created(job_id=f"job_{finish}", **hook), "w1", LEASE_SECONDS).job
        assert claimed is not None
        if finish == "complete":
            ended.append(subject.jobs.complete(claimed, "w1", result=JobResult(output="Grüße ✓")))
        else:
            error = JobError(code=ErrorCode.PROVIDER_ERROR, message="no", retryable=False)
            ended.append(subject.jobs.fail_leased(claimed, "w1", error))
    for record in ended:
        stored = subject.jobs.find(record.id)
        assert stored is not None
        snapshot = job_snapshot(record)
        assert snapshot is not None
        assert shown(JobRecord.model_validate(snapshot)) == shown(stored)
    assert [record.to_job().cancel_requested for record in ended] == [True, False, False]


def test_a_count_given_no_time_is_cut_short_not_answered_in_part(subject: Subject) -> None:
    # (the reconciler's run ends within its time: review 275, hunt 315)
    subject.created()
    with pytest.raises(ReadCutShort):
        subject.jobs.count_unfinished(stop=lambda: True)
    assert subject.jobs.count_unfinished(stop=lambda: False) == {"high": 1}


@pytest.mark.parametrize("named", [("ten_other", "high"), ("ten_acme", "low")], ids=["tenant", "lane"])
def test_a_claim_naming_another_tenant_or_lane_is_foreign_and_writes_nothing(
    subject: Subject, named: tuple[str, str]
) -> None:
    # (hunt 316: a message naming another tenant or lane than its job's)
    job_id = subject.created()
    before = subject.jobs.find(job_id)
    claim = subject.jobs.claim(job_id, "w1", 60.0, named)
    assert claim.outcome is ClaimOutcome.FOREIGN
    assert subject.jobs.find(job_id) == before
