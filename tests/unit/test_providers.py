"""Failure classification and answer parsing, with httpx's in-memory MockTransport."""

from __future__ import annotations

import json

import httpx
import pytest

from llmq.models import ChatMessage, ErrorCode, GenerationParams
from llmq.providers import (
    ChatCompletionsProvider,
    GenerationRequest,
    PermanentProviderError,
    TransientProviderError,
)

REQUEST = GenerationRequest(
    model="m",
    messages=[ChatMessage(role="user", content="hi")],
    params=GenerationParams(max_tokens=5),
    job_id="job_x",
)


def _provider(handler, stream: bool = False) -> ChatCompletionsProvider:
    return ChatCompletionsProvider(
        "http://provider.test/v1", lambda: "sk-test", stream, httpx.MockTransport(handler)
    )


async def test_a_completion_is_parsed_and_the_request_carries_params_and_key() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"content": "hello"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            },
        )

    result = await _provider(answer).generate(REQUEST, 5)
    assert (result.output, result.finish_reason, result.usage.output_tokens) == ("hello", "stop", 1)
    body = json.loads(seen[0].content)
    assert body["max_tokens"] == 5 and body["model"] == "m"
    assert seen[0].headers["authorization"] == "Bearer sk-test"
    assert seen[0].headers["x-llmq-job-id"] == "job_x"


@pytest.mark.parametrize(
    ("status", "body", "headers", "retry_after"),
    [
        (429, {"error": {"code": "rate_limit_exceeded"}}, {"retry-after": "7"}, 7.0),
        (503, {}, {"retry-after-ms": "1500"}, 1.5),
        (500, {}, {}, None),
        (408, {}, {}, None),
        (401, {"error": {"code": "invalid_api_key"}}, {}, None),
    ],
)
async def test_retryable_statuses_are_transient_with_retry_after(status, body, headers, retry_after) -> None:
    provider = _provider(lambda request: httpx.Response(status, json=body, headers=headers))
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.retry_after == retry_after
    assert caught.value.status_code == status


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "context_length_exceeded", ErrorCode.CONTEXT_LENGTH_EXCEEDED),
        (400, "content_filter", ErrorCode.CONTENT_FILTERED),
        (404, "model_not_found", ErrorCode.MODEL_NOT_FOUND),
        (404, None, ErrorCode.MODEL_NOT_FOUND),
        (400, "something_else", ErrorCode.INVALID_REQUEST),
        (422, None, ErrorCode.INVALID_REQUEST),
    ],
)
async def test_deterministic_errors_are_permanent_with_a_closed_code(status, code, expected) -> None:
    body = {"error": {"code": code, "message": "no"}} if code else {}
    provider = _provider(lambda request: httpx.Response(status, json=body))
    with pytest.raises(PermanentProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is expected


async def test_connection_errors_and_timeouts_are_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    for handler in (refuse, slow):
        with pytest.raises(TransientProviderError) as caught:
            await _provider(handler).generate(REQUEST, 5)
        assert caught.value.code is ErrorCode.PROVIDER_UNAVAILABLE


async def test_a_malformed_answer_is_a_transient_provider_error() -> None:
    provider = _provider(lambda request: httpx.Response(200, content=b"<html>oops</html>"))
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is ErrorCode.PROVIDER_ERROR


async def test_a_stream_is_assembled_with_usage() -> None:
    chunks = [
        {"choices": [{"delta": {"content": "hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
    ]
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    provider = _provider(lambda request: httpx.Response(200, text=text), stream=True)
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason, result.usage.output_tokens) == ("hello", "stop", 2)


async def test_a_stream_that_trickles_past_the_deadline_is_a_transient_timeout() -> None:
    import asyncio

    class Trickle(httpx.AsyncByteStream):
        async def __aiter__(self):
            while True:
                await asyncio.sleep(0.05)
                yield b": keep-alive\n\n"

    provider = _provider(lambda request: httpx.Response(200, stream=Trickle()), stream=True)
    with pytest.raises(TransientProviderError, match="did not finish in time"):
        await provider.generate(REQUEST, 0.3)
