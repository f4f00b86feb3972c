"""JobRunner on in-memory stores: claim outcomes, retry, cancel and expiry, as a client sees them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from random import Random
from typing import Any

import pytest

from llmq import execution
from llmq.batches import item_job_id
from llmq.config import LlmqConfig, RetryPolicy
from llmq.errors import StoreContended, StoreUnavailable
from llmq.execution import Invocation, JobRunner
from llmq.job_record import JobInput, JobRecord
from llmq.models import ChatMessage, ErrorCode, JobResult, JobStatus, LaneMessage, WebhookEvent
from llmq.providers import GenerationRequest, PermanentProviderError, ProviderError, TransientProviderError
from llmq.sqs_edge import PoisonMessage, RetryLater
from tests.support.stores import Clock, InMemoryBlobs, InMemoryJobs, InMemoryQueues, job_record

OWNER = "req-1/msg-1/aaaa"
WEBHOOK = "https://hooks.example.com/llmq"


class ScriptedProvider:
    """Answers in order (a result, an error to raise, or seconds to hang), then "ok"."""

    def __init__(self, *answers: JobResult | ProviderError | float) -> None:
        self.answers: deque[JobResult | ProviderError | float] = deque(answers)
        self.calls: list[GenerationRequest] = []
        self.finished = 0

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        self.calls.append(request)
        answer = self.answers.popleft() if self.answers else JobResult(output="ok")
        if isinstance(answer, ProviderError):
            raise answer
        if isinstance(answer, float):
            await asyncio.sleep(answer)
            answer = JobResult(output="late")
        self.finished += 1
        return answer


class World:
    def __init__(self, *answers: JobResult | ProviderError | float, **config: object) -> None:
        self.clock = Clock()
        self.config = LlmqConfig.model_validate(
            {"retry": RetryPolicy(base_seconds=2, max_seconds=60), "cancel_check_seconds": 0.02, **config}
        )
        self.jobs = InMemoryJobs(self.config, self.clock)
        self.queues = InMemoryQueues()
        self.provider = ScriptedProvider(*answers)
        self.runner = JobRunner(self.jobs, self.queues, self.provider, self.config, rng=Random(7))

    def add(self, **changes: object) -> JobRecord:
        return self.jobs.add(job_record(self.jobs.now_ms(), **changes))

    def running(self, owner: str, lease_in_ms: int, attempts: int = 1, **changes: object) -> JobRecord:
        """A job leased to `owner`, its lease ending `lease_in_ms` from now (negative: lapsed)."""
        lease = self.jobs.now_ms() + lease_in_ms
        return self.add(
            status=JobStatus.RUNNING, attempts=attempts, lease_owner=owner, lease_expires_ms=lease, **changes
        )

    def run(
        self,
        job_id: str = "job_1",
        owner: str = OWNER,
        remaining_seconds: float = 60.0,
        tenant_id: str | None = None,
    ) -> None:
        body = LaneMessage(job_id=job_id, lane="high", tenant_id=tenant_id).model_dump_json()
        invocation = Invocation(owner=owner, remaining_seconds=lambda: remaining_seconds)
        asyncio.run(self.runner.run(body, invocation))

    def job(self, job_id: str = "job_1") -> JobRecord:
        return self.jobs.records[job_id]

    def outcome(self, job_id: str = "job_1") -> tuple[JobStatus, ErrorCode | None]:
        """What the client sees of a finished job: its status and error code."""
        job = self.job(job_id)
        return job.status, job.error.code if job.error else None


# ---- claim outcomes ---------------------------------------------------------------------


def test_a_queued_job_is_claimed_run_once_and_succeeds_with_its_webhook_queued() -> None:
    # Given a queued job subscribed to job.succeeded
    world = World(JobResult(output="the answer"))
    world.add(webhook_url=WEBHOOK, webhook_events=[WebhookEvent.SUCCEEDED])
    # When its lane message is run
    world.run()
    # Then the provider was called once and the job succeeded with its result
    job = world.job()
    assert len(world.provider.calls) == 1
    assert (job.status, job.attempts, job.result) == (JobStatus.SUCCEEDED, 1, JobResult(output="the answer"))
    assert job.lease_owner is None
    # And its terminal webhook is on the webhooks queue
    assert world.queues.webhooks == [("job_1", WebhookEvent.SUCCEEDED)]


def test_a_duplicate_message_for_a_finished_job_never_reaches_the_provider() -> None:
    # Given a job that has just succeeded
    world = World()
    world.add(status=JobStatus.SUCCEEDED, finished_ms=world.jobs.now_ms(), result=JobResult(output="done"))
    # When a duplicate of its message arrives
    world.run()
    # Then nothing is called, the job is untouched and no second webhook goes out
    assert world.provider.calls == []
    assert world.job().result == JobResult(output="done")
    assert world.queues.webhooks == []


def test_a_job_leased_by_another_live_worker_is_left_to_it() -> None:
    # Given a job another worker holds with a live lease
    world = World()
    world.running("other", lease_in_ms=60_000)
    # When a copy of its message is run here
    world.run()
    # Then the provider is not called and the other worker keeps the job
    assert world.provider.calls == []
    job = world.job()
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "other", 1)


def test_a_lapsed_lease_is_taken_over_and_the_job_finishes_here() -> None:
    # Given a job whose worker crashed: running, lease expired, one attempt spent
    world = World()
    world.running("crashed", lease_in_ms=-1)
    # When its message comes back
    world.run()
    # Then this worker takes it over and finishes it on the second attempt
    assert len(world.provider.calls) == 1
    assert (world.job().status, world.job().attempts) == (JobStatus.SUCCEEDED, 2)


def test_our_own_claim_whose_answer_was_lost_is_recognised_and_run() -> None:
    # Given the claim was applied for us but its answer lost (the job is leased to us)
    world = World()
    world.running(OWNER, lease_in_ms=60_000)
    # When the retried claim is refused on our own lease
    world.run()
    # Then the runner carries on as the owner and completes the job
    assert len(world.provider.calls) == 1
    assert world.job().status is JobStatus.SUCCEEDED


def test_a_cancel_requested_before_the_claim_ends_canceled_without_a_provider_call() -> None:
    # Given a job asked to cancel whose worker vanished (lease lapsed)
    world = World()
    world.running(
        "crashed",
        lease_in_ms=-1,
        cancel_requested=True,
        webhook_url=WEBHOOK,
        webhook_events=[WebhookEvent.CANCELED],
    )
    # When its message is run
    world.run()
    # Then it ends canceled, never billed, and the client hears about it
    assert world.provider.calls == []
    assert world.job().status is JobStatus.CANCELED
    assert world.queues.webhooks == [("job_1", WebhookEvent.CANCELED)]


def test_a_job_whose_workers_crashed_max_attempts_times_fails_as_worker_crashed() -> None:
    # Given a job whose lease lapsed after its last allowed attempt
    world = World(max_attempts=3)
    world.running("crashed", lease_in_ms=-1, attempts=3)
    # When its message comes back
    world.run()
    # Then it fails as worker_crashed without another provider call
    assert world.provider.calls == []
    assert world.outcome() == (JobStatus.FAILED, ErrorCode.WORKER_CRASHED)


def test_a_queued_job_past_its_deadline_expires_without_running() -> None:
    # Given a queued job whose deadline has passed
    world = World()
    world.add(deadline_ms=world.jobs.now_ms() - 1)
    # When its message is run
    world.run()
    # Then it is expired with deadline_exceeded and the provider never called
    assert world.provider.calls == []
    assert world.outcome() == (JobStatus.EXPIRED, ErrorCode.DEADLINE_EXCEEDED)


def test_a_copy_arriving_during_the_retry_backoff_comes_back_when_due() -> None:
    # Given a job requeued after a failure, not due for another 30 s
    world = World()
    world.add(attempts=1, not_before_ms=world.jobs.now_ms() + 30_000)
    # When a copy of its message arrives now
    with pytest.raises(RetryLater) as retry:
        world.run()
    # Then it is not run, and asks to come back when the backoff ends
    assert world.provider.calls == []
    assert retry.value.delay_seconds == pytest.approx(30)
    assert world.job().status is JobStatus.QUEUED


def test_a_message_for_a_job_that_does_not_exist_is_poison() -> None:
    world = World()
    with pytest.raises(PoisonMessage):
        world.run("job_missing")
    assert world.provider.calls == []


def test_a_body_that_is_not_a_lane_message_is_poison() -> None:
    world = World()
    invocation = Invocation(owner=OWNER, remaining_seconds=lambda: 60.0)
    with pytest.raises(PoisonMessage):
        asyncio.run(world.runner.run('{"hello": 1}', invocation))


def test_a_lane_message_with_a_field_a_later_version_added_still_runs_its_job() -> None:
    """Versions run side by side during a deploy (and after a rollback, messages of the newer
    one are still in flight): a field this version does not know is not poison."""
    # Given a queued job, and its lane message as a later version would write it
    world = World(JobResult(output="the answer"))
    world.add()
    body = {"job_id": "job_1", "lane": "high", "redrive_round": 1, "added_later": {"x": 1}}
    invocation = Invocation(owner=OWNER, remaining_seconds=lambda: 60.0)
    # When a worker runs it
    asyncio.run(world.runner.run(json.dumps(body), invocation))
    # Then the job runs once and succeeds
    assert world.outcome() == (JobStatus.SUCCEEDED, None)
    assert len(world.provider.calls) == 1


def test_a_throttled_claim_returns_the_message_after_the_lease_would_lapse() -> None:
    # Given a jobs table that keeps throttling the claim, and every read of the job
    world = World()
    world.add()
    world.jobs.unavailable.update({"claim", "find"})
    # When the message is run with little time left
    with pytest.raises(RetryLater) as retry:
        world.run(remaining_seconds=2.0)
    # Then it comes back once any lease it may have taken has lapsed (remaining + margin)
    assert retry.value.delay_seconds >= 2.0 + world.config.lease_margin_seconds
    assert world.provider.calls == []


def test_a_throttled_claim_a_read_shows_untaken_comes_back_as_a_copy_after_a_lease() -> None:
    # Given a jobs table that keeps throttling the claim, but answers a read of the job
    world = World()
    world.add()
    world.jobs.unavailable.add("claim")
    # When the message is run
    world.run(remaining_seconds=60.0, tenant_id="ten_acme")
    # Then the read shows no lease was taken: the message is acknowledged and a copy sent,
    # due once a lease it might have taken would have lapsed, spending no receive
    assert [job_id for job_id, _ in world.queues.delays] == ["job_1"]
    assert world.queues.delays[0][1] >= 60
    assert world.provider.calls == []
    assert world.outcome() == (JobStatus.QUEUED, None)


# ---- retry ------------------------------------------------------------------------------


def test_a_retryable_provider_failure_requeues_the_job_with_a_delay_honouring_retry_after() -> None:
    # Given a provider that answers 429 with Retry-After: 40
    world = World(TransientProviderError("rate limited", status_code=429, retry_after=40.0))
    world.add()
    # When the job runs
    with pytest.raises(RetryLater) as retry:
        world.run()
    # Then the message comes back no sooner than Retry-After, and the job waits queued
    job = world.job()
    assert retry.value.delay_seconds >= 40
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 1, None)
    assert job.error is not None and job.error.code is ErrorCode.PROVIDER_UNAVAILABLE
    assert job.not_before_ms is not None and job.not_before_ms >= world.jobs.now_ms() + 40_000


def test_the_retried_job_succeeds_on_its_second_attempt() -> None:
    # Given a job that failed once with a transient error
    world = World(TransientProviderError("busy", status_code=503))
    world.add()
    with pytest.raises(RetryLater) as retry:
        world.run()
    # When its message comes back after the delay
    world.clock.advance(retry.value.delay_seconds)
    world.run(owner="req-2/msg-1/bbbb")
    # Then it succeeds on attempt 2 after two provider calls
    assert len(world.provider.calls) == 2
    assert (world.job().status, world.job().attempts) == (JobStatus.SUCCEEDED, 2)


def test_a_non_retryable_provider_failure_fails_the_job_at_once() -> None:
    # Given a provider that refuses the prompt as too long
    world = World(PermanentProviderError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "too long", 400))
    world.add()
    # When the job runs
    world.run()
    # Then it fails with that code after one call, and is not retried
    assert len(world.provider.calls) == 1
    assert world.outcome() == (JobStatus.FAILED, ErrorCode.CONTEXT_LENGTH_EXCEEDED)
    assert world.queues.lanes["high"] == []


def test_a_transient_failure_on_the_last_attempt_fails_as_retries_exhausted() -> None:
    # Given a job on its last allowed attempt
    world = World(TransientProviderError("busy", status_code=503), max_attempts=2)
    world.add(attempts=1)
    # When the provider fails again
    world.run()
    # Then the job fails as retries_exhausted instead of being requeued
    assert world.outcome() == (JobStatus.FAILED, ErrorCode.RETRIES_EXHAUSTED)


def test_a_retry_that_would_start_after_the_deadline_fails_as_deadline_exceeded() -> None:
    # Given a job whose deadline is sooner than the provider's Retry-After
    world = World(TransientProviderError("rate limited", status_code=429, retry_after=120.0))
    world.add(deadline_ms=world.jobs.now_ms() + 60_000)
    # When the provider asks to come back later
    world.run()
    # Then the job fails with deadline_exceeded rather than waiting past its deadline
    assert world.outcome() == (JobStatus.FAILED, ErrorCode.DEADLINE_EXCEEDED)


# ---- cancel -----------------------------------------------------------------------------


def test_a_cancel_while_the_provider_generates_stops_the_job() -> None:
    # Given a provider that takes 5 s, and a client that cancels as soon as the job runs
    world = World(5.0)
    world.add(webhook_url=WEBHOOK, webhook_events=[WebhookEvent.CANCELED])

    async def cancel_soon() -> None:
        await asyncio.sleep(0.05)
        world.jobs.request_cancel(world.job())

    async def run_and_cancel() -> None:
        body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
        invocation = Invocation(owner=OWNER, remaining_seconds=lambda: 60.0)
        await asyncio.gather(world.runner.run(body, invocation), cancel_soon())

    # When the cancel arrives mid-generation
    asyncio.run(run_and_cancel())
    # Then the generation is abandoned and the job ends canceled, with its webhook
    assert (len(world.provider.calls), world.provider.finished) == (1, 0)
    assert world.job().status is JobStatus.CANCELED
    assert world.queues.webhooks == [("job_1", WebhookEvent.CANCELED)]


def test_a_cancel_during_a_retryable_failure_ends_canceled_and_is_never_retried() -> None:
    # Given a running job whose client asks to cancel while the provider is failing
    world = World()
    world.add()

    class CancelOnCall(ScriptedProvider):
        async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
            world.jobs.request_cancel(world.job())
            return await super().generate(request, timeout_seconds)

    world.runner.provider = CancelOnCall(TransientProviderError("busy", status_code=503))
    # When the job runs
    world.run()
    # Then it ends canceled, with no message left to bring it back
    assert world.job().status is JobStatus.CANCELED
    assert world.queues.lanes["high"] == []


def test_a_worker_whose_lease_was_taken_over_cannot_overwrite_the_result() -> None:
    # Given a provider so slow that another worker takes the job over meanwhile
    world = World()
    world.add()

    class TakenOver(ScriptedProvider):
        async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
            world.jobs.records["job_1"] = world.job().model_copy(update={"lease_owner": "usurper"})
            return await super().generate(request, timeout_seconds)

    world.runner.provider = TakenOver()
    # When this worker's generation finishes
    world.run()
    # Then its result is discarded: the job still belongs to the other worker
    job = world.job()
    assert (job.status, job.lease_owner, job.result) == (JobStatus.RUNNING, "usurper", None)


# ---- the tenant's concurrency cap ---------------------------------------------------------------


def test_a_job_whose_tenant_is_at_its_cap_waits_as_a_delayed_copy_unspent() -> None:
    # Given a tenant capped at one job at a time, one running and one queued
    world = World()
    world.jobs.shares["ten_acme"].max_concurrency = 1
    world.running("other-worker", 60_000, id="job_0")
    world.add(id="job_1")
    # When a worker gets the queued job's message
    world.run("job_1", tenant_id="ten_acme")
    # Then the message is acknowledged and replaced by a delayed copy: no receive is spent,
    # so waiting for a slot can never carry the job to the DLQ
    assert world.queues.lanes["high"] == ["job_1"]
    ((copy, delay),) = world.queues.delays
    assert copy == "job_1" and 1 <= delay <= world.config.fair_share.max_deferral_seconds
    # And the job was never claimed: still queued, no attempt, no provider call
    assert (world.job("job_1").status, world.job("job_1").attempts) == (JobStatus.QUEUED, 0)
    assert world.provider.calls == []


def test_a_deferral_whose_send_fails_holds_the_message_back_instead() -> None:
    # Given a tenant at its cap, and SQS refusing the delayed copy
    world = World()
    world.jobs.shares["ten_acme"].max_concurrency = 1
    world.running("other-worker", 60_000, id="job_0")
    world.add(id="job_1")
    world.queues.unavailable.add("enqueue_job")
    # When a worker gets the message, Then it is reported failed with the deferral as its delay
    with pytest.raises(RetryLater) as held:
        world.run("job_1", tenant_id="ten_acme")
    assert held.value.delay_seconds >= 1
    assert world.job("job_1").attempts == 0


def _run_batch(
    world: World, jobs: list[str | LaneMessage], remaining_seconds: float = 60.0
) -> list[BaseException | None]:
    """One invocation's batch: its records (job ids of ten_acme, or messages) run at once on one
    loop, as the worker runs them."""
    invocation = Invocation(owner=OWNER, remaining_seconds=lambda: remaining_seconds)
    messages = [
        job if isinstance(job, LaneMessage) else LaneMessage(job_id=job, lane="high", tenant_id="ten_acme")
        for job in jobs
    ]

    async def batch() -> list[BaseException | None]:
        runs = (world.runner.run(message.model_dump_json(), invocation) for message in messages)
        return await asyncio.gather(*runs, return_exceptions=True)

    return asyncio.run(batch())


def _counting_claims(world: World) -> list[str]:
    claims: list[str] = []
    claim = world.jobs.claim

    def counted(job_id: str, *args: object, **kwargs: object) -> object:
        claims.append(job_id)
        return claim(job_id, *args, **kwargs)  # type: ignore[arg-type]

    world.jobs.claim = counted  # type: ignore[method-assign]
    return claims


def test_a_batch_of_a_tenant_at_its_cap_spends_one_refused_claim_not_one_each() -> None:
    # Given a tenant capped at one job, which runs one, and five more of its jobs queued
    world = World()
    world.jobs.shares["ten_acme"].max_concurrency = 1
    world.running("other-worker", 60_000, id="job_0")
    ids = [f"job_{n}" for n in range(1, 6)]
    for job_id in ids:
        world.add(id=job_id)
    claims = _counting_claims(world)
    # When one invocation receives all five
    assert _run_batch(world, list(ids)) == [None] * 5
    # Then the batch's first claim was refused at the cap, and spoke for the other four: one
    # refused write, not five
    assert claims == ["job_1"]
    # And the copies of those four say so: their next receive claims for itself
    assert sorted(world.queues.spoken_for) == ids[1:]
    # And all five wait as delayed copies, unspent: queued, no attempt, no provider call
    assert sorted(job_id for job_id, _ in world.queues.delays) == ids
    assert all(1 <= delay <= world.config.fair_share.max_deferral_seconds for _, delay in world.queues.delays)
    assert {(world.job(job_id).status, world.job(job_id).attempts) for job_id in ids} == {
        (JobStatus.QUEUED, 0)
    }
    assert world.provider.calls == []


def test_a_batch_whose_first_claim_takes_a_slot_claims_the_rest_at_once_within_the_cap() -> None:
    # Given a tenant capped at two, with nothing running, and five queued jobs
    world = World()
    world.jobs.shares["ten_acme"].max_concurrency = 2
    ids = [f"job_{n}" for n in range(1, 6)]
    for job_id in ids:
        world.add(id=job_id)
    claims = _counting_claims(world)
    # (the two generations last until every claim has answered: a job that ended first would
    # free its slot for a later claim, on a loaded machine)
    answered: list[str] = []
    counted = world.jobs.claim

    def answering(job_id: str, *args: object, **kwargs: object) -> object:
        claim = counted(job_id, *args, **kwargs)  # type: ignore[arg-type]
        answered.append(job_id)
        return claim

    world.jobs.claim = answering  # type: ignore[method-assign]

    class AfterEveryClaim(ScriptedProvider):
        async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
            for _ in range(2000):
                if len(answered) == len(ids):
                    break
                await asyncio.sleep(0.005)
            return await super().generate(request, timeout_seconds)

    world.provider = world.runner.provider = AfterEveryClaim()
    # When one invocation receives all five
    assert _run_batch(world, list(ids)) == [None] * 5
    # Then each claimed for itself (the first took a slot, so it spoke for no one): two ran,
    # and three were refused by the cap and wait as delayed copies
    assert sorted(claims) == ids
    assert world.queues.spoken_for == []
    statuses = sorted(world.job(job_id).status.value for job_id in ids)
    assert statuses == ["queued"] * 3 + ["succeeded"] * 2
    assert len(world.provider.calls) == 2
    assert len(world.queues.delays) == 3


def test_a_first_claim_that_aws_refuses_speaks_for_no_one() -> None:
    # Given a tenant with room for one more job, and the table throttling the batch's first
    # claim (and only it)
    world = World()
    world.jobs.shares["ten_acme"].max_concurrency = 1
    world.add(id="job_1")
    world.add(id="job_2")
    claims: list[str] = []
    claim = world.jobs.claim

    def throttled_once(job_id: str, *args: object, **kwargs: object) -> object:
        claims.append(job_id)
        if len(claims) == 1:
            raise StoreUnavailable("ProvisionedThroughputExceededException")
        return claim(job_id, *args, **kwargs)  # type: ignore[arg-type]

    world.jobs.claim = throttled_once  # type: ignore[method-assign]
    # When one invocation receives both, with too little time to retry the throttled claim
    outcomes = _run_batch(world, ["job_1", "job_2"], remaining_seconds=3.0)
    # Then the throttled message comes back later (as a copy: a read showed the job untaken),
    # and the other claimed for itself and ran
    assert claims == ["job_1", "job_2"]
    assert outcomes == [None, None]
    assert [job_id for job_id, _ in world.queues.delays] == ["job_1"]
    assert world.job("job_2").status is JobStatus.SUCCEEDED
    assert len(world.provider.calls) == 1


def test_a_message_spoken_for_last_time_claims_for_itself_and_takes_over_a_lapsed_lease() -> None:
    # Given a tenant capped at one, whose slot is held by a job whose worker died (its lease
    # lapsed), and a queued job of the same tenant
    world = World()
    world.jobs.shares["ten_acme"].max_concurrency = 1
    world.running("crashed-worker", -1_000, id="job_0")
    world.add(id="job_1")
    claims = _counting_claims(world)
    # When a batch holds the queued job's message first, then the crashed job's, which was
    # spoken for by a refusal last time
    crashed = LaneMessage(job_id="job_0", lane="high", tenant_id="ten_acme", spoken_for=True)
    assert _run_batch(world, ["job_1", crashed]) == [None, None]
    # Then the crashed job's message claimed for itself, took its own lapsed lease over and ran
    assert sorted(claims) == ["job_0", "job_1"]
    assert world.job("job_0").status is JobStatus.SUCCEEDED
    assert world.job("job_0").attempts == 2
    # And the queued one, refused while the slot was held, waits as a copy of its own claim's
    assert world.job("job_1").status is JobStatus.QUEUED
    assert world.queues.spoken_for == []


def _spoken_for_with_no_copy(world: World) -> list[str]:
    """A tenant at its cap of one, jobs 1 and 2 queued, and SQS refusing every copy: job 2's
    message is spoken for by job 1's refusal, with no copy to say so. The claims made."""
    world.jobs.shares["ten_acme"].max_concurrency = 1
    world.running("other-worker", 60_000, id="job_0")
    world.add(id="job_1")
    world.add(id="job_2")
    world.queues.unavailable.add("enqueue_job")
    return _counting_claims(world)


