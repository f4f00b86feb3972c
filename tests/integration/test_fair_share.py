"""Tenants share fairly (issue 14, DESIGN §3.11): the active-jobs quota at submit and the
per-tenant concurrency cap at claim, through the real handlers against moto and a loopback
provider. The counts' exactness under every interleaving of crashes, duplicates and lost
answers is the lifecycle model's (tests/integration/test_lifecycle_model.py, `_shares_hold`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest

from llmq import aws
from llmq.jobs import JobRepository
from llmq.policy import ClaimOutcome
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq.shares import ShareRepository, share_key
from llmq_cli.tenant_limits import DeferredBacklog, TenantLimits
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import (
    ENTERPRISE,
    FREE,
    Harness,
    hidden_for_each_receive,
    observing_sqs,
    on_aws_call,
)


def _shares(harness: Harness) -> ShareRepository:
    return ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))


def _lane_total(harness: Harness, lane: str) -> int:
    return harness.total_count(harness.stack.lane_queue_urls[lane])


class _Later:
    """Real time shifted forward: the reconciler's view of a lease that has lapsed."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def _capped_with_long_deferrals(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, cap: int
) -> Harness:
    """A harness whose enterprise tenant is capped at `cap`, with deferrals of 30 s at least:
    a copy sent sooner than that was handed a freed slot."""
    config = integration_config(provider, fair_share={"min_deferral_seconds": 30})
    harness = Harness(moto_stack, config, monkeypatch)
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=cap)
    provider.reset()
    return harness


# ---- the active-jobs quota ----------------------------------------------------------------------


def test_a_submit_over_the_quota_is_429_with_retry_after_and_writes_nothing(harness: Harness) -> None:
    # Given a free tenant allowed two active jobs, which has two queued
    _shares(harness).set_limits(FREE["tenant_id"], max_active_jobs=2)
    accepted = [harness.submit(tenant=FREE, key=f"k{n}") for n in range(2)]
    assert [reply.status for reply in accepted] == [202, 202]
    # When it submits a third
    refused = harness.submit(tenant=FREE, key="k2", prompt="one too many")
    # Then it is refused with a stable code and a Retry-After, as problem+json
    assert refused.status == 429
    assert refused.code == "quota_exceeded"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == str(harness.config.fair_share.quota_retry_after_seconds)
    assert "at most 2" in refused.body["detail"]
    # And nothing was written or enqueued, and the share still counts two
    assert harness.item_count() == 2
    assert _lane_total(harness, "low") == 2
    assert _shares(harness).get(FREE["tenant_id"]).active == 2
    # And the tenant's key k2 was not used up: it is free for a later submit
    assert harness.api("GET", "/v1/jobs", tenant=FREE).body["data"].__len__() == 2


def test_a_replay_of_an_accepted_key_is_never_refused_by_the_quota(harness: Harness) -> None:
    # Given a tenant at its quota of one
    _shares(harness).set_limits(FREE["tenant_id"], max_active_jobs=1)
    first = harness.submit(tenant=FREE, key="only")
    # When the client retries the accepted submit
    replay = harness.submit(tenant=FREE, key="only")
    # Then it gets its job back, marked replayed, and nothing new exists
    assert (first.status, replay.status) == (202, 202)
    assert replay.body["id"] == first.body["id"]
    assert replay.headers.get("idempotent-replayed") == "true"
    assert harness.item_count() == 1
    assert _shares(harness).get(FREE["tenant_id"]).active == 1


def test_a_finished_job_makes_room_under_the_quota(harness: Harness) -> None:
    # Given a tenant at its quota of one
    _shares(harness).set_limits(FREE["tenant_id"], max_active_jobs=1)
    job_id = harness.submit(tenant=FREE).body["id"]
    assert harness.submit(tenant=FREE).status == 429
    # When its job ends (here: canceled while queued)
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=FREE).status == 200
    # Then the next submit is accepted, and the quota is per tenant: another tenant never noticed
    assert harness.submit(tenant=FREE).status == 202
    assert harness.submit(tenant=ENTERPRISE).status == 202
    assert _shares(harness).get(FREE["tenant_id"]).active == 1


def test_the_tier_default_quota_applies_without_an_override(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the free tier's default quota, set to two in the config
    config = integration_config(provider, fair_share={"tiers": {"free": {"max_active_jobs": 2}}})
    harness = Harness(moto_stack, config, monkeypatch)
    # When a free tenant submits three jobs
    statuses = [harness.submit(tenant=FREE).status for _ in range(3)]
    # Then the third is refused
    assert statuses == [202, 202, 429]


# ---- the concurrency cap ----------------------------------------------------------------------


def test_a_tenant_never_runs_more_than_its_cap_and_the_rest_wait_without_being_spent(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given an enterprise tenant capped at two jobs at once, with five queued slow jobs
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=2)
    provider.reset()
    ids = [harness.submit(prompt=f"job {n} [[latency:0.5]]").body["id"] for n in range(5)]
    url = harness.stack.lane_queue_urls["high"]
    # When one worker invocation receives all five
    messages = harness.receive(url)
    assert len(messages) == 5
    response = harness.run_worker(url, messages)
    # Then the provider saw at most two at once, two ran, and three wait as delayed copies
    # of their messages (the originals acknowledged: no receive spent on waiting)
    assert provider.state.max_in_flight == 2
    assert response == {"batchItemFailures": []}
    # (each copy is delayed by at least a second: it may be due already, so visible, or not)
    waiting = harness.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]
    assert (
        int(waiting["ApproximateNumberOfMessages"]) + int(waiting["ApproximateNumberOfMessagesDelayed"]) == 3
    )
    states = {job_id: harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body for job_id in ids}
    assert sorted(job["status"] for job in states.values()) == ["queued"] * 3 + ["succeeded"] * 2
    # And a deferral is not an attempt: the waiting jobs have never been claimed
    assert all(job["attempts"] == 0 for job in states.values() if job["status"] == "queued")
    # And both slots are free again, with three jobs still active
    share = _shares(harness).get(ENTERPRISE["tenant_id"])
    assert (share.running, share.active) == (0, 3)


