"""Long-polls are capped per tenant (llmq.long_polls): one tenant's waiting requests cannot hold
the api's whole reserved concurrency. A GET refused a place is a 429 with Retry-After, at once;
a submit refused one is still accepted.

The places other requests hold are taken through the same repository the api uses, as
concurrent api environments would hold them; the request under test goes through the real
api handler against moto.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from llmq import aws
from llmq.jobs import JobRepository
from llmq.live_output import OutputChunk
from llmq.long_polls import LongPolls, polls_key
from llmq.models import JobResult
from llmq.offload import Offload
from llmq.payloads import PayloadStore
from llmq.telemetry import MetricName
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import REGION, MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, FREE, Harness, emitted_metrics, on_aws_call

PAST = 120.0


def _polls(harness: Harness, clock_offset: float = 0.0) -> LongPolls:
    return LongPolls(
        harness.stack.jobs_table, dynamodb=aws.client("dynamodb"), clock=lambda: time.time() + clock_offset
    )


def _places_held(harness: Harness, tenant: dict[str, str]) -> int:
    item = aws.client("dynamodb").get_item(
        TableName=harness.stack.jobs_table, Key=polls_key(tenant["tenant_id"]), ConsistentRead=True
    )["Item"]
    return len(item["waiting"]["M"])


def _poll(
    harness: Harness, job_id: str, tenant: dict[str, str], wait: int = 1
) -> tuple[int, str, str | None]:
    """(status, the job's status or the problem's code, Retry-After)."""
    reply = harness.api("GET", f"/v1/jobs/{job_id}", tenant=tenant, query={"wait": str(wait)})
    found = reply.body["status"] if reply.status == 200 else str(reply.code)
    return reply.status, found, reply.headers.get("retry-after")


REFUSED = (429, "too_many_long_polls", "2")


def test_a_tenant_at_its_long_poll_cap_gets_429_at_once_with_retry_after(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a free tenant (its tier allows 2 waiting requests) with a queued job, and two of
    # its requests waiting elsewhere
    config = harness.config.fair_share
    assert config.tiers["free"].max_long_polls == 2
    assert config.long_poll_retry_after_seconds == int(REFUSED[2])
    job_id = harness.submit(tenant=FREE).body["id"]
    polls = _polls(harness)
    held = [polls.enter(FREE["tenant_id"], cap=2, seconds=20) for _ in range(2)]
    assert None not in held
    # When a third asks to wait, it is refused at once, as a rate limit is, with Retry-After
    capsys.readouterr()
    assert _poll(harness, job_id, FREE) == REFUSED
    # and counted for the operator's dashboard
    (record,) = emitted_metrics(capsys.readouterr().out, MetricName.LONG_POLL_REFUSED)
    assert record[MetricName.LONG_POLL_REFUSED] == [1.0]
    # And a poll without a wait still reads the job
    assert _poll(harness, job_id, FREE, wait=0) == (200, "queued", None)
    # And another tenant's wait is not affected
    other = harness.submit(tenant=ENTERPRISE).body["id"]
    assert _poll(harness, other, ENTERPRISE) == (200, "queued", None)
    # When one of the waiting requests answers, the next wait is granted, and its place given back
    polls.leave(FREE["tenant_id"], held[0])  # type: ignore[arg-type]
    assert _poll(harness, job_id, FREE) == (200, "queued", None)
    assert _places_held(harness, FREE) == 1


def test_a_submit_that_prefers_to_wait_at_the_cap_is_accepted_without_waiting(harness: Harness) -> None:
    polls = _polls(harness)
    assert None not in [polls.enter(FREE["tenant_id"], cap=2, seconds=20) for _ in range(2)]
    reply = harness.api("POST", "/v1/jobs", body={"prompt": "x"}, headers={"Prefer": "wait=3"}, tenant=FREE)
    # Accepted (a job was written and enqueued), but the wait was not applied
    assert (reply.status, reply.body["status"]) == (202, "queued")
    assert "preference-applied" not in reply.headers
    assert harness.item_count() == 1
    assert len(harness.receive(harness.stack.lane_queue_urls["low"])) == 1


def test_places_of_requests_that_died_are_taken_back_once_their_wait_is_over(harness: Harness) -> None:
    # Given two places taken by requests that died two minutes ago (a timeout, a crash): their
    # wait and its margin are over, and nothing gave them back
    job_id = harness.submit(tenant=FREE).body["id"]
    dead = _polls(harness, clock_offset=-PAST)
    assert None not in [dead.enter(FREE["tenant_id"], cap=2, seconds=20) for _ in range(2)]
    # When a request asks to wait, it is granted
    assert _poll(harness, job_id, FREE) == (200, "queued", None)
    # And the lapsed places are gone: nothing is held once it has answered
    assert _places_held(harness, FREE) == 0


def test_an_operator_override_wins_over_the_tier(harness: Harness) -> None:
    job_id = harness.submit(tenant=ENTERPRISE).body["id"]
    polls = _polls(harness)
    polls.set_limit(ENTERPRISE["tenant_id"], 1)
    assert polls.limit(ENTERPRISE["tenant_id"]) == 1
    place = polls.enter(ENTERPRISE["tenant_id"], cap=20, seconds=20)
    assert place is not None
    # The tier allows 20, the override 1, and that one is taken
    assert _poll(harness, job_id, ENTERPRISE) == REFUSED
    polls.set_limit(ENTERPRISE["tenant_id"], None)
    assert _poll(harness, job_id, ENTERPRISE) == (200, "queued", None)
    with pytest.raises(ValueError, match="at least 1"):
        polls.set_limit(ENTERPRISE["tenant_id"], 0)


def test_a_finished_job_is_answered_without_taking_a_place(harness: Harness) -> None:
    job_id = harness.submit(tenant=FREE).body["id"]
    harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=FREE)
    polls = _polls(harness)
    assert None not in [polls.enter(FREE["tenant_id"], cap=2, seconds=20) for _ in range(2)]
    assert _poll(harness, job_id, FREE, wait=20) == (200, "canceled", None)


def test_a_wait_past_a_lowered_bound_is_cut_to_it_not_refused(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a deployment that lowered both long polls' bounds below the documented 20 s and 25 s
    config = integration_config(
        provider,
        limits={"max_get_wait_seconds": 1, "wait_poll_seconds": 0.05},
        streaming={"max_wait_seconds": 1},
    )
    harness = Harness(moto_stack, config, monkeypatch)
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    # When a client written for the documented bounds (the CLI's 20 s and 25 s) waits
    got = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "20"})
    events = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": "25"})
    # Then each waits as long as this deployment lets it and answers, as `Prefer: wait` does,
    # not a 422 the client cannot act on (hunt 302: `llmq submit --stream` failed on its first read)
    assert (got.status, got.body["status"]) == (200, "queued")
    assert events.status == 200, events.body
    assert events.headers["content-type"].startswith("text/event-stream")
    assert "event: status" in events.body
    # And a negative wait is still a clear 422
    negative = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "-1"})
    assert (negative.status, negative.code) == (422, "invalid_request")


def test_no_tier_lets_one_tenant_wait_in_more_than_half_the_api_reservation() -> None:
    from llmq.config import LlmqConfig

    assert LlmqConfig().long_poll_cap("enterprise") == 20
    small = LlmqConfig.model_validate({"concurrency": {"api": 10}})
    assert [small.long_poll_cap(tier) for tier in ("enterprise", "free", "other")] == [5, 2, 5]
    # Without reservations there is no share to protect, only the account's quota
    unreserved = LlmqConfig.model_validate({"concurrency": {"reserve": False, "api": 10}})
    assert unreserved.long_poll_cap("enterprise") == 20


# ---- DynamoDB busy, or a place taken whose answer was lost -------------------------------------


@pytest.fixture
def faults(harness: Harness) -> Iterator[AwsFaults]:
    injected = AwsFaults()
    yield injected
    injected.disarm()


@pytest.mark.parametrize("kind", [FaultKind.THROTTLE, FaultKind.APPLIED_LOST])
def test_a_place_that_cannot_be_taken_is_a_busy_store_at_once_and_leaves_nothing_held(
    harness: Harness, faults: AwsFaults, kind: FaultKind, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = harness.submit(tenant=FREE).body["id"]
    polls = _polls(harness)
    polls.leave(FREE["tenant_id"], polls.enter(FREE["tenant_id"], cap=2, seconds=1) or "")
    # Given DynamoDB refuses the write that takes the place, or applies it and loses the answer
    fault = faults.arm(kind, "dynamodb.UpdateItem")
    capsys.readouterr()
    # When the tenant long-polls, it is answered at once that the store is busy, and told when
    # to ask again: not a 429 `too_many_long_polls`, which tells the integrator its own waits
    # are at their limit, nor counted as a refusal on the operator's dashboard (hunt 322)
    status, code, retry_after = _poll(harness, job_id, FREE)
    assert (status, code) == (503, "service_unavailable")
    assert retry_after is not None and int(retry_after) >= 1
    assert [entry.fault for entry in faults.fired] == [fault]
    assert emitted_metrics(capsys.readouterr().out, MetricName.LONG_POLL_REFUSED) == []
    # And no place is left held by a request that is not waiting
    assert _places_held(harness, FREE) == 0
    # And once DynamoDB answers, the same poll waits, and gives its place back
    faults.disarm()
    assert _poll(harness, job_id, FREE) == (200, "queued", None)
    assert _places_held(harness, FREE) == 0


def test_a_wait_whose_place_write_fails_past_its_time_answers_the_job_as_read(harness: Harness) -> None:
    # Given a queued job, and DynamoDB slow (1.5 s) and then throttling the write that would
    # take a long-poll place
    job_id = harness.submit().body["id"]
    calls: list[float] = []

    def slow_then_throttled(params: dict[str, Any], **_: Any) -> None:
        if str(params.get("Key", {}).get("pk", {}).get("S", "")).startswith("polls#"):
            calls.append(time.time())
            time.sleep(1.5)
            error: Any = {
                "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(error, "UpdateItem")

    # When a poll waits 1 s
    with on_aws_call("dynamodb", "provide-client-params.dynamodb.UpdateItem", slow_then_throttled):
        reply = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "1"})
    # Then, its wait's time spent on the place's tries, it is answered with the job as read, as
    # when no place was taken for want of time (review 277: a 503)
    assert calls
    assert (reply.status, reply.body.get("status")) == (200, "queued"), reply.body


def test_a_place_taken_whose_answer_was_lost_is_recognised_as_its_own(
    harness: Harness, faults: AwsFaults
) -> None:
    # Given a free tenant (2 places) with one request waiting elsewhere
    job_id = harness.submit(tenant=FREE).body["id"]
    assert _polls(harness).enter(FREE["tenant_id"], cap=2, seconds=20) is not None
    # When the write that takes the last place is applied, its answer lost, and botocore
    # sends it again (which now finds the map full, its own place in it)
    fault = faults.arm(FaultKind.APPLIED_RETRIED, "dynamodb.UpdateItem")
    reply = _poll(harness, job_id, FREE)
    # Then the request knows the place is its own: it waits, and gives it back
    assert [entry.fault for entry in faults.fired] == [fault]
    assert reply == (200, "queued", None)
    assert _places_held(harness, FREE) == 1


def _slow_first_place(seconds: float) -> None:
    """The first write to a tenant's long-poll places takes `seconds` (DynamoDB slow)."""
    slowed: list[bool] = []

    def slow(params: dict[str, Any], **_: Any) -> None:
        body = params.get("body") or b""
        text = body.decode() if isinstance(body, bytes) else str(body)
        if "polls#" in text and not slowed:
            slowed.append(True)
            time.sleep(seconds)

    aws.client("dynamodb").meta.events.register("before-call.dynamodb.UpdateItem", slow)


