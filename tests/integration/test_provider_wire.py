"""What real OpenAI-compatible servers send (gateways' heartbeats, vLLM's and Gemini's error
shapes, rate-limit headers, moderation refusals), byte for byte over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from llmq.models import ChatMessage, ErrorCode, GenerationParams
from llmq.providers import (
    Answer,
    ChatCompletionsProvider,
    GenerationRequest,
    PermanentProviderError,
    ProviderError,
    ProviderKey,
    ProviderTimeout,
    TransientProviderError,
)

REQUEST = GenerationRequest(
    model="m",
    messages=[ChatMessage(role="user", content="hi")],
    params=GenerationParams(max_tokens=5),
    job_id="job_wire",
)


@asynccontextmanager
async def _server(
    script: list[bytes | float | str],
    seen: list[bytes] | None = None,
    later: list[bytes | float | str] | None = None,
) -> AsyncIterator[str]:
    """A loopback HTTP/1.1 server: reads a request, then writes `script` (bytes are sent,
    floats are pauses, "HANG" waits forever), then closes; `later`, to the requests after the
    first."""
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = await reader.read(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                body += await reader.read(65536)
            if seen is not None:
                seen.append(head)
            nonlocal requests
            requests += 1
            for item in script if requests == 1 or later is None else later:
                if item == "HANG":
                    await asyncio.sleep(3600)
                elif isinstance(item, float):
                    await asyncio.sleep(item)
                elif isinstance(item, bytes):
                    writer.write(item)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _event(chunk: dict | str) -> bytes:
    return b"data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk)).encode() + b"\n\n"


def _delta(text: str, finish_reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}]}


def _error_answer(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


async def test_an_empty_data_keep_alive_mid_stream_is_ignored_as_sse_says_not_a_malformed_answer() -> None:
    # A gateway's heartbeat while the model is slow: `data:` with nothing, then the blank line.
    # WHATWG SSE: an event whose data buffer is empty is not dispatched. Taken for a malformed
    # answer, the paid generation would be abandoned and paid for again, on every attempt.
    body = (
        _event(_delta("Hel"))
        + b"data:\n\n"
        + _event(_delta("lo"))
        + _event(_delta("", "stop"))
        + _event("[DONE]")
    )
    async with _server([_sse_head(), _chunked(body), _chunked(b"")]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        result = await provider.generate(REQUEST, 5)
    assert result.output == "Hello"


async def test_the_key_read_counts_against_the_calls_time() -> None:
    # The key store's read (Secrets Manager: botocore's 3 tries of 3 s + 10 s) counts against
    # the call's time, or a call could outlast the worker's write-back reserve and the Lambda.
    def slow_key() -> str:
        time.sleep(1.5)
        return "sk-test"

    async with _server([_sse_head(), "HANG"]) as url:
        provider = ChatCompletionsProvider(url, slow_key, stream=True)
        started = time.monotonic()
        with pytest.raises(ProviderError):
            await provider.generate(REQUEST, 1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 1.4, f"a 1.0 s call took {elapsed:.1f} s"


@pytest.mark.parametrize(
    "body",
    [
        # vLLM's ErrorResponse (before 0.10): the error's fields at the top level.
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        # Gemini's OpenAI-compatible endpoint answers its errors as a JSON list.
        [
            {
                "error": {
                    "code": 400,
                    "message": "This model's maximum context length is 4096 tokens.",
                    "status": "INVALID_ARGUMENT",
                }
            }
        ],
    ],
    ids=["vllm-top-level", "gemini-list"],
)
async def test_an_http_errors_message_is_kept_in_the_shapes_real_servers_send(body: object) -> None:
    # The job fails at once, saying why: a prompt over the context, not just "provider answered 400".
    async with _server([_error_answer(400, json.dumps(body).encode())]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(ProviderError) as raised:
            await provider.generate(REQUEST, 5)
    assert "maximum context length" in raised.value.message, raised.value.message


@pytest.mark.parametrize(
    "extra, body",
    [
        # OpenAI: no Retry-After on many 429s, only its rate-limit reset headers (Go durations).
        (
            b"x-ratelimit-reset-requests: 6m0s\r\nx-ratelimit-remaining-requests: 0\r\n",
            {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
        ),
        # Gemini: the wait is in the body's RetryInfo.
        (
            b"",
            [
                {
                    "error": {
                        "code": 429,
                        "message": "Resource exhausted",
                        "status": "RESOURCE_EXHAUSTED",
                        "details": [
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}
                        ],
                    }
                }
            ],
        ),
    ],
    ids=["openai-reset-header", "gemini-retry-info"],
)
async def test_a_429s_stated_wait_is_honoured_when_it_is_not_a_retry_after(
    extra: bytes, body: object
) -> None:
    # Without it the job's attempts (backoff 1-2 s, then 2-4 s) would all be spent within a
    # per-minute limit, and the job would fail retries_exhausted though waiting would do.
    async with _server([_error_answer(429, json.dumps(body).encode(), extra)]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(TransientProviderError) as raised:
            await provider.generate(REQUEST, 5)
    assert raised.value.retry_after is not None and raised.value.retry_after >= 30


async def test_a_provider_key_with_a_trailing_newline_is_sent_without_it() -> None:
    # A secret stored from a file or the console often ends with a newline, which as a header
    # is refused before anything is sent: every job would fail as if the provider were down.
    seen: list[bytes] = []
    body = _event(_delta("ok", "stop")) + _event("[DONE]")
    async with _server([_sse_head(), _chunked(body), _chunked(b"")], seen) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test\n", stream=True)
        result = await provider.generate(REQUEST, 5)
    assert result.output == "ok"
    assert b"authorization: Bearer sk-test\r\n" in seen[0] + b"\r\n"


async def test_a_403_that_refuses_the_prompt_for_moderation_fails_it_as_content_filtered() -> None:
    # OpenRouter's moderated models answer a flagged prompt with 403 (its metadata gives the
    # reasons). DESIGN §3.4: a content-policy refusal fails at once and is never retried; it
    # is not a refused key.
    body = {
        "error": {
            "code": 403,
            "message": 'openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for "harassment".',
            "metadata": {"reasons": ["harassment"], "provider_name": "OpenAI", "model_slug": "openai/gpt-4o"},
        }
    }
    async with _server([_error_answer(403, json.dumps(body).encode())]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(ProviderError) as raised:
            await provider.generate(REQUEST, 5)
    assert type(raised.value).__name__ == "PermanentProviderError", type(raised.value).__name__
    assert raised.value.code.value == "content_filtered"


def _whole_then(keep_alive: bytes, count: int) -> list[bytes | float | str]:
    """The answer's text, then its finish_reason alone (a whole answer), then the upstream stalls
    (no usage chunk, no [DONE]) while the gateway keeps the connection alive."""
    script: list[bytes | float | str] = [
        _sse_head(),
        _chunked(_event(_delta("Hello")) + _event(_delta("", "stop"))),
    ]
    for _ in range(count):
        script += [0.5, _chunked(keep_alive)]
    return [*script, "HANG"]


@pytest.mark.parametrize("keep_alive", [b": keep-alive\n\n", b"data:\n\n"], ids=["comment", "empty data"])
async def test_a_whole_answer_is_not_held_open_by_keep_alives(keep_alive: bytes) -> None:
    # Given a whole answer whose trailer never comes, while the gateway sends keep-alives
    async with _server(_whole_then(keep_alive, 40)) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        started = time.monotonic()
        result = await provider.generate(REQUEST, 8.0)
        elapsed = time.monotonic() - started
    # Then the paid answer is returned after the trailer's short wait, not at the deadline (a
    # cancel meanwhile would have thrown it away), an empty `data:` no more a sign of life
    # than a comment
    assert result.output == "Hello"
    assert elapsed < 4.0, f"held {elapsed:.1f} s"


async def test_a_key_read_that_took_the_calls_time_sends_nothing() -> None:
    # Given a key store slow enough to take most of the call's time (Secrets Manager retried)
    def slow_key() -> str:
        time.sleep(0.7)
        return "sk-test"

    seen: list[bytes] = []
    body = _event(_delta("ok", "stop")) + _event("[DONE]")
    async with _server([_sse_head(), _chunked(body), _chunked(b"")], seen) as url:
        provider = ChatCompletionsProvider(url, slow_key, stream=True)
        with pytest.raises(TransientProviderError) as raised:
            await provider.generate(REQUEST, 1.0)
    # Then nothing is sent into the sliver left (it would be cut off, billed, and fail as a
    # provider_timeout, not retried): a transient failure, which costs nothing
    assert seen == []
    assert "was not sent" in raised.value.message


async def test_a_403_model_not_found_fails_at_once_as_the_requests_own() -> None:
    # OpenAI answers a model the project may not use with 403 `model_not_found`
    body = {
        "error": {
            "message": "Project `proj_9KoeXdtHe0YQJbsF2FQAKmzl` does not have access to model `gpt-4o-mini`",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
    }
    async with _server([_error_answer(403, json.dumps(body).encode())]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(PermanentProviderError) as raised:
            await provider.generate(REQUEST, 5)
    # And it is told in llmq's words: the provider's text names the operator's project
    assert raised.value.code.value == "model_not_found"
    assert "proj_" not in raised.value.message and "model_not_found" in raised.value.message


@pytest.mark.parametrize(("status", "level"), [(401, "WARNING"), (429, "INFO")])
async def test_an_account_error_is_logged_once_a_rate_limit_as_a_note(
    status: int, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    code = "invalid_api_key" if status == 401 else "rate_limit_exceeded"
    body = {"error": {"message": "said by the provider", "code": code}}
    with caplog.at_level("INFO"):
        async with _server([_error_answer(status, json.dumps(body).encode(), b"retry-after: 3\r\n")]) as url:
            provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
            with pytest.raises(TransientProviderError):
                # (a 401 is read again once with the same key: no second call)
                await provider.generate(REQUEST, 5)
    # Then the operator's log has what the provider said, once per answer: a warning for a
    # refused account, a note for an ordinary rate limit (a storm of them pages nobody)
    said = [record for record in caplog.records if getattr(record, "provider_message", None)]
    assert [(record.levelname, record.__dict__["provider_message"]) for record in said] == [
        (level, "said by the provider")
    ]


# A key with no prefix `_KEY_LIKE` knows, too short for its long-token rule (a vLLM --api-key, a
# LiteLLM virtual key), and the request's text, which a provider's message may echo.
SHORT_KEY = "vllm-Op3rat0rKey"
PROMPT = "the tenant's confidential prompt, word for word"
ECHOED = GenerationRequest(
    model="m",
    messages=[ChatMessage(role="user", content=PROMPT)],
    params=GenerationParams(max_tokens=5),
    job_id="job_echoed",
)


@pytest.mark.parametrize("status", [500, 502, 400, 422])
@pytest.mark.parametrize("quoted", ["whole", "cut-short"])
async def test_a_provider_error_quoting_the_key_never_puts_it_in_the_jobs_error(
    status: int, quoted: str
) -> None:
    # Given a provider (or a proxy before it) whose error quotes the request's Authorization,
    # whole or cut at the proxy's own length limit
    key = SHORT_KEY if quoted == "whole" else SHORT_KEY[:12]
    body = {"error": {"message": f"upstream refused the request with authorization: Bearer {key}"}}
    async with _server([_error_answer(status, json.dumps(body).encode())]) as url:
        provider = ChatCompletionsProvider(url, lambda: SHORT_KEY, stream=True)
        with pytest.raises(ProviderError) as raised:
            await provider.generate(ECHOED, 5)
    # Then the error the job keeps, which its tenant reads (GET, the webhook), says what the
    # provider said without the operator's key (hunt 325: word for word)
    assert SHORT_KEY[:6] not in raised.value.message and SHORT_KEY[:6] not in str(raised.value)
    assert "upstream refused the request" in raised.value.message


@pytest.mark.parametrize("status", [401, 429, 403])
@pytest.mark.parametrize("echo", ["whole", "cut-short", "as-json"])
async def test_an_account_error_echoing_the_key_and_the_input_logs_neither(
    status: int, echo: str, caplog: pytest.LogCaptureFixture
) -> None:
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded", 403: "model_not_found"}[status]
    echoed = {"whole": PROMPT, "cut-short": PROMPT[:30] + "...", "as-json": json.dumps({"content": PROMPT})}[
        echo
    ]
    body = {"error": {"message": f"refused key {SHORT_KEY} for the input: {echoed}", "code": code}}
    with caplog.at_level("INFO"):
        async with _server([_error_answer(status, json.dumps(body).encode())]) as url:
            provider = ChatCompletionsProvider(url, lambda: SHORT_KEY, stream=True)
            with pytest.raises(ProviderError):
                await provider.generate(ECHOED, 5)
    # Then the operator's log keeps what the provider said, without the key or the prompt
    # (hunt 325: `_KEY_LIKE` knew neither)
    said = [
        str(record.__dict__["provider_message"])
        for record in caplog.records
        if getattr(record, "provider_message", None)
    ]
    assert said and all(message == "[withheld: it quotes the request]" for message in said), said
    assert not any(
        SHORT_KEY in str(record.__dict__) or PROMPT in str(record.__dict__) for record in caplog.records
    )


async def test_a_key_given_back_as_the_errors_code_is_in_neither_the_jobs_error_nor_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = {"error": {"message": "refused", "code": SHORT_KEY}}
    with caplog.at_level("INFO"):
        async with _server([_error_answer(401, json.dumps(body).encode())]) as url:
            provider = ChatCompletionsProvider(url, lambda: SHORT_KEY, stream=True)
            with pytest.raises(TransientProviderError) as raised:
                await provider.generate(ECHOED, 5)
    # (code names are lower-cased: the key is cut out in any case; review 280)
    assert SHORT_KEY.lower() not in raised.value.message.lower()
    assert not any(SHORT_KEY.lower() in str(record.__dict__).lower() for record in caplog.records)


async def test_a_fresh_key_read_after_a_401_that_took_the_calls_time_sends_nothing_more() -> None:
    # Given a rotated key: the cached one is refused (401), and the fresh read from the key
    # store is slow (Secrets Manager retried), taking most of the call's time
    def read(fresh: bool) -> str:
        if fresh:
            time.sleep(0.7)
            return "sk-new"
        return "sk-old"

    refused = json.dumps(
        {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
    ).encode()
    seen: list[bytes] = []
    answer: list[bytes | float | str] = [_sse_head(), _chunked(_event(_delta("Hel"))), "HANG"]
    async with _server([_error_answer(401, refused)], seen, later=answer) as url:
        provider = ChatCompletionsProvider(url, ProviderKey(read), stream=True)
        with pytest.raises(TransientProviderError) as raised:
            await provider.generate(REQUEST, 1.0)
    # Then, as for the first read, nothing is sent into the sliver left (it would be cut off,
    # billed, and fail as provider_timeout): a plain transient failure, retried with the new key
    # (no refusal of llmq's account, which would wait minutes)
    assert len(seen) == 1
    assert not raised.value.about_account and "not sent again" in raised.value.message


async def test_a_whole_answer_is_kept_when_the_loop_is_late_at_the_calls_deadline() -> None:
    """Hunt 228: whole, only its trailer awaited, the answer was lost to the call's deadline
    when another job of the batch held the event loop across the trailer wait's margin: both
    timers fired together and the call's won, failing a paid answer as provider_timeout."""
    # Given a whole answer whose trailer never comes
    script: list[bytes | float | str] = [
        _sse_head(),
        _chunked(_event(_delta("Hello"))),
        _chunked(_event(_delta("", "stop"))),
        "HANG",
    ]
    async with _server(script) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        began = time.monotonic()

        async def neighbour() -> None:
            # (the batch's other work, holding the loop over the call's last half second)
            await asyncio.sleep(1.5)
            time.sleep(max(0.0, began + 2.3 - time.monotonic()))

        held = asyncio.create_task(neighbour())
        # When the call's deadline passes while the loop is held
        request = dataclasses.replace(REQUEST, answer=Answer())
        result = await provider.generate(request, 2.0)
        await held
    # Then the paid answer is returned, not a timeout
    assert result.output == "Hello"