def test_a_batch_of_a_tenant_at_its_cap_is_refused_by_one_claim_and_waits_unspent(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a tenant capped at one, whose only slot another worker holds, and six queued jobs
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=1)
    provider.reset()
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    holder = harness.submit(prompt="the running one").body["id"]
    assert jobs.claim(holder, "other-worker", 600).outcome is ClaimOutcome.CLAIMED
    ids = [harness.submit(prompt=f"job {n}").body["id"] for n in range(6)]
    url = harness.stack.lane_queue_urls["high"]
    messages = [m for m in harness.receive(url) if json.loads(m["Body"])["job_id"] in ids]
    assert len(messages) == 6
    transactions: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        transactions.append(json.dumps(params, default=str))

    events = aws.client("dynamodb").meta.events
    events.register("provide-client-params.dynamodb.TransactWriteItems", record)
    try:
        # When one worker invocation receives the six
        assert harness.run_worker(url, messages) == {"batchItemFailures": []}
    finally:
        events.unregister("provide-client-params.dynamodb.TransactWriteItems", record)
    # Then one claim was tried, and refused at the cap: it spoke for the other five
    assert len(transactions) == 1
    # And all six wait as delayed copies, never claimed, with nothing sent to the provider
    waiting = harness.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]
    assert (
        int(waiting["ApproximateNumberOfMessages"]) + int(waiting["ApproximateNumberOfMessagesDelayed"]) == 6
    )
    states = [harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body for job_id in ids]
    assert {(job["status"], job["attempts"]) for job in states} == {("queued", 0)}
    assert provider.state.log == []
    # And the share still counts the one running and all seven active
    share = _shares(harness).get(ENTERPRISE["tenant_id"])
    assert (share.running, share.active) == (1, 7)


def test_a_refused_message_is_sent_on_the_moment_its_batchs_own_job_frees_a_slot(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant capped at two, whose deferrals are long (30 s at least), and six queued jobs
    harness = _capped_with_long_deferrals(moto_stack, provider, monkeypatch, cap=2)
    ids = [harness.submit(prompt=f"job {n} [[latency:0.3]]").body["id"] for n in range(6)]
    url = harness.stack.lane_queue_urls["high"]
    sends: list[tuple[int, int]] = []  # (DelaySeconds, provider calls ended by then)
    hidden: list[int] = []  # visibility timeouts set while the batch ran

    def record(params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == url:
            sends.append((int(params.get("DelaySeconds", 0)), len(provider.state.log)))

    def record_hold(params: dict[str, Any], **_: Any) -> None:
        hidden.append(int(params["VisibilityTimeout"]))

    with observing_sqs("SendMessage", record), observing_sqs("ChangeMessageVisibility", record_hold):
        # When one worker invocation (of 60 s) receives all six: two run, four are refused
        messages = harness.receive(url, visibility=600)
        assert len(messages) == 6
        assert harness.run_worker(url, messages, timeout_seconds=60) == {"batchItemFailures": []}
    # Then two of the refused waited for the batch's own two jobs and were sent on, undelayed,
    # each once a job had ended; the other two were deferred by the policy, as before
    assert provider.state.max_in_flight == 2
    delays = sorted(delay for delay, _ in sends)
    assert len(delays) == 4 and delays[:2] == [0, 0] and min(delays[2:]) >= 30
    assert all(ended >= 1 for delay, ended in sends if delay == 0)
    # And while they waited, and only they, each was hidden only until just after the
    # invocation could end (its 60 s and the lease margin), not the 600 s it was received
    # for: a crash meanwhile brings it back then
    assert len(hidden) == 2
    assert all(60 <= timeout <= 60 + harness.config.lease_margin_seconds for timeout in hidden)
    # And the next invocation finds those two at once and runs them, within the cap
    again = harness.receive(url)
    assert len(again) == 2
    assert harness.run_worker(url, again) == {"batchItemFailures": []}
    assert provider.state.max_in_flight == 2
    states = [harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body for job_id in ids]
    assert sorted(job["status"] for job in states) == ["queued"] * 2 + ["succeeded"] * 4
    assert all(job["attempts"] == 0 for job in states if job["status"] == "queued")
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).running == 0


def test_a_first_attempt_that_succeeds_leaves_its_run_time_for_the_lanes_deferrals(harness: Harness) -> None:
    # Given a tenant with no run on record
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).last_runs == {}
    # When a job that fails for good runs, nothing is kept (a failure's run says little)
    failed = harness.submit(prompt="no [[fail:400:context_length_exceeded]]").body["id"]
    harness.drain("high")
    assert harness.api("GET", f"/v1/jobs/{failed}", tenant=ENTERPRISE).body["status"] == "failed"
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).last_runs == {}
    # When a 0.3 s job succeeds at its first attempt
    done = harness.submit(prompt="yes [[latency:0.3]]").body["id"]
    harness.drain("high")
    assert harness.api("GET", f"/v1/jobs/{done}", tenant=ENTERPRISE).body["status"] == "succeeded"
    # Then the share keeps how long it held its slot, in its lane, with nothing else changed
    share = _shares(harness).get(ENTERPRISE["tenant_id"])
    assert set(share.last_runs) == {"high"} and share.last_runs["high"] >= 300
    assert (share.running, share.active) == (0, 0)


def test_a_capped_tenant_does_not_hold_back_another_tenant_in_the_same_lane(harness: Harness) -> None:
    # Given tenant A at its cap of one in the high lane (a job running), and one more of A's waiting
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=1)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    running = harness.submit().body["id"]
    waiting = harness.submit().body["id"]
    assert jobs.claim(running, "busy-worker", 60).outcome is ClaimOutcome.CLAIMED
    # And another enterprise tenant with a job in the same lane
    other = {"tenant_id": "ten_other", "tier": "enterprise"}
    theirs = harness.submit(tenant=other).body["id"]
    # When workers try both waiting jobs
    assert jobs.claim(waiting, "w2", 60, (ENTERPRISE["tenant_id"], "high")).outcome is ClaimOutcome.AT_CAP
    assert jobs.claim(theirs, "w3", 60, (other["tenant_id"], "high")).outcome is ClaimOutcome.CLAIMED


