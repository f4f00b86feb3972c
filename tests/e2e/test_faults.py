"""DESIGN §3 under injected faults, with figures from the job table, the provider's call log,
the receiver's log and the queues.

Two sandboxes, started side by side:
- `main` has the sandbox's own numbers (worker timeout 10 s, 2 attempts, webhook schedule
  1-2-4-8 s), except that a queued job counts as stale after 2 s, so the reconciler (every
  10 s in the sandbox) finds a lost enqueue within one sweep;
- `down` has its provider pointed at a closed port on 127.0.0.1.

Both run with LLMQ_SANDBOX_CHAOS=on: their pollers deliver some messages twice, shuffle
batches, hold messages back for a later batch and hand over partial batches, as a standard
queue may, so every figure below holds under at-least-once delivery for real.

Faults come from the sandbox (llmq_sandbox/doubles/faults.py and the introspection API): the api's
SendMessage failing after its PutItem (`POST /_sandbox/faults`), a lane's mapping paused so
that poison and good messages form one batch (`POST /_sandbox/mappings`), provider directives
and storms, and a receiver that fails the first N attempts until healed.

The slow scenarios (a hung and a stalled provider, two receiver outages, a lost enqueue) are
started first by the `background` fixture and checked near the end, so they play out while
the quick ones run. Tests run in file order: the storm, which hits every provider call while
it lasts, waits for the provider calls of everything else to be over.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest

from llmq.webhooks import EARLY_TOLERANCE_SECONDS
from tests.e2e.conftest import SandboxUnderTest, run_llmq, stop_sandbox, wait_until
from tests.e2e.figures import (
    CLOCK_SLACK,
    Figures,
    invocations_once_logged,
    lane_message,
    overlapping,
    settle,
    start_sandboxes,
)

pytestmark = pytest.mark.e2e

STALE_QUEUED_SECONDS = 2
MAIN_CONFIG: dict[str, Any] = {"reconciler": {"stale_queued_seconds": STALE_QUEUED_SECONDS}}
DOWN_MAX_ATTEMPTS = 3
NOT_JSON = "this is not { json"
UNKNOWN_JOB = "job_00000000000000000000000000"
CHAOS_SEED = "12"


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, SandboxUnderTest]]:
    down_config = {
        "provider": {"base_url": f"http://127.0.0.1:{closed_port()}/v1"},
        "max_attempts": DOWN_MAX_ATTEMPTS,
    }
    # At least once for real: the pollers duplicate, reorder and split batches (seeded).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMQ_SANDBOX_CHAOS", "on")
        patch.setenv("LLMQ_SANDBOX_CHAOS_SEED", CHAOS_SEED)
        main, down = start_sandboxes(lambda: tmp_path_factory.mktemp("sandbox"), [MAIN_CONFIG, down_config])
    yield {"main": main, "down": down}
    for sandbox in (main, down):
        if (sandbox.directory / ".llmq" / "sandbox.json").exists():
            stop_sandbox(sandbox)


@pytest.fixture(scope="module")
def sandbox(sandboxes: dict[str, SandboxUnderTest]) -> SandboxUnderTest:
    return sandboxes["main"]


@dataclass
class Ledger:
    """What this module did that the last test accounts for."""

    poison_message_ids: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


@dataclass
class Background:
    lost: str
    lost_body: dict[str, Any]
    lost_key: str
    lost_fault: str
    lost_replies: list[httpx.Response]
    hang: str
    stall: str
    outage_brief: str
    outage_brief_path: str
    outage_long: str
    outage_long_path: str


@pytest.fixture(scope="module", autouse=True)
def background(figures: Figures, config: dict[str, Any]) -> Background:
    receiver = figures.sandbox.state["receiver_url"]
    # A lost enqueue: the api's SendMessage fails once, after its PutItem; the client retries.
    fault = figures.arm_call_fault("api", "sqs.SendMessage", times=1)
    lost_body = {"prompt": "Lost in the mail [[tokens:4]]"}
    key = "faults-lost-enqueue"
    first = figures.submit("enterprise", lost_body, **{"Idempotency-Key": key})
    retry = figures.submit("enterprise", lost_body, **{"Idempotency-Key": key})
    # A receiver down for fewer attempts than the schedule has, and one down beyond it.
    brief_failures = len(config["webhooks"]["schedule_seconds"]) - 1
    brief_path = f"/hooks/outage-brief/fail-{brief_failures}"
    long_path = "/hooks/outage-long/fail-99"
    brief = figures.submit("enterprise", {"prompt": "Brief", "webhook": {"url": receiver + brief_path}})
    long = figures.submit("enterprise", {"prompt": "Long", "webhook": {"url": receiver + long_path}})
    # A provider that never answers, and one that trickles keep-alives forever (the free lane).
    hang = figures.submit("free", {"prompt": "Think forever [[hang]]"})
    stall = figures.submit("free", {"prompt": "Drip forever [[stall]]"})
    return Background(
        lost=first.json()["id"],
        lost_body=lost_body,
        lost_key=key,
        lost_fault=fault,
        lost_replies=[first, retry],
        hang=hang.json()["id"],
        stall=stall.json()["id"],
        outage_brief=brief.json()["id"],
        outage_brief_path=brief_path,
        outage_long=long.json()["id"],
        outage_long_path=long_path,
    )


def webhook_to(figures: Figures, path: str, events: list[str] | None = None) -> dict[str, Any]:
    hook: dict[str, Any] = {"url": figures.sandbox.state["receiver_url"] + path}
    if events is not None:
        hook["events"] = events
    return hook


def heard(figures: Figures, job_id: str) -> dict[str, int]:
    """The events the receiver accepted (2xx), per type, counted by webhook-id: under
    at-least-once delivery two copies of a webhooks message handled at the same moment may both
    POST, under the one webhook-id by which a receiver de-duplicates (Standard Webhooks)."""
    ids: dict[str, set[str]] = {}
    for delivery in figures.deliveries(job_id):
        if 200 <= delivery["status"] < 300:
            ids.setdefault(delivery["type"], set()).add(delivery["webhook_id"])
    return {event_type: len(webhook_ids) for event_type, webhook_ids in ids.items()}


def delivery_log(figures: Figures, job_id: str) -> list[dict[str, Any]]:
    """The attempts llmq counted for the job's terminal event, oldest first, as its delivery log
    (GET /v1/jobs/{id}/webhook) shows them: the latest ten, across redeliveries. Under at-least-once delivery the receiver may see
    more POSTs than attempts: two copies of one webhooks message handled at once POST one
    attempt twice, under its one webhook-id, however far apart a loaded machine lands them."""
    with figures.sandbox.api("enterprise") as client:
        [terminal] = client.get(f"/v1/jobs/{job_id}/webhook").json()["deliveries"]
    attempts: list[dict[str, Any]] = terminal["attempts"]
    return attempts


def posted_at(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp()


def receives(records: list[dict[str, Any]], job_id: str | None = None) -> set[tuple[str, int]]:
    """The distinct receives (message id, receive count) the records handed over, for one job or
    all: the chaos mode hands some receives over twice, and those count once."""
    found = set()
    for record in records:
        pairs = zip(record["message_ids"], record["receive_counts"], strict=True)
        if job_id is None:
            found |= set(pairs)
            continue
        assert len(record["job_ids"]) == len(record["message_ids"]), record
        found |= {pair for pair, job in zip(pairs, record["job_ids"], strict=True) if job == job_id}
    return found


def wait_delivered(figures: Figures, job_id: str, event_type: str, timeout: float = 30) -> None:
    assert wait_until(lambda: figures.successes(job_id).get(event_type), timeout=timeout), (
        f"no successful {event_type} delivery for {job_id}: {figures.deliveries(job_id)}"
    )


# ---- deterministic errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("[[fail:400:context_length_exceeded]]", "context_length_exceeded"),
        ("[[fail:400:content_policy_violation]]", "content_filtered"),
        ("[[fail:404:model_not_found]]", "model_not_found"),
        ("[[fail:400:invalid_request_error]]", "invalid_request"),
    ],
)
def test_a_deterministic_error_costs_one_call_and_fails_for_good(
    figures: Figures, directive: str, code: str
) -> None:
    # Given a job the provider refuses with a 4xx that no retry can fix, and a webhook
    accepted = figures.submit(
        "enterprise", {"prompt": f"Refused {directive}", "webhook": webhook_to(figures, f"/hooks/{code}")}
    )
    job = figures.sandbox.wait_terminal(accepted.json()["id"])
    # Then it failed at once with that code, not retryable, after exactly one call
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert job["error"]["code"] == code
    assert job["error"]["retryable"] is False
    assert [call.status for call in figures.provider_calls(job["id"])] == [int(directive[7:10])]
    # And the client heard it once
    wait_delivered(figures, job["id"], "job.failed")
    assert heard(figures, job["id"]) == {"job.failed": 1}


# ---- duplicate deliveries ---------------------------------------------------------------------


def test_duplicate_lane_messages_run_each_job_once_and_deliver_each_webhook_once(
    figures: Figures, sandbox: SandboxUnderTest
) -> None:
    # Given three running jobs: one plain, one whose receiver fails its first attempt, one that
    # also subscribes to job.started
    hooks = [
        webhook_to(figures, "/hooks/dup-plain"),
        webhook_to(figures, "/hooks/dup-retried/fail-1"),
        webhook_to(figures, "/hooks/dup-started", ["job.started", "job.succeeded"]),
    ]
    ids = [
        figures.submit("enterprise", {"prompt": f"Dup {n} [[latency:2]]", "webhook": hook}).json()["id"]
        for n, hook in enumerate(hooks)
    ]
    for job_id in ids:
        assert figures.wait_status(job_id, {"running"}) == "running"
    # When three copies of each lane message arrive while the jobs run, and three more after
    copies = [lane_message(job_id, "high") for job_id in ids for _ in range(3)]
    figures.send_lane_messages("high", copies)
    figures.wait_all_terminal(ids)
    figures.send_lane_messages("high", copies)
    figures.wait_drained([figures.lane_queues["high"]])
    for job_id in ids:
        wait_delivered(figures, job_id, "job.succeeded")
    settle(3)  # room for a second run or a second webhook, if there were one
    for job_id, hook in zip(ids, hooks, strict=True):
        job = figures.job(job_id)
        # Then each job ran once: one claim, one provider call, one terminal state
        assert (job["status"], job["attempts"]) == ("succeeded", 1)
        assert [call.status for call in figures.provider_calls(job_id)] == [200]
        # And the worker did receive every copy, and acknowledged each
        assert len(receives(sandbox.invocations(function="worker", job_id=job_id), job_id)) == 1 + 6
        # And every subscribed event was received as a success, under one webhook-id
        subscribed = hook.get("events", ["job.succeeded"])
        assert heard(figures, job_id) == dict.fromkeys(subscribed, 1)
        for event_type in subscribed:
            deliveries = figures.deliveries(job_id, event_type)
            assert len({delivery["webhook_id"] for delivery in deliveries}) == 1
            assert all(delivery["verified"] for delivery in deliveries)
        assert job["webhook"]["delivery"]["status"] == "delivered"
    # And the retried delivery carried the same webhook-id on every POST, the receiver's one
    # failure first (an attempt whose webhooks message the at-least-once sandbox handed over
    # twice POSTs twice, under that one webhook-id; when it does so for the first attempt, the
    # receiver's second POST of it is the one it accepts, and no retry is needed)
    retried = figures.deliveries(ids[1], "job.succeeded")
    statuses = [delivery["status"] for delivery in retried]
    assert statuses == [500] + [200] * (len(statuses) - 1) and len(statuses) >= 2, statuses
    assert len({delivery["webhook_id"] for delivery in retried}) == 1


def test_duplicate_messages_during_a_retry_backoff_do_not_cut_the_retry_after_short(
    figures: Figures,
) -> None:
    # Given a job whose first call answers 503 with Retry-After: 3, now queued for its retry
    job_id = figures.submit("enterprise", {"prompt": "Busy [[fail:503x1]] [[retry_after:3]]"}).json()["id"]
    assert figures.wait_status(job_id, {"queued"}, timeout=10) == "queued"
    assert [call.status for call in figures.provider_calls(job_id)] == [503]
    # When two copies of its lane message arrive during the backoff
    figures.send_lane_messages("high", [lane_message(job_id, "high")] * 2)
    job = figures.sandbox.wait_terminal(job_id)
    # Then it succeeds on its second call (its first attempt: the 503 refused it before
    # generating, refunded), called no sooner than the provider asked
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    first, second = figures.provider_calls(job_id)
    assert (first.status, second.status) == (503, 200)
    assert second.started_at - first.ended_at >= 3 - CLOCK_SLACK


def test_a_fractional_retry_after_is_never_rounded_down(figures: Figures) -> None:
    # Given a provider that asks for 1.45 s before each job's retry (jobs a quarter second apart,
    # so that their retries do not all fall on the same poll of the queue)
    ids = []
    for n in range(4):
        body = {"prompt": f"Slow down {n} [[fail:429x1]] [[retry_after:1.45]]"}
        ids.append(figures.submit("enterprise", body).json()["id"])
        time.sleep(0.25)
    for job_id in ids:
        job = figures.sandbox.wait_terminal(job_id)
        # Then each retry came no sooner than 1.45 s after its 429 (the 429's attempt refunded)
        assert (job["status"], job["attempts"]) == ("succeeded", 1)
        first, second = figures.provider_calls(job_id)
        assert (first.status, second.status) == (429, 200)
        assert second.started_at - first.ended_at >= 1.45 - CLOCK_SLACK, (first, second)


# ---- poison -----------------------------------------------------------------------------------


def _set_aside(figures: Figures, poison_queue: str) -> set[str]:
    """The lane messages the poison queue holds copies of (each names its message id), read
    without taking them: every copy in one receive (moto answers all), visible again at once."""
    messages = figures.sqs.receive_message(
        QueueUrl=poison_queue, MaxNumberOfMessages=10, VisibilityTimeout=0, MessageAttributeNames=["All"]
    ).get("Messages", [])
    return {message["MessageAttributes"]["llmq-message-id"]["StringValue"] for message in messages}


def test_poison_goes_to_the_dlq_and_its_batchmates_succeed(
    figures: Figures, sandbox: SandboxUnderTest, config: dict[str, Any], ledger: Ledger
) -> None:
    # Given three jobs accepted while the api's SendMessage fails, so no message names them yet
    fault = figures.arm_call_fault("api", "sqs.SendMessage", times=3)
    good = [
        figures.submit("enterprise", {"prompt": f"Batchmate {n} [[tokens:4]]"}).json()["id"] for n in range(3)
    ]
    assert figures.call_fault(fault)["fired"] == 3
    # When their messages and two poison messages (not JSON; an unknown job) land together
    bodies = [
        NOT_JSON,
        lane_message(good[0], "high"),
        lane_message(UNKNOWN_JOB, "high"),
        lane_message(good[1], "high"),
        lane_message(good[2], "high"),
    ]
    # Sent while the lane's mapping is paused (and its last long poll over), so that the
    # poller receives them together when it resumes.
    figures.set_mapping("worker", "high", enabled=False)
    try:
        settle(1.5)
        message_ids = figures.send_lane_messages("high", bodies)
    finally:
        figures.set_mapping("worker", "high", enabled=True)
    poison = [message_ids[0], message_ids[2]]
    ledger.poison_message_ids += poison
    # Then the good jobs succeed, each after one provider call
    for job_id in good:
        job = sandbox.wait_terminal(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 1)
        assert len(figures.provider_calls(job_id)) == 1
    # And the poison reached the lane's DLQ after max_receive_count receives, never crashing the
    # worker, and the dead-letter function took it from there
    dlq = figures.lane_dlqs["high"]
    assert wait_until(
        lambda: (
            {
                message_id
                for record in sandbox.invocations(function="dead_letter")
                for message_id in record["message_ids"]
            }
            >= set(poison)
        ),
        timeout=30,
    )

    def receipts(message_id: str) -> list[dict[str, Any]]:
        return [
            record for record in sandbox.invocations(function="worker") if message_id in record["message_ids"]
        ]

    def counts(message_id: str) -> set[int]:
        """The receive counts at which the worker was handed the message."""
        return {count for received, count in receives(receipts(message_id)) if received == message_id}

    allowed = config["max_receive_count"]
    assert wait_until(lambda: all(len(counts(message_id)) >= allowed for message_id in poison), timeout=15)
    for message_id in poison:
        assert counts(message_id) == set(range(1, allowed + 1))
        assert {record["outcome"] for record in receipts(message_id)} == {"ok"}
    # And every batch the poison was in reported only the poison as failed, and its good
    # batchmates (the chaos mode may split the five into several batches) as done
    for record in {
        record["request_id"]: record for message_id in poison for record in receipts(message_id)
    }.values():
        assert record["outcome"] == "ok"
        assert set(record["failed_message_ids"]) == set(poison) & set(record["message_ids"])
        assert set(record["deleted_message_ids"]) == set(record["message_ids"]) - set(poison)
    # And the dead-letter function looked at each, did not crash, and set it aside: the lane's
    # DLQ is empty, and the poison queue holds both, visible to an operator (a dead letter
    # delivered twice, as the chaos mode may, is set aside twice: copies name their message)
    poison_queue = sandbox.stack_outputs()["PoisonQueueUrl"]
    assert wait_until(lambda: _set_aside(figures, poison_queue) == set(poison), timeout=30), _set_aside(
        figures, poison_queue
    )
    dead_letter = [
        record
        for record in sandbox.invocations(function="dead_letter")
        if set(record["message_ids"]) & set(poison)
    ]
    assert {record["outcome"] for record in dead_letter} == {"ok"}
    assert not {message_id for record in dead_letter for message_id in record["failed_message_ids"]} & set(
        poison
    )
    assert wait_until(lambda: figures.depth(dlq) == 0, timeout=10), figures.depth(dlq)
    # And the operator's CLI lists them, with their bodies, and will not redrive them
    listed = run_llmq(sandbox.directory, "dlq", "list", "--queue", "poison", "--peek", "5")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["visible"] >= len(poison) and entry["redrives_to"] is None
    assert {item["body"] for item in entry["peek"]} == {NOT_JSON, lane_message(UNKNOWN_JOB, "high")}
    assert all(item["llmq-why"] and item["llmq-message-id"] in poison for item in entry["peek"])
    refused = run_llmq(sandbox.directory, "dlq", "redrive", "--queue", "poison")
    assert refused.returncode == 1 and "not redriven" in refused.stderr, refused
    settle(2)
    assert _set_aside(figures, poison_queue) == set(poison)
    # And the unknown job was not created by any of this
    with sandbox.api("enterprise") as client:
        assert client.get(f"/v1/jobs/{UNKNOWN_JOB}").status_code == 404


# ---- lost enqueue -----------------------------------------------------------------------------


def test_a_lost_enqueue_is_sent_by_the_reconciler_and_the_job_runs_once(
    figures: Figures, sandbox: SandboxUnderTest, background: Background
) -> None:
    first, retry = background.lost_replies
    # Given a submit whose SendMessage failed after its PutItem: the client still got 202
    assert figures.call_fault(background.lost_fault)["fired"] == 1
    assert first.status_code == 202
    assert first.headers["location"] == f"{sandbox.api_url}/v1/jobs/{background.lost}"
    # And its retry with the same Idempotency-Key got the same job back, created nothing
    assert (retry.status_code, retry.json()["id"]) == (202, background.lost)
    assert retry.headers["idempotent-replayed"] == "true"
    # When the reconciler finds it queued and stale
    job = sandbox.wait_terminal(background.lost, timeout=60)
    # Then it ran once
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    assert len(figures.provider_calls(background.lost)) == 1
    # And its first message was the reconciler's: a run of it came between the accept and the
    # job's first receipt (a message known lost is sent at the reconciler's next run)
    created = datetime.fromisoformat(job["created_at"]).timestamp()
    first_receipt = invocations_once_logged(sandbox, 1, function="worker", job_id=background.lost)[0]
    runs = [run["started_at"] for run in sandbox.invocations(function="reconciler")]
    assert any(created - CLOCK_SLACK <= started <= first_receipt["started_at"] for started in runs), (
        created,
        first_receipt["started_at"],
        runs,
    )
    # And a later retry with the key replays the finished job; the tenant has it once
    again = figures.submit("enterprise", background.lost_body, **{"Idempotency-Key": background.lost_key})
    assert (again.status_code, again.json()["id"], again.json()["status"]) == (
        202,
        background.lost,
        "succeeded",
    )
    assert again.headers["idempotent-replayed"] == "true"
    with sandbox.api("enterprise") as client:
        listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    assert [listed_job["id"] for listed_job in listed].count(background.lost) == 1


# ---- cancel races -----------------------------------------------------------------------------


def submit_and_cancel(figures: Figures, body: dict[str, Any], offset: float) -> tuple[str, httpx.Response]:
    """Submit, wait until the job runs (or already ended), wait `offset` seconds, cancel."""
    job_id: str = figures.submit("enterprise", body).json()["id"]
    figures.wait_status(job_id, {"running", "succeeded", "failed", "canceled"})
    time.sleep(offset)
    with figures.sandbox.api("enterprise") as client:
        return job_id, client.post(f"/v1/jobs/{job_id}/cancel")


# The fake provider's answer, in tokens, when a prompt names none: a whole stream sends this many.
LONG_ANSWER_TOKENS = 8


def test_a_cancel_during_running_ends_in_one_state_with_only_that_states_webhook(figures: Figures) -> None:
    # Given one long job, and five that finish about when their cancel arrives
    plan = [({"prompt": "Long [[latency:8]]", "webhook": webhook_to(figures, "/hooks/cancel-long")}, 0.3)]
    for n, offset in enumerate([0.6, 0.8, 0.9, 1.0, 1.2]):
        body = {"prompt": f"Race {n} [[latency:1]]", "webhook": webhook_to(figures, f"/hooks/race-{n}")}
        plan.append((body, offset))
    # When each is canceled while it runs (the long job first and alone: five concurrent
    # requests cold-start API environments, which can delay its cancel by seconds)
    long_job, long_reply = submit_and_cancel(figures, *plan[0])
    with ThreadPoolExecutor(max_workers=len(plan) - 1) as pool:
        replies = {
            long_job: long_reply,
            **dict(pool.map(lambda step: submit_and_cancel(figures, *step), plan[1:])),
        }
    finals = figures.wait_all_terminal(replies)
    # Then the long job was stopped: canceled, no result, and its stream cut short
    assert replies[long_job].status_code == 202
    assert replies[long_job].json()["cancel_requested"] is True
    assert (finals[long_job]["status"], finals[long_job]["result"]) == ("canceled", None)
    # (the provider logs a call once it notices the closed connection, at its next chunk)
    assert wait_until(lambda: figures.provider_calls(long_job), timeout=10)
    (call,) = figures.provider_calls(long_job)
    assert call.deltas_sent < LONG_ANSWER_TOKENS, call
    # And every job ended canceled or succeeded, one state only, heard of once
    for job_id in replies:
        wait_delivered(figures, job_id, f"job.{finals[job_id]['status']}")
    settle(2)
    for job_id, reply in replies.items():
        final = finals[job_id]
        assert final["status"] in {"canceled", "succeeded"}
        assert reply.status_code in {202, 409}
        if reply.status_code == 409:  # the cancel came too late: the result stands
            assert final["status"] == "succeeded"
        assert (final["result"] is not None) == (final["status"] == "succeeded")
        assert figures.job(job_id)["status"] == final["status"]
        assert figures.job(job_id)["finished_at"] == final["finished_at"]
        assert figures.sandbox.provider_calls(job_id) == 1
        deliveries = figures.deliveries(job_id)
        assert {delivery["type"] for delivery in deliveries} == {f"job.{final['status']}"}
        assert heard(figures, job_id) == {f"job.{final['status']}": 1}


# ---- provider storms --------------------------------------------------------------------------


def test_a_storm_of_429_and_503_ends_every_job_succeeded_or_exhausted_and_honours_retry_after(
    figures: Figures, sandbox: SandboxUnderTest, config: dict[str, Any], background: Background
) -> None:
    retry_after = 2
    # Given nothing else calls the provider any more (the lost enqueue has run)
    sandbox.wait_terminal(background.lost, timeout=60)
    # When half the provider's answers are 429 or 503 with Retry-After for a while
    figures.storm(rate=0.5, seconds=12, statuses=[429, 503], retry_after=retry_after)
    try:
        ids = [
            figures.submit("enterprise", {"prompt": f"Storm {n} [[tokens:4]]"}).json()["id"]
            for n in range(12)
        ]
        jobs = figures.wait_all_terminal(ids)
    finally:
        figures.storm(rate=0, seconds=0, statuses=[429, 503], retry_after=0)
    outcomes = []
    for job_id, job in jobs.items():
        calls = figures.provider_calls(job_id)
        statuses = [call.status for call in calls]
        # Then each job succeeded on its first attempt: every refusal (a 429 or 503 before
        # generating) refunded, up to the budget of them, which a storm of seconds never spends
        assert statuses[-1] == 200 and set(statuses[:-1]) <= {429, 503}
        assert (job["status"], job["attempts"]) == ("succeeded", 1)
        assert len(calls) <= 1 + config["retry"]["max_refusals"]
        # And no two calls of a job at once
        assert overlapping(calls) == []
        # And each retry waited at least the Retry-After
        for earlier, later in itertools.pairwise(calls):
            assert later.started_at - earlier.ended_at >= retry_after - CLOCK_SLACK
        outcomes.append((job["status"], len(calls)))
    # And the storm did hit: some jobs were retried
    assert any(calls == 2 for _, calls in outcomes), outcomes


def test_a_provider_that_refuses_connections_exhausts_the_retries(
    sandboxes: dict[str, SandboxUnderTest],
) -> None:
    down = sandboxes["down"]
    config = httpx.get(f"{down.api_url}/_sandbox/config").json()
    assert config["max_attempts"] == DOWN_MAX_ATTEMPTS
    # When jobs are submitted while the provider's port refuses every connection
    with down.api("enterprise") as client:
        ids = [client.post("/v1/jobs", json={"prompt": f"Nobody home {n}"}).json()["id"] for n in range(3)]
    for job_id in ids:
        job = down.wait_terminal(job_id)
        # Then each fails with retries_exhausted after max_attempts attempts
        assert (job["status"], job["error"]["code"]) == ("failed", "retries_exhausted")
        assert job["attempts"] == DOWN_MAX_ATTEMPTS
        assert job["error"]["retryable"] is False
        # And each attempt was an invocation that ended normally
        # (counted as distinct receives: the chaos mode may have replayed one of them already,
        # so a count of records could be reached before the last attempt's record is logged)
        wait_until(
            lambda: (
                len(receives(down.invocations(function="worker", job_id=job_id), job_id))  # noqa: B023
                >= DOWN_MAX_ATTEMPTS
            ),
            timeout=15,
        )
        records = down.invocations(function="worker", job_id=job_id)
        # (at most one receive per attempt: a chaos replay of one receive, arriving after the
        # retry's backoff, may carry an attempt of its own, as a duplicate delivery may on AWS)
        assert 1 <= len(receives(records, job_id)) <= DOWN_MAX_ATTEMPTS
        assert {record["outcome"] for record in records} == {"ok"}
        # And the sandbox's own provider was never reached
        assert down.provider_calls(job_id) == 0
    stop_sandbox(down)


# ---- a provider that never finishes ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hang", "stall"])
def test_a_provider_that_never_finishes_is_bounded_inside_the_invocation(
    sandbox: SandboxUnderTest, background: Background, config: dict[str, Any], kind: str
) -> None:
    job_id = getattr(background, kind)
    # When the provider never answers ([[hang]]) or answers and then only sends keep-alives
    job = sandbox.wait_terminal(job_id, "free", timeout=90)
    # Then the total deadline on the call ends the attempt, and the job is not retried: the
    # provider may still be generating, and billing, so the client decides (provider_timeout)
    assert (job["status"], job["error"]["code"], job["error"]["retryable"]) == (
        "failed",
        "provider_timeout",
        True,
    )
    assert job["attempts"] == 1
    assert sandbox.provider_calls(job_id) == 1
    # And the invocation did not overrun its timeout: it settled the job and deleted the message
    records = invocations_once_logged(sandbox, 1, function="worker", job_id=job_id)
    assert len(receives(records, job_id)) == 1
    assert {record["outcome"] for record in records} == {"ok"}
    assert all(record["duration_seconds"] < config["worker"]["timeout_seconds"] for record in records)
    assert records[-1]["deleted_message_ids"]


# ---- receiver outages -------------------------------------------------------------------------


def test_a_receiver_down_for_n_attempts_gets_the_webhook_once_on_attempt_n_plus_one(
    figures: Figures, background: Background, config: dict[str, Any]
) -> None:
    job_id = background.outage_brief
    failures = len(config["webhooks"]["schedule_seconds"]) - 1
    # When the receiver answers 500 to the first N attempts
    wait_delivered(figures, job_id, "job.succeeded", timeout=40)
    settle(2)
    deliveries = figures.deliveries(job_id)
    # Then the receiver failed its N POSTs and then accepted the event, every POST under the one
    # webhook-id (a duplicate POST of one attempt may be among the N, or come beside the 200)
    statuses = [delivery["status"] for delivery in deliveries]
    assert statuses[:failures] == [500] * failures and set(statuses[failures:]) == {200}, statuses
    assert len({delivery["webhook_id"] for delivery in deliveries}) == 1
    assert all(delivery["verified"] for delivery in deliveries)
    # And llmq counted each attempt once, no more attempts than POSTs, the last one delivering it
    # (one receive handed over twice POSTs its attempt twice: a 200 beside its twin's 500 is
    # logged under that same attempt, and counts no attempt more)
    log = delivery_log(figures, job_id)
    numbers = [entry["attempt"] for entry in log]
    twin = len(numbers) > 1 and numbers[-1] == numbers[-2]
    attempts = [entry for entry in log if not (twin and entry is log[-1])]
    assert [entry["attempt"] for entry in attempts] == list(range(1, len(attempts) + 1)), numbers
    assert [entry["status_code"] for entry in log] == [500] * (len(log) - 1) + [200]
    assert len(attempts) <= min(failures + 1, len(deliveries))
    # And the retries followed the schedule (each delay less its jitter, and less the lead the
    # dispatcher lets a copy have: SQS delays in whole seconds, so a retry may come that early)
    jitter = config["webhooks"]["jitter_fraction"]
    gaps = [posted_at(later) - posted_at(earlier) for earlier, later in itertools.pairwise(attempts)]
    for gap, delay in zip(gaps, config["webhooks"]["schedule_seconds"], strict=False):
        assert gap >= delay * (1 - jitter) - EARLY_TOLERANCE_SECONDS
    # And the job records the delivery as its log does
    delivery = figures.job(job_id)["webhook"]["delivery"]
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == (
        "delivered",
        len(attempts),
        200,
    )


def test_a_receiver_down_beyond_the_schedule_fails_the_delivery_and_a_redeliver_works_later(
    figures: Figures, sandbox: SandboxUnderTest, background: Background, config: dict[str, Any]
) -> None:
    job_id = background.outage_long
    attempts = 1 + len(config["webhooks"]["schedule_seconds"])
    # When the receiver fails every attempt of the schedule
    assert wait_until(lambda: figures.job(job_id)["webhook"]["delivery"]["status"] == "failed", timeout=60), (
        figures.job(job_id)["webhook"]
    )
    job = figures.job(job_id)
    # Then the delivery is failed after every attempt, and the result is still there to poll
    assert (job["status"], job["webhook"]["delivery"]["attempts"]) == ("succeeded", attempts)
    assert job["result"]["output"]
    # (the receiver saw every attempt fail; it may have seen more POSTs than attempts: a copy of
    # the message handed over twice POSTs its attempt twice)
    failed = figures.deliveries(job_id)
    assert {delivery["status"] for delivery in failed} == {500}
    assert attempts <= len(failed) <= 2 * attempts, [delivery["received_at"] for delivery in failed]
    assert [entry["status_code"] for entry in delivery_log(figures, job_id)] == [500] * attempts
    # When the receiver is back and the client asks for a redelivery
    figures.heal(background.outage_long_path)
    asked = time.time()  # the receiver stamps deliveries with this machine's clock
    with sandbox.api("enterprise") as client:
        redeliver = client.post(f"/v1/jobs/{job_id}/webhook/redeliver")
    assert redeliver.status_code == 202
    # Then it is delivered once more, as a success (once, or twice by a duplicate copy), under
    # the same webhook-id, in a round of its own
    wait_delivered(figures, job_id, "job.succeeded")
    settle(2)
    deliveries = figures.deliveries(job_id)
    before = [delivery for delivery in deliveries if delivery["received_at"] < asked]
    after = [delivery for delivery in deliveries if delivery["received_at"] >= asked]
    assert before == failed
    assert after and {delivery["status"] for delivery in after} == {200}
    rounds = [(entry["attempt"], entry["status_code"]) for entry in delivery_log(figures, job_id)]
    assert rounds == [(n, 500) for n in range(1, attempts + 1)] + [(1, 200)]
    assert len({delivery["webhook_id"] for delivery in deliveries}) == 1
    assert figures.job(job_id)["webhook"]["delivery"]["status"] == "delivered"


# ---- the end state ----------------------------------------------------------------------------


def _queued(figures: Figures, tier: str) -> list[dict[str, Any]]:
    with figures.sandbox.api(tier) as client:
        jobs: list[dict[str, Any]] = client.get("/v1/jobs", params={"status": "queued"}).json()["data"]
    return jobs


def test_nothing_is_left_running_or_queued_and_only_the_poison_is_kept(
    figures: Figures, ledger: Ledger
) -> None:
    # Then no job is left running or queued, for either tenant
    # (the list reads an index that may lag the last completions by a moment: DynamoDB GSI)
    for tier in ("enterprise", "free"):
        assert wait_until(lambda: figures.running(tier) == [], timeout=10), figures.running(tier)  # noqa: B023
        assert wait_until(lambda: _queued(figures, tier) == [], timeout=10), _queued(figures, tier)  # noqa: B023
    # And the lane and webhook queues are empty, and so is the webhook DLQ
    depths = figures.wait_drained([*figures.working_queues(), figures.webhook_dlq])
    assert set(depths.values()) == {0}, depths
    # And the lane DLQs are empty: the poison messages wait in the poison queue
    assert figures.depth(figures.lane_dlqs["high"]) == 0
    assert figures.depth(figures.lane_dlqs["low"]) == 0
    assert _set_aside(figures, figures.sandbox.stack_outputs()["PoisonQueueUrl"]) == set(
        ledger.poison_message_ids
    )