def test_a_message_spoken_for_whose_copy_sqs_refuses_comes_back_as_it_was_unclaimed() -> None:
    # Given a message spoken for whose copy SQS refuses
    world = World()
    claims = _spoken_for_with_no_copy(world)
    # When one invocation receives both
    outcomes = _run_batch(world, ["job_1", "job_2"])
    # Then both come back later, and only the scout spent a claim: nothing ran
    assert claims == ["job_1"]
    assert all(isinstance(outcome, RetryLater) for outcome in outcomes)
    assert {world.job(job_id).status for job_id in ("job_1", "job_2")} == {JobStatus.QUEUED}
    assert world.provider.calls == []


def test_a_message_spoken_for_whose_copy_sqs_refuses_is_looked_at_and_its_cancel_honoured() -> None:
    # Given a message spoken for whose copy SQS refuses, and its job asked to cancel (the look
    # a claim of its own makes: it came back as it was, and could be spoken for again)
    world = World()
    claims = _spoken_for_with_no_copy(world)
    world.jobs.records["job_2"] = world.job("job_2").model_copy(update={"cancel_requested": True})
    # When one invocation receives both
    outcomes = _run_batch(world, ["job_1", "job_2"])
    # Then the canceled job ends canceled now, its message done, with no claim of its own
    assert claims == ["job_1"]
    assert isinstance(outcomes[0], RetryLater) and outcomes[1] is None
    assert world.job("job_2").status is JobStatus.CANCELED