def test_a_crashed_workers_slot_comes_back_when_the_reconciler_recovers_its_job(harness: Harness) -> None:
    # Given a tenant capped at one whose only slot is held by a worker that died (lease lapsed)
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=1)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    crashed = harness.submit().body["id"]
    waiting = harness.submit().body["id"]
    assert jobs.claim(crashed, "dead-worker", lease_seconds=1).outcome is ClaimOutcome.CLAIMED
    assert jobs.claim(waiting, "w2", 60).outcome is ClaimOutcome.AT_CAP
    # When the reconciler runs once after the lease lapsed
    later = _Later(offset=2)
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    recovering = JobRepository(
        harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"), clock=later
    )
    report = Reconciler(recovering, queues, harness.config).run()
    # Then the crashed job is queued again with its attempt counted, and its slot is free
    assert report.recovered == [crashed]
    assert harness.api("GET", f"/v1/jobs/{crashed}", tenant=ENTERPRISE).body["status"] == "queued"
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).running == 0
    # And the waiting job can now be claimed
    assert jobs.claim(waiting, "w2", 60).outcome is ClaimOutcome.CLAIMED


def test_a_takeover_of_its_own_lapsed_lease_is_never_refused_by_the_cap(harness: Harness) -> None:
    # Given a tenant at its cap of one, held by a job whose worker died
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=1)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    job_id = harness.submit().body["id"]
    assert jobs.claim(job_id, "dead-worker", lease_seconds=0.2).outcome is ClaimOutcome.CLAIMED
    time.sleep(0.3)
    # When the job's own message comes back and a worker claims it
    takeover = jobs.claim(job_id, "w2", 60, (ENTERPRISE["tenant_id"], "high"))
    # Then the slot passes to the new attempt: still one held, by this job
    assert takeover.outcome is ClaimOutcome.CLAIMED
    assert takeover.job is not None and takeover.job.attempts == 2
    share = _shares(harness).get(ENTERPRISE["tenant_id"])
    assert set(share.holders["high"]) == {job_id}


def test_a_cap_stored_above_what_the_share_item_can_name_holds_at_that_bound(harness: Harness) -> None:
    from llmq.config import MAX_TENANT_SLOTS
    from llmq.shares import MAX_CONCURRENCY, holders_of

    # Given a tenant whose operator override of 5,000 was stored before the bound, holding the
    # bound's number of slots already
    tenant = ENTERPRISE["tenant_id"]
    job_id = harness.submit().body["id"]
    now = {"N": str(int(time.time() * 1000))}
    held = {f"job_{n:026d}": now for n in range(MAX_TENANT_SLOTS)}
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key=share_key(tenant),
        UpdateExpression="SET #max = :max, #h = :held",
        ExpressionAttributeNames={"#max": MAX_CONCURRENCY, "#h": holders_of("high")},
        ExpressionAttributeValues={":max": {"N": "5000"}, ":held": {"M": held}},
    )
    assert _shares(harness).get(tenant).cap("high") == MAX_TENANT_SLOTS
    # When a worker claims its next job
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claim = jobs.claim(job_id, "w1", 60, (tenant, "high"))
    # Then it waits at the cap (review 266: held past the bound, the share item grew toward
    # DynamoDB's 400 KB, where claims fail as ItemTooLarge and burn their receives)
    assert claim.outcome is ClaimOutcome.AT_CAP
    assert len(_shares(harness).get(tenant).holders["high"]) == MAX_TENANT_SLOTS


def test_a_deferred_message_comes_back_later_the_longer_the_tenants_backlog(harness: Harness) -> None:
    # Given a tenant capped at one with a running job, and first a short then a long backlog
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=1)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(harness.submit().body["id"], "busy", 60).outcome is ClaimOutcome.CLAIMED
    url = harness.stack.lane_queue_urls["high"]
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    time.sleep(1.0)  # the running job has aged: the estimate of a run is about 2 s

    def deferrals(count: int) -> list[int]:
        for _ in range(count):
            harness.submit()
        timeouts: list[int] = []  # the delays of the deferred copies

        def record(params: dict[str, Any], **_: Any) -> None:
            timeouts.append(int(params["DelaySeconds"]))

        events = aws.client("sqs").meta.events
        events.register("provide-client-params.sqs.SendMessage", record)
        try:
            received = []
            while batch := harness.receive(url):
                received += batch
            for start in range(0, len(received), 10):
                harness.run_worker(url, received[start : start + 10])
        finally:
            events.unregister("provide-client-params.sqs.SendMessage", record)
        return timeouts

    # When workers meet the short backlog, then the long one
    short = deferrals(2)
    long = deferrals(40)
    # Then every message was deferred, never claimed (the short backlog's two are still away),
    # and the long backlog waits longer
    # (a short deferral may end during the long round and be deferred again there)
    assert len(short) == 2 and 40 <= len(long) <= 42
    assert sorted(long)[len(long) // 2] > 5 * max(short)
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).running == 1


def test_lane_messages_name_their_tenant_as_the_message_group(harness: Harness) -> None:
    # When a tenant submits
    harness.submit(tenant=FREE)
    # Then the lane message carries the tenant as its fair-queue group and in its body
    response = harness.sqs.receive_message(
        QueueUrl=harness.stack.lane_queue_urls["low"], MessageSystemAttributeNames=["MessageGroupId"]
    )
    (message,) = response["Messages"]
    assert json.loads(message["Body"])["tenant_id"] == FREE["tenant_id"]
    assert message.get("Attributes", {}).get("MessageGroupId") == FREE["tenant_id"]