@pytest.mark.parametrize(("path", "wait"), [("", "20"), ("/events", "25")])
def test_a_wait_whose_place_is_slow_to_take_still_answers_within_api_gateways_timeout(
    harness: Harness, path: str, wait: str
) -> None:
    # Given a running job's long poll or events stream, reaching the function 19 s after API
    # Gateway received it (a cold start, a queue for an environment), and DynamoDB slow (5 s)
    # to take its long-poll place
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    _slow_first_place(5.0)
    received = time.time() - 19.0
    reply = harness.api(
        "GET",
        f"/v1/jobs/{job_id}{path}",
        tenant=ENTERPRISE,
        query={"wait": wait},
        request_context={"requestTimeEpoch": int(received * 1000)},
    )
    # Then it answers before API Gateway's 29 s: the place's time came out of its wait
    assert reply.status == 200
    assert time.time() - received < 29.0


# The api's calls a wait can make after its deadline, by service.
_SLOWED = {"dynamodb": ("GetItem", "UpdateItem", "Query", "BatchGetItem"), "s3": ("HeadObject", "GetObject")}


def _slow_after(
    moment: float, seconds: float, calls: list[str], first: Callable[[], None] | None = None
) -> None:
    """The api's DynamoDB and S3 calls made after `moment` (epoch s) take `seconds` each: what
    botocore's retries spend on a call throttled twice (backoffs of up to 1 s and 2 s). `first`
    runs once, before the first of them."""
    done: list[bool] = []

    def slow(model: Any, **_: Any) -> None:
        if time.time() >= moment:
            if first is not None and not done:
                done.append(True)
                first()
            calls.append(model.name)
            time.sleep(seconds)

    for service, operations in _SLOWED.items():
        for operation in operations:
            aws.client(service).meta.events.register(
                f"before-call.{service}.{operation}", slow, unique_id=f"slow-after-{operation}"
            )