class _LongInvocation:
    """A Lambda of 900 s, whose clock a provider call moves on."""

    def __init__(self) -> None:
        self.left = 900.0

    def remaining(self) -> float:
        return self.left


def test_a_message_spoken_for_handed_a_slot_late_in_the_invocation_never_runs_with_what_is_left() -> None:
    # Given a tenant capped at two whose slots are held by two crashed jobs, whose messages
    # (spoken for last time) claim for themselves and run for most of the invocation, and two
    # queued jobs: job 1 the scout, refused, speaks for job 2; each waits for a crashed job's end
    lam = _LongInvocation()
    timeouts: dict[str, float] = {}

    class Provider:
        async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
            timeouts[request.job_id] = timeout_seconds
            if request.job_id in ("job_3", "job_4"):
                await asyncio.sleep(0.2)
                lam.left = 40.0  # (they ran about 860 s)
            return JobResult(output="whole", finish_reason="stop")

    world = World()
    world.runner = JobRunner(world.jobs, world.queues, Provider(), world.config, rng=Random(7))  # type: ignore[arg-type]
    world.jobs.shares["ten_acme"].max_concurrency = 2
    for crashed in ("job_3", "job_4"):
        world.running("crashed-worker", -1_000, id=crashed, shared=True)
    world.add(id="job_1", shared=True)
    world.add(id="job_2", shared=True)
    world.queues.unavailable.add("enqueue_job")  # (no copy can be sent)
    invocation = Invocation(owner=OWNER, remaining_seconds=lam.remaining, hold_message=lambda seconds: True)
    messages = [
        LaneMessage(job_id="job_1", lane="high", tenant_id="ten_acme"),
        LaneMessage(job_id="job_2", lane="high", tenant_id="ten_acme"),
        *(
            LaneMessage(job_id=job, lane="high", tenant_id="ten_acme", spoken_for=True)
            for job in ("job_3", "job_4")
        ),
    ]

    async def batch() -> list[BaseException | None]:
        runs = (world.runner.run(message.model_dump_json(), invocation) for message in messages)
        return await asyncio.gather(*runs, return_exceptions=True)

    # When the crashed jobs' runs end, handing the waiting messages their slots, and no copy
    # can be sent
    outcomes = asyncio.run(batch())
    # Then job 2 (spoken for) is not claimed to run with the 40 s left, as job 1 is not: a call
    # cut off is billed, and fails provider_timeout for good; both wait, queued, for a whole
    # invocation
    assert {world.job(job).status for job in ("job_3", "job_4")} == {JobStatus.SUCCEEDED}
    assert sorted(timeouts) == ["job_3", "job_4"]
    assert {world.job(job).status for job in ("job_1", "job_2")} == {JobStatus.QUEUED}
    assert [type(outcome).__name__ for outcome in outcomes[:2]] == ["RetryLater", "RetryLater"]


