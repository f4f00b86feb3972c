"""Live output through the real api and worker handlers against moto and the loopback provider:
a `stream: true` job read as server-sent events while it runs, resumed after each response."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import jsonschema
import pytest

from llmq import aws
from llmq.jobs import JobRepository
from llmq.live_output import CHUNK_MAX_CHARS, OutputChunk
from llmq.models import JobResult, Usage
from llmq.offload import Offload
from llmq.payloads import PayloadStore
from llmq.queues import QueueRepository
from llmq.reconcile import Reconciler
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack
from tests.integration.conftest import integration_config
from tests.integration.harness import ENTERPRISE, FREE, Harness


def _events(body: str) -> list[tuple[str, str | None, str]]:
    events = []
    for block in body.split("\n\n"):
        # (lines end at a line feed only, as SSE reads them: not at U+2028 in an output)
        fields = dict(line.partition(": ")[::2] for line in block.split("\n"))
        if "event" in fields:
            events.append((fields["event"], fields.get("id"), fields.get("data", "")))
    return events


@pytest.fixture
def streaming(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> Harness:
    """The harness with a provider that streams (the suite's default asks for whole answers)."""
    config = integration_config(provider)
    streamed = config.provider.model_copy(update={"stream": True})
    return Harness(moto_stack, config.model_copy(update={"provider": streamed}), monkeypatch)


def test_a_streaming_job_is_read_live_across_reconnects_and_ends_with_done(
    streaming: Harness, provider: FakeProviderServer
) -> None:
    harness = streaming
    # Given a stream: true job whose provider streams 60 tokens over about 3 s
    reply = harness.submit(prompt="[[latency:3]] [[tokens:60]] tell me", stream=True)
    assert reply.status == 202 and reply.body["stream"] is True
    job_id = reply.body["id"]
    # When the worker runs it while a client follows its events, reconnecting as told
    worker = threading.Thread(target=harness.drain, args=("high",))
    worker.start()
    last_id: str | None = None
    deltas: list[dict[str, object]] = []
    statuses: list[str] = []
    done: dict[str, object] | None = None
    responses_with_output = 0
    for _ in range(200):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        got = harness.api(
            "GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, headers=headers, query={"wait": "10"}
        )
        assert got.status == 200
        assert got.headers["content-type"] == "text/event-stream"
        assert got.headers["cache-control"] == "no-cache"
        events = _events(str(got.body))
        responses_with_output += any(event == "output.delta" for event, _, _ in events)
        for event, event_id, data in events:
            if event == "output.delta":
                deltas.append(json.loads(data))
                last_id = event_id
            elif event == "status":
                statuses.append(json.loads(data)["status"])
            elif event == "done":
                done = json.loads(data)
        if done is not None:
            break
    worker.join(timeout=60)
    # Then it saw the job run and end, its deltas in order with their seq as ids
    assert done is not None and done["status"] == "succeeded"
    assert "running" in statuses
    assert [delta["seq"] for delta in deltas] == list(range(1, len(deltas) + 1))
    # And the deltas, joined, are the job's whole output, read over several responses
    assert "".join(str(delta["delta"]) for delta in deltas) == done["result"]["output"]  # type: ignore[index]
    assert responses_with_output >= 2
    assert provider.calls_for(job_id) == 1


def test_a_job_without_stream_gets_status_and_done_and_another_tenant_gets_404(harness: Harness) -> None:
    job_id = harness.submit(prompt="hello").body["id"]
    harness.drain("high")
    got = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": "0"})
    events = _events(str(got.body))
    assert [(event, event_id) for event, event_id, _ in events] == [("status", None), ("done", "done")]
    assert json.loads(events[1][2])["status"] == "succeeded"
    # (`done` is the job exactly as GET shows it, its null fields too: hunt 290)
    shown = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert json.loads(events[1][2]) == shown and shown["error"] is None
    foreign = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=FREE)
    assert (foreign.status, foreign.code) == (404, "job_not_found")
    # And a reconnect after `done` is answered 204, which ends an EventSource for good
    after = harness.api(
        "GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, headers={"Last-Event-ID": "done"}
    )
    assert after.status == 204
    foreign_after = harness.api(
        "GET", f"/v1/jobs/{job_id}/events", tenant=FREE, headers={"Last-Event-ID": "done"}
    )
    assert foreign_after.status == 404
    # And a `done` carried over from another job's stream does not end one still queued: its
    # stream starts from the beginning
    queued = harness.submit(prompt="still queued").body["id"]
    carried = harness.api(
        "GET",
        f"/v1/jobs/{queued}/events",
        tenant=ENTERPRISE,
        headers={"Last-Event-ID": "done"},
        query={"wait": "0"},
    )
    assert carried.status == 200
    assert [event for event, _, _ in _events(str(carried.body))][:1] == ["status"]