def test_a_queued_job_says_its_place_among_the_tenants_queued_jobs(harness: Harness) -> None:
    # Given a tenant with three queued jobs, the first of them then started, and another tenant's job
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    ids = [harness.submit(prompt=f"job {n}").body["id"] for n in range(3)]
    harness.submit(tenant={"tenant_id": "ten_other", "tier": "enterprise"})
    assert jobs.claim(ids[0], "w1", 60).outcome is ClaimOutcome.CLAIMED

    def position(job_id: str) -> Any:
        return harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body.get("queue_position")

    # When the client polls, Then the queued ones say where they stand (1: next), counting only
    # this tenant's queued jobs, and a running job has no position
    assert [position(job_id) for job_id in ids] == [None, 1, 2]
    # And the list does not pay for positions
    listed = harness.api("GET", "/v1/jobs", tenant=ENTERPRISE).body["data"]
    assert all("queue_position" not in job or job["queue_position"] is None for job in listed)


# ---- a tenant's share item is hot: transactions on it conflict ---------------------------------


@pytest.fixture
def faults(harness: Harness) -> Iterator[AwsFaults]:
    injected = AwsFaults()
    yield injected
    injected.disarm()


def test_an_accept_whose_transaction_conflicts_is_tried_again_and_counted_once(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given two conflicting transactions on the tenant's share item (another submit, a claim)
    faults.arm(FaultKind.TRANSACTION_CONFLICT, "dynamodb.TransactWriteItems", times=2)
    # When the client submits
    reply = harness.submit(key="busy-tenant")
    # Then the api tried again and accepted it: one job, one message, counted once
    assert len(faults.fired) == 2
    assert reply.status == 202
    assert harness.item_count() == 1
    assert _lane_total(harness, "high") == 1
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).active == 1


def test_an_accept_that_keeps_conflicting_is_a_503_to_retry_and_writes_nothing(
    harness: Harness, faults: AwsFaults
) -> None:
    faults.arm(FaultKind.TRANSACTION_CONFLICT, "dynamodb.TransactWriteItems", times=50)
    reply = harness.submit(key="very-busy")
    assert reply.status == 503 and reply.code == "storage_contended"
    assert "retry-after" in reply.headers
    assert harness.item_count() == 0
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).active == 0


def test_a_claim_whose_transaction_conflicts_runs_the_job_once(
    harness: Harness, faults: AwsFaults, provider: FakeProviderServer
) -> None:
    # Given a queued job, and the claim's first two transactions conflicting
    job_id = harness.submit().body["id"]
    faults.arm(FaultKind.TRANSACTION_CONFLICT, "dynamodb.TransactWriteItems", times=2)
    # When the worker runs its message
    assert harness.drain("high") == {"batchItemFailures": []}
    # Then the job ran once and its slot is back
    assert len(faults.fired) == 2
    assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] == "succeeded"
    assert provider.calls_for(job_id) == 1
    share = _shares(harness).get(ENTERPRISE["tenant_id"])
    assert (share.running, share.active) == (0, 0)


def test_a_job_requeued_for_a_retry_hands_its_slot_to_the_message_waiting_in_its_batch(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant capped at one, whose deferrals are 30 s at least, and two queued jobs
    # whose first provider call fails with a 503
    harness = _capped_with_long_deferrals(moto_stack, provider, monkeypatch, cap=1)
    ids = [harness.submit(prompt=f"job {n} [[fail:503x1]]").body["id"] for n in range(2)]
    url = harness.stack.lane_queue_urls["high"]
    delays: list[int] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        delays.append(int(params.get("DelaySeconds", 0)))

    # When one invocation receives both: one runs, fails and is requeued for its retry, and
    # the other waits for it
    messages = harness.receive(url, visibility=600)
    assert len(messages) == 2
    slowed: list[bool] = []

    def slow_first_requeue(params: dict[str, Any], **_: Any) -> None:
        # (the first requeue's write takes a second: the other message's claim meets the slot
        # held, on a loaded machine too, where it could otherwise come after the requeue)
        if not slowed and "REMOVE lease_owner" in json.dumps(params):
            slowed.append(True)
            time.sleep(1.0)

    with (
        observing_sqs("SendMessage", record),
        on_aws_call("dynamodb", "provide-client-params.dynamodb.TransactWriteItems", slow_first_requeue),
    ):
        response = harness.run_worker(url, messages, timeout_seconds=60)
    assert slowed
    # Then the requeue freed the slot and the waiting message was sent on at once, while the
    # requeued one waits out its backoff
    assert len(response["batchItemFailures"]) == 1
    assert delays == [0]
    statuses = [harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body for job_id in ids]
    assert sorted((job["status"], job["attempts"]) for job in statuses) == [("queued", 0), ("queued", 1)]
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).running == 0


