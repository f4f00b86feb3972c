"""JobIntake on in-memory stores: accept, replay, cancel and redeliver, as the API's client sees them."""

from __future__ import annotations

import hashlib

import pytest

from llmq.config import LlmqConfig
from llmq.errors import (
    IdempotencyConflict,
    JobNotCancelable,
    JobNotFound,
    JobNotTerminal,
    QuotaExceeded,
    StoreContended,
    UnknownModel,
)
from llmq.intake import JobIntake
from llmq.job_record import JobRecord
from llmq.models import DeliveryStatus, JobRequest, JobStatus, WebhookEvent, WebhookSubscription
from llmq.tenants import TenantIdentity
from tests.support.stores import Clock, InMemoryBlobs, InMemoryJobs, InMemoryQueues, job_record

ACME = TenantIdentity(tenant_id="ten_acme", tier="enterprise")
HOBBY = TenantIdentity(tenant_id="ten_hobby", tier="free")
WEBHOOK = "https://hooks.example.com/llmq"


class World:
    def __init__(self, **config: object) -> None:
        self.config = LlmqConfig.model_validate(config)
        self.jobs = InMemoryJobs(self.config, Clock())
        self.queues = InMemoryQueues()
        self.blobs = InMemoryBlobs()
        self.intake = JobIntake(
            self.jobs, self.queues, self.config, check_webhook_url=lambda url: None, payloads=self.blobs
        )

    def submit(self, tenant: TenantIdentity = ACME, key: str | None = None, **body: object) -> str:
        request = JobRequest.model_validate({"prompt": "hello", **body})
        return self.intake.submit(tenant, request, key).job.id


# ---- accept -----------------------------------------------------------------------------


def test_a_submitted_job_is_stored_queued_and_sent_to_its_tiers_lane() -> None:
    # Given an enterprise tenant and a free one
    world = World()
    # When each submits a job
    enterprise = world.submit(ACME)
    free = world.submit(HOBBY)
    # Then both are stored queued, each with one message in its tier's lane
    assert world.jobs.records[enterprise].status is JobStatus.QUEUED
    assert dict(world.queues.lanes) == {"high": [enterprise], "low": [free]}


def test_a_replay_with_the_same_key_and_body_returns_the_first_job_and_sends_nothing() -> None:
    # Given a job submitted with an Idempotency-Key
    world = World()
    first = world.submit(key="order-42")
    # When the same request is sent again
    replay = world.intake.submit(ACME, JobRequest(prompt="hello"), "order-42")
    # Then it is the same job, marked replayed, and no second message was sent
    assert (replay.job.id, replay.replayed) == (first, True)
    assert world.queues.lanes["high"] == [first]
    assert len(world.jobs.records) == 1


def test_a_replay_with_a_different_body_is_a_conflict() -> None:
    world = World()
    world.submit(key="order-42")
    with pytest.raises(IdempotencyConflict):
        world.submit(key="order-42", prompt="something else")
    assert len(world.queues.lanes["high"]) == 1


HOOK = {"url": WEBHOOK}


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ({"metadata": {"a": "1", "b": "2"}}, {"metadata": {"b": "2", "a": "1"}}),
        (
            {"params": {"temperature": 0.2, "max_tokens": 5}},
            {"params": {"max_tokens": 5, "temperature": 0.2}},
        ),
        ({"prompt": "hello"}, {"prompt": None, "messages": [{"role": "user", "content": "hello"}]}),
        (
            {"webhook": {**HOOK, "events": ["job.succeeded", "job.failed"]}},
            {"webhook": {**HOOK, "events": ["job.failed", "job.succeeded", "job.failed"]}},
        ),
        (
            {"webhook": HOOK},
            {"webhook": {**HOOK, "events": ["job.expired", "job.succeeded", "job.failed", "job.canceled"]}},
        ),
    ],
    ids=["metadata-keys", "params-keys", "prompt-shorthand", "events-order", "default-events"],
)
def test_a_replay_of_the_same_request_written_differently_returns_the_first_job(
    first: dict[str, object], again: dict[str, object]
) -> None:
    # Given a job submitted with an Idempotency-Key
    world = World()
    job_id = world.submit(key="order-7", **first)
    # When the same request comes again under the key, its JSON written another way
    replay = world.intake.submit(ACME, JobRequest.model_validate({"prompt": "hello", **again}), "order-7")
    # Then it is a replay of the first job, and nothing more was written or sent
    assert (replay.job.id, replay.replayed) == (job_id, True)
    assert (len(world.jobs.records), world.queues.lanes["high"]) == (1, [job_id])