def test_a_batch_item_spoken_for_by_its_batch_still_ends_at_its_retention_not_after_it() -> None:
    # Given a batch's queued item (no reconciler sweep looks at it: its claims do) of a tenant
    # whose one slot is held for days, its retention ending just past the margin, and another
    # item of the batch received with each of its copies, whose refusal speaks for it
    world = World()
    sent = world.queues.sent
    world.jobs.shares["ten_acme"].max_concurrency = 1
    batch_id = "bat_" + "0" * 12 + "a" * 14
    running, scout, item = (item_job_id(batch_id, n) for n in range(3))
    world.running("busy-worker", 30 * 86_400_000, id=running)
    world.add(id=scout)
    expires_at = world.jobs.now_ms() // 1000 + world.config.reconciler.retention_margin_seconds + 60
    world.add(id=item, expires_at=expires_at)
    world.jobs.shares["ten_acme"].active = 10_000  # (a long backlog: deferrals as long as allowed)
    message = LaneMessage(job_id=item, lane="high", tenant_id="ten_acme")
    # When its copies come back, one after another, until it ends
    for round_ in range(40):
        scouting = [LaneMessage(job_id=scout, lane="high", tenant_id="ten_acme")] if round_ else []
        before = len(sent)
        _run_batch(world, [*scouting, message])
        if world.job(item).status is not JobStatus.QUEUED:
            break
        ((message, delay),) = [(copy, delay) for copy, delay in sent[before:] if copy.job_id == item]
        world.clock.advance(delay)
    # Then a look of its own ended it expired, its quota given back, before its retention ran
    # out (and DynamoDB's TTL could delete it, its quota then counted for good)
    assert world.job(item).status is JobStatus.EXPIRED
    assert world.jobs.now_ms() // 1000 < expires_at
    assert any(copy.spoken_for for copy, _ in sent if copy.job_id == item)