def _unslowed() -> None:
    for service, operations in _SLOWED.items():
        for operation in operations:
            aws.client(service).meta.events.unregister(
                f"before-call.{service}.{operation}", unique_id=f"slow-after-{operation}"
            )


def _submit_waiting(harness: Harness, context: dict[str, Any]) -> Any:
    """A submit that prefers to wait its longest, API Gateway's request context as given."""
    return harness.api(
        "POST",
        "/v1/jobs",
        body={"prompt": "hello"},
        headers={"Prefer": "wait=25"},
        tenant=ENTERPRISE,
        request_context=context,
    )


@pytest.mark.parametrize("kind", ["GET ?wait", "POST Prefer: wait"])
def test_a_wait_whose_calls_after_its_deadline_are_throttled_still_answers_within_api_gateways_timeout(
    harness: Harness, kind: str
) -> None:
    # Given a wait cut to end 4 s before API Gateway's 29 s (it received the request 21 s ago),
    # whose calls after that deadline each take as long as botocore's retries of a twice
    # throttled call
    received = time.time() - 21.0
    deadline = received + 29.0 - 4.0
    calls: list[str] = []
    context = {"requestTimeEpoch": int(received * 1000)}
    try:
        if kind == "GET ?wait":
            job_id = harness.submit(prompt="hello").body["id"]
            _slow_after(deadline - 0.05, 2.0, calls)
            reply = harness.api(
                "GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "20"}, request_context=context
            )
        else:
            _slow_after(deadline - 0.05, 2.5, calls)
            reply = _submit_waiting(harness, context)
    finally:
        _unslowed()
    # Then it answers before API Gateway gives up: once late, it leaves its place to lapse and
    # skips the queue position (hunt 262: a 200 or 202 after 29 s reaches no one; the client
    # sees a 504, and one retrying a submit without a key pays for a second job)
    assert reply.status in (200, 202), reply.body
    assert time.time() - received < 29.0, calls
    assert calls[0] == "GetItem"