@pytest.mark.parametrize(
    "other",
    [
        {"metadata": {"a": "1", "b": "3"}},
        {"prompt": None, "messages": [{"role": "system", "content": "hello"}]},
        {
            "prompt": None,
            "messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "hi"}],
        },
        {"webhook": {**HOOK, "events": ["job.succeeded"]}},
        {"metadata": {"a": "1", "b": "2"}, "webhook": HOOK},
    ],
)
def test_a_replay_that_asks_for_something_else_is_still_a_conflict(other: dict[str, object]) -> None:
    world = World()
    world.submit(key="order-7", metadata={"a": "1", "b": "2"})
    with pytest.raises(IdempotencyConflict):
        world.intake.submit(ACME, JobRequest.model_validate({"prompt": "hello", **other}), "order-7")
    assert len(world.jobs.records) == 1


def test_the_hash_earlier_versions_compare_is_kept_so_replays_survive_an_upgrade_and_a_rollback() -> None:
    world = World()
    body = {"prompt": "hello", "metadata": {"b": "2", "a": "1"}}
    request = JobRequest.model_validate(body)
    as_written = hashlib.sha256(
        request.model_dump_json(exclude_none=True, exclude_defaults=True).encode()
    ).hexdigest()
    # A job this version accepts keeps the hash earlier versions compute: after a rollback,
    # a replay of the same bytes is still recognised
    job_id = world.submit(key="order-8", **body)
    assert world.jobs.records[job_id].request_hash == as_written
    # A job an earlier version stored (no digest) is replayed by the same bytes after the
    # upgrade; the same request written another way cannot be told from another body then
    world.jobs.records[job_id] = world.jobs.records[job_id].model_copy(update={"request_digest": None})
    assert world.intake.submit(ACME, request, "order-8").replayed
    with pytest.raises(IdempotencyConflict):
        world.submit(key="order-8", prompt="hello", metadata={"a": "1", "b": "2"})


def test_a_job_whose_message_cannot_be_sent_is_still_accepted_for_the_reconciler() -> None:
    # Given a lane queue that is throttling
    world = World()
    world.queues.unavailable.add("enqueue_job")
    # When a job is submitted
    job_id = world.submit()
    # Then the client still gets its job, stored queued (the reconciler sends it later)
    assert world.jobs.records[job_id].status is JobStatus.QUEUED
    assert world.queues.lanes["high"] == []


def test_a_model_outside_the_allow_list_is_refused_and_nothing_is_stored() -> None:
    world = World()
    with pytest.raises(UnknownModel):
        world.submit(model="gpt-2")
    assert (world.jobs.records, dict(world.queues.lanes)) == ({}, {})


def test_an_input_too_large_for_the_item_is_kept_in_the_payload_store() -> None:
    # Given an item budget smaller than the prompt
    world = World(limits={"max_item_payload_bytes": 8192})
    # When a large prompt is submitted
    job_id = world.submit(prompt="x" * 20_000)
    # Then the item holds a reference and the payload store holds the input
    stored = world.jobs.records[job_id]
    assert stored.input is None and stored.input_ref in world.blobs.objects
    assert b"x" * 20_000 in world.blobs.objects[stored.input_ref]


@pytest.mark.parametrize(
    ("config", "body"),
    [
        ({"limits": {"max_item_payload_bytes": 16_384}}, {"prompt": "x" * 20_000}),
        ({}, {"prompt": "y" * 17_000, "stream": True}),
    ],
    ids=["too-large-for-the-item", "a-streams-input-over-its-inline-limit"],
)
def test_a_submit_refused_before_its_input_goes_to_s3_leaves_nothing_there(
    config: dict[str, object], body: dict[str, object]
) -> None:
    # Given a free tenant at its active-jobs quota, and inputs that go to the payload store
    world = World(fair_share={"tiers": {"free": {"max_active_jobs": 1}}}, **config)
    world.submit(HOBBY)
    # When it submits such a job, and a key taken by one is reused with another body
    with pytest.raises(QuotaExceeded):
        world.submit(HOBBY, **body)
    assert world.blobs.objects == {}
    first = world.submit(ACME, key="order-9", **body)
    with pytest.raises(IdempotencyConflict):
        world.submit(ACME, key="order-9", **{**body, "prompt": "z" * 20_000})
    # Then neither refusal wrote an input, and a replay of the same body writes none either
    replay = world.intake.submit(ACME, JobRequest.model_validate(body), "order-9")
    assert (replay.job.id, replay.replayed) == (first, True)
    assert list(world.blobs.objects) == [world.jobs.records[first].input_ref]


# ---- read -------------------------------------------------------------------------------


def test_another_tenants_job_is_not_found() -> None:
    world = World()
    job_id = world.submit(ACME)
    with pytest.raises(JobNotFound):
        world.intake.get(HOBBY, job_id)
    assert world.intake.get(ACME, job_id).id == job_id


