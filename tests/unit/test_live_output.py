"""Live output of `stream: true` jobs on in-memory stores: the worker's chunk writes, the cancel
they carry, job.output webhooks, and the events GET /v1/jobs/{id}/events answers."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from random import Random
from typing import Any

import pytest

from llmq.config import LlmqConfig
from llmq.errors import StoreUnavailable
from llmq.execution import Invocation, JobRunner
from llmq.intake import JobIntake
from llmq.job_record import JobRecord
from llmq.live_output import CHUNK_MAX_CHARS, OutputChunk, OutputRecorder, resume_point
from llmq.models import JobResult, JobStatus, LaneMessage, OutputDelta, WebhookEvent
from llmq.providers import GenerationRequest, TransientProviderError
from llmq.sqs_edge import RetryLater
from llmq.tenants import TenantIdentity
from tests.support.stores import Clock, InMemoryJobs, InMemoryQueues, job_record

OWNER = "req-1/msg-1/aaaa"
WEBHOOK = "https://hooks.example.com/llmq"
INTERVAL_MS = 100


class StreamingProvider:
    """Streams `deltas` to the request's on_output, `pause` seconds apart, then answers them
    joined; or, with `fail_after`, raises a transient error after that many deltas."""

    def __init__(self, deltas: list[str], pause: float = 0.01, fail_after: int | None = None) -> None:
        self.deltas = deltas
        self.pause = pause
        self.fail_after = fail_after
        self.calls = 0
        self.sent = 0
        self.canceled = False

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        self.calls += 1
        fail_after, self.fail_after = self.fail_after, None
        try:
            for index, delta in enumerate(self.deltas):
                if fail_after is not None and index == fail_after:
                    raise TransientProviderError("the stream broke")
                await asyncio.sleep(self.pause)
                self.sent += 1
                if request.on_output is not None:
                    request.on_output(delta)
        except asyncio.CancelledError:
            self.canceled = True
            raise
        return JobResult(output="".join(self.deltas))


class CountingJobs(InMemoryJobs):
    """The in-memory table, counting the worker's output writes and cancel reads; `lose` makes
    the next N output writes apply but answer StoreUnavailable, as a lost response does."""

    def __init__(self, config: LlmqConfig, clock: Clock) -> None:
        super().__init__(config, clock)
        self.output_writes: list[OutputChunk] = []
        self.cancel_reads = 0
        self.lose = 0
        self.cancel_at_write: int | None = None

    def write_output(self, job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        self.output_writes.append(chunk)
        if self.cancel_at_write == len(self.output_writes):
            self.records[job.id] = self.records[job.id].model_copy(update={"cancel_requested": True})
        super().write_output(job, owner, chunk, final=final)
        if self.lose:
            self.lose -= 1
            raise StoreUnavailable("dynamodb.TransactWriteItems: the answer was lost")

    def is_cancel_requested(self, job_id: str) -> bool:
        self.cancel_reads += 1
        return super().is_cancel_requested(job_id)


class World:
    def __init__(self, provider: StreamingProvider, **config: object) -> None:
        self.clock = Clock()
        self.config = LlmqConfig.model_validate(
            {
                "cancel_check_seconds": 0.3,
                "streaming": {"partial_interval_ms": INTERVAL_MS, "output_webhook_interval_ms": 500},
                **config,
            }
        )
        self.jobs = CountingJobs(self.config, self.clock)
        self.queues = InMemoryQueues()
        self.provider = provider
        self.runner = JobRunner(self.jobs, self.queues, provider, self.config, rng=Random(7))

    def add(self, **changes: object) -> JobRecord:
        return self.jobs.add(job_record(self.jobs.now_ms(), **changes))

    def run(self, owner: str = OWNER) -> None:
        body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
        asyncio.run(self.runner.run(body, Invocation(owner=owner, remaining_seconds=lambda: 60.0)))

    def job(self) -> JobRecord:
        return self.jobs.records["job_1"]

    def deltas(self) -> list[OutputDelta]:
        return self.jobs.read_output(self.job(), 1, 10_000)


def words(count: int) -> list[str]:
    # Non-ASCII on purpose: sizes are characters and UTF-8 bytes, never one per byte.
    return [f"wörd{index}✓ " for index in range(count)]


def test_a_streaming_job_keeps_its_output_in_order_at_most_once_per_interval() -> None:
    # Given a stream: true job whose provider streams 40 deltas over about 0.4 s
    tokens = words(40)
    world = World(StreamingProvider(tokens, pause=0.01))
    world.add(stream=True)
    # When it runs
    world.run()
    # Then the job succeeded, and its chunks, read in order, are its whole output
    job = world.job()
    assert job.status is JobStatus.SUCCEEDED
    deltas = world.deltas()
    assert "".join(delta.delta for delta in deltas) == "".join(tokens) == job.result.output  # type: ignore[union-attr]
    assert [delta.seq for delta in deltas] == list(range(1, len(deltas) + 1))
    assert job.stream_seq == len(deltas)
    # And it wrote at most once per interval while generating (plus the tail at the end),
    # not once per token
    assert 2 <= len(world.jobs.output_writes) < len(tokens) / 2
    # And with output writes coming, it never read the job to look for a cancel
    assert world.jobs.cancel_reads == 0


def test_a_job_without_stream_writes_no_output_and_keeps_its_cost() -> None:
    # Given a job without stream: true, from a provider that streams
    world = World(StreamingProvider(words(10)))
    world.add()
    world.run()
    # Then no output write was made and the job item has no live-output attribute
    assert world.job().status is JobStatus.SUCCEEDED
    assert world.jobs.output_writes == []
    assert world.jobs.chunks == {}
    stored = world.job().model_dump(exclude_none=True)
    assert not {"stream", "stream_seq", "output_partial", "progress_ms"} & stored.keys()


def test_a_cancel_is_seen_at_the_next_output_write_and_stops_the_generation() -> None:
    # Given a streaming job of 200 deltas, 10 ms apart (2 s), and no cancel reads for 60 s
    world = World(StreamingProvider(words(200), pause=0.01), cancel_check_seconds=60)
    world.add(stream=True)
    # When its client cancels after the second output write
    world.jobs.cancel_at_write = 2
    world.run()
    # Then that write was refused, the generation stopped there, and the job ended canceled
    job = world.job()
    assert job.status is JobStatus.CANCELED
    assert world.provider.canceled
    assert len(world.jobs.output_writes) == 2
    assert world.provider.sent < 100
    # And no read was spent finding the cancel
    assert world.jobs.cancel_reads == 0


def test_a_write_applied_but_unanswered_is_sent_again_unchanged_and_counted_once() -> None:
    # Given output writes whose first two answers are lost after DynamoDB applied them
    tokens = words(30)
    world = World(StreamingProvider(tokens, pause=0.01))
    world.add(stream=True)
    world.jobs.lose = 2
    world.run()
    # Then every chunk is in the output once, in order: nothing doubled, nothing lost
    deltas = world.deltas()
    assert "".join(delta.delta for delta in deltas) == "".join(tokens)
    assert world.job().status is JobStatus.SUCCEEDED
    # And the lost answers were followed by the same chunk again, never a new one on top
    first, second = world.jobs.output_writes[:2]
    assert first == second


def test_a_retried_attempt_starts_its_output_with_a_reset() -> None:
    # Given a streaming job whose first attempt breaks after 20 of 30 deltas
    tokens = words(30)
    world = World(StreamingProvider(tokens, pause=0.01, fail_after=20))
    world.add(stream=True)
    with pytest.raises(RetryLater):
        world.run()
    first_attempt = world.deltas()
    assert first_attempt and not any(delta.reset for delta in first_attempt)
    assert world.job().status is JobStatus.QUEUED
    # When the retry runs (its backoff over)
    world.clock.advance(120)
    world.run(owner="req-2/msg-1/bbbb")
    # Then its first delta says to drop the earlier text, and what follows is the whole output
    deltas = world.deltas()
    retried = deltas[len(first_attempt) :]
    assert retried[0].reset and retried[0].attempt == 2
    assert "".join(delta.delta for delta in retried) == "".join(tokens) == world.job().result.output  # type: ignore[union-attr]


class _BreaksThenAnswersNothing:
    """Call 1 streams ten deltas and breaks; call 2 answers with no output at all."""

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        self.calls += 1
        if self.calls == 1:
            for delta in words(10):
                await asyncio.sleep(0.01)
                request.on_output(delta)
            raise TransientProviderError("the stream broke")
        return JobResult(output="", finish_reason="content_filter")


def test_a_retry_that_produces_nothing_still_resets_the_earlier_attempts_text() -> None:
    # Given a streaming job whose first attempt streamed some text and broke
    provider = _BreaksThenAnswersNothing()
    world = World(provider)  # type: ignore[arg-type]
    world.add(stream=True)
    with pytest.raises(RetryLater):
        world.run()
    assert world.deltas()
    # When its retry succeeds with an empty output
    world.clock.advance(120)
    world.run(owner="req-2/msg-1/bbbb")
    assert world.job().status is JobStatus.SUCCEEDED and world.job().result.output == ""  # type: ignore[union-attr]
    # Then a client reading the events gets a reset after the first attempt's text: the deltas
    # since the last reset join to the job's output, empty, never the earlier attempt's text
    intake = JobIntake(world.jobs, InMemoryQueues(), world.config, lambda url: None, sleep=lambda s: None)
    tenant = TenantIdentity(tenant_id=world.job().tenant_id, tier="enterprise")
    events = parse(intake.output_events(tenant, world.job().id, seen=0, wait_seconds=0))
    deltas = [json.loads(data) for event, _, data in events if event == "output.delta"]
    last_reset = max(index for index, delta in enumerate(deltas) if delta["reset"])
    assert deltas[last_reset]["attempt"] == 2
    assert "".join(delta["delta"] for delta in deltas[last_reset:]) == ""
    assert provider.calls == 2


def test_output_webhooks_are_throttled_and_carry_each_piece_of_output_once() -> None:
    # Given a streaming job subscribed to job.output, streaming for about 1.2 s, with output
    # webhooks at most every 0.5 s
    tokens = words(60)
    world = World(StreamingProvider(tokens, pause=0.02))
    world.add(stream=True, webhook_url=WEBHOOK, webhook_events=[WebhookEvent.OUTPUT, WebhookEvent.SUCCEEDED])
    world.run()
    # Then a few job.output webhooks went out, far fewer than output writes
    outputs = world.queues.outputs
    assert 2 <= len(outputs) <= 5
    assert len(outputs) < len(world.jobs.output_writes)
    # And together, in order, they carry the whole output, their seq ranges back to back
    assert "".join(event.delta for event in outputs) == "".join(tokens)
    assert outputs[0].seq_from == 1
    for before, after in itertools.pairwise(outputs):
        assert after.seq_from == before.seq_to + 1
    assert outputs[-1].seq_to == world.job().stream_seq
    # And the terminal webhook went out too
    assert ("job_1", WebhookEvent.SUCCEEDED) in world.queues.webhooks


def test_a_running_jobs_poll_shows_its_progress_and_the_start_of_its_output() -> None:
    # Given the start of the output limited to 12 characters
    config = LlmqConfig.model_validate({"streaming": {"partial_max_chars": 12}})
    recorder = OutputRecorder(job_id="job_1", first_seq=0, attempt=1, reset=False, config=config.streaming)
    for piece in ("héllo ", "wörld ", "again"):
        recorder(piece)
    chunk = recorder.next_chunk()
    assert chunk is not None
    # Then the chunk holds the text, and the job's partial only its start, flagged
    assert (chunk.delta, chunk.partial, chunk.truncated, chunk.tokens) == (
        "héllo wörld again",
        "héllo wörld ",
        True,
        3,
    )
    # And a job written with it shows progress in a poll while it runs
    job = job_record(1_790_000_000_000, status=JobStatus.RUNNING, stream=True, attempts=1).model_copy(
        update={
            "progress_tokens": 3,
            "progress_ms": 1_790_000_001_000,
            "output_partial": chunk.partial,
            "stream_attempt": 1,
        }
    )
    shown = job.to_job()
    assert shown.progress is not None and shown.progress.output_tokens == 3
    assert shown.output_partial == "héllo wörld "
    # And a finished one does not, nor a retry before its own first write (the last attempt's)
    assert job.model_copy(update={"status": JobStatus.SUCCEEDED}).to_job().progress is None
    retried = job.model_copy(update={"attempts": 2}).to_job()
    assert (retried.progress, retried.output_partial) == (None, None)


@pytest.mark.parametrize(
    ("header", "after", "seen"),
    [
        (None, None, 0),
        ("7", None, 7),
        (None, 5, 5),
        # EventSource reconnects to its URL, ?after= included, with the id it read last
        ("7", 3, 7),
        ("2", 0, 2),
        ("3", 9, 9),
        ("status", None, 0),
        ("done", None, 0),
        (" 12 ", None, 12),
        # Digits Python's int() refuses, or too many
        ("²", None, 0),
        ("1" * 19, None, 0),
    ],
)
def test_the_resume_point_is_the_later_of_after_and_last_event_id(
    header: str | None, after: int | None, seen: int
) -> None:
    assert resume_point(header, after) == seen


# ---- the events a client reads --------------------------------------------------------------


def parse(body: str) -> list[tuple[str, str | None, str]]:
    """(event, id, data) of each event; the retry hint aside."""
    events = []
    for block in body.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields[name] = value
        if "event" in fields:
            events.append((fields["event"], fields.get("id"), fields.get("data", "")))
    return events


class EventsWorld:
    def __init__(self, **streaming: object) -> None:
        self.clock = Clock()
        self.config = LlmqConfig.model_validate({"streaming": {"poll_interval_ms": 50, **streaming}})
        self.jobs = InMemoryJobs(self.config, self.clock)
        self.intake = JobIntake(self.jobs, InMemoryQueues(), self.config, lambda url: None, sleep=self._sleep)
        self.tenant = TenantIdentity(tenant_id="t1", tier="enterprise")
        self.on_sleep: list[object] = []
        self.sleeps = 0

    def _sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.on_sleep:
            action = self.on_sleep.pop(0)
            action()  # type: ignore[operator]

    def write(self, job_id: str, *pieces: str, attempt: int = 1, every: float = 0.0) -> None:
        """`pieces` as `attempt`'s chunks (a reset first when it is a retry), `every` seconds
        apart."""
        job = self.jobs.records[job_id]
        recorder = OutputRecorder(
            job_id=job_id,
            first_seq=job.stream_seq or 0,
            attempt=attempt,
            reset=attempt > 1,
            config=self.config.streaming,
        )
        for piece in pieces:
            recorder(piece)
            chunk = recorder.next_chunk()
            assert chunk is not None
            self.jobs.write_output(job, OWNER, chunk)
            recorder.written(chunk)
            job = self.jobs.records[job_id]
            self.clock.advance(every)


def running_stream_job(world: EventsWorld) -> JobRecord:
    return world.jobs.add(
        job_record(
            world.jobs.now_ms(),
            tenant_id="t1",
            status=JobStatus.RUNNING,
            stream=True,
            attempts=1,
            lease_owner=OWNER,
            lease_expires_ms=world.jobs.now_ms() + 60_000,
        )
    )


def test_a_fresh_connection_gets_the_status_and_the_output_so_far_then_resumes_after_its_last_id() -> None:
    world = EventsWorld()
    running_stream_job(world)
    world.write("job_1", "Hél", "lo")
    # When a client connects
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=5))
    # Then it reads the status, then each delta with its seq as the id
    assert [(event, event_id) for event, event_id, _ in events] == [
        ("status", None),
        ("output.delta", "1"),
        ("output.delta", "2"),
    ]
    assert json.loads(events[1][2])["delta"] == "Hél"
    # When more output comes while it waits after delta 2
    world.on_sleep.append(lambda: world.write("job_1", " wörld"))
    body = world.intake.output_events(world.tenant, "job_1", seen=2, wait_seconds=5)
    # Then the response holds only what is new (no repeated status) and ends with a retry hint
    assert [(event, event_id) for event, event_id, _ in parse(body)] == [("output.delta", "3")]
    assert body.endswith("retry: 100\n\n")


def test_the_end_of_the_job_ends_the_stream_with_done_and_the_whole_job() -> None:
    world = EventsWorld()
    running_stream_job(world)
    world.write("job_1", "a", "b")

    def finish() -> None:
        job = world.jobs.records["job_1"]
        world.jobs.complete(job, OWNER, result=JobResult(output="ab"))

    world.on_sleep.append(finish)
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=2, wait_seconds=5))
    assert [event for event, _, _ in events] == ["status", "done"]
    assert json.loads(events[0][2]) == {"status": "succeeded"}
    done = json.loads(events[1][2])
    assert (done["status"], done["result"]["output"]) == ("succeeded", "ab")


def test_a_job_without_stream_gets_status_and_done_only() -> None:
    world = EventsWorld()
    world.jobs.add(job_record(world.jobs.now_ms(), tenant_id="t1", status=JobStatus.QUEUED))

    def start() -> None:
        world.jobs.records["job_1"] = world.jobs.records["job_1"].model_copy(
            update={"status": JobStatus.RUNNING}
        )

    world.on_sleep.append(start)
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=5))
    assert [(event, json.loads(data)) for event, _, data in events] == [
        ("status", {"status": "queued"}),
        ("status", {"status": "running"}),
    ]


def test_nothing_new_holds_the_response_for_the_wait_then_ends_with_only_a_retry_hint() -> None:
    world = EventsWorld()
    running_stream_job(world)
    world.write("job_1", "a")
    body = world.intake.output_events(world.tenant, "job_1", seen=1, wait_seconds=0.3)
    assert body == "retry: 100\n\n"
    assert world.sleeps >= 1


def test_another_tenants_job_is_not_found() -> None:
    from llmq.errors import JobNotFound

    world = EventsWorld()
    running_stream_job(world)
    other = TenantIdentity(tenant_id="t2", tier="enterprise")
    with pytest.raises(JobNotFound):
        world.intake.output_events(other, "job_1", seen=0, wait_seconds=1)


# ---- the CLI's follower ---------------------------------------------------------------------


@pytest.mark.parametrize("live", [True, False], ids=["terminal", "file"])
def test_the_cli_follower_resumes_after_a_cut_connection_and_a_429_and_prints_each_delta_once(
    monkeypatch: pytest.MonkeyPatch, live: bool
) -> None:
    import io

    import httpx

    from llmq_cli.client import LlmqClient
    from llmq_cli.main import print_stream

    def delta(seq: int, text: str, reset: bool = False, attempt: int = 1) -> str:
        data = json.dumps({"seq": seq, "delta": text, "attempt": attempt, "reset": reset})
        return f"id: {seq}\nevent: output.delta\ndata: {data}\n\n"

    done = 'event: done\ndata: {"id": "job_1", "status": "succeeded"}\n\n'
    seen_ids: list[str | None] = []
    # Each request's answer by the Last-Event-ID it sent: a 429 first, then a response cut
    # mid-event, then the rest (a retried attempt starting over), then the end.
    answers = {
        None: [
            httpx.Response(429, headers={"retry-after": "0"}, json={"code": "too_many_long_polls"}),
            httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=(delta(1, "Hel") + delta(2, "lo")[:20]).encode(),
            ),
        ],
        "1": [
            httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=(delta(2, "lo") + delta(3, "Hi", reset=True, attempt=2) + "retry: 0\n\n").encode(),
            )
        ],
        "3": [
            httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=(delta(4, "!") + done).encode()
            )
        ],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        last = request.headers.get("last-event-id")
        seen_ids.append(last)
        return answers[last].pop(0)

    monkeypatch.setattr("llmq_cli.client.time.sleep", lambda seconds: None)
    client = LlmqClient("http://api.test", "key")
    client._http = httpx.Client(transport=httpx.MockTransport(handler))
    out, err = io.StringIO(), io.StringIO()
    job = print_stream(client.follow("job_1", timeout=30), out, err, live=live)
    # Then each delta was read once, in order, the restart said on stderr, and the end came
    assert job == {"id": "job_1", "status": "succeeded"}
    assert seen_ids == [None, None, "1", "3"]
    assert "attempt 2 starts again" in err.getvalue()
    # To a terminal, each delta as it came; to a file or a pipe, the job's output alone (the
    # abandoned attempt's text dropped)
    assert out.getvalue() == ("HelloHi!\n" if live else "Hi!\n")


# ---- nothing in the output may cost the generation or its result -----------------------------


class FailingQueues(InMemoryQueues):
    """A webhooks queue whose job.output sends fail with something no one expected."""

    def enqueue_webhook(self, job_id: str, event: WebhookEvent, output: object = None, **kw: Any) -> None:
        if event is WebhookEvent.OUTPUT:
            raise RuntimeError("unexpected")
        super().enqueue_webhook(job_id, event)


def test_unexpected_failures_of_output_writes_and_webhooks_never_cost_the_result() -> None:
    # Given a streaming job subscribed to job.output whose output webhooks fail oddly, and
    # whose first output writes fail with an error no one expected
    tokens = words(30)
    world = World(StreamingProvider(tokens, pause=0.01))
    world.queues = FailingQueues()
    world.runner = JobRunner(world.jobs, world.queues, world.provider, world.config, rng=Random(7))
    world.add(stream=True, webhook_url=WEBHOOK, webhook_events=[WebhookEvent.OUTPUT, WebhookEvent.SUCCEEDED])
    original = world.jobs.write_output
    failures = iter([TypeError("odd"), TypeError("odd")])

    def flaky(job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        original(job, owner, chunk, final=final)

    world.jobs.write_output = flaky  # type: ignore[method-assign]
    world.run()
    # Then the job succeeded with its result and its terminal webhook
    assert world.job().status is JobStatus.SUCCEEDED
    assert world.job().result.output == "".join(tokens)  # type: ignore[union-attr]
    assert ("job_1", WebhookEvent.SUCCEEDED) in world.queues.webhooks
    # And the output still holds every piece once
    assert "".join(delta.delta for delta in world.deltas()) == "".join(tokens)


def test_an_output_write_that_finds_the_lease_taken_stops_the_generation_without_a_cancel() -> None:
    # Given a streaming job whose lease another worker takes over after the first output write
    world = World(StreamingProvider(words(200), pause=0.01), cancel_check_seconds=60)
    world.add(stream=True)
    original = world.jobs.write_output

    def taken_over(job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        original(job, owner, chunk, final=final)
        world.jobs.records[job.id] = world.jobs.records[job.id].model_copy(update={"lease_owner": "worker-2"})

    world.jobs.write_output = taken_over  # type: ignore[method-assign]
    world.run()
    # Then the generation stopped, and the job is left running under its new owner: not canceled
    job = world.job()
    assert world.provider.canceled and world.provider.sent < 100
    assert (job.status, job.lease_owner, job.cancel_requested) == (JobStatus.RUNNING, "worker-2", False)


def test_a_lone_surrogate_is_replaced_and_a_split_pair_kept_whole_in_deltas_and_result() -> None:
    # A provider's escapes decoded one event at a time: a pair split over two deltas, and a
    # surrogate alone
    world = World(StreamingProvider(["caf", "\ud800", "é a\ud83d", "\ude00b"], pause=0.01))
    world.add(stream=True)
    world.run()
    job = world.job()
    assert job.status is JobStatus.SUCCEEDED
    expected = "caf\ufffdé a😀b"
    assert "".join(delta.delta for delta in world.deltas()) == expected
    assert job.result is not None and job.result.output == expected


def test_output_its_last_writes_could_not_keep_is_served_from_the_result() -> None:
    # Given a streaming job whose last output writes, after its generation, AWS keeps refusing
    tokens = words(30)
    world = World(StreamingProvider(tokens, pause=0.01))
    world.add(stream=True)
    original = world.jobs.write_output

    def refused_at_the_end(job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        if final:
            raise StoreUnavailable("dynamodb.TransactWriteItems: throttled")
        original(job, owner, chunk, final=final)

    world.jobs.write_output = refused_at_the_end  # type: ignore[method-assign]
    world.run()
    job = world.job()
    assert job.status is JobStatus.SUCCEEDED
    written = "".join(delta.delta for delta in world.deltas())
    assert len(written) < len(job.result.output)  # type: ignore[union-attr]
    # When a client reads its events after its last chunk
    intake = JobIntake(world.jobs, InMemoryQueues(), world.config, lambda url: None)
    tenant = TenantIdentity(tenant_id=job.tenant_id, tier="enterprise")
    events = parse(intake.output_events(tenant, "job_1", seen=job.stream_seq or 0))
    # Then it gets the rest of the output as the next delta, then the end
    assert [event for event, _, _ in events] == ["output.delta", "status", "done"]
    tail = json.loads(events[0][2])
    assert tail["seq"] == (job.stream_seq or 0) + 1
    assert written + tail["delta"] == job.result.output  # type: ignore[union-attr]


class NoPlaces:
    """Every long-poll place taken."""

    def enter(self, tenant_id: str, cap: int, seconds: float, deadline: float | None = None) -> str | None:
        return None

    def leave(self, tenant_id: str, place: str) -> None:
        raise AssertionError("no place was taken")


def test_with_every_long_poll_place_taken_the_stream_answers_at_once_and_says_when_to_come_back() -> None:
    world = EventsWorld()
    world.intake.polls = NoPlaces()
    running_stream_job(world)
    world.write("job_1", "a")
    body = world.intake.output_events(world.tenant, "job_1", seen=1, wait_seconds=5)
    # Not a 429 (EventSource would stop for good): nothing new, and a retry after Retry-After
    retry_ms = world.config.fair_share.long_poll_retry_after_seconds * 1000
    assert body == f"retry: {retry_ms}\n\n"
    assert world.sleeps == 0


def test_a_client_new_to_a_finished_job_reads_its_deltas_before_its_end() -> None:
    world = EventsWorld()
    running_stream_job(world)
    world.write("job_1", "a", "b")
    world.jobs.complete(world.jobs.records["job_1"], OWNER, result=JobResult(output="ab"))
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=5))
    # A client that stops at a terminal status has read the output by then
    assert [event for event, _, _ in events] == ["output.delta", "output.delta", "status", "done"]


def test_a_finished_jobs_chunk_read_left_unfinished_by_aws_does_not_end_the_stream() -> None:
    world = EventsWorld()
    running_stream_job(world)
    world.write("job_1", "a", "b", "c")
    world.jobs.complete(world.jobs.records["job_1"], OWNER, result=JobResult(output="abc"))
    # When the read of chunk 2 comes back without it (BatchGetItem's unprocessed keys)
    world.jobs.unread_chunks = {("job_1", 2)}
    with pytest.raises(StoreUnavailable):
        world.intake.output_events(world.tenant, "job_1", seen=1, wait_seconds=5)
    # (which the api function answers with a retry hint: nothing was skipped, nothing ended)
    # And when only chunk 3 is left unread, chunk 2 comes, and the stream does not end
    world.jobs.unread_chunks = {("job_1", 3)}
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=1, wait_seconds=5))
    assert [(event, event_id) for event, event_id, _ in events] == [("output.delta", "2")]
    # And the next request, once AWS answers, reads on and ends the stream
    world.jobs.unread_chunks = set()
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=1, wait_seconds=5))
    assert [(event, event_id) for event, event_id, _ in events] == [
        ("output.delta", "2"),
        ("output.delta", "3"),
        ("status", None),
        ("done", "done"),
    ]


def test_chunks_past_their_ttl_are_gone_and_the_result_gives_the_rest() -> None:
    world = EventsWorld(chunk_ttl_seconds=3600)
    running_stream_job(world)
    world.write("job_1", "a", "b")
    world.jobs.complete(world.jobs.records["job_1"], OWNER, result=JobResult(output="ab"))
    # An hour and a second later, the chunks are past their TTL (DynamoDB has not deleted them)
    world.clock.advance(3601)
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=5))
    # Then the result gives the whole output, as a reset after the last chunk: a client that
    # reads every delta still reads all of the output
    assert [(event, event_id) for event, event_id, _ in events] == [
        ("output.delta", "3"),
        ("status", None),
        ("done", "done"),
    ]
    assert json.loads(events[0][2]) == {"seq": 3, "delta": "ab", "attempt": 1, "reset": True}
    assert json.loads(events[-1][2])["result"]["output"] == "ab"


def _retried_long_after(world: EventsWorld, first: list[str], second: list[str]) -> None:
    """A stream job's first attempt wrote `first`, and its retry, run a chunk's TTL later (a
    provider's Retry-After, backoffs, its turn at the tenant's cap), is writing `second`."""
    running_stream_job(world)
    world.write("job_1", *first)
    world.clock.advance(world.config.streaming.chunk_ttl_seconds + 1)
    world.jobs.records["job_1"] = world.jobs.records["job_1"].model_copy(update={"attempts": 2})
    world.write("job_1", *second, attempt=2)


def _joined(events: list[tuple[str, str | None, str]]) -> str:
    text = ""
    for event, _, data in events:
        if event == "output.delta":
            delta = json.loads(data)
            text = ("" if delta["reset"] else text) + delta["delta"]
    return text


def test_a_retry_run_long_after_the_first_attempt_streams_to_a_new_follower() -> None:
    # Given a retry writing its output while the first attempt's chunks are past their TTL
    world = EventsWorld(chunk_ttl_seconds=3600)
    _retried_long_after(world, ["Once ", "upon"], ["Once upon a time", " there was"])
    # When a client starts following
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=1))
    # Then it reads the running attempt's chunks, the oldest left first, at once
    deltas = [
        (event_id, json.loads(data)["reset"]) for event, event_id, data in events if event == "output.delta"
    ]
    assert deltas == [("3", True), ("4", False)]
    assert _joined(events) == "Once upon a time there was"
    assert world.sleeps == 0


def test_a_follower_skips_more_than_a_page_of_expired_chunks_without_polling_them() -> None:
    world = EventsWorld(chunk_ttl_seconds=3600)
    _retried_long_after(world, [f"w{i} " for i in range(150)], ["x", "y"])
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=1))
    assert [event_id for event, event_id, _ in events if event == "output.delta"] == ["151", "152"]
    assert world.sleeps == 0


def test_a_finished_retry_whose_first_attempt_expired_gives_a_new_follower_the_whole_output() -> None:
    world = EventsWorld(chunk_ttl_seconds=3600)
    _retried_long_after(world, ["Once ", "upon"], ["Once upon a time", " there was"])
    world.jobs.complete(
        world.jobs.records["job_1"], OWNER, result=JobResult(output="Once upon a time there was")
    )
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=1))
    # The whole output, from the result, as a reset after the last chunk; then the end
    assert [(event, event_id) for event, event_id, _ in events] == [
        ("output.delta", "5"),
        ("status", None),
        ("done", "done"),
    ]
    assert _joined(events) == "Once upon a time there was"


def _follow(world: EventsWorld, seen: int = 0) -> tuple[str, list[int], dict[str, object]]:
    """An SSE client: it reconnects after the last delta's id until `done`; the text joined by
    the reset rule, the ids it read, and the Job `done` carried."""
    text, ids = "", []
    for _ in range(50):
        events = parse(world.intake.output_events(world.tenant, "job_1", seen=seen, wait_seconds=0))
        for event, event_id, data in events:
            if event == "output.delta":
                assert event_id is not None and int(event_id) > seen
                seen = int(event_id)
                ids.append(seen)
                delta = json.loads(data)
                text = ("" if delta["reset"] else text) + delta["delta"]
            elif event == "done":
                return text, ids, json.loads(data)
    raise AssertionError("the stream never ended")


def test_a_whole_output_served_over_several_responses_reads_on_in_its_own_numbering() -> None:
    # Given a finished job whose chunks are all past their TTL, and one delta a response: its
    # whole output (two pieces) takes two responses, the second resumed after the first's id
    world = EventsWorld(chunk_ttl_seconds=3600, max_deltas_per_response=1)
    running_stream_job(world)
    output = "x" * CHUNK_MAX_CHARS + "TAIL"
    world.write("job_1", *[output[start : start + 4000] for start in range(0, len(output), 4000)])
    world.jobs.complete(world.jobs.records["job_1"], OWNER, result=JobResult(output=output))
    world.clock.advance(3601)
    # Then the client joins the whole output, not its first piece and then the (empty) tail
    text, ids, done = _follow(world)
    assert text == output and done["status"] == "succeeded"
    assert ids == [6, 7]


def test_a_wait_reads_expired_chunks_once_not_at_every_poll() -> None:
    # Given a job waiting for its retry a chunk's TTL after its first attempt wrote 900 chunks
    world = EventsWorld(chunk_ttl_seconds=3600)
    running_stream_job(world)
    world.write("job_1", *[f"w{i} " for i in range(900)])
    world.clock.advance(3601)
    world.jobs.records["job_1"] = world.jobs.records["job_1"].model_copy(
        update={"status": JobStatus.QUEUED, "lease_owner": None}
    )
    reads: list[int] = []
    real = world.jobs.read_output

    def counted(job: JobRecord, first: int, last: int, **limit: int) -> list[OutputDelta]:
        reads.append(first)
        return real(job, first, last, **limit)

    world.jobs.read_output = counted  # type: ignore[method-assign]
    # When a new follower waits through several polls
    body = world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=0.2)
    # Then it got nothing of the expired attempt, and read its chunks once
    assert [event for event, _, _ in parse(body)] == ["status"]
    assert reads == [1] and world.sleeps >= 5


def test_a_new_follower_of_a_job_awaiting_its_retry_gets_no_fragment_of_the_abandoned_attempt() -> None:
    # Given a first attempt's 150 chunks, written a second apart, the job then sent back to
    # wait a day (a 429's Retry-After), half of them now past their TTL
    world = EventsWorld(chunk_ttl_seconds=3600)
    running_stream_job(world)
    world.write("job_1", *[f"word{index} " for index in range(150)], every=1)
    world.jobs.records["job_1"] = world.jobs.records["job_1"].model_copy(
        update={"status": JobStatus.QUEUED, "lease_owner": None}
    )
    world.clock.advance(3600 - 75)
    # Then a new follower is not served the rest of it as if it were the output's beginning
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=0))
    assert [event for event, _, _ in events] == ["status"]
    # And when the retry writes, its output comes from its first delta
    world.jobs.records["job_1"] = world.jobs.records["job_1"].model_copy(
        update={"status": JobStatus.RUNNING, "lease_owner": OWNER, "attempts": 2}
    )
    world.write("job_1", "Once", " upon", attempt=2)
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=0))
    assert [event_id for event, event_id, _ in events if event == "output.delta"] == ["151", "152"]
    assert _joined(events) == "Once upon"


def test_the_cli_writing_to_a_file_takes_a_large_result_from_its_url_not_the_joined_deltas() -> None:
    import io

    from httpx_sse import ServerSentEvent

    from llmq_cli.main import print_stream

    # Given a stream whose deltas are an abandoned draft (the rest expired), and a `done` whose
    # result is too large to inline: a link to it in S3
    events = [
        ServerSentEvent(
            event="output.delta",
            id="1",
            data=json.dumps({"seq": 1, "delta": "abandoned ", "attempt": 1, "reset": False}),
        ),
        ServerSentEvent(
            event="done",
            id="done",
            data=json.dumps({"id": "job_1", "status": "succeeded", "result_url": "https://s3.test/r"}),
        ),
    ]
    fetched: list[str] = []

    def fetch(url: str) -> str:
        fetched.append(url)
        return "the whole output"

    out, err = io.StringIO(), io.StringIO()
    assert print_stream(iter(events), out, err, live=False, fetch=fetch) is not None
    # Then the file holds the result, read from its link
    assert (out.getvalue(), fetched) == ("the whole output\n", ["https://s3.test/r"])
    # And when the link cannot be read, what the deltas gave
    out = io.StringIO()
    print_stream(iter(events), out, err, live=False, fetch=lambda url: None)
    assert out.getvalue() == "abandoned \n"


def test_the_cli_says_what_restarted_only_after_it_printed_something() -> None:
    import io

    from httpx_sse import ServerSentEvent

    from llmq_cli.main import print_stream

    def delta(seq: int, text: str, attempt: int, reset: bool) -> ServerSentEvent:
        data = json.dumps({"seq": seq, "delta": text, "attempt": attempt, "reset": reset})
        return ServerSentEvent(event="output.delta", id=str(seq), data=data)

    done = ServerSentEvent(event="done", id="done", data=json.dumps({"id": "job_1", "status": "succeeded"}))
    out, err = io.StringIO(), io.StringIO()
    # A stream that opens with the whole output served from the result (a reset), then a retry
    print_stream(
        iter([delta(3, "ab", 1, True), delta(4, "X", 2, True), delta(5, "Y", 2, True), done]),
        out,
        err,
        live=True,
    )
    assert out.getvalue() == "abXY\n"
    assert err.getvalue().splitlines()[1:] == [
        "[attempt 2 starts again]",
        "",
        "[the output starts again from its beginning]",
    ]


def test_the_cli_writing_to_a_file_keeps_what_it_read_when_interrupted() -> None:
    import io
    from collections.abc import Iterator

    from httpx_sse import ServerSentEvent

    from llmq_cli.main import print_stream

    def events() -> Iterator[ServerSentEvent]:
        yield ServerSentEvent(
            event="output.delta",
            id="1",
            data=json.dumps({"seq": 1, "delta": "Once", "attempt": 1, "reset": False}),
        )
        raise KeyboardInterrupt

    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        print_stream(events(), out, err, live=False)
    assert out.getvalue() == "Once"


def test_the_cli_writing_to_a_file_keeps_what_it_read_when_the_stream_stops_before_done() -> None:
    import io

    from httpx_sse import ServerSentEvent

    from llmq_cli.main import print_stream

    def delta(seq: int, text: str) -> ServerSentEvent:
        return ServerSentEvent(
            event="output.delta",
            id=str(seq),
            data=json.dumps({"seq": seq, "delta": text, "attempt": 1, "reset": False}),
        )

    out, err = io.StringIO(), io.StringIO()
    assert print_stream(iter([delta(1, "Once upon"), delta(2, " a time")]), out, err, live=False) is None
    assert out.getvalue() == "Once upon a time"


def test_a_tail_of_several_pieces_read_over_several_responses_is_not_taken_for_the_whole() -> None:
    # Given a finished job whose last writes failed: the rest of its output, two pieces, only
    # in its result; and three deltas a response
    world = EventsWorld(max_deltas_per_response=3)
    running_stream_job(world)
    world.write("job_1", "ab", "cd")
    output = "abcd" + "y" * CHUNK_MAX_CHARS + "END"
    world.jobs.complete(world.jobs.records["job_1"], OWNER, result=JobResult(output=output))
    # Then a client reads the chunks and the tail in its own numbering, across responses
    text, ids, done = _follow(world)
    assert ids == [1, 2, 3, 4] and text == output and done["status"] == "succeeded"


def test_a_follower_behind_a_retry_whose_first_attempt_expired_reads_no_expired_chunk() -> None:
    # Given a first attempt's 150 chunks past their TTL, and its retry's first two chunks
    world = EventsWorld(chunk_ttl_seconds=3600)
    _retried_long_after(world, [f"w{i} " for i in range(150)], ["Once", " upon"])
    asked: list[range] = []
    real = world.jobs.read_output

    def counted(job: JobRecord, first: int, last: int, **limit: int) -> list[OutputDelta]:
        asked.append(range(first, last + 1))
        return real(job, first, last, **limit)

    world.jobs.read_output = counted  # type: ignore[method-assign]
    # When a new follower comes
    events = parse(world.intake.output_events(world.tenant, "job_1", seen=0, wait_seconds=0))
    # Then it reads the retry's output from its first chunk, having asked for one expired key
    assert [event_id for event, event_id, _ in events if event == "output.delta"] == ["151", "152"]
    assert _joined(events) == "Once upon"
    assert [(r.start, r.stop - 1) for r in asked] == [(1, 1), (151, 152)]


def test_a_cancel_that_comes_as_the_generation_ends_leaves_its_paid_result_standing() -> None:
    # Given a streaming job whose generation ends while its first output write is in flight,
    # and the client's cancel lands just before that write is judged
    tokens = words(3)
    world = World(StreamingProvider(tokens, pause=0.0), cancel_check_seconds=60)
    world.add(stream=True)
    original = world.jobs.write_output

    def slow_then_canceled(job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        if not final:
            time.sleep(0.3)
            world.jobs.records[job.id] = world.jobs.records[job.id].model_copy(
                update={"cancel_requested": True}
            )
        original(job, owner, chunk, final=final)

    world.jobs.write_output = slow_then_canceled  # type: ignore[method-assign]
    world.run()
    # Then the finished generation's result is kept: the job succeeded, its whole output too
    job = world.job()
    assert world.provider.sent == 3 and not world.provider.canceled
    assert (job.status, job.result.output) == (JobStatus.SUCCEEDED, "".join(tokens))  # type: ignore[union-attr]
    assert "".join(delta.delta for delta in world.deltas()) == "".join(tokens)


def test_a_job_output_send_refused_once_goes_with_the_next_and_nothing_is_sent_twice() -> None:
    tokens = words(60)
    world = World(StreamingProvider(tokens, pause=0.02))
    refusals = iter([True])

    class OnceRefused(InMemoryQueues):
        def enqueue_webhook(self, job_id: str, event: WebhookEvent, output: object = None, **kw: Any) -> None:
            if event is WebhookEvent.OUTPUT and next(refusals, False):
                raise StoreUnavailable("sqs.SendMessage: throttled")
            super().enqueue_webhook(job_id, event, output, **kw)  # type: ignore[arg-type]

    world.queues = OnceRefused()
    world.runner = JobRunner(world.jobs, world.queues, world.provider, world.config, rng=Random(7))
    world.add(stream=True, webhook_url=WEBHOOK, webhook_events=[WebhookEvent.OUTPUT])
    world.run()
    outputs = world.queues.outputs
    assert "".join(event.delta for event in outputs) == "".join(tokens)
    assert [event.seq_from for event in outputs] == [1] + [event.seq_to + 1 for event in outputs[:-1]]


def test_final_output_writes_that_stall_leave_the_result_write_its_reserve() -> None:
    """The writes that keep the end of the output are bounded by the Lambda's time less the
    reserve kept for the result: a table that stalls them never pushes the paid result past
    the invocation's deadline."""
    # Given a streaming job in an invocation 4 s from its deadline (so 1 s is kept back for
    # the result), and a table on which the final output writes hang
    tokens = words(5)
    world = World(StreamingProvider(tokens, pause=0.0), cancel_check_seconds=60)
    world.add(stream=True)
    release = threading.Event()
    original_write, original_complete = world.jobs.write_output, world.jobs.complete
    deadline = time.monotonic() + 4.0
    left_at_result: list[float] = []

    def stalled(job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        if final:
            release.wait(30)
        original_write(job, owner, chunk, final=final)

    def complete(job: JobRecord, owner: str, **kwargs: Any) -> JobRecord:
        left_at_result.append(deadline - time.monotonic())
        return original_complete(job, owner, **kwargs)

    world.jobs.write_output = stalled  # type: ignore[method-assign]
    world.jobs.complete = complete  # type: ignore[method-assign]
    body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
    try:
        asyncio.run(
            world.runner.run(
                body, Invocation(owner=OWNER, remaining_seconds=lambda: deadline - time.monotonic())
            )
        )
    finally:
        release.set()
    # Then the result was written with (about) its reserve of the invocation still left, and
    # the job succeeded with all of its output
    assert len(left_at_result) == 1 and left_at_result[0] > 0.5
    job = world.job()
    assert (job.status, job.result.output) == (JobStatus.SUCCEEDED, "".join(tokens))  # type: ignore[union-attr]


def _deadline_run(world: World, seconds: float) -> list[float]:
    """Run the job in an invocation `seconds` from its deadline; the time left at each result
    write is returned."""
    deadline = time.monotonic() + seconds
    left: list[float] = []
    original_complete = world.jobs.complete

    def complete(job: JobRecord, owner: str, **kwargs: Any) -> JobRecord:
        left.append(deadline - time.monotonic())
        return original_complete(job, owner, **kwargs)

    world.jobs.complete = complete  # type: ignore[method-assign]
    body = LaneMessage(job_id="job_1", lane="high").model_dump_json()
    asyncio.run(
        world.runner.run(body, Invocation(owner=OWNER, remaining_seconds=lambda: deadline - time.monotonic()))
    )
    return left


def test_a_last_job_output_send_that_hangs_leaves_the_result_write_its_reserve() -> None:
    # Given a streaming job subscribed to job.output in an invocation 6 s from its deadline
    # (1.5 s kept back for the result), whose last job.output send hangs
    tokens = words(12)
    release = threading.Event()

    class SlowOutputs(InMemoryQueues):
        def enqueue_webhook(self, job_id: str, event: WebhookEvent, output: object = None, **kw: Any) -> None:
            if event is WebhookEvent.OUTPUT and world.provider.sent == len(tokens):
                release.wait(10)
            super().enqueue_webhook(job_id, event, output, **kw)  # type: ignore[arg-type]

    world = World(StreamingProvider(tokens, pause=0.12), cancel_check_seconds=60)
    world.queues = SlowOutputs()
    world.runner = JobRunner(world.jobs, world.queues, world.provider, world.config, rng=Random(7))
    world.add(stream=True, webhook_url=WEBHOOK, webhook_events=[WebhookEvent.OUTPUT, WebhookEvent.SUCCEEDED])
    try:
        left = _deadline_run(world, 6.0)
    finally:
        release.set()
    # Then the result was written with about its reserve left, and the job succeeded
    assert len(left) == 1 and left[0] > 0.5
    assert world.job().status is JobStatus.SUCCEEDED


def test_a_cancel_the_watcher_sees_stops_the_generation_while_an_output_write_is_in_flight() -> None:
    # Given a streaming job whose output writes take 2.5 s each (a throttled table), and a
    # cancel that lands as the first of them starts
    tokens = words(40)
    world = World(StreamingProvider(tokens, pause=0.05), cancel_check_seconds=0.3)
    world.add(stream=True)
    original = world.jobs.write_output
    first = threading.Event()

    def slow(job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = False) -> None:
        if not final:
            if not first.is_set():
                first.set()
                world.jobs.records[job.id] = world.jobs.records[job.id].model_copy(
                    update={"cancel_requested": True}
                )
            time.sleep(2.5)
        original(job, owner, chunk, final=final)

    world.jobs.write_output = slow  # type: ignore[method-assign]
    world.run()
    # Then the watcher's read stopped the generation before its end, and the job is canceled
    assert world.provider.canceled and world.provider.sent < len(tokens)
    assert world.job().status is JobStatus.CANCELED


def test_a_job_output_send_applied_but_unanswered_is_sent_again_unchanged() -> None:
    # Given a streaming job whose first job.output send reaches SQS but answers an error
    tokens = words(60)
    world = World(StreamingProvider(tokens, pause=0.02))
    lost = iter([True])

    class AppliedThenLost(InMemoryQueues):
        def enqueue_webhook(self, job_id: str, event: WebhookEvent, output: object = None, **kw: Any) -> None:
            super().enqueue_webhook(job_id, event, output, **kw)  # type: ignore[arg-type]
            if event is WebhookEvent.OUTPUT and next(lost, False):
                raise StoreUnavailable("sqs.SendMessage: the answer was lost")

    world.queues = AppliedThenLost()
    world.runner = JobRunner(world.jobs, world.queues, world.provider, world.config, rng=Random(7))
    world.add(stream=True, webhook_url=WEBHOOK, webhook_events=[WebhookEvent.OUTPUT])
    world.run()
    # Then it was sent again as it was (same range, so the same webhook-id), and the events,
    # one per range as a receiver keeps them, hold the whole output once, in order
    first, again, *rest = world.queues.outputs
    assert again == first
    assert "".join(event.delta for event in [first, *rest]) == "".join(tokens)
    assert [event.seq_from for event in rest] == [first.seq_to + 1] + [
        event.seq_to + 1 for event in rest[:-1]
    ]


def test_a_lone_surrogate_in_a_result_that_did_not_stream_is_replaced_too() -> None:
    # Given a job without stream whose provider answers a stray escape ("\ud83d" in its JSON)
    world = World(StreamingProvider(["ok \ud83d", " and more"], pause=0.0))
    world.add()
    world.run()
    # Then its result can be stored and sent: the lone half is U+FFFD, the rest as it came
    job = world.job()
    assert (job.status, job.result.output) == (JobStatus.SUCCEEDED, "ok \ufffd and more")  # type: ignore[union-attr]


def test_the_cancel_watcher_looks_one_period_after_the_last_look_or_write_never_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An output write sees a cancel, so the watcher skips its read right after one; but it must
    look again one period after that write, not a whole period later: a write just after the
    watcher's wake once put its next read two periods away (a canceled generation billed on)."""
    import asyncio as real_asyncio
    import types

    from llmq import execution

    now = {"t": 0.0}
    writes = {1.05: True}  # an output write lands 50 ms after the watcher's first read
    recorder = types.SimpleNamespace(last_write_at=None)
    reads: list[float] = []
    original_sleep = real_asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        target = now["t"] + seconds
        for at in sorted(writes):
            if now["t"] < at <= target:
                recorder.last_write_at = at
        now["t"] = target
        await original_sleep(0)

    def is_cancel_requested(job_id: str) -> bool:
        reads.append(round(now["t"], 3))
        return len(reads) == 2

    monkeypatch.setattr(execution.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(execution.time, "monotonic", lambda: now["t"])

    async def read_cancel(job_id: str) -> bool:
        return is_cancel_requested(job_id)

    runner = types.SimpleNamespace(
        config=types.SimpleNamespace(cancel_check_seconds=1.0),
        jobs=types.SimpleNamespace(is_cancel_requested=is_cancel_requested),
        _read_cancel=read_cancel,
    )
    assert real_asyncio.run(execution.JobRunner._cancel_requested(runner, "job_1", recorder)) is True
    # A read at 1 s; the write at 1.05 s saw the flag then; the next read one period after it
    assert reads == [1.0, 2.05]