@pytest.mark.parametrize(
    ("kind", "late_by"),
    [("POST Prefer: wait", 20.0), ("GET ?wait", 24.4), ("GET /events", 24.4)],
)
def test_a_wait_throttled_throughout_takes_no_place_once_its_time_is_gone(
    harness: Harness, kind: str, late_by: float
) -> None:
    # Given DynamoDB and S3 throttled throughout (each call as long as botocore's retries of
    # a twice throttled one), a request that reaches the function late, and (for the submit) a
    # tenant that has never waited, whose places are still to be made
    job_id = None if kind.startswith("POST") else harness.submit(prompt="hello", stream=True).body["id"]
    if kind.startswith("GET"):
        assert harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE, query={"wait": "1"}).status == 200
    received = time.time() - late_by
    context = {"requestTimeEpoch": int(received * 1000)}
    calls: list[str] = []
    try:
        _slow_after(0, 2.5, calls)
        if kind.startswith("POST"):
            reply = _submit_waiting(harness, context)
        else:
            path = f"/v1/jobs/{job_id}" + ("/events" if kind.endswith("events") else "")
            reply = harness.api("GET", path, tenant=ENTERPRISE, query={"wait": "20"}, request_context=context)
    finally:
        _unslowed()
    # Then it answers before API Gateway gives up, without a 429: a wait whose first read
    # took its time takes no place, and the place's writes stop at its deadline (hunt 289:
    # the first wait's three writes answered an accepted submit 32.6 s after its receipt)
    assert reply.status in (200, 202), reply.body
    assert time.time() - received < 29.0, calls