def test_a_message_spoken_for_whose_own_claim_met_contention_is_still_spoken_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a message spoken for last time, whose own claim loses to other transactions
    world = World()
    world.add(id="job_1")

    def contended(*_: object, **__: object) -> None:
        raise StoreContended("TransactionConflict")

    monkeypatch.setattr(world.jobs, "claim", contended)
    message = LaneMessage(job_id="job_1", lane="high", tenant_id="ten_acme", spoken_for=True)
    # When a worker receives it
    assert _run_batch(world, [message]) == [None]
    # Then its copy still says it has had no look of its own
    assert world.queues.spoken_for == ["job_1"]


def test_a_slot_frees_when_the_running_job_ends() -> None:
    # Given a tenant capped at one, its slot held by a job that then succeeds
    world = World()
    world.jobs.shares["ten_acme"].max_concurrency = 1
    world.add(id="job_0")
    world.add(id="job_1")
    world.run("job_0", tenant_id="ten_acme")
    assert world.job("job_0").status is JobStatus.SUCCEEDED
    # When the next job's message comes, Then it runs
    world.run("job_1", tenant_id="ten_acme")
    assert world.job("job_1").status is JobStatus.SUCCEEDED
    assert world.queues.delays == []


@pytest.mark.parametrize("spoken_for", [False, True])
def test_a_deferral_longer_than_sqs_allows_travels_as_copies_and_claims_only_when_due(
    spoken_for: bool,
) -> None:
    # Given a message deferred until 2,000 s from now (SQS delays a message 900 s at most),
    # on its own claim's refusal or on its batch's first claim's
    world = World()
    world.add(id="job_1")
    due = world.jobs.now_ms() + 2_000_000
    message = LaneMessage(
        job_id="job_1", lane="high", tenant_id="ten_acme", not_before_ms=due, spoken_for=spoken_for
    )
    # When a worker receives it
    assert _run_batch(world, [message]) == [None]
    # Then it passes it on for another 900 s without trying a claim, still saying whether it
    # was spoken for (so that its next claim is its own)
    assert world.queues.delays == [("job_1", 900)]
    assert world.queues.spoken_for == (["job_1"] if spoken_for else [])
    assert (world.job().status, world.job().attempts) == (JobStatus.QUEUED, 0)
    assert world.provider.calls == []