_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "the whole answer"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3},
    }
).encode()


def _head(content_type: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("after", ["cut", "stall"])
@pytest.mark.parametrize(
    ("stream", "content_type", "body"),
    [
        (False, b"application/json", _COMPLETION),
        (True, b"text/event-stream", _COMPLETION),
        (True, b"application/json", _event(_delta("the whole answer")) + _event(_delta("", "stop"))),
    ],
    ids=["a completion", "a completion labelled a stream", "a stream labelled json"],
)
async def test_a_whole_answer_whose_connection_is_cut_or_stalls_after_it_is_kept(
    stream: bool, content_type: bytes, body: bytes, after: str
) -> None:
    # Given a whole answer, paid for, whose connection is then cut before the chunked
    # encoding's end, or left open (a proxy closing early, a server that never finishes)
    end: list[bytes | float | str] = [0.2] if after == "cut" else ["HANG"]
    async with _server([_head(content_type), _chunked(body), *end]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=stream)
        started = time.monotonic()
        result = await provider.generate(REQUEST, 8.0)
    # Then the answer is kept, and at once (hunt 272: read to the body's end, a cut was retried,
    # paying again, and a stall failed the job as a provider_timeout with the answer lost)
    assert (result.output, result.finish_reason) == ("the whole answer", "stop")
    assert time.monotonic() - started < 6.0


async def test_a_completion_cut_before_its_end_is_an_answer_cut_off() -> None:
    async with _server([_head(b"application/json"), _chunked(_COMPLETION[:-20]), 0.2]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=False)
        with pytest.raises(TransientProviderError) as raised:
            await provider.generate(REQUEST, 5.0)
    assert "cut off" in raised.value.message


# ---- what real servers and proxies answer (hunt 297) ----------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "key_refused"),
    [
        # LiteLLM's proxy, its key or team over budget
        (
            400,
            {
                "error": {
                    "message": "Budget has been exceeded! Current cost: 14.27, Max budget: 100.0",
                    "type": "budget_exceeded",
                    "code": "400",
                }
            },
            False,
        ),
        # Google's OpenAI-compatible endpoint, a bad key
        (
            400,
            [
                {
                    "error": {
                        "code": 400,
                        "message": "API key not valid.",
                        "status": "INVALID_ARGUMENT",
                        "details": [
                            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
                        ],
                    }
                }
            ],
            True,
        ),
    ],
    ids=["litellm-budget", "gemini-key"],
)
async def test_an_account_refusal_answered_400_is_llmqs_account_not_the_requests(
    status: int, body: object, key_refused: bool
) -> None:
    answer = _error_answer(status, json.dumps(body).encode())
    async with _server([answer], later=[answer]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(ProviderError) as raised:
            await provider.generate(REQUEST, 5)
    # Retried minutes apart, the operator paged, never the job failed for good as the client's
    # (hunt 297: invalid_request, not retryable, the operator's spend quoted to the tenant)
    error = raised.value
    assert isinstance(error, TransientProviderError) and error.about_account
    assert error.key_refused is key_refused
    assert "Current cost" not in error.message


@pytest.mark.parametrize("key", ["sk-abc\u200b", "\u201csk-abc\u201d", "sk-abc\u2026"])
async def test_a_key_no_header_can_carry_is_the_operators_to_fix_and_sends_nothing(key: str) -> None:
    async with _server([]) as url:
        provider = ChatCompletionsProvider(url, lambda: key, stream=True)
        with pytest.raises(TransientProviderError) as raised:
            await provider.generate(REQUEST, 5)
    # (hunt 297: httpx's refusal escaped as an unreadable answer, the backlog failed in seconds)
    assert raised.value.about_account and "header" in raised.value.message


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 301 Moved\r\nlocation: https://api.example.com/v1/chat/completions\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 405 Not Allowed\r\ncontent-type: text/html\r\ncontent-length: 22\r\n\r\n<html>405 nginx</html>",
        _error_answer(400, b"<html><title>400 The plain HTTP request was sent to HTTPS port</title></html>"),
    ],
    ids=["redirect", "405", "html-400"],
)
async def test_a_base_url_that_is_wrong_is_the_operators_to_fix(answer: bytes) -> None:
    async with _server([answer]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(ProviderError) as raised:
            await provider.generate(REQUEST, 5)
    # (hunt 297: a redirect spent the attempts seconds apart; a proxy's HTML 400 or 405 failed
    # the backlog for good as the client's invalid request)
    assert isinstance(raised.value, TransientProviderError) and raised.value.about_account
    assert "provider.base_url" in raised.value.message


async def test_openrouters_429_reset_is_waited_for() -> None:
    reset_ms = int((time.time() + 40) * 1000)
    body = {
        "error": {
            "message": "Rate limit exceeded: free-models-per-min.",
            "code": 429,
            "metadata": {"headers": {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset_ms)}},
        }
    }
    extra = b"x-ratelimit-remaining: 0\r\nx-ratelimit-reset: %d\r\n" % reset_ms
    async with _server([_error_answer(429, json.dumps(body).encode(), extra)]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(TransientProviderError) as raised:
            await provider.generate(REQUEST, 5)
    # (hunt 297: not read, the attempts were spent 2 and 4 s apart inside the limit's minute)
    assert raised.value.retry_after is not None and 30 <= raised.value.retry_after <= 41


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            400,
            {
                "object": "error",
                "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
                "type": "BadRequestError",
                "code": 400,
            },
        ),
        (
            422,
            {
                "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4090",
                "error_type": "validation",
            },
        ),
    ],
    ids=["vllm", "tgi"],
)
async def test_a_prompt_past_the_context_said_in_words_is_context_length_exceeded(
    status: int, body: dict
) -> None:
    async with _server([_error_answer(status, json.dumps(body).encode())]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        with pytest.raises(PermanentProviderError) as raised:
            await provider.generate(REQUEST, 5)
    # (hunt 297: invalid_request, which a client truncating on context_length_exceeded never saw)
    assert raised.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED


# ---- an answer that never began: a generation that may still run, and bill (hunt 303) ----------

_JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"


def _keep_alives(piece: bytes, seconds: float = 1.6) -> list[bytes | float]:
    """`piece` every 0.4 s for `seconds`: OpenRouter's whitespace, or SSE comments."""
    out: list[bytes | float] = []
    for _ in range(int(seconds / 0.4)):
        out += [_chunked(piece), 0.4]
    return out


async def _failure(script: list, *, stream: bool, retry_timeouts: bool = False) -> ProviderError:
    async with _server(script) as url:
        provider = ChatCompletionsProvider(
            url, lambda: "sk-test", stream=stream, retry_timeouts=retry_timeouts
        )
        with pytest.raises(ProviderError) as raised:
            await provider.generate(REQUEST, 10)
    return raised.value


@pytest.mark.parametrize("code", [504, 408])
@pytest.mark.parametrize("stream", [False, True], ids=["whitespace", "sse-comments"])
async def test_a_gateways_timeout_said_in_band_after_keep_alives_is_a_timeout(
    code: int, stream: bool
) -> None:
    # Given OpenRouter's way: 200 once a model starts, keep-alives, then the upstream's timeout
    # in the body (review 269: retried as a 5xx, each retry a new paid generation)
    error = json.dumps({"error": {"code": code, "message": "upstream timed out"}}).encode()
    script = (
        [_sse_head(), *_keep_alives(b": OPENROUTER PROCESSING\n\n"), _chunked(b"data: " + error + b"\n\n")]
        if stream
        else [_JSON_HEAD, *_keep_alives(b" \n"), _chunked(error)]
    )
    failure = await _failure([*script, _chunked(b"")], stream=stream)
    # Then it is a timeout, not retried unless the operator says so
    assert isinstance(failure, ProviderTimeout), repr(failure)


@pytest.mark.parametrize(
    "first",
    [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [], "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]},
    ],
    ids=["role-only", "azure-prompt-filter"],
)
async def test_a_stream_cut_after_a_chunk_with_no_answer_is_a_cut_before_the_answer(first: dict) -> None:
    # Given a first chunk that carries no answer (sent before the first token), keep-alives, a cut
    script = [_sse_head(), _chunked(_event(first)), *_keep_alives(b": ka\n\n")]
    failure = await _failure(script, stream=True)
    assert isinstance(failure, ProviderTimeout), repr(failure)


@pytest.mark.parametrize("stream", [False, True], ids=["whitespace", "sse-comments"])
async def test_keep_alives_then_a_clean_end_are_no_answer_either(stream: bool) -> None:
    script = [
        _sse_head() if stream else _JSON_HEAD,
        *_keep_alives(b": ka\n\n" if stream else b" "),
        _chunked(b""),
    ]
    failure = await _failure(script, stream=stream)
    assert isinstance(failure, ProviderTimeout), repr(failure)


async def test_a_held_504_retried_by_the_operators_choice_keeps_its_retry_after() -> None:
    # Given provider.retry_timeouts, and a gateway's 504 with Retry-After after holding the request
    head = b"HTTP/1.1 504 Gateway Timeout\r\nretry-after: 30\r\ncontent-length: 0\r\n\r\n"
    failure = await _failure([1.5, head], stream=False, retry_timeouts=True)
    # Then it is retried as a 503 is: not sooner than it says
    assert isinstance(failure, TransientProviderError)
    assert (failure.retry_after, failure.status_code) == (30, 504)


async def test_a_gateways_timeout_said_in_band_at_once_is_retried_as_a_5xx() -> None:
    error = json.dumps({"error": {"code": 504, "message": "upstream timed out"}}).encode()
    failure = await _failure([_JSON_HEAD, _chunked(error), _chunked(b"")], stream=False)
    assert isinstance(failure, TransientProviderError) and failure.status_code == 504, repr(failure)


_ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


@pytest.mark.parametrize("pause", [0.0, 1.2], ids=["at-once", "later"])
async def test_an_empty_answer_ended_by_done_where_done_ends_the_answer_is_kept(pause: float) -> None:
    # (review 270: no text, so "no answer began", failed a whole, paid, empty answer)
    script = [_sse_head(), _chunked(_event(_ROLE)), pause, _chunked(_event("[DONE]")), _chunked(b"")]
    async with _server(script) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True, done_ends_answer=True)
        result = await provider.generate(REQUEST, 10)
    assert result.output == ""