def test_a_submit_wait_whose_place_write_is_throttled_just_before_its_deadline_answers_in_time(
    harness: Harness,
) -> None:
    # Given a tenant's long-poll place writes throttled (each failing after botocore's three
    # tries, 2.5 s), and a Prefer: wait submit API Gateway received 24.8 s ago (its wait's
    # budget a fraction of a second: the place's write starts just before its deadline)
    calls: list[float] = []

    def throttled(params: dict[str, Any], **_: Any) -> None:
        if str(params.get("Key", {}).get("pk", {}).get("S", "")).startswith("polls#"):
            calls.append(time.time())
            time.sleep(2.5)
            error: Any = {
                "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(error, "UpdateItem")

    received = time.time() - 24.8
    with on_aws_call("dynamodb", "provide-client-params.dynamodb.UpdateItem", throttled):
        reply = _submit_waiting(harness, {"requestTimeEpoch": int(received * 1000)})
    # Then the accepted submit answers before API Gateway's 29 s: the place, maybe taken,
    # lapses by itself rather than be taken back by a second throttled write (review 265)
    assert reply.status == 202, reply.body
    assert time.time() - received < 29.0, [round(call - received, 2) for call in calls]


@pytest.mark.parametrize("wait", ["0", "1"])
def test_an_events_wait_whose_first_read_was_slow_still_serves_the_deltas_written(
    harness: Harness, wait: str
) -> None:
    # Given a running stream: true job with three deltas written
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claim = jobs.claim(job_id, "worker-1", 600)
    assert claim.claimed and claim.job is not None
    for seq in range(1, 4):
        chunk = OutputChunk(
            seq=seq,
            delta=f"d{seq} ",
            attempt=1,
            reset=False,
            tokens=seq,
            partial="",
            truncated=False,
            chars=seq * 3,
        )
        jobs.write_output(claim.job, "worker-1", chunk)
    # And the api's first read of it slow (one throttled read: 1.3 s), past a 1 s wait
    slowed: list[str] = []

    def slow_once(**_: Any) -> None:
        if not slowed:
            slowed.append("GetItem")
            time.sleep(1.3)

    with on_aws_call("dynamodb", "before-call.dynamodb.GetItem", slow_once):
        got = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": wait})
    # Then the deltas written are served, as without a wait (review 265: a hint alone, at
    # every reconnect while the store was slow)
    assert slowed and got.status == 200
    assert [event for event in str(got.body).split("\n") if event.startswith("event: ")].count(
        "event: output.delta"
    ) >= 1, got.body


@pytest.mark.parametrize("held", ["inline", "in S3"])
def test_an_events_wait_that_sees_its_job_end_late_still_answers_within_api_gateways_timeout(
    harness: Harness, held: str
) -> None:
    # Given a running stream: true job with one chunk written, followed from that chunk by a
    # client whose request API Gateway received 21 s ago (its wait cut to end 4 s before 29 s)
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    other = boto3.client("dynamodb", region_name=REGION)
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=other)
    claimed = jobs.claim(job_id, "worker-1", 120)
    assert claimed.claimed and claimed.job is not None
    job = claimed.job
    chunk = OutputChunk(
        seq=1,
        delta="Once",
        attempt=1,
        reset=False,
        tokens=1,
        partial="Once",
        truncated=False,
        chars=4,
        opens=True,
    )
    jobs.write_output(job, "worker-1", chunk)
    result = JobResult(output="Once upon" + ("x" * 400_000 if held == "in S3" else ""), finish_reason="stop")
    payloads = PayloadStore(harness.stack.payload_bucket, s3=boto3.client("s3", region_name=REGION))
    ref = Offload(payloads, harness.config).put_result(job, "worker-1", result) if held == "in S3" else None
    received = time.time() - 21.0
    deadline = received + 29.0 - 4.0
    calls: list[str] = []
    # When the job ends just as the wait's time is up, and every call after that is throttled
    _slow_after(
        deadline - 0.05,
        2.0,
        calls,
        first=lambda: jobs.complete(job, "worker-1", **({"result_ref": ref} if ref else {"result": result})),
    )
    try:
        reply = harness.api(
            "GET",
            f"/v1/jobs/{job_id}/events",
            tenant=ENTERPRISE,
            headers={"Last-Event-ID": "1"},
            query={"wait": "25"},
            request_context={"requestTimeEpoch": int(received * 1000)},
        )
    finally:
        _unslowed()
    # Then it answers before API Gateway gives up, with a retry hint: the reconnect reads the
    # rest (hunt 267: the job's, its chunks' and its result's reads, each throttled, took it
    # past 29 s, and a 504 ends an EventSource for good)
    assert reply.status == 200
    assert time.time() - received < 29.0, calls
    assert calls == ["GetItem"], calls
    assert "retry:" in reply.body and "done" not in reply.body, reply.body
    # and the reconnect, a moment later, gets the rest of the output and the end
    again = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, headers={"Last-Event-ID": "1"})
    assert again.status == 200 and "event: done" in again.body, again.body[:300]