def test_a_claim_that_keeps_meeting_other_transactions_comes_back_soon_as_a_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a claim whose transaction loses to others on the tenant's share, try after try
    world = World()
    world.add(id="job_1")

    def contended(*_: object, **__: object) -> None:
        raise StoreContended("dynamodb.TransactWriteItems: ['TransactionConflict'] after 5 tries")

    monkeypatch.setattr(world.jobs, "claim", contended)
    # When a worker runs its message (with little time left, so the in-process retries end)
    world.run("job_1", tenant_id="ten_acme", remaining_seconds=5.0)
    # Then the message is replaced by a copy due in seconds, not parked for a lease
    ((copy, delay),) = world.queues.delays
    assert copy == "job_1" and 1 <= delay <= 5
    assert world.job().attempts == 0


# ---- an input held in S3 ------------------------------------------------------------------


class _SlowOnce(InMemoryBlobs):
    """The first read of an input is slow: throttled (S3 SlowDown, retried by the worker) or
    answered late (retried inside the SDK); `meanwhile` runs as it is."""

    def __init__(self, meanwhile: Callable[[], object], throttled: bool) -> None:
        super().__init__()
        self.meanwhile = meanwhile
        self.throttled = throttled
        self.reads = 0

    def get(self, key: str) -> bytes:
        self.reads += 1
        if self.reads == 1:
            self.meanwhile()
            time.sleep(0.05)
            if self.throttled:
                raise StoreUnavailable("s3.GetObject: SlowDown")
        return super().get(key)


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        self.calls += 1
        return JobResult(output="a paid answer")