@pytest.mark.parametrize(
    "delta",
    [{"reasoning_content": "Let me think"}, {"reasoning": "Let me think"}, {"refusal": "I cannot"}],
    ids=["deepseek-vllm", "openrouter", "refusal"],
)
async def test_a_stream_cut_while_the_model_streams_tokens_other_than_text_is_a_cut_answer(
    delta: dict,
) -> None:
    # Given a generation under way in tokens that are not the answer's text (a reasoning
    # model's thinking), cut (review 270: taken for a cut before any answer, and failed)
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    script = [
        _sse_head(),
        _chunked(_event(_ROLE)),
        *[piece for _ in range(3) for piece in (_chunked(_event(chunk)), 0.4)],
    ]
    failure = await _failure(script, stream=True)
    # Then it is an answer cut part way, retried as ever
    assert type(failure) is TransientProviderError, repr(failure)


@pytest.mark.parametrize(
    "before",
    [
        [_chunked(_event(_ROLE)), 1.2],
        _keep_alives(b": OPENROUTER PROCESSING\n\n"),
        [_chunked(_event(_ROLE)), *_keep_alives(b": ping\n\n")],
    ],
    ids=["role", "sse-comments", "role-and-comments"],
)
async def test_done_after_nothing_of_the_answer_a_while_is_a_timeout(before: list) -> None:
    # ([DONE] is a gateway ending the stream, whether or not the model behind it gave up: as a
    # clean end or a cut after the same, review 271)
    script = [_sse_head(), *before, _chunked(_event("[DONE]")), _chunked(b"")]
    failure = await _failure(script, stream=True)
    assert isinstance(failure, ProviderTimeout), repr(failure)