def test_a_provider_that_does_not_stream_gives_a_streaming_job_its_output_at_the_end(
    harness: Harness,
) -> None:
    # Given a deployment whose provider answers whole (provider.stream false)
    job_id = harness.submit(prompt="[[tokens:30]] whole", stream=True).body["id"]
    harness.drain("high")
    got = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": "0"})
    events = _events(str(got.body))
    # Then its events hold the whole output as one delta, then the end
    assert [event for event, _, _ in events] == ["output.delta", "status", "done"]
    done = json.loads(events[-1][2])
    assert json.loads(events[0][2])["delta"] == done["result"]["output"]


def test_a_whole_answer_written_at_its_end_goes_as_one_job_output_event_per_message_not_per_chunk(
    harness: Harness,
) -> None:
    # Given a deployment whose provider answers whole, and a job subscribed to job.output
    # whose answer (57,000 characters) takes four output chunks and fits one message
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.output", "job.succeeded"]}
    job_id = harness.submit(prompt="[[tokens:10000]] tell", stream=True, webhook=hook).body["id"]
    harness.drain("high")
    sent: list[dict[str, Any]] = []
    while got := harness.receive(harness.stack.webhook_queue_url, visibility=600):
        sent += [json.loads(message["Body"]) for message in got]
    outputs = [message["output"] for message in sent if message["event"] == "job.output"]
    output = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["result"]["output"]
    assert len(output) > 3 * 16_000
    # Then one job.output carries it all (not one per chunk, sent together at once), then the end
    assert [(event["seq_from"], event["seq_to"]) for event in outputs] == [(1, 4)]
    assert outputs[0]["delta"] == output
    assert [message["event"] for message in sent].count("job.succeeded") == 1


def test_an_output_holding_unicode_line_separators_stays_one_data_line_for_any_reader(
    harness: Harness,
) -> None:
    # Given a streaming job whose output holds U+2028, U+2029 and U+0085 (NEL), which a
    # JSON string may hold raw and which str.splitlines, and httpx-sse before 0.4.2, split at
    job_id = harness.submit(prompt="[[echo]] one\u2028two\u2029three\x85four", stream=True).body["id"]
    harness.drain("high")
    body = str(harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": "0"}).body)
    output = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["result"]["output"]
    assert "\u2028" in output
    # Then a reader that splits lines as Python does still reads each event's JSON whole,
    # and the deltas are the output
    events = []
    for block in body.split("\n\n"):
        fields = dict(line.partition(": ")[::2] for line in block.splitlines())
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    assert "".join(data["delta"] for event, data in events if event == "output.delta") == output
    assert events[-1][1]["result"]["output"] == output


def test_a_bad_resume_point_or_wait_is_a_clear_422(harness: Harness) -> None:
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    for query in ({"after": "-1"}, {"after": "x"}, {"wait": "-1"}, {"wait": "x"}):
        got = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query=query)
        assert got.status == 422, query
        assert got.headers["content-type"] == "application/problem+json"