def test_a_handed_on_copy_whose_send_stalls_never_outlasts_the_invocation(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant capped at one, and two of its jobs in one batch: one slow, one that waits
    harness = _capped_with_long_deferrals(moto_stack, provider, monkeypatch, cap=1)
    running = harness.submit(prompt="slow [[latency:3]]").body["id"]
    waiting = harness.submit(prompt="waits").body["id"]
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url, visibility=600)
    assert len(messages) == 2

    # And SQS answering the waiting job's copy in 10 s (botocore's read timeout for one try)
    def stall(params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == url and json.loads(params["MessageBody"])["job_id"] == waiting:
            time.sleep(10)

    events = aws.client("sqs").meta.events
    events.register("provide-client-params.sqs.SendMessage", stall)
    try:
        response = harness.run_worker(url, messages, timeout_seconds=12.0)
    finally:
        events.unregister("provide-client-params.sqs.SendMessage", stall)
    # Then the send is given up in time for the invocation to answer, the waiting message
    # reported to come back (hunt 265: the send ran on past the invocation's end, and on Lambda
    # every record of the batch, the succeeded one's too, would have come back). (The test's own
    # event loop still waits for the stalled thread as it closes; Lambda's stays open.)
    assert [failure["itemIdentifier"] for failure in response["batchItemFailures"]] == [
        message["MessageId"] for message in messages if json.loads(message["Body"])["job_id"] == waiting
    ]
    assert harness.api("GET", f"/v1/jobs/{running}", tenant=ENTERPRISE).body["status"] == "succeeded"


def test_a_handed_on_copy_that_sqs_throttles_leaves_its_message_to_wait_its_deferral(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant capped at one, whose deferrals are 30 s at least, and two queued jobs
    harness = _capped_with_long_deferrals(moto_stack, provider, monkeypatch, cap=1)
    ids = [harness.submit(prompt=f"job {n} [[latency:0.2]]").body["id"] for n in range(2)]
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url, visibility=1)
    assert len(messages) == 2
    # When one runs and the other waits for it, and SQS throttles the copy sent as its slot frees
    tried: list[int] = []  # DelaySeconds of each send tried

    def record(params: dict[str, Any], **_: Any) -> None:
        tried.append(int(params.get("DelaySeconds", 0)))

    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", times=20)
    try:
        with observing_sqs("SendMessage", record):
            response = harness.run_worker(url, messages)
    finally:
        faults.disarm()
    # Then the copy tried was the undelayed one, sent as the slot freed; that message is
    # reported failed, and waits out its deferral (not back at once, to spin through its
    # receives while SQS throttles)
    assert faults.fired and tried and set(tried) == {0}
    assert len(response["batchItemFailures"]) == 1
    time.sleep(2.0)  # past the receive's own visibility timeout of 1 s
    assert harness.receive(url) == []
    states = sorted(
        harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] for job_id in ids
    )
    assert states == ["queued", "succeeded"]
    assert _shares(harness).get(ENTERPRISE["tenant_id"]).running == 0


def test_a_message_naming_no_tenant_refused_at_the_cap_is_replaced_by_a_copy_that_names_it(
    harness: Harness,
) -> None:
    # Given a tenant at its cap of one (a job running), and a second job whose lane message
    # names only the job, as an older sender wrote them
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=1)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    running = harness.submit().body["id"]
    waiting = harness.submit().body["id"]
    assert jobs.claim(running, "busy-worker", 60).outcome is ClaimOutcome.CLAIMED
    url = harness.stack.lane_queue_urls["high"]
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    harness.sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"job_id": waiting}))
    # When a worker receives it
    messages = harness.receive(url)
    assert len(messages) == 1
    assert harness.run_worker(url, messages) == {"batchItemFailures": []}
    # Then it was acknowledged only because a delayed copy replaced it, naming the tenant
    copies = harness.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesDelayed"]
    )
    assert int(copies["Attributes"]["ApproximateNumberOfMessagesDelayed"]) == 1
    assert harness.api("GET", f"/v1/jobs/{waiting}", tenant=ENTERPRISE).body["status"] == "queued"


# ---- a retry overlapping its first submit is a replay, never a quota refusal ---------------


def _quota(harness: Harness, limit: int) -> None:
    _shares(harness).set_limits(FREE["tenant_id"], max_active_jobs=limit)


def _first_submit_lands_after_the_retrys_look(store: Any, submit: Callable[[], Any]) -> dict[str, Any]:
    """The retry's look for its key finds nothing, and the first submit (its connection to the
    client dropped) commits just after it: `store.find` answers, then runs `submit` once."""
    first: dict[str, Any] = {}
    find = store.find

    def find_then_the_first_commits(*args: Any, **kwargs: Any) -> Any:
        found = find(*args, **kwargs)
        if not first:
            store.find = find
            first["reply"] = submit()
        return found

    store.find = find_then_the_first_commits
    return first


def test_a_batch_retry_overlapping_its_first_submit_is_its_replay_not_a_429(harness: Harness) -> None:
    # Given a tenant with room for 5 active jobs, and a batch of 3 under a key
    from tests.integration.test_batches import _requests, _submit

    _quota(harness, 5)

    def submit() -> Any:
        return _submit(harness, tenant=FREE, key="k1", requests=_requests(3))

    # When the client's retry looks for the key just before its first submit commits
    first = _first_submit_lands_after_the_retrys_look(harness.api_module.batch_intake().batches, submit)
    retry = submit()
    # Then the retry answers the batch the first one made, as a replay: the quota (which the
    # first one's 3 now fill) never refuses it, and no third item is counted
    assert first["reply"].status == 202
    assert (retry.status, retry.body["id"]) == (202, first["reply"].body["id"])
    assert _shares(harness).get(FREE["tenant_id"]).active == 3