async def test_done_at_once_after_nothing_of_the_answer_is_retried() -> None:
    script = [_sse_head(), _chunked(_event(_ROLE)), _chunked(_event("[DONE]")), _chunked(b"")]
    failure = await _failure(script, stream=True)
    assert type(failure) is TransientProviderError, repr(failure)


@pytest.mark.parametrize(
    "delta",
    [
        {"role": "assistant", "context": {"citations": [{"content": "doc"}], "intent": '["q"]'}},
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
        {"role": "assistant", "content": None, "tool_calls": [], "function_call": None, "refusal": None},
    ],
    ids=["azure-on-your-data-context", "empty-text-part", "nulls"],
)
async def test_a_cut_after_a_first_chunk_of_metadata_a_while_is_a_timeout(delta: dict) -> None:
    # (review 271: metadata a server sends before the first token is not the generation)
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    script = [_sse_head(), _chunked(_event(chunk)), *_keep_alives(b": ping\n\n")]
    failure = await _failure(script, stream=True)
    assert isinstance(failure, ProviderTimeout), repr(failure)


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"], ids=["crlf", "cr"])
async def test_a_whole_answer_cut_right_after_its_finish_lines_cr_is_kept(eol: bytes) -> None:
    # Given a stream with CR LF (or CR) line ends, cut after the CR that ends its finish line
    # (hunt 306: the line waited for an LF that never came, and the paid answer was retried)
    body = b"".join(
        b"data: " + json.dumps(chunk).encode() + eol + eol
        for chunk in (_ROLE, _delta("Hello"), _delta("", "stop"))
    )
    cut = body.rindex(b'"stop"}]}') + len(b'"stop"}]}') + 1
    async with _server([_sse_head(), _chunked(body[:cut]), 0.2]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("Hello", "stop")


@pytest.mark.parametrize(
    "field", [b"id: %d\n", b"event: message\n", b"retry: 3000\n"], ids=["id", "event", "retry"]
)
async def test_a_stream_labelled_json_whose_events_open_with_another_field_is_read_as_a_stream(
    field: bytes,
) -> None:
    # (hunt 306: read as one malformed JSON body, at every call, each paid for)
    chunks = [_delta("Hello"), _delta(" world"), _delta("", "stop"), "[DONE]"]
    body = b"".join(
        (field % n if b"%d" in field else field) + _event(chunk) for n, chunk in enumerate(chunks)
    )
    async with _server([_head(b"application/json"), _chunked(body), _chunked(b"")]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("Hello world", "stop")


# ---- answers with no text, and more than one choice (hunt 332) -------------------------------


def _choice(delta: dict, finish_reason: str | None = None, index: int = 0) -> dict:
    return {"choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}


@pytest.mark.parametrize(
    "tokens",
    [
        [_choice({"reasoning_content": f"step {n} "}) for n in range(5)],
        [_choice({"reasoning": "thinking about it"})],
        [_choice({"content": "Hi"})],
    ],
    ids=["reasoning_content", "reasoning", "text"],
)
async def test_a_finished_answer_of_any_tokens_cut_before_its_trailer_is_kept(tokens: list[dict]) -> None:
    # Given a reasoning model that spent max_tokens thinking: its stream finishes (length) with
    # no text, alone, then the connection is cut before the usage chunk and [DONE]
    role = _choice({"role": "assistant", "content": None})
    body = b"".join(_event(chunk) for chunk in [role, *tokens, _choice({}, "length")])
    answer = Answer()
    request = dataclasses.replace(REQUEST, answer=answer)
    async with _server([_sse_head(), _chunked(body), 0.2]) as url:
        provider = ChatCompletionsProvider(url, lambda: "sk-test", stream=True)
        result = await provider.generate(request, 8.0)
    # Then the paid answer is kept as it is, as a text answer's is (hunt 332: retried as a cut
    # stream, paid for three times, and the job failed retries_exhausted), and marked whole, so
    # a cancel at that moment keeps it too
    assert result.finish_reason == "length" and answer.whole
    assert result.output == ("Hi" if tokens[0]["choices"][0]["delta"].get("content") else "")


async def test_only_the_first_choice_is_the_answer_whatever_a_server_interleaves() -> None:
    # Given a gateway that ignores n=1 and streams a second choice between the first's chunks
    chunks = [
        _choice({"content": text}, index=index)
        for pair in [("The", "A"), (" cat", " dog")]
        for index, text in enumerate(pair)
    ]
    whole = [*chunks, _choice({"content": " sat"}), _choice({}, "stop", index=1), _choice({}, "stop")]
    async with _server(
        [_sse_head(), _chunked(b"".join(map(_event, whole)) + _event("[DONE]")), _chunked(b"")]
    ) as url:
        result = await ChatCompletionsProvider(url, lambda: "sk-test", stream=True).generate(REQUEST, 8.0)
    # Then the output is the first choice's alone (hunt 332: "TheA cat dog sat")
    assert (result.output, result.finish_reason) == ("The cat sat", "stop")
    # And the second's finish never makes the first's cut answer whole
    cut = [*chunks, _choice({}, "stop", index=1)]
    async with _server([_sse_head(), _chunked(b"".join(map(_event, cut))), 0.2]) as url:
        with pytest.raises(TransientProviderError):
            await ChatCompletionsProvider(url, lambda: "sk-test", stream=True).generate(REQUEST, 8.0)


@pytest.mark.parametrize("status", [429, 503, 529])
async def test_a_refusal_answered_at_once_is_unbilled_and_one_after_a_held_request_is_not(
    status: int,
) -> None:
    body = json.dumps(
        {"error": {"message": "upstream connect error or disconnect/reset before headers"}}
    ).encode()
    # Given a provider that refuses at once, and a gateway that answers the same after holding
    # the whole request a while (the model behind it crashed mid-generation)
    async with (
        _server([_error_answer(status, body)]) as at_once,
        _server([2.5, _error_answer(status, body)]) as held,
    ):
        provider = ChatCompletionsProvider(at_once, lambda: "sk-test", stream=False)
        with pytest.raises(TransientProviderError) as refused:
            await provider.generate(REQUEST, 10.0)
        provider = ChatCompletionsProvider(held, lambda: "sk-test", stream=False)
        with pytest.raises(TransientProviderError) as late:
            await provider.generate(REQUEST, 10.0)
    # Then only the first is a refusal whose attempt is refunded: the second may have been
    # generating, and paid for (review 285: refunded too, a job was called 13 times, not 3)
    assert (refused.value.refused, late.value.refused) == (True, False)