def test_the_openapi_document_describes_the_stream_and_its_events(harness: Harness) -> None:
    document = harness.api("GET", "/v1/openapi.json", tenant=ENTERPRISE).body
    operation = document["paths"]["/v1/jobs/{job_id}/events"]["get"]
    parameters = {parameter["name"].lower() for parameter in operation["parameters"]}
    assert {"job_id", "wait", "after", "last-event-id"} <= parameters
    stream = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert stream["x-llmq-events"]["output.delta"] == {"$ref": "#/components/schemas/OutputDelta"}
    # And the stream's schema describes each event as an SSE parser reads it (before OpenAPI
    # 3.2, a text/event-stream schema is one event's): a finished job's events match it
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    harness.drain("high")
    got = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": "0"})
    events = _events(str(got.body))
    assert [event for event, _, _ in events][-1] == "done"
    for event, event_id, data in events:
        parsed = {"event": event, "data": data, **({"id": event_id} if event_id else {})}
        jsonschema.validate(parsed, stream)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"event": "status", "data": {"status": "queued"}}, stream)
    schemas = document["components"]["schemas"]
    assert {"seq", "delta", "attempt", "reset"} <= schemas["OutputDelta"]["properties"].keys()
    assert {"seq_from", "seq_to", "delta"} <= schemas["JobOutputEvent"]["properties"].keys()
    job = schemas["Job"]["properties"]
    assert {"stream", "progress", "output_partial", "output_partial_truncated"} <= job.keys()
    assert "stream" in schemas["JobRequest"]["properties"]
    assert "job.output" in schemas["WebhookEvent"]["enum"]


def test_a_cancel_that_meets_an_output_write_in_progress_is_tried_again_not_answered_503(
    harness: Harness,
) -> None:
    # Given a running job, and its item held by a transaction (an output write) when the
    # cancel's UpdateItem arrives, twice
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    assert jobs.claim(job_id, "worker-1", 60).claimed
    faults = AwsFaults()
    try:
        conflict = faults.arm(FaultKind.TRANSACTION_CONFLICT, "dynamodb.UpdateItem", times=2)
        reply = harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE)
    finally:
        faults.disarm()
    # Then the cancel went through on a later try: 202, and the job is flagged
    assert len(faults.fired_for(conflict)) == 2
    assert (reply.status, reply.body["cancel_requested"]) == (202, True)


@pytest.mark.parametrize("last_event_id", [None, "done"])
def test_a_busy_store_answers_the_stream_with_a_retry_not_an_error(
    harness: Harness, last_event_id: str | None
) -> None:
    # Given a job, and the table throttling the api's reads of it; a client starting to read,
    # or one that carried a `done` over from another job's stream (hunt 267: its look at
    # whether the job ended was a 503)
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    headers = {"Last-Event-ID": last_event_id} if last_event_id else None
    faults = AwsFaults()
    try:
        throttle = faults.arm(FaultKind.THROTTLE, "dynamodb.GetItem", times=1)
        reply = harness.api(
            "GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": "0"}, headers=headers
        )
    finally:
        faults.disarm()
    # Then the answer is a 200 that says when to come back (any other status ends an
    # EventSource for good), and the next request reads the stream
    assert len(faults.fired_for(throttle)) == 1
    assert (reply.status, reply.body) == (200, "retry: 2000\n\n")
    again = harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, query={"wait": "0"})
    assert _events(str(again.body))[0][0] == "status"


def _canceled_into_its_call(
    harness: Harness, provider: FakeProviderServer, prompt: str, after_seconds: float
) -> dict[str, Any]:
    """A job of `prompt` run by a worker, canceled `after_seconds` into its provider call: the
    job as it ended."""
    job_id = harness.submit(prompt=prompt).body["id"]
    worker = threading.Thread(target=harness.drain, args=("high",))
    worker.start()
    deadline = time.monotonic() + 10
    while provider.calls_for(job_id) == 0:
        assert time.monotonic() < deadline, "the provider was never called"
        time.sleep(0.02)
    time.sleep(after_seconds)
    assert harness.api("POST", f"/v1/jobs/{job_id}/cancel", tenant=ENTERPRISE).status == 202
    worker.join(timeout=30)
    job: dict[str, Any] = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    return job


def test_a_cancel_while_only_a_whole_answers_trailer_is_awaited_keeps_the_paid_answer(
    streaming: Harness, provider: FakeProviderServer
) -> None:
    # Given a streamed answer that is whole (its finish_reason came alone), whose server holds
    # the connection 1.5 s before the usage chunk and [DONE], when a cancel comes while the
    # trailer is awaited
    job = _canceled_into_its_call(streaming, provider, "[[tokens:3]] [[trailer_late:1.5]] hi", 0.4)
    # Then the answer the provider billed stands: the job succeeded with it, after one call
    assert (job["status"], job["cancel_requested"]) == ("succeeded", True), job
    assert job["result"]["output"]
    assert provider.calls_for(job["id"]) == 1


