"""Live output over real HTTP: a `stream: true` job followed through the sandbox's gateway with
httpx-sse (reconnecting with Last-Event-ID, as EventSource does), `llmq submit --stream`, a
cancel mid-stream, and job.output webhooks verified with the reference standardwebhooks."""

from __future__ import annotations

import itertools
import json
import random
import threading
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from standardwebhooks import Webhook

from llmq_cli.client import LlmqClient
from tests.e2e.conftest import SandboxUnderTest, run_llmq, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sandbox(shared_sandbox: SandboxUnderTest) -> SandboxUnderTest:
    return shared_sandbox


def _provider_records(sandbox: SandboxUnderTest, job_id: str) -> list[dict[str, Any]]:
    """The fake provider's log of the job's calls: a call is logged when its answer ends."""
    log = httpx.get(f"{sandbox.state['provider_url']}/_calls").json()["log"]
    return [dict(record) for record in log if record["job_id"] == job_id]


def _provider_record(sandbox: SandboxUnderTest, job_id: str) -> dict[str, Any]:
    records = _provider_records(sandbox, job_id)
    assert len(records) == 1, records
    return records[0]


def _submit(sandbox: SandboxUnderTest, **body: Any) -> str:
    with sandbox.api() as client:
        reply = client.post("/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    assert reply.json()["stream"] is body.get("stream", False)
    return str(reply.json()["id"])


def test_a_streaming_job_is_read_live_with_httpx_sse_across_reconnects(sandbox: SandboxUnderTest) -> None:
    # Given a stream: true job whose provider streams 80 tokens over about 4 s
    job_id = _submit(sandbox, prompt="[[latency:4]] [[tokens:80]] stream this", stream=True)
    # When a client follows its events, reconnecting after each response from its last id
    key = sandbox.tenant("enterprise")["api_key"]
    deltas: list[dict[str, Any]] = []
    done: dict[str, Any] | None = None
    last_id: str | None = None
    responses_with_output = 0
    running_polls: list[dict[str, Any]] = []
    with httpx.Client(
        base_url=sandbox.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=40
    ) as http:
        for _ in range(300):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
                assert source.response.status_code == 200
                assert source.response.headers["content-type"].startswith("text/event-stream")
                got_output = False
                for event in source.iter_sse():
                    if event.event == "output.delta":
                        deltas.append(json.loads(event.data))
                        last_id, got_output = event.id, True
                    elif event.event == "done":
                        done = json.loads(event.data)
            responses_with_output += got_output
            if done is not None:
                break
            # And a poll of the job while it runs shows its progress and its output so far
            polled = http.get(f"/v1/jobs/{job_id}").json()
            if polled["status"] == "running" and polled.get("progress"):
                running_polls.append(polled)
    # Then the client read the output in pieces, in order, over several responses
    assert done is not None and done["status"] == "succeeded"
    assert [delta["seq"] for delta in deltas] == list(range(1, len(deltas) + 1))
    assert responses_with_output >= 2
    # And the pieces joined are the whole result, from one provider call
    assert "".join(delta["delta"] for delta in deltas) == done["result"]["output"]
    assert _provider_record(sandbox, job_id)["deltas_sent"] == 80
    assert running_polls, "no poll saw the running job's progress"
    first = running_polls[0]
    assert first["progress"]["output_tokens"] >= 1
    assert done["result"]["output"].startswith(first["output_partial"])


def _complete_events(text: str) -> list[tuple[str, str | None, str]]:
    """The events a reader has whole when the connection is cut after `text`: an event counts
    only once its blank line came (as the SSE standard dispatches them)."""
    events = []
    for block in text.split("\n\n")[:-1]:
        fields = dict(line.partition(": ")[::2] for line in block.splitlines())
        if "event" in fields:
            events.append((fields["event"], fields.get("id"), fields.get("data", "")))
    return events


def test_cut_connections_at_random_points_lose_and_double_no_delta(sandbox: SandboxUnderTest) -> None:
    # Given a streaming job of 120 tokens over about 6 s
    job_id = _submit(sandbox, prompt="[[latency:6]] [[tokens:120]] cut me", stream=True)
    key = sandbox.tenant("enterprise")["api_key"]
    rng = random.Random(20261202)
    deltas: list[dict[str, Any]] = []
    done: dict[str, Any] | None = None
    last_id: str | None = None
    cuts = 0
    with httpx.Client(
        base_url=sandbox.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=40
    ) as http:
        for _ in range(400):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                assert response.status_code == 200
                body = response.read().decode()
            # When the reader's connection breaks at a random byte of each response
            cut = rng.randint(0, len(body)) if rng.random() < 0.7 else len(body)
            cuts += cut < len(body)
            for event, event_id, data in _complete_events(body[:cut]):
                if event == "output.delta":
                    deltas.append(json.loads(data))
                    last_id = event_id
                elif event == "done":
                    done = json.loads(data)
            if done is not None:
                break
    # Then, resuming from the last whole delta each time, it read every delta once, in order
    assert done is not None and done["status"] == "succeeded"
    assert cuts >= 3
    assert [delta["seq"] for delta in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(delta["delta"] for delta in deltas) == done["result"]["output"]


def test_llmq_submit_stream_prints_the_output_as_it_arrives(sandbox: SandboxUnderTest) -> None:
    done = run_llmq(sandbox.directory, "submit", "--stream", "[[latency:2]] [[tokens:30]] Grüße, 世界")
    assert done.returncode == 0, done.stderr
    job_id, status = done.stderr.strip().splitlines()[-1].split()
    assert status == "succeeded"
    with sandbox.api() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert done.stdout == job["result"]["output"] + "\n"


def test_a_canceled_streaming_job_stops_its_generation_and_its_stream_ends_canceled(
    sandbox: SandboxUnderTest,
) -> None:
    # Given a streaming job of 300 tokens over 30 s, followed by a client
    job_id = _submit(sandbox, prompt="[[latency:30]] [[tokens:300]] a long one", stream=True)
    key = sandbox.tenant("enterprise")["api_key"]
    events = LlmqClient(sandbox.api_url, key).follow(job_id, timeout=120)
    first = next(event for event in events if event.event == "output.delta")
    assert json.loads(first.data)["seq"] == 1
    # When its client cancels it after the first output
    with sandbox.api() as client:
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    # Then the stream ends with done, canceled
    done = next(event for event in events if event.event == "done")
    assert json.loads(done.data)["status"] == "canceled"
    # And the provider's generation was cut off, far short of its 300 tokens
    # (the call is logged when its cut stream ends, a moment after the cancel)
    records = wait_until(lambda: _provider_records(sandbox, job_id) or None, 30) or []
    assert len(records) == 1, records
    assert 1 <= records[0]["deltas_sent"] < 300


def test_job_output_webhooks_carry_the_output_in_order_signed_like_every_event(
    sandbox: SandboxUnderTest,
) -> None:
    # Given a streaming job subscribed to job.output and job.succeeded
    receiver = sandbox.state["receiver_url"]
    job_id = _submit(
        sandbox,
        prompt="[[latency:5]] [[tokens:60]] with webhooks",
        stream=True,
        webhook={"url": f"{receiver}/hooks", "events": ["job.output", "job.succeeded"]},
    )
    job = sandbox.wait_terminal(job_id)
    assert job["status"] == "succeeded"

    def all_arrived() -> list[dict[str, Any]] | None:
        # Each event is its own message: the last job.output may come after job.succeeded.
        found = sandbox.deliveries(job_id)
        outputs = sorted(
            (d["data"] for d in found if d["type"] == "job.output" and d["data"]),
            key=lambda data: data["seq_from"],
        )
        whole = "".join(data["delta"] for data in outputs) == job["result"]["output"]
        return found if whole and any(d["type"] == "job.succeeded" for d in found) else None

    deliveries = wait_until(all_arrived, 30)
    assert deliveries, sandbox.deliveries(job_id)
    verifier = Webhook(sandbox.tenant("enterprise")["webhook_secret"])
    outputs = []
    for delivery in deliveries:
        request = delivery["request"]
        payload = verifier.verify(request["body"], request["headers"])
        assert delivery["verified"] and payload["type"] == delivery["type"]
        if payload["type"] == "job.output":
            outputs.append(payload["data"])
    # Then a few job.output webhooks came, fewer than the tokens, each verified
    outputs.sort(key=lambda data: data["seq_from"])
    assert 2 <= len(outputs) < 60
    # And together, back to back, they carry the whole output
    assert "".join(data["delta"] for data in outputs) == job["result"]["output"]
    for before, after in itertools.pairwise(outputs):
        assert after["seq_from"] == before["seq_to"] + 1


def test_a_job_without_stream_is_followed_by_status_and_done(sandbox: SandboxUnderTest) -> None:
    job_id = _submit(sandbox, prompt="[[latency:1]] plain")
    key = sandbox.tenant("enterprise")["api_key"]
    seen = [
        (event.event, json.loads(event.data)) for event in LlmqClient(sandbox.api_url, key).follow(job_id)
    ]
    assert seen[-1][0] == "done" and seen[-1][1]["status"] == "succeeded"
    assert {name for name, _ in seen} <= {"status", "done"}
    # And the follower's reconnects did not hold the tenant's long-poll places
    thread_errors: list[BaseException] = []

    def poll() -> None:
        try:
            with sandbox.api() as client:
                assert client.get(f"/v1/jobs/{job_id}", params={"wait": 1}).status_code == 200
        except BaseException as exc:
            thread_errors.append(exc)

    thread = threading.Thread(target=poll)
    thread.start()
    thread.join(30)
    assert not thread_errors