# ---- cancel -----------------------------------------------------------------------------


def test_cancelling_a_queued_job_ends_it_canceled_with_its_webhook() -> None:
    # Given a queued job subscribed to job.canceled
    world = World()
    job_id = world.submit(webhook=WebhookSubscription(url=WEBHOOK, events=[WebhookEvent.CANCELED]))
    # When the client cancels it
    canceled = world.intake.cancel(ACME, job_id)
    # Then it is canceled at once and the webhook is queued
    assert canceled.status is JobStatus.CANCELED
    assert world.jobs.records[job_id].status is JobStatus.CANCELED
    assert world.queues.webhooks == [(job_id, WebhookEvent.CANCELED)]


def test_cancelling_a_running_job_asks_its_worker_to_stop() -> None:
    # Given a job a worker is running
    world = World()
    now = world.jobs.now_ms()
    world.jobs.add(
        job_record(now, status=JobStatus.RUNNING, attempts=1, lease_owner="w", lease_expires_ms=now + 60_000)
    )
    # When the client cancels it
    answer = world.intake.cancel(ACME, "job_1")
    # Then it is still running, flagged for its worker, and no webhook has gone out yet
    assert (answer.status, answer.cancel_requested) == (JobStatus.RUNNING, True)
    assert world.jobs.is_cancel_requested("job_1")
    assert world.queues.webhooks == []


def test_a_finished_job_cannot_be_canceled() -> None:
    world = World()
    world.jobs.add(job_record(world.jobs.now_ms(), status=JobStatus.SUCCEEDED))
    with pytest.raises(JobNotCancelable):
        world.intake.cancel(ACME, "job_1")
    assert world.jobs.records["job_1"].status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    "ends",
    [None, JobStatus.SUCCEEDED, JobStatus.CANCELED],
    ids=["still-moving", "finished", "canceled-by-another"],
)
def test_a_job_that_moves_at_every_try_to_cancel_it_is_a_503_to_retry_unless_it_ended(
    ends: JobStatus | None,
) -> None:
    # Given a job claimed and handed back between each of the cancel's reads and its write (or
    # finished by its worker before the last try's write)
    world = World()
    job_id = world.submit()
    read = world.jobs.get
    reads: list[str] = []

    def moving(job_id: str, tenant_id: str) -> JobRecord:
        job = read(job_id, tenant_id)
        reads.append(job.status.value)
        flipped = JobStatus.RUNNING if job.status is JobStatus.QUEUED else JobStatus.QUEUED
        if ends is not None and len(reads) == 3:
            flipped = ends
        if not job.status.is_terminal:
            world.jobs.records[job_id] = job.model_copy(update={"status": flipped, "lease_owner": "w"})
        return job

    world.jobs.get = moving  # type: ignore[method-assign]
    # When the client cancels it
    if ends is JobStatus.CANCELED:
        # Then one canceled by another cancel meanwhile is canceled, as asked (review 265)
        assert world.intake.cancel(ACME, job_id).status is JobStatus.CANCELED
        return
    with pytest.raises(JobNotCancelable if ends else StoreContended):
        world.intake.cancel(ACME, job_id)
    # Then it is answered as contention to retry, not as a job already finished, which it is
    # not; or as finished, when it is (review 264); and the cancel ended nothing
    assert world.jobs.records[job_id].status.is_terminal is (ends is not None)
    assert world.queues.webhooks == []


# ---- redeliver --------------------------------------------------------------------------


def test_redelivery_of_a_finished_job_queues_its_terminal_event_again() -> None:
    # Given a succeeded job whose webhook delivery failed
    world = World()
    world.jobs.add(
        job_record(
            world.jobs.now_ms(),
            status=JobStatus.SUCCEEDED,
            webhook_url=WEBHOOK,
            webhook_events=[WebhookEvent.SUCCEEDED],
            delivery_status=DeliveryStatus.FAILED,
            delivery_attempts=5,
        )
    )
    # When the client asks for redelivery
    job = world.intake.redeliver(ACME, "job_1")
    # Then the delivery is pending afresh and the event is on the webhooks queue
    assert (job.delivery_status, job.delivery_attempts) == (DeliveryStatus.PENDING, 0)
    assert world.queues.webhooks == [("job_1", WebhookEvent.SUCCEEDED)]


def test_redelivery_of_an_unfinished_job_is_refused() -> None:
    world = World()
    job_id = world.submit(webhook=WebhookSubscription(url=WEBHOOK))
    with pytest.raises(JobNotTerminal):
        world.intake.redeliver(ACME, job_id)
    assert world.queues.webhooks == []