@pytest.mark.parametrize("throttled", [True, False], ids=["throttled", "slow"])
@pytest.mark.parametrize(
    ("cancel", "flag_unreadable"),
    [(True, False), (False, False), (False, True)],
    ids=["canceled-meanwhile", "not-canceled", "flag-unreadable"],
)
def test_a_cancel_that_comes_while_an_s3_input_is_slow_to_read_ends_the_job_before_any_provider_call(
    cancel: bool, flag_unreadable: bool, throttled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a claimed job whose input is in S3 and slow to read, while its client cancels it
    # (or not; or the cancel flag cannot be read then)
    monkeypatch.setattr(execution, "_SLOW_INPUT_SECONDS", 0.01)
    config = LlmqConfig()
    jobs = InMemoryJobs(config, Clock())
    blobs = _SlowOnce(lambda: cancel and jobs.request_cancel(jobs.records["job_1"]), throttled)
    blobs.objects["inputs/job_1/x.json"] = (
        JobInput(messages=[ChatMessage(role="user", content="hi")]).model_dump_json().encode()
    )
    jobs.add(job_record(jobs.now_ms(), input=None, input_ref="inputs/job_1/x.json"))
    if flag_unreadable:
        jobs.unavailable.add("is_cancel_requested")
    provider = _Counting()
    runner = JobRunner(jobs, InMemoryQueues(), provider, config, rng=Random(1), payloads=blobs)
    # When the worker runs it
    body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
    asyncio.run(runner.run(body, Invocation(owner="o1", remaining_seconds=lambda: 60.0)))
    # Then a canceled job ends canceled with no provider call; otherwise it runs once (a flag
    # that could not be read is a missed look, not a reason to hand the job back)
    assert blobs.reads == (2 if throttled else 1)
    expected = (JobStatus.CANCELED, 0) if cancel else (JobStatus.SUCCEEDED, 1)
    assert (jobs.records["job_1"].status, provider.calls) == expected


@pytest.mark.parametrize(("items_held", "bounded"), [(2, True), (3, False)])
def test_a_batch_items_wait_for_its_sibling_is_bounded_when_a_slot_may_free_outside(
    monkeypatch: pytest.MonkeyPatch, items_held: int, bounded: bool
) -> None:
    """An item refused at its tenant's whole cap (its batch slots not full) may take a slot the
    tenant's own jobs free in another invocation, unseen by its siblings: its wait for them ends
    when its deferral is due. Refused by its batch slots, all held by its siblings, only their
    ends can free one: it waits for them."""
    from llmq.shares import ShareState

    world = World()
    now = world.jobs.now_ms()
    items = {f"item_{n}": now - 1000 for n in range(items_held)}
    own = {f"own_{n}": now - 1000 for n in range(4 - items_held)}
    share = ShareState(
        tenant_id="ten_a",
        active=12,
        holders={"high": {**items, **own}},
        batch_holders={"high": items},
        max_concurrency=4,
        max_batch_concurrency=3,
        last_runs={"high": 10_000},
    )
    seen: list[bool] = []

    async def recorded(key: Any, invocation: object, due_ms: int, held: int) -> bool:
        seen.append(held > world.runner._handoff.siblings(key))
        return False

    monkeypatch.setattr(world.runner, "_wait_for_a_sibling", recorded)
    key = ("ten_a", "high", True)
    message = LaneMessage(job_id="job_1", lane="high", tenant_id="ten_a")
    invocation = Invocation(owner=OWNER, remaining_seconds=lambda: 60.0)

    async def defer() -> None:
        with world.runner._handoff.holding(key) as first, world.runner._handoff.holding(key) as second:
            first.answered(took_slot=True)
            second.answered(took_slot=True)
            if items_held == 3:
                with world.runner._handoff.holding(key) as third:
                    third.answered(took_slot=True)
                    await world.runner._defer(message, key, share, now, invocation)
            else:
                await world.runner._defer(message, key, share, now, invocation)

    asyncio.run(defer())
    assert seen == [bounded]


# ---- what a tenant reads of an error about the operator's provider account ---------------

OPERATOR_KEY = "sk-proj-OPERATORSECRETKEY0000000000000000000000Zq9X"
# What OpenAI answers to a wrong or revoked key (it masks the middle, not the ends), and to an
# organization over its rate limit (its usage across every tenant).
PROVIDER_ACCOUNT_ERRORS = {
    401: {
        "message": "Incorrect API key provided: sk-proj-****************************************Zq9X. "
        "You can find your API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    },
    429: {
        "message": "Rate limit reached for gpt-4o in organization org-OPERATORORG123 on tokens per min "
        "(TPM): Limit 30000, Used 29850, Requested 1200.",
        "type": "tokens",
        "code": "rate_limit_exceeded",
    },
}


@pytest.mark.parametrize("status", [401, 429])
def test_an_error_about_the_operators_provider_account_is_told_in_llmqs_words(status: int) -> None:
    import httpx

    from llmq.providers import ChatCompletionsProvider

    # Given a provider that refuses llmq's key (401), or rate-limits its organization (429)
    body = json.dumps({"error": PROVIDER_ACCOUNT_ERRORS[status]}).encode()
    world = World(max_attempts=2)
    world.runner.provider = ChatCompletionsProvider(
        "http://provider.test/v1",
        lambda: OPERATOR_KEY,
        False,
        httpx.MockTransport(lambda request: httpx.Response(status, content=body)),
    )
    # (a 429 past the refusals refunded: `RetryPolicy.max_refusals`)
    world.add(attempts=1, refusals=world.config.retry.max_refusals)
    # When the job's attempts run out on it
    world.run()
    job = world.job()
    # Then the tenant reads what happened and the provider's code, never the provider's text
    # (the key's last characters, the operator's organization, the account's usage)
    assert job.status is JobStatus.FAILED and job.error is not None
    shown = job.error.message
    for secret in ("Zq9X", "org-OPERATORORG123", "Used 29850"):
        assert secret not in shown, shown
    assert PROVIDER_ACCOUNT_ERRORS[status]["code"] in shown
    assert ("credentials" if status == 401 else "rate-limiting") in shown


class _RecordingTimeouts(ScriptedProvider):
    def __init__(self) -> None:
        super().__init__()
        self.given: list[float] = []

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        self.given.append(timeout_seconds)
        return await super().generate(request, timeout_seconds)


@pytest.mark.parametrize("left", [20.0, 16.0])
def test_a_generation_started_late_keeps_the_whole_write_back_reserve(left: float) -> None:
    # Given an invocation of 300 s (15 s kept back for the write-back) whose claim of a job
    # answered late, `left` seconds before its end (slow AWS calls before it)
    world = World()
    world.provider = world.runner.provider = _RecordingTimeouts()
    world.add()
    lost = [0.0]
    claim = world.jobs.claim

    def slow_claim(*args: Any, **kwargs: Any) -> Any:
        lost[0] = 300.0 - left
        return claim(*args, **kwargs)

    world.jobs.claim = slow_claim  # type: ignore[method-assign]
    body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
    invocation = Invocation(owner=OWNER, remaining_seconds=lambda: 300.0 - lost[0])
    # When it runs the job
    try:
        asyncio.run(world.runner.run(body, invocation))
        handed_back = False
    except RetryLater:
        handed_back = True
    # Then the provider is given what is left less the whole 15 s, never more (a quarter of
    # what was left kept 5 s or 4 s: too little for a throttled write and a parked result);
    # with too little for a generation, the job is handed back, its attempt refunded
    if left - 15 >= 2:
        assert not handed_back
        assert world.provider.given and world.provider.given[0] <= left - 15
        assert world.job().status is JobStatus.SUCCEEDED
    else:
        assert handed_back and world.provider.given == []
        assert (world.job().status, world.job().attempts) == (JobStatus.QUEUED, 0)


def test_a_slow_last_look_for_a_cancel_never_takes_the_time_a_billed_failure_needs() -> None:
    # Given a job on its last attempt whose provider call fails for now (billed), in an
    # invocation 18 s from its end (the 15 s reserve and 3 s), and a cancel-flag read that
    # stalls longer than that once the call is over
    world = World(TransientProviderError("busy", status_code=503), max_attempts=1)
    world.add()
    release = threading.Event()
    look = world.jobs.is_cancel_requested

    def stalled(job_id: str) -> bool:
        if world.provider.calls:  # (the look after the failure)
            release.wait(20)
        return look(job_id)

    world.jobs.is_cancel_requested = stalled  # type: ignore[method-assign]
    deadline = time.monotonic() + 18.0
    left_at_failure: list[float] = []
    fail = world.jobs.fail_leased

    def failed(*args: Any, **kwargs: Any) -> JobRecord:
        left_at_failure.append(deadline - time.monotonic())
        return fail(*args, **kwargs)

    world.jobs.fail_leased = failed  # type: ignore[method-assign]
    body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
    invocation = Invocation(owner=OWNER, remaining_seconds=lambda: deadline - time.monotonic())
    # When it runs
    try:
        asyncio.run(world.runner.run(body, invocation))
    finally:
        release.set()
    # Then its failure was recorded before the invocation's end, without waiting for the look
    # (which took the invocation's last seconds: on Lambda the write never came, and the job
    # was left running, to be run again after its lease)
    assert world.outcome() == (JobStatus.FAILED, ErrorCode.RETRIES_EXHAUSTED)
    assert len(left_at_failure) == 1 and left_at_failure[0] > 0
    assert len(world.provider.calls) == 1


class _TimesOutThenCanceled(ScriptedProvider):
    """A call that runs until the timeout it was given (the invocation's clock moves on to
    the write-back reserve), during which the client cancels, after the watcher's last look;
    with `provider.retry_timeouts` the timeout is a transient error."""

    def __init__(self, world: World, left: list[float]) -> None:
        super().__init__()
        self.world = world
        self.left = left
        self.given: list[float] = []

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> Any:
        self.calls.append(request)
        self.given.append(timeout_seconds)
        # the client cancels near the end of the call (the watcher looks every 5 s)
        self.world.jobs.request_cancel(self.world.job())
        # the call's time is used up: what is left is the reserve the runner kept
        self.left[0] -= timeout_seconds
        raise TransientProviderError("the provider stopped answering (timed out)")


def test_a_cancel_before_a_retried_timeout_on_the_last_attempt_ends_canceled_not_failed() -> None:
    # Given a job on its last attempt, in a 300 s invocation, whose provider call (timeouts
    # retried, so transient) runs to its deadline; the client cancels during the call,
    # after the watcher's last look
    world = World(max_attempts=1, cancel_check_seconds=5.0)
    left = [300.0]
    world.provider = world.runner.provider = _TimesOutThenCanceled(world, left)
    world.add()
    body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
    invocation = Invocation(owner=OWNER, remaining_seconds=lambda: left[0])
    # When it runs
    asyncio.run(world.runner.run(body, invocation))
    # Then the cancel, asked before the job ended, is what it ends with: the last look is made,
    # though the call took all the time beyond the write-back's reserve
    assert world.job().cancel_requested
    assert world.outcome() == (JobStatus.CANCELED, None)


# ---- a provider that refuses for a while (hunt 335) -----------------------------------------


def _refusing(refusals: int, status: int = 529) -> tuple[Any, list[Any]]:
    """The real provider client against a server that refuses `refusals` calls with `status`
    (before generating anything), then answers."""
    import httpx

    from llmq.providers import ChatCompletionsProvider

    calls: list[Any] = []
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    answer = {
        "choices": [{"index": 0, "message": {"content": "the answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }

    def serve(request: Any) -> Any:
        calls.append(request)
        return (
            httpx.Response(status, json=overloaded)
            if len(calls) <= refusals
            else httpx.Response(200, json=answer)
        )

    return ChatCompletionsProvider(
        "http://provider.test/v1", lambda: "sk-test", False, httpx.MockTransport(serve)
    ), calls


@pytest.mark.parametrize("status", [429, 503, 529])
def test_a_provider_refusing_for_a_while_spends_no_attempt_and_the_job_succeeds_after(status: int) -> None:
    # Given a queued job, and a provider that refuses six calls in a row before generating
    # (an outage of a minute and more at the backoffs), with three attempts allowed
    world = World()
    world.runner.provider, calls = _refusing(6, status)
    world.add()
    delays: list[int] = []
    for run in range(7):
        # When each of its messages comes, once the one before asked to come back
        world.run(owner=f"req-{run}/msg-{run}/aaaa")
        if run < 6:
            # Then each refusal hands the job back with its attempt refunded, a delayed copy
            # of its message in the lane instead of this one coming back (no receive counted)
            job = world.job()
            assert (job.status, job.attempts, job.refusals) == (JobStatus.QUEUED, 0, run + 1)
            assert job.error is not None and job.error.retryable
            (_job_id, delay) = world.queues.delays[-1]
            delays.append(delay)
            world.clock.advance(delay)
    # And the seventh call succeeds, on the job's first attempt (hunt 335: every refusal spent
    # an attempt, and a six-second outage failed the job retries_exhausted, nothing paid for)
    job = world.job()
    assert (job.status, job.attempts, len(calls)) == (JobStatus.SUCCEEDED, 1, 7)
    # And the copies wait longer each time, as attempts' backoffs do
    assert delays == sorted(delays) and delays[-1] > delays[0]


def test_refusals_past_their_budget_spend_attempts_and_fail_retryable() -> None:
    # Given a provider that refuses every call, and two refusals refunded at most
    world = World(retry=RetryPolicy(base_seconds=2, max_seconds=60, max_refusals=2))
    world.runner.provider, calls = _refusing(1000)
    world.add()
    for run in range(10):
        try:
            world.run(owner=f"req-{run}/msg-{run}/aaaa")
        except RetryLater as retry:
            world.clock.advance(retry.delay_seconds)
            continue
        if world.job().status is JobStatus.FAILED:
            break
        world.clock.advance(world.queues.delays[-1][1])
    # Then after two refunded refusals, three attempts are spent, and the job fails
    # retries_exhausted, retryable: nothing was paid for, and the same request may be sent later
    job = world.job()
    assert (job.status, job.refusals, job.attempts, len(calls)) == (JobStatus.FAILED, 2, 3, 5)
    assert job.error is not None and (job.error.code, job.error.retryable) == (
        ErrorCode.RETRIES_EXHAUSTED,
        True,
    )


def test_a_refusal_whose_copy_cannot_be_sent_says_it_gave_back_the_slot() -> None:
    # Given a refused job whose delayed copy SQS refuses
    world = World()
    world.runner.provider, _calls = _refusing(5, 503)
    world.add()
    world.queues.unavailable.add("enqueue_job")
    # When it is handed back, then its message comes back instead, saying the slot is free (for
    # a waiter in its batch, and for sending it again should its message be gone: review 285)
    with pytest.raises(RetryLater) as retry:
        world.run()
    assert retry.value.gave_back_slot
    job = world.job()
    assert (job.status, job.lease_owner, job.attempts, job.refusals) == (JobStatus.QUEUED, None, 0, 1)


def test_a_refused_job_says_it_started_once_and_that_it_ran_when_its_deadline_passes() -> None:
    # Given a job subscribed to job.started, which the provider refuses twice, then answers
    world = World()
    world.runner.provider, calls = _refusing(2, 529)
    world.add(webhook_url=WEBHOOK, webhook_events=[WebhookEvent.STARTED])
    for run in range(3):
        world.run(owner=f"req-{run}/msg-{run}/aaaa")
        if run < 2:
            world.clock.advance(world.queues.delays[-1][1])
    # Then job.started went once (review 285: once per refusal, each refunded attempt the first)
    assert (world.job().status, len(calls)) == (JobStatus.SUCCEEDED, 3)
    assert [event for _, event in world.queues.webhooks].count(WebhookEvent.STARTED) == 1
    # And a refused job whose next call comes after its deadline says it ran, retryable
    late = World()
    late.runner.provider, _late_calls = _refusing(5, 503)
    late.add(deadline_ms=late.jobs.now_ms() + 120_000)
    late.run(owner="req-0/msg-0/aaaa")
    late.clock.advance(200)
    late.run(owner="req-1/msg-1/aaaa")
    error = late.job().error
    assert error is not None and error.code is ErrorCode.DEADLINE_EXCEEDED
    assert error.retryable and "ran 1 time(s)" in error.message, error


def test_the_jitter_above_a_stated_wait_never_fails_a_retry_that_fits_before_the_deadline() -> None:
    # Given jobs whose deadline is 28 s away, each failed with a 429 and Retry-After: 27
    outcomes = []
    for seed in range(8):
        world = World(TransientProviderError("rate limited", status_code=429, retry_after=27.0))
        world.runner._rng = Random(seed)
        world.add(deadline_ms=world.jobs.now_ms() + 28_000)
        # When each runs once
        with pytest.raises(RetryLater):
            world.run()
        outcomes.append(world.job().status)
    # Then every one waits for its retry, at the provider's second at the latest (review 286:
    # the jitter above the wait failed most of them deadline_exceeded)
    assert outcomes == [JobStatus.QUEUED] * 8
