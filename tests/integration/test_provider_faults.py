"""The provider client against the fake provider over real loopback HTTP: broken answers,
finish reasons and timeouts as a worker meets them, with the fake's per-job call counts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmq import aws
from llmq.models import ChatMessage, ErrorCode, GenerationParams, JobResult
from llmq.providers import (
    ChatCompletionsProvider,
    GenerationRequest,
    PermanentProviderError,
    ProviderError,
    ProviderKey,
    ProviderTimeout,
    TransientProviderError,
    verified_context,
)
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from tests.integration.harness import ENTERPRISE, Harness

STREAMING = [True, False]


def _request(job_id: str, prompt: str) -> GenerationRequest:
    return GenerationRequest(
        model="fake-model",
        messages=[ChatMessage(role="user", content=prompt)],
        params=GenerationParams(max_tokens=50),
        job_id=job_id,
    )


def _client(server: FakeProviderServer, stream: bool) -> ChatCompletionsProvider:
    return ChatCompletionsProvider(server.base_url, lambda: None, stream=stream)


def _faults(server: FakeProviderServer, job_id: str, timeout: float = 5.0) -> list[str | None]:
    """The fault of each call, once every call counted has been logged: the fake logs a call
    after writing its answer, so a client may read the answer a moment before the log has it."""
    deadline = time.monotonic() + timeout
    while True:
        faults = [record.fault for record in server.state.log if record.job_id == job_id]
        if len(faults) >= server.calls_for(job_id) or time.monotonic() > deadline:
            return faults
        time.sleep(0.01)


@pytest.mark.parametrize("stream", STREAMING)
async def test_a_transient_stream_error_on_the_first_call_then_a_clean_answer(
    provider: FakeProviderServer, stream: bool
) -> None:
    # Given a job whose first answer breaks with a 503 error event inside a 200
    client = _client(provider, stream)
    request = _request(f"job_stream_error_{stream}", "Hi [[tokens:6]] [[stream_error:503x1]]")
    # When the worker calls the provider, and calls again
    with pytest.raises(TransientProviderError) as first:
        await client.generate(request, 10)
    second = await client.generate(request, 10)
    # Then the first call is retryable as a 503, and the second is the whole answer
    assert (first.value.code, first.value.status_code) == (ErrorCode.PROVIDER_UNAVAILABLE, 503)
    assert (len(second.output.split()), second.finish_reason) == (6, "stop")
    # And the provider was called twice, the first answer broken
    assert provider.calls_for(request.job_id or "") == 2
    assert _faults(provider, request.job_id or "") == ["stream_error", None]


@pytest.mark.parametrize("stream", STREAMING)
async def test_a_permanent_stream_error_fails_with_its_code_after_one_call(
    provider: FakeProviderServer, stream: bool
) -> None:
    # Given a job whose answer breaks with context_length_exceeded inside a 200
    request = _request(f"job_too_long_{stream}", "Hi [[stream_error:400:context_length_exceeded]]")
    # When the worker calls the provider
    with pytest.raises(PermanentProviderError) as caught:
        await _client(provider, stream).generate(request, 10)
    # Then the job fails for good with that code, after one call
    assert caught.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert provider.calls_for(request.job_id or "") == 1


@pytest.mark.parametrize("stream", STREAMING)
async def test_a_cut_answer_is_transient_and_the_retry_gets_the_whole_answer(
    provider: FakeProviderServer, stream: bool
) -> None:
    # Given a job whose first answer's connection is closed half-way
    client = _client(provider, stream)
    request = _request(f"job_cut_{stream}", "Hi [[tokens:6]] [[stream_cut:x1]]")
    # When the worker calls the provider, and calls again
    expected = "stream ended before the generation finished" if stream else "answer was cut off"
    with pytest.raises(TransientProviderError, match=expected) as first:
        await client.generate(request, 10)
    second = await client.generate(request, 10)
    # Then the half answer was never a result; the retry got all of it
    assert first.value.code is ErrorCode.PROVIDER_ERROR
    assert (len(second.output.split()), second.finish_reason) == (6, "stop")
    assert provider.calls_for(request.job_id or "") == 2
    assert _faults(provider, request.job_id or "") == ["stream_cut", None]


@pytest.mark.parametrize("stream", STREAMING)
@pytest.mark.parametrize("reason", ["length", "content_filter"])
async def test_the_finish_reason_reaches_the_result_as_the_provider_said(
    provider: FakeProviderServer, stream: bool, reason: str
) -> None:
    # Given a provider that stops the answer for `reason`
    request = _request(f"job_finish_{reason}_{stream}", f"Hi [[tokens:4]] [[finish:{reason}]]")
    # When the worker calls it
    result: JobResult = await _client(provider, stream).generate(request, 10)
    # Then it is a result with that finish_reason, after one call
    assert (len(result.output.split()), result.finish_reason) == (4, reason)
    assert provider.calls_for(request.job_id or "") == 1


async def test_every_call_of_an_environment_shares_one_tls_context(
    provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a fresh environment (nothing verified yet) that counts CA bundle loads
    verified_context.cache_clear()
    loads: list[object] = []
    load = ssl.SSLContext.load_verify_locations

    def counted(context: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(context)
        load(context, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    # When it runs three jobs, each with its own client and connection
    client = _client(provider, stream=True)
    results = [await client.generate(_request(f"job_tls_{n}", "Hi [[tokens:2]]"), 10) for n in range(3)]
    # Then each got its answer from one call, and the CA bundle was loaded once, not per job
    assert [len(result.output.split()) for result in results] == [2, 2, 2]
    assert [provider.calls_for(f"job_tls_{n}") for n in range(3)] == [1, 1, 1]
    assert len(loads) == 1


@pytest.mark.parametrize("stream", STREAMING)
async def test_a_provider_that_never_answers_is_a_provider_timeout(
    provider: FakeProviderServer, stream: bool
) -> None:
    # Given a provider that received the request and never answers
    request = _request(f"job_hang_{stream}", "Hi [[hang]]")
    # When the call's deadline passes
    with pytest.raises(ProviderTimeout) as caught:
        await _client(provider, stream).generate(request, 0.5)
    # Then it is a provider timeout (it may still be generating), not a retryable error
    assert caught.value.code is ErrorCode.PROVIDER_TIMEOUT
    assert provider.calls_for(request.job_id or "") == 1


async def test_a_provider_nobody_listens_for_is_transient() -> None:
    # Given a loopback port nothing listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ChatCompletionsProvider(f"http://127.0.0.1:{port}/v1", lambda: None)
    # When the worker calls it, then the job is retried: nothing was sent
    with pytest.raises(TransientProviderError) as caught:
        await client.generate(_request("job_refused", "Hi"), 2)
    assert caught.value.code is ErrorCode.PROVIDER_UNAVAILABLE


async def _dropping_server(
    received: list[int], *, refuse_first: bool = False, read: bool = True, wait: float = 1.2
) -> tuple[asyncio.Server, str]:
    """A provider on 127.0.0.1 that reads the whole request (or nothing: `read` False), waits,
    then resets the connection without a word (a load balancer's idle timeout under a
    non-streamed generation). With `refuse_first`, it answers the connection's first request
    401 and keeps the connection for the next."""

    async def request(reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        received.append(1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if refuse_first:
            await request(reader)
            body = b'{"error": {"message": "bad key"}}'
            writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n")
            writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        if read:
            await request(reader)
        await asyncio.sleep(wait)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("retry_timeouts", [False, True])
@pytest.mark.parametrize("refuse_first", [False, True], ids=["first-call", "after-a-refused-key"])
async def test_a_connection_dropped_a_while_after_the_whole_request_went_out_is_a_provider_timeout(
    retry_timeouts: bool, refuse_first: bool
) -> None:
    # Given a provider that took the whole request, and a second later dropped the connection
    # unanswered (also the call made again with a new key, on the connection kept after a 401)
    received: list[int] = []
    server, url = await _dropping_server(received, refuse_first=refuse_first)
    keys = iter(["old", "new"])
    key = ProviderKey(lambda fresh: next(keys) if fresh or refuse_first else "old")
    async with server:
        provider = ChatCompletionsProvider(url, key, False, retry_timeouts=retry_timeouts)
        # When the job calls it
        with pytest.raises(ProviderError) as caught:
            await provider.generate(_request("job_dropped", "Hi"), 5)
    assert len(received) == (2 if refuse_first else 1)
    # Then it is treated as a timeout: the provider may be generating (and billing) it still,
    # so it is retried only when the operator chose to retry timeouts
    if retry_timeouts:
        assert isinstance(caught.value, TransientProviderError)
    else:
        assert isinstance(caught.value, ProviderTimeout)
        assert "billing" in caught.value.message


async def test_a_connection_reset_at_once_by_a_server_that_never_read_the_request_is_retried() -> None:
    # Given a provider restarting: it takes the connection and resets it unread, at once
    received: list[int] = []
    server, url = await _dropping_server(received, read=False, wait=0.05)
    async with server:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", False)
        # When the job calls it, then it is an ordinary retry: nothing was generated
        with pytest.raises(TransientProviderError):
            await provider.generate(_request("job_reset", "Hi"), 5)
    assert received == []


# ---- the provider key's lifecycle: set after deploy, rotated while workers hold it cached ----


class SecretReads:
    """Counts the GetSecretValue calls of the worker's Secrets Manager client."""

    def __init__(self, harness: Harness) -> None:
        self.count = 0
        client = harness.worker().secrets().client
        client.meta.events.register("provide-client-params.secrets-manager.GetSecretValue", self._count)

    def _count(self, **_: object) -> None:
        self.count += 1