def test_a_cancel_while_a_whole_answers_trailer_comes_in_pieces_keeps_the_paid_answer(
    streaming: Harness, provider: FakeProviderServer
) -> None:
    # Given a whole answer whose usage chunk comes 1.5 s after its finish_reason, and [DONE]
    # 1.5 s after that (each within the 2 s a trailer's silence may last; 3 s in all), when a
    # cancel comes while the trailer is awaited
    job = _canceled_into_its_call(streaming, provider, "[[tokens:3]] [[trailer_late:1.5:1.5]] hi", 0.4)
    # Then the answer the provider billed stands, after one call
    assert (job["status"], job["cancel_requested"]) == ("succeeded", True), job
    assert job["result"]["output"]
    assert provider.calls_for(job["id"]) == 1


def test_a_cancel_whose_wait_for_a_trailer_runs_out_keeps_the_whole_answer(
    streaming: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a whole answer whose trailer comes 1.5 s after its finish_reason, and a cancel's wait
    # for a trailer that ends first (as when the event loop is late: another job of the batch
    # holding it)
    monkeypatch.setattr("llmq.execution.TRAILER_WAIT_SECONDS", 0.3)
    job = _canceled_into_its_call(streaming, provider, "[[tokens:3]] [[trailer_late:1.5]] hi", 0.4)
    # Then the answer stands as it was when the wait ran out: paid for, never thrown away
    assert (job["status"], job["cancel_requested"]) == ("succeeded", True), job
    assert job["result"]["output"]
    assert provider.calls_for(job["id"]) == 1


def test_a_cancel_while_an_early_finish_reason_looks_whole_still_stops_the_generation(
    streaming: Harness, provider: FakeProviderServer
) -> None:
    # Given a gateway that sends a finish_reason alone after the first delta, pauses, and goes on
    # with the answer (2 s more), when a cancel comes while that early finish_reason is the
    # latest word
    job = _canceled_into_its_call(
        streaming, provider, "[[tokens:20]] [[latency:2]] [[finish_mid:0.6]] hi", 0.2
    )
    # Then the cancel stops the generation once more text shows the answer was not whole
    assert job["status"] == "canceled", job


def test_a_long_non_ascii_output_is_read_in_pages_that_fit_a_lambda_response(
    moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = integration_config(provider)
    limits = config.limits.model_copy(update={"max_prompt_chars": 50_000, "max_body_bytes": 1_000_000})
    harness = Harness(moto_stack, config.model_copy(update={"limits": limits}), monkeypatch)
    # Given a stream: true job whose provider answered whole (so no chunk holds its output: it
    # is served from the result), 40,000 emoji: twelve bytes each once the runtime escapes them
    text = "\U0001f600" * 40_000
    job_id = harness.submit(prompt=f"[[echo]]{text}", stream=True).body["id"]
    harness.drain("high")
    # And a Lambda response limit of 600 KB, which `done` (its result inline, 480 KB escaped)
    # leaves little of (Lambda's is 6 MB: 100 chunks of emoji pass it)
    limit = 600_000
    monkeypatch.setattr("llmq.live_output.MAX_RESPONSE_BODY_BYTES", limit)
    # When a client reads its events, reconnecting with the id it read last
    last_id: str | None = None
    deltas: list[dict[str, Any]] = []
    done: dict[str, Any] | None = None
    for _ in range(30):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        got = harness.api(
            "GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, headers=headers, query={"wait": "0"}
        )
        assert got.status == 200
        # Then each response fits the limit, as the runtime serializes it
        assert len(json.dumps(str(got.body), ensure_ascii=True)) <= limit
        for event, event_id, data in _events(str(got.body)):
            if event == "output.delta":
                deltas.append(json.loads(data))
                last_id = event_id
            elif event == "done":
                done = json.loads(data)
        if done is not None:
            break
    # And the deltas, in order over several responses, are the whole output, then `done`
    assert done is not None and done["status"] == "succeeded"
    assert [delta["seq"] for delta in deltas] == list(range(1, len(deltas) + 1))
    assert len(deltas) >= 3
    assert "".join(delta["delta"] for delta in deltas) == text == done["result"]["output"]


def test_a_page_of_non_ascii_chunks_of_a_running_job_fits_a_lambda_response(harness: Harness) -> None:
    # Given a running stream: true job whose output so far is 40 full chunks of emoji (a
    # provider that answers in bursts, or writes that fell behind, make full chunks)
    job_id = harness.submit(prompt="hello", stream=True).body["id"]
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    claim = jobs.claim(job_id, "worker-1", 600)
    assert claim.claimed and claim.job is not None
    text = "\U0001f600" * CHUNK_MAX_CHARS
    for seq in range(1, 41):
        chunk = OutputChunk(
            seq=seq,
            delta=text,
            attempt=1,
            reset=False,
            tokens=seq,
            partial="",
            truncated=True,
            chars=seq * CHUNK_MAX_CHARS,
        )
        jobs.write_output(claim.job, "worker-1", chunk)
    # When a client follows its events from the start (a long poll, which answers at once)
    seen: list[int] = []
    for _ in range(10):
        headers = {"Last-Event-ID": str(seen[-1])} if seen else {}
        got = harness.api(
            "GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE, headers=headers, query={"wait": "1"}
        )
        assert got.status == 200
        # Then each response fits Lambda's 6 MB as the runtime serializes it (7.7 MB in one)
        assert len(json.dumps(str(got.body), ensure_ascii=True)) <= 6 * 1024 * 1024
        seen += [
            int(str(event_id)) for event, event_id, _ in _events(str(got.body)) if event == "output.delta"
        ]
        if seen and seen[-1] == 40:
            break
    # And it read every chunk once, in order, over more than one response
    assert seen == list(range(1, 41))


def test_a_parked_result_recorded_over_another_attempts_chunks_is_read_whole(harness: Harness) -> None:
    # Given a stream: true job whose attempt 1 was paid for and parked (its result write failed
    # for good), and whose attempt 2, unable to see the parked result, streamed another
    # generation's start and then crashed
    job_id = harness.submit(prompt="tell me", stream=True).body["id"]
    tenant = (ENTERPRISE["tenant_id"], "high")
    jobs = JobRepository(harness.stack.jobs_table, harness.config, dynamodb=aws.client("dynamodb"))
    offload = Offload(PayloadStore(harness.stack.payload_bucket, s3=aws.client("s3")), harness.config)
    first = jobs.claim(job_id, "worker-1", -1, tenant=tenant)
    assert first.claimed and first.job is not None
    paid = JobResult(output="Paris is the capital of France.", finish_reason="stop", usage=Usage())
    offload.park_result(first.job, paid)
    second = jobs.claim(job_id, "worker-2", -1, tenant=tenant)
    assert second.claimed and second.job is not None and second.job.attempts == 2
    other = "Lyon is a big city "
    chunk = OutputChunk(
        seq=1, delta=other, attempt=2, reset=False, tokens=4, partial=other, truncated=False, chars=len(other)
    )
    jobs.write_output(second.job.model_copy(update={"lease_owner": "worker-2"}), "worker-2", chunk)
    # When the reconciler finds the lapsed lease and records the parked result
    later = JobRepository(
        harness.stack.jobs_table,
        harness.config,
        dynamodb=aws.client("dynamodb"),
        clock=lambda: time.time() + harness.config.reconciler.expired_lease_grace_seconds + 60,
    )
    queues = QueueRepository(
        harness.stack.lane_queue_urls, harness.stack.webhook_queue_url, sqs=aws.client("sqs")
    )
    Reconciler(later, queues, harness.config, offload=offload).run()
    # Then the job succeeded with what was paid for, and a client that reads its events (each
    # reset starting the text again) reads that output, not the other generation's start
    deltas, done = [], None
    for event, _, data in _events(
        str(harness.api("GET", f"/v1/jobs/{job_id}/events", tenant=ENTERPRISE).body)
    ):
        if event == "output.delta":
            deltas.append(json.loads(data))
        elif event == "done":
            done = json.loads(data)
    text = ""
    for delta in deltas:
        text = ("" if delta["reset"] else text) + delta["delta"]
    assert done is not None and (done["status"], done["result"]["output"]) == ("succeeded", paid.output)
    assert text == paid.output