def test_an_s3_held_job_retry_overlapping_its_first_submit_is_its_replay_not_a_429(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a tenant with room for one active job, and a job whose input goes to S3 (a stream's
    # input over streaming.max_inline_input_bytes), under a key
    limits = {"max_prompt_chars": 100_000, "wait_poll_seconds": 0.05}
    harness = Harness(moto_stack, integration_config(provider, limits=limits), monkeypatch)
    _quota(harness, 1)

    def submit() -> Any:
        return harness.submit(tenant=FREE, key="k2", prompt="x" * 20_000, stream=True)

    # When the client's retry looks for the key just before its first submit commits
    first = _first_submit_lands_after_the_retrys_look(harness.api_module.intake().jobs, submit)
    retry = submit()
    # Then the retry answers the job the first one made, as a replay
    assert first["reply"].status == 202
    assert (retry.status, retry.body["id"]) == (202, first["reply"].body["id"])


def test_a_batch_key_past_its_retention_over_the_quota_is_a_429_not_a_replay(harness: Harness) -> None:
    # Given a tenant's batch under a key, past its retention (its item not yet deleted), and the
    # tenant's quota then full
    from llmq.batches import batch_key
    from tests.integration.test_batches import _requests, _submit

    _quota(harness, 4)
    first = _submit(harness, tenant=FREE, key="old", requests=_requests(3))
    assert first.status == 202
    harness.ddb.update_item(
        TableName=harness.stack.jobs_table,
        Key=batch_key(first.body["id"]),
        UpdateExpression="SET expires_at = :at",
        ExpressionAttributeValues={":at": {"N": str(int(time.time()) - 60)}},
    )
    # When the key is used again, Then the quota refuses it: the old batch is gone, not replayed
    again = _submit(harness, tenant=FREE, key="old", requests=_requests(3))
    assert (again.status, again.body["code"]) == (429, "quota_exceeded")


def _claims_of_a_new_batch(
    harness: Harness, tenant: dict[str, str], lane: str, claims: int
) -> tuple[list[ClaimOutcome], JobRepository]:
    """A batch of six of `tenant`'s, expanded into `lane`, then its first `claims` items claimed
    by workers: their outcomes, and the jobs those workers claim with."""
    from llmq.batches import item_job_id

    batch = harness.api(
        "POST",
        "/v1/batches",
        body={"requests": [{"custom_id": f"item-{n}", "body": {"prompt": f"item {n}"}} for n in range(6)]},
        tenant=tenant,
    )
    assert batch.status == 202
    url = harness.stack.lane_queue_urls[lane]
    harness.run_worker(
        url, [m for m in harness.receive(url) if json.loads(m["Body"]).get("kind") == "expand"]
    )
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    outcomes = [jobs.claim(item_job_id(batch.body["id"], n), f"w{n}", 3600).outcome for n in range(claims)]
    return outcomes, jobs


def test_an_operators_cap_is_whole_for_batches_in_a_lane_of_their_own(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the lane of batches (`batches.lane`) none of the tenant's own jobs runs, so no slot is
    kept for them there: under an operator's cap as under the tier's, its items take it all."""
    harness = Harness(moto_stack, integration_config(provider, batches={"lane": "low"}), monkeypatch)
    # Given an operator's cap of 4 (a batch cap of 3 elsewhere), and a batch of six expanded
    # into the batch lane, when workers claim its items
    _shares(harness).set_limits(
        ENTERPRISE["tenant_id"], max_concurrency=4, reserve=harness.config.batches.interactive_reserve
    )
    outcomes, _ = _claims_of_a_new_batch(harness, ENTERPRISE, "low", 5)
    # Then four run at once, the whole cap, and the fifth waits
    assert outcomes == [ClaimOutcome.CLAIMED] * 4 + [ClaimOutcome.AT_CAP]


def test_batches_in_the_tenants_own_lane_keep_its_reserve_when_that_lane_is_the_batch_lane(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane of batches is some tier's own lane too: there a tenant's own jobs still run,
    and its batch items stay below the batch cap, leaving them the reserve."""
    harness = Harness(moto_stack, integration_config(provider, batches={"lane": "low"}), monkeypatch)
    # Given a free-tier tenant (whose own lane is the batch lane) capped at 4 by an operator
    _shares(harness).set_limits(
        FREE["tenant_id"], max_concurrency=4, reserve=harness.config.batches.interactive_reserve
    )
    # When workers claim its batch's items, and then a job of its own
    outcomes, jobs = _claims_of_a_new_batch(harness, FREE, "low", 4)
    own = harness.submit(tenant=FREE, key="own-job").body["id"]
    # Then three items run (the batch cap), and the tenant's own job takes the slot kept for it
    assert outcomes == [ClaimOutcome.CLAIMED] * 3 + [ClaimOutcome.AT_CAP]
    assert jobs.claim(own, "w-own", 3600).outcome is ClaimOutcome.CLAIMED


def test_a_lane_that_becomes_the_tenants_own_stops_being_whole_for_its_batches(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch in a lane not the tenant's own marks it whole; if the operator's config later
    makes it the tenant's own, the tenant's own jobs there keep their reserve again."""
    # Given a free tenant's batch in the high lane, not its own: the lane marked whole
    before = Harness(moto_stack, integration_config(provider, batches={"lane": "high"}), monkeypatch)
    first = before.api(
        "POST", "/v1/batches", body={"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}, tenant=FREE
    )
    assert first.status == 202
    share = aws.client("dynamodb").get_item(
        TableName=moto_stack.jobs_table, Key={"pk": {"S": f"share#{FREE['tenant_id']}"}}
    )["Item"]
    assert "wholeb_high" in share
    # When the config puts the free tier in the high lane, and the tenant submits there
    lanes = [
        {"name": "high", "tiers": ["enterprise", "free"], "max_concurrency": 8},
        {"name": "low", "tiers": ["batch-only"], "max_concurrency": 2},
    ]
    after = Harness(
        moto_stack, integration_config(provider, lanes=lanes, batches={"lane": "high"}), monkeypatch
    )
    _shares(after).set_limits(
        FREE["tenant_id"], max_concurrency=4, reserve=after.config.batches.interactive_reserve
    )
    own = after.submit(tenant=FREE, key="own-job").body
    assert own["lane"] == "high"
    outcomes, jobs = _claims_of_a_new_batch(after, FREE, "high", 4)
    # Then its items stay below the batch cap there, and its own job runs
    assert outcomes == [ClaimOutcome.CLAIMED] * 3 + [ClaimOutcome.AT_CAP]
    assert jobs.claim(own["id"], "w-own", 3600).outcome is ClaimOutcome.CLAIMED


def test_a_message_waiting_for_its_batchs_sibling_goes_back_when_its_deferral_is_due(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused message waits in flight for a sibling of its batch to end (the slot handoff),
    but never past its own deferral: a slot may free in another invocation, which the sibling
    does not see, and the job would stay queued while its tenant runs below its cap."""
    import threading

    from llmq.models import ErrorCode, JobError

    harness = Harness(moto_stack, integration_config(provider), monkeypatch)
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=2)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    url = harness.stack.lane_queue_urls["high"]
    # Given another worker's job holding one of the tenant's two slots
    other = harness.submit(prompt="x").body["id"]
    claim = jobs.claim(other, "other-worker", 600)
    assert claim.outcome is ClaimOutcome.CLAIMED
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    # And a slow job and another received in one batch: the second is refused at the cap
    harness.submit(prompt="slow [[latency:8]]")
    refused = harness.submit(prompt="r").body["id"]
    messages = harness.receive(url, visibility=600)
    assert len(messages) == 2
    began = time.monotonic()
    copies: list[float] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == url and json.loads(params["MessageBody"])["job_id"] == refused:
            copies.append(time.monotonic() - began + int(params.get("DelaySeconds", 0)))

    freed: list[float] = []

    def free_the_other_slot() -> None:
        jobs.fail_leased(
            claim.job, "other-worker", JobError(code=ErrorCode.PROVIDER_ERROR, message="x", retryable=False)
        )
        freed.append(time.monotonic() - began)

    # When the other worker's slot frees a second in, while the slow sibling still runs
    timer = threading.Timer(1.0, free_the_other_slot)
    events = aws.client("sqs").meta.events
    events.register("provide-client-params.sqs.SendMessage", record)
    timer.start()
    try:
        harness.run_worker(url, messages, timeout_seconds=60)
    finally:
        events.unregister("provide-client-params.sqs.SendMessage", record)
        timer.join()
    # Then the refused job's copy came back about when its deferral was due (it was short:
    # one job waiting), not when its sibling ended 8 s later
    (due,) = copies
    assert due <= freed[0] + 4.0, (copies, freed)


def test_a_message_whose_siblings_hold_every_slot_waits_for_one_of_them(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the tenant's slots are all held by the refused message's own batch, only one of
    those ending can free a slot: the message waits for it however short its deferral (going
    back at once, it would only be refused again, and again)."""
    harness = Harness(moto_stack, integration_config(provider), monkeypatch)
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=2)
    url = harness.stack.lane_queue_urls["high"]
    # Given three slow jobs of a tenant capped at two, received in one batch
    ids = [harness.submit(prompt=f"slow {n} [[latency:3]]").body["id"] for n in range(3)]
    messages = harness.receive(url, visibility=600)
    assert len(messages) == 3
    began = time.monotonic()
    copies: list[float] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == url and json.loads(params["MessageBody"])["job_id"] in ids:
            copies.append(time.monotonic() - began + int(params.get("DelaySeconds", 0)))

    events = aws.client("sqs").meta.events
    events.register("provide-client-params.sqs.SendMessage", record)
    try:
        harness.run_worker(url, messages, timeout_seconds=60)
    finally:
        events.unregister("provide-client-params.sqs.SendMessage", record)
    # Then the refused job's one copy came back as a sibling ended and freed its slot, not before
    (due,) = copies
    assert due >= 2.5, copies


def test_a_job_that_only_waits_at_its_cap_outlasts_an_sqs_send_outage_before_the_dlq(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a tenant capped at one, whose slot another worker holds with a short last run (so
    # its deferrals are a second or two), and one queued job waiting its turn
    _shares(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=1)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    url = harness.stack.lane_queue_urls["high"]
    holder = harness.submit(prompt="the running one").body["id"]
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert jobs.claim(holder, "other-worker", 3600).outcome is ClaimOutcome.CLAIMED
    waiting = harness.submit(prompt="waits its turn").body["id"]
    # When SQS refuses every copy its deferrals send, through each of the lane's receives
    faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", function="worker", times=1000)
    faults.wrap_handler("worker", harness.worker())
    receives = harness.config.max_receive_count
    hidden_for = hidden_for_each_receive(harness, url, receives)
    # Then each receive sent it away for twice as long as the one before, from 15 s: the
    # lane's receives outlast a quarter of an hour of refused sends before the DLQ, where the
    # deferrals' own second or two spun it there in seconds; the job is still queued, unspent
    assert len(hidden_for) == receives
    assert all(hidden_for[n] >= 15 * 2**n for n in range(receives)), hidden_for
    assert sum(hidden_for) >= 15 * 60
    job = harness.api("GET", f"/v1/jobs/{waiting}", tenant=ENTERPRISE).body
    assert (job["status"], job["attempts"]) == ("queued", 0)


# ---- a raised cap --------------------------------------------------------------------------------


def _limits(harness: Harness) -> TenantLimits:
    """`llmq tenants` as the CLI builds it against the stack: the shares, the tenant index and
    the lane queues."""
    from llmq.long_polls import LongPolls
    from llmq.tenants import TenantRepository

    table = harness.stack.jobs_table
    tenants = TenantRepository(harness.stack.tenants_table, dynamodb=aws.client("dynamodb"))
    tenants.create("Acme", ENTERPRISE["tier"], tenant_id=ENTERPRISE["tenant_id"])
    return TenantLimits(
        tenants=tenants,
        shares=_shares(harness),
        polls=LongPolls(table, dynamodb=aws.client("dynamodb")),
        usage_plans=None,
        config=harness.config,
        backlog=DeferredBacklog(
            jobs=JobRepository(table, harness.config, dynamodb=aws.client("dynamodb")),
            queues=QueueRepository(
                harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
            ),
        ),
    )


def deferred_at_a_cap_of_one(harness: Harness, backlog: int) -> list[str]:
    """A tenant capped at one, its slot held by a long job, and `backlog` queued jobs whose
    messages a worker deferred at the cap (far: its last job ran five minutes); their ids,
    oldest first."""
    tenant = ENTERPRISE["tenant_id"]
    _shares(harness).set_limits(tenant, max_concurrency=1)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(harness.submit(prompt="long").body["id"], "busy", 600).outcome is ClaimOutcome.CLAIMED
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key=share_key(tenant),
        UpdateExpression="SET lrun_high = :ran",
        ExpressionAttributeValues={":ran": {"N": "300000"}},
    )
    url = harness.stack.lane_queue_urls["high"]
    for message in harness.receive(url):
        harness.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    ids = []
    for n in range(backlog):
        ids.append(harness.submit(prompt=f"job {n}").body["id"])
        time.sleep(0.002)  # apart in the tenant index's order
    received = harness.receive(url)
    assert len(received) == backlog
    # (each deferred to the end of its window: one drawn at its start came back within seconds
    # on a slow machine, beside the copy a test then wakes)
    with mock.patch.object(random.Random, "random", return_value=0.99):
        harness.run_worker(url, received)
    waiting = harness.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]
    assert (
        int(waiting["ApproximateNumberOfMessages"]),
        int(waiting["ApproximateNumberOfMessagesDelayed"]),
    ) == (
        0,
        backlog,
    )
    return ids


def test_a_raised_cap_starts_the_tenants_deferred_jobs_at_once(
    harness: Harness, provider: FakeProviderServer
) -> None:
    """Hunt 216: a backlog deferred at the old cap waited out its deferrals (up to an hour) with
    the new slots idle; set-limits now sends a message for as many queued jobs as there is room."""
    # Given a tenant capped at one, one job running and four deferred for minutes
    ids = deferred_at_a_cap_of_one(harness, 4)
    provider.reset()
    # When the operator raises its cap to ten
    shown = _limits(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=10)
    # Then each of the four has a message now, and a worker runs all four at once
    assert shown["woken"] == 4
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url)
    assert sorted(json.loads(message["Body"])["job_id"] for message in messages) == sorted(ids)
    assert harness.run_worker(url, messages) == {"batchItemFailures": []}
    states = [harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] for job_id in ids]
    assert states == ["succeeded"] * 4
    assert provider.state.calls == {job_id: 1 for job_id in ids}


def test_a_raised_cap_wakes_only_as_many_as_its_free_slots_oldest_first(harness: Harness) -> None:
    # Given a tenant capped at one, one job running and five deferred
    ids = deferred_at_a_cap_of_one(harness, 5)
    # When the cap goes to three (two free slots)
    shown = _limits(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=3)
    # Then the two oldest queued jobs get a message, the rest keep their deferrals
    assert shown["woken"] == 2
    woken = [
        json.loads(message["Body"])["job_id"]
        for message in harness.receive(harness.stack.lane_queue_urls["high"])
    ]
    assert sorted(woken) == sorted(ids[:2])


def test_a_cap_with_no_free_slot_or_a_quota_change_wakes_nothing(harness: Harness) -> None:
    # Given a tenant capped at one, its slot held, with three deferred jobs
    deferred_at_a_cap_of_one(harness, 3)
    limits = _limits(harness)
    # When the cap is set again to one (no slot free), and its quota is raised
    for change in ({"max_concurrency": 1}, {"max_active_jobs": 500}):
        assert "woken" not in limits.set_limits(ENTERPRISE["tenant_id"], **change)
    # Then no message was sent: the deferred copies are all there is
    assert harness.receive(harness.stack.lane_queue_urls["high"]) == []


def test_a_job_waiting_out_a_retry_backoff_is_passed_over_for_one_that_can_start(harness: Harness) -> None:
    """Review 219: the oldest queued job may be one waiting out a retry's backoff, whose claim
    is refused until then; woken in place of a deferred one, the free slot stayed idle."""
    from llmq.models import ErrorCode, JobError

    # Given a job of the tenant's requeued with ten minutes' backoff (the oldest queued job)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    retried = harness.submit(prompt="retried").body["id"]
    claim = jobs.claim(retried, "w1", 600)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job is not None
    error = JobError(code=ErrorCode.PROVIDER_UNAVAILABLE, message="503", retryable=True)
    jobs.requeue(claim.job, "w1", error, 600)
    time.sleep(0.01)
    # And, behind it, a cap of one whose slot is held and two jobs deferred at it
    ids = deferred_at_a_cap_of_one(harness, 2)
    # When the cap goes to two (one free slot)
    assert _limits(harness).set_limits(ENTERPRISE["tenant_id"], max_concurrency=2)["woken"] == 1
    # Then the slot goes to the oldest job that can start now, and a worker starts it
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url)
    assert [json.loads(message["Body"])["job_id"] for message in messages] == [ids[0]]
    harness.run_worker(url, messages)
    assert harness.api("GET", f"/v1/jobs/{ids[0]}", tenant=ENTERPRISE).body["status"] == "succeeded"


def test_waking_cut_short_by_sqs_says_how_far_it_got_and_setting_the_cap_again_wakes_the_rest(
    harness: Harness,
) -> None:
    """Review 219: a send refused part way failed the whole command after the cap was written,
    and running it again woke nothing (the cap had not risen)."""
    # Given a tenant capped at one with three deferred jobs, and SQS throttling the second send
    # past botocore's retries
    ids = deferred_at_a_cap_of_one(harness, 3)
    limits = _limits(harness)
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "sqs.SendMessage", nth=2, times=20)
    try:
        # When the cap goes to eight
        shown = limits.set_limits(ENTERPRISE["tenant_id"], max_concurrency=8)
    finally:
        faults.disarm()
    # Then the cap is set, and the answer says one job was woken and why the rest were not
    assert shown["limits"]["max_concurrency"]["value"] == 8
    assert shown["woken"] == 1 and "Throttl" in shown["wake_stopped"]
    # And setting the cap again wakes every queued job (the first a second time: a duplicate,
    # which its claim answers), and a worker runs each once
    again = limits.set_limits(ENTERPRISE["tenant_id"], max_concurrency=8)
    assert again["woken"] == 3 and "wake_stopped" not in again
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url)
    assert sorted({json.loads(message["Body"])["job_id"] for message in messages}) == sorted(ids)
    harness.run_worker(url, messages)
    states = [harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body for job_id in ids]
    assert [(job["status"], job["attempts"]) for job in states] == [("succeeded", 1)] * 3