@pytest.fixture
def keyed_harness(
    harness: Harness, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Harness]:
    """The worker reads its provider key from Secrets Manager (moto), as deployed; the fake
    provider answers 401 to any other key."""
    # The worker's secrets provider and its cache live in its module, imported afresh per harness
    secrets = aws.client("secretsmanager")
    arn = secrets.create_secret(Name="llmq-provider-key", SecretString="sk-first")["ARN"]
    monkeypatch.setenv("LLMQ_PROVIDER_SECRET_ID", arn)
    provider.state.api_key = "sk-first"
    yield harness


def _provider_statuses(provider: FakeProviderServer, job_id: str) -> list[int]:
    return [record.status for record in provider.state.log if record.job_id == job_id]


def test_a_key_rotated_within_the_cache_is_read_again_on_the_401_and_the_job_succeeds(
    keyed_harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a warm worker that holds the first key in its five-minute cache
    harness = keyed_harness
    first = harness.submit(prompt="before the rotation").body["id"]
    assert harness.drain("high") == {"batchItemFailures": []}
    reads = SecretReads(harness)
    # When the operator rotates the key, and the provider stops taking the old one
    aws.client("secretsmanager").put_secret_value(SecretId="llmq-provider-key", SecretString="sk-second")
    provider.state.api_key = "sk-second"
    second = harness.submit(prompt="after the rotation").body["id"]
    response = harness.drain("high")
    # Then the job succeeds on its first attempt: the 401 made the worker read the key again
    # at once, once, and call again with the new key
    assert response == {"batchItemFailures": []}
    job = harness.api("GET", f"/v1/jobs/{second}", tenant=ENTERPRISE).body
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    assert _provider_statuses(provider, second) == [401, 200]
    assert reads.count == 1
    assert _provider_statuses(provider, first) == [200]


def test_a_wrong_key_is_read_again_once_per_invocation_and_the_jobs_retry_later(
    keyed_harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a key the provider refuses (the operator has not set the real one yet)
    harness = keyed_harness
    provider.state.api_key = "sk-real"
    ids = [harness.submit(prompt=f"job {i}").body["id"] for i in range(3)]
    url = harness.stack.lane_queue_urls["high"]
    messages = harness.receive(url)
    harness.run_worker(url, messages)  # cold start: the cache is filled
    reads = SecretReads(harness)
    # When the next delivery of the three jobs runs in one invocation
    harness.let_backoffs_pass()
    for message in messages:
        # Visible again already, if the backoff ran out while the machine was slow
        with contextlib.suppress(harness.sqs.exceptions.MessageNotInflight):
            harness.sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
            )
    again: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(again) < len(ids) and time.monotonic() < deadline:
        again += harness.receive(url)
    response = harness.run_worker(url, again)
    # Then Secrets Manager was asked once for the three refusals, each job called the provider
    # once per delivery, and every job waits for a retry instead of failing
    assert len(response["batchItemFailures"]) == 3
    assert reads.count == 1
    assert [len(_provider_statuses(provider, job_id)) for job_id in ids] == [2, 2, 2]
    statuses = {harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body["status"] for job_id in ids}
    assert statuses == {"queued"}


def test_a_refused_key_is_retried_over_minutes_and_a_backlog_that_runs_out_may_be_sent_again(
    harness: Harness, provider: FakeProviderServer
) -> None:
    # Given a provider that refuses llmq's key (an operator rotated it badly)
    job_id = harness.submit(prompt="[[fail:401x99]]").body["id"]
    hidden: list[int] = []
    sqs = aws.client("sqs")

    def record(params: dict[str, Any], **_: Any) -> None:
        if int(params["VisibilityTimeout"]) > 0:  # (not the test's own skips of the backoff)
            hidden.append(int(params["VisibilityTimeout"]))

    sqs.meta.events.register("provide-client-params.sqs.ChangeMessageVisibility", record)
    url = harness.stack.lane_queue_urls["high"]
    try:
        # When the worker runs the job through its attempts (the backoffs skipped)
        for _ in range(harness.config.max_attempts):
            messages = harness.receive(url)
            response = harness.run_worker(url, messages)
            harness.let_backoffs_pass()
            for message in messages:
                if message["MessageId"] in {item["itemIdentifier"] for item in response["batchItemFailures"]}:
                    with contextlib.suppress(harness.sqs.exceptions.MessageNotInflight):
                        harness.sqs.change_message_visibility(
                            QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                        )
    finally:
        sqs.meta.events.unregister("provide-client-params.sqs.ChangeMessageVisibility", record)
    # Then each retry waited minutes, doubling, not seconds: the operator paged has time to
    # fix the key before the backlog's attempts run out
    floor = harness.config.retry.account_error_seconds
    assert [seconds >= floor * 2**n for n, seconds in enumerate(hidden)] == [True] * (
        harness.config.max_attempts - 1
    )
    # And a job whose attempts ran out says so in llmq's words, and that it may be sent again
    job = harness.api("GET", f"/v1/jobs/{job_id}", tenant=ENTERPRISE).body
    assert (job["status"], job["error"]["code"], job["error"]["retryable"]) == (
        "failed",
        "retries_exhausted",
        True,
    )
    assert "refused llmq's credentials" in job["error"]["message"]
    assert provider.calls_for(job_id) == harness.config.max_attempts


def test_each_refusal_of_llmqs_own_key_is_counted_at_once_for_its_alarm(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a provider that refuses llmq's key (401), and a job that succeeds beside it
    from llmq.telemetry import MetricName
    from tests.integration.harness import emitted_metrics

    harness.submit(prompt="[[fail:401x99]]")
    harness.submit(prompt="fine")
    capsys.readouterr()
    # When the worker runs them once
    harness.drain("high")
    # Then the refusal is counted on its first attempt, long before the job's attempts run out
    # (ProviderAccountRefused pages on the first), and the success counts nothing of the kind
    (refused,) = emitted_metrics(capsys.readouterr().out, MetricName.PROVIDER_ACCOUNT_REFUSED)
    assert refused[MetricName.PROVIDER_ACCOUNT_REFUSED] == [1.0]
    assert refused["service"]


def test_a_worker_refused_its_visibility_grant_counts_each_record_it_fails(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a worker whose role lost sqs:ChangeMessageVisibility (a change to its grants):
    # every record it asks to come back later fails with AccessDenied
    from botocore.exceptions import ClientError

    from llmq.telemetry import MetricName
    from tests.integration.harness import emitted_metrics

    def denied(**_: Any) -> None:
        error: Any = {"Error": {"Code": "AccessDenied", "Message": "not authorized"}}
        raise ClientError(error, "ChangeMessageVisibility")

    harness.submit(prompt="[[fail:503x1]]")
    capsys.readouterr()
    sqs = aws.client("sqs")
    sqs.meta.events.register("before-call.sqs.ChangeMessageVisibility", denied, unique_id="test-denied")
    try:
        # When the worker runs it (the provider answers 503 once: the record asks to retry later)
        response = harness.drain("high")
    finally:
        sqs.meta.events.unregister("before-call.sqs.ChangeMessageVisibility", unique_id="test-denied")
    # Then the record failed, and it is counted for Lane<Name>RecordsFailing (it now comes back
    # only after the lane's visibility timeout, which nothing else would show for half an hour)
    assert len(response["batchItemFailures"]) == 1
    (counted,) = emitted_metrics(capsys.readouterr().out, MetricName.RECORD_FAILED)
    assert counted["queue"] == harness.stack.lane_queue_urls["high"].rsplit("/", 1)[-1]
