"""Failure classification and answer parsing, with httpx's in-memory MockTransport."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq import providers
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
    job_id="job_x",
)


def _provider(handler, stream: bool = False, retry_timeouts: bool = False) -> ChatCompletionsProvider:
    return ChatCompletionsProvider(
        "http://provider.test/v1",
        lambda: "sk-test",
        stream,
        httpx.MockTransport(handler),
        retry_timeouts=retry_timeouts,
    )


def _sse(*events: dict[str, Any] | str) -> str:
    """An SSE body: each event a JSON chunk, or a raw data value such as "[DONE]"."""
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def _delta(text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}]}


def _streaming(body: str) -> ChatCompletionsProvider:
    return _provider(lambda request: httpx.Response(200, text=body), stream=True)


class _Broken(httpx.AsyncByteStream):
    """A 200 body that sends `head`, then the connection drops."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


class _Trickle(httpx.AsyncByteStream):
    """A 200 stream that only ever sends keep-alives: every read succeeds."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.05)
            yield b": keep-alive\n\n"


def _raises(exc_type: type[httpx.HTTPError]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    return handler


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
        # the provider account out of credit, and a base URL that moved: an operator's to fix,
        # not the client's request (failing them would fail the whole backlog as invalid)
        (402, {"error": {"message": "Insufficient Balance"}}, {}, None),
        (307, {}, {"location": "https://provider.test/v1/chat/completions"}, None),
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
        (404, "not_found_error", ErrorCode.MODEL_NOT_FOUND),
        (404, "RESOURCE_DOES_NOT_EXIST", ErrorCode.MODEL_NOT_FOUND),
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


async def test_a_malformed_answer_is_a_transient_provider_error() -> None:
    provider = _provider(lambda request: httpx.Response(200, content=b"<html>oops</html>"))
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is ErrorCode.PROVIDER_ERROR


async def test_a_truncated_json_answer_is_a_transient_provider_error() -> None:
    # Given a non-streaming answer whose JSON body stops half-way
    whole = json.dumps({"choices": [{"message": {"content": "hello"}, "finish_reason": "stop"}]})
    provider = _provider(lambda request: httpx.Response(200, content=whole[: len(whole) // 2].encode()))
    # When the job calls it, then it is retried, never recorded as a result
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is ErrorCode.PROVIDER_ERROR


# Valid JSON of about 10 KB that Python's parser cannot read: it nests 5,000 objects deep.
_TOO_DEEP = '{"x":' * 5000 + "1" + "}" * 5000


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream chunk"])
async def test_an_answer_nested_too_deeply_to_parse_is_a_transient_provider_error(stream: bool) -> None:
    # Given a 200 whose JSON (the whole answer, or one chunk of a stream) nests 5,000 levels
    if stream:
        body = _sse(_delta("hi"), '{"choices": [], "extra": ' + _TOO_DEEP + "}", "[DONE]")
    else:
        body = (
            '{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "extra": '
            + _TOO_DEEP
            + "}"
        )
    provider = _provider(lambda request: httpx.Response(200, text=body), stream=stream)
    # When the job calls it, then it is the malformed answer it is, not the parser's RecursionError
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is ErrorCode.PROVIDER_ERROR


async def test_an_error_body_nested_too_deeply_is_classified_by_its_status() -> None:
    provider = _provider(lambda request: httpx.Response(400, text='{"error": ' + _TOO_DEEP + "}"))
    with pytest.raises(PermanentProviderError):
        await provider.generate(REQUEST, 5)


async def test_a_stream_is_assembled_with_usage() -> None:
    chunks = [
        {"choices": [{"delta": {"content": "hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}},
    ]
    result = await _streaming(_sse(*chunks, "[DONE]")).generate(REQUEST, 5)
    assert (result.output, result.finish_reason, result.usage.output_tokens) == ("hello", "stop", 2)


# ---- errors inside a 200 answer ---------------------------------------------------------------


async def test_a_transient_error_event_mid_stream_is_retried_not_a_success() -> None:
    # Given a stream that sends some text, then a 503 error event, then [DONE] (as vLLM does)
    error = {"error": {"message": "engine died", "type": "server_error", "code": 503}}
    provider = _streaming(_sse(_delta("half an"), _delta(" answer"), error, "[DONE]"))
    # When the job calls it
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    # Then the job is retried as if the provider had answered 503, with the provider's message
    assert (caught.value.code, caught.value.status_code) == (ErrorCode.PROVIDER_UNAVAILABLE, 503)
    assert caught.value.message == "engine died"


async def test_a_permanent_error_event_mid_stream_fails_with_its_code() -> None:
    # Given a stream whose error event says the prompt is too long
    error = {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "status": 400,
        }
    }
    provider = _streaming(_sse(_delta("x"), error))
    # When the job calls it, then it fails for good with the mapped code
    with pytest.raises(PermanentProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert (caught.value.code, caught.value.status_code) == (ErrorCode.CONTEXT_LENGTH_EXCEEDED, 400)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # A status in the event decides, as the HTTP status would.
        ({"error": {"message": "slow down", "code": 429}}, TransientProviderError),
        ({"error": {"message": "bad", "code": "400"}}, ErrorCode.INVALID_REQUEST),
        # Without a status, the type stands for one.
        ({"error": {"message": "busy", "code": "rate_limit_exceeded"}}, TransientProviderError),
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            TransientProviderError,
        ),
        ({"error": {"message": "no", "type": "not_found_error"}}, ErrorCode.MODEL_NOT_FOUND),
        ({"error": {"message": "no", "type": "invalid_request_error"}}, ErrorCode.INVALID_REQUEST),
        # A known permanent code, with no status: it beats what a generic type implies
        ({"error": {"message": "no", "code": "content_policy_violation"}}, ErrorCode.CONTENT_FILTERED),
        (
            {"error": {"message": "no", "type": "server_error", "code": "context_length_exceeded"}},
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        ),
        # vLLM's older shape: the chunk itself is the error
        (
            {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400},
            ErrorCode.INVALID_REQUEST,
        ),
        # Nothing to go on: the provider failed while generating, so it is retried
        ({"error": {"message": "???", "type": "mystery_error"}}, TransientProviderError),
        ({"error": "model crashed"}, TransientProviderError),
    ],
)
async def test_error_events_are_classified_like_the_http_error_they_stand_for(
    event: dict[str, Any], expected: ErrorCode | type[Exception]
) -> None:
    # Given a stream that breaks with this error event
    provider = _streaming(_sse(_delta("x"), event))
    # When the job calls it, then it is retried or fails with the code a user can act on
    if isinstance(expected, ErrorCode):
        with pytest.raises(PermanentProviderError) as permanent:
            await provider.generate(REQUEST, 5)
        assert permanent.value.code is expected
    else:
        with pytest.raises(expected):
            await provider.generate(REQUEST, 5)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"message": "overloaded", "type": "server_error", "code": 503}, TransientProviderError),
        ({"message": "too long", "code": "context_length_exceeded"}, PermanentProviderError),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream-asked-json-answered"])
async def test_a_200_body_that_is_only_an_error_is_classified_like_the_http_error(
    error: dict[str, Any], expected: type[Exception], stream: bool
) -> None:
    # Given a 200 whose body is an error instead of a completion (also when a stream was asked
    # for and the server answered one JSON body)
    provider = _provider(lambda request: httpx.Response(200, json={"error": error}), stream=stream)
    # When the job calls it, then it is retried or failed like the error it reports
    with pytest.raises(expected) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.message == error["message"]


async def test_a_whole_json_completion_answered_to_a_stream_request_is_kept_not_paid_for_again() -> None:
    # Given a server that ignores `stream: true` and answers with the whole completion at once
    body = {
        "choices": [{"message": {"content": "the whole answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    calls: list[httpx.Request] = []
    provider = _provider(lambda request: calls.append(request) or httpx.Response(200, json=body), stream=True)
    # When the job calls it, then the answer is its result, from one call
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason, result.usage.output_tokens) == (
        "the whole answer",
        "stop",
        4,
    )
    assert len(calls) == 1


class _FinishedThenSilent(httpx.AsyncByteStream):
    """The whole answer with its finish_reason, then keep-alive comments only, for ever."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _sse(_delta("the whole"), _delta(" answer", "stop")).encode()
        while True:
            await asyncio.sleep(0.02)
            yield b": keep-alive\n\n"


async def test_a_stream_that_stalls_after_its_finish_reason_is_a_whole_answer_not_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a stream that goes silent (keep-alives only) after its finish_reason
    monkeypatch.setattr(providers, "_AFTER_FINISH_SECONDS", 0.2)
    provider = _provider(lambda request: httpx.Response(200, stream=_FinishedThenSilent()), stream=True)
    # When the job calls it with time to spare, then the finished answer is its result
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("the whole answer", "stop")


class _TrailerApart(httpx.AsyncByteStream):
    """A whole answer (its finish_reason alone), then its trailer in pieces `gap` apart, each
    within the silence a whole answer's trailer is given: a usage chunk, a later usage chunk
    (as a gateway adding its own count may send), [DONE]."""

    def __init__(self, gap: float) -> None:
        self.gap = gap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _sse(_delta("the whole"), _delta(" answer"), _delta("", "stop")).encode()
        for tokens in (2, 5):
            await asyncio.sleep(self.gap)
            yield _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens}}).encode()
        await asyncio.sleep(self.gap)
        yield b"data: [DONE]\n\n"


class _AnnotatedTrailer(httpx.AsyncByteStream):
    """A whole answer, then an annotation chunk (no text, no finish_reason, no usage), then
    the usage chunk and [DONE], `gap` apart."""

    def __init__(self, gap: float) -> None:
        self.gap = gap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _sse(_delta("the whole"), _delta(" answer"), _delta("", "stop")).encode()
        await asyncio.sleep(self.gap)
        annotation = {"index": 0, "delta": {}, "finish_reason": None, "content_filter_results": {}}
        yield _sse({"choices": [annotation]}).encode()
        await asyncio.sleep(self.gap)
        yield _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}, "[DONE]").encode()


async def test_a_whole_answers_trailer_in_pieces_is_awaited_from_the_answers_end_not_each_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a whole answer whose trailer comes in pieces 0.7 s apart, each within a trailer's
    # silence (1 s here), and a trailer given 1 s in all from the answer's end (10 s on AWS)
    monkeypatch.setattr(providers, "_AFTER_FINISH_SECONDS", 1.0)
    monkeypatch.setattr(providers, "_WHOLE_TRAILER_SECONDS", 1.0)
    provider = _provider(lambda request: httpx.Response(200, stream=_TrailerApart(0.7)), stream=True)
    # When the job calls it
    result = await provider.generate(REQUEST, 30)
    # Then the answer is taken with what of its trailer came within that time (the first usage
    # chunk), not a whole silence more after each piece, for as long as pieces keep coming
    assert (result.output, result.usage.output_tokens) == ("the whole answer", 2)


async def test_a_whole_answers_usage_after_a_slow_annotation_chunk_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a whole answer whose trailer is an annotation chunk (Azure's content_filter_results)
    # and then its usage, each 0.7 of a trailer's silence after the line before: the usage
    # comes past one silence from the answer's end, well within the trailer's whole time
    monkeypatch.setattr(providers, "_AFTER_FINISH_SECONDS", 1.0)
    provider = _provider(lambda request: httpx.Response(200, stream=_AnnotatedTrailer(0.7)), stream=True)
    # When the job calls it, nobody canceling it
    result = await provider.generate(REQUEST, 30)
    # Then its usage is recorded: the tokens billed (review 255: it read 0 and 0)
    assert (result.output, result.usage.output_tokens, result.usage.input_tokens) == (
        "the whole answer",
        7,
        3,
    )


async def test_an_sse_error_event_is_never_part_of_an_answer_even_without_an_error_key() -> None:
    # Given a stream that sends half an answer, then an SSE `error` event whose data has no
    # `error` key, then [DONE]
    body = _sse(_delta("half an")) + 'event: error\ndata: {"message": "engine crashed", "code": 500}\n\n'
    provider = _streaming(body + "data: [DONE]\n\n")
    # When the job calls it, then it is retried like the 500 it reports: half an answer is no success
    with pytest.raises(TransientProviderError, match="engine crashed"):
        await provider.generate(REQUEST, 5)
    # (an event of another type, or data after the error event's blank line, is the answer's)
    other = _streaming("event: message\n" + _sse(_delta("hello", "stop")))
    assert (await other.generate(REQUEST, 5)).output == "hello"


@pytest.mark.parametrize("finish_reason", ["abort", "error"])
@pytest.mark.parametrize("shape", ["stream", "answer", "stream-asked-json-answered"])
async def test_a_generation_the_server_gave_up_on_is_retried_not_a_success(
    finish_reason: str, shape: str
) -> None:
    # Given a server that stopped the generation itself (vLLM's and SGLang's abort), streamed or not
    if shape == "stream":
        provider = _streaming(_sse(_delta("half an"), _delta("", finish_reason), "[DONE]"))
    else:
        body = {"choices": [{"message": {"content": "half an"}, "finish_reason": finish_reason}]}
        provider = _provider(lambda request: httpx.Response(200, json=body), stream=shape != "answer")
    # When the job calls it, then it is retried
    with pytest.raises(TransientProviderError, match=r"cut off|ended before"):
        await provider.generate(REQUEST, 5)


async def test_an_sse_error_event_in_plain_text_keeps_its_message() -> None:
    provider = _streaming("event: error\ndata: the engine ran out of memory\n\n")
    with pytest.raises(TransientProviderError, match="ran out of memory"):
        await provider.generate(REQUEST, 5)


@pytest.mark.parametrize(
    "events",
    [
        # OpenAI's shape: the finish_reason in a chunk of its own (the usage chunk and [DONE] lost)
        (_delta("the whole"), _delta(" answer"), _delta("", "stop")),
        # vLLM's: the last text carries the finish_reason, then the usage chunk ([DONE] lost)
        (_delta("the whole"), _delta(" answer", "stop"), {"choices": [], "usage": {"completion_tokens": 2}}),
    ],
    ids=["finish alone", "finish with the last text, then usage"],
)
async def test_a_stream_cut_after_its_finish_reason_is_a_whole_answer_not_a_retry(
    events: tuple[dict[str, Any], ...],
) -> None:
    # Given a stream whose connection resets after the generation said it finished
    head = _sse(*events).encode()
    provider = _provider(lambda request: httpx.Response(200, stream=_Broken(head)), stream=True)
    # When the job calls it, then the paid, finished answer is its result
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("the whole answer", "stop")


# ---- streams that stop early ------------------------------------------------------------------


async def test_a_stream_that_ends_without_finish_reason_or_done_is_transient() -> None:
    # Given a stream that sends half an answer and then simply ends
    provider = _streaming(_sse(_delta("half an"), _delta(" answer")))
    # When the job calls it, then it is retried: half an answer is never a success
    with pytest.raises(TransientProviderError, match="stream ended before the generation finished"):
        await provider.generate(REQUEST, 5)


async def test_a_stream_whose_connection_drops_mid_answer_is_transient() -> None:
    # Given a stream whose connection drops after some text
    head = _sse(_delta("half an")).encode()
    provider = _provider(lambda request: httpx.Response(200, stream=_Broken(head)), stream=True)
    # When the job calls it, then it is retried with the same explanation
    with pytest.raises(TransientProviderError, match="stream ended before the generation finished"):
        await provider.generate(REQUEST, 5)


async def test_an_answer_whose_connection_drops_mid_body_is_transient() -> None:
    # Given a non-streaming answer whose connection drops half-way through the body
    provider = _provider(lambda request: httpx.Response(200, stream=_Broken(b'{"choices": [')))
    # When the job calls it, then it is retried
    with pytest.raises(TransientProviderError, match="cut off"):
        await provider.generate(REQUEST, 5)


async def test_a_stream_with_its_finish_reason_and_no_done_succeeds() -> None:
    # Given a stream that ends with its finish_reason, and no [DONE] (some servers never send it)
    result = await _streaming(_sse(_delta("hello", "stop"))).generate(REQUEST, 5)
    # Then the job has its output, and the finish_reason as given
    assert (result.output, result.finish_reason) == ("hello", "stop")


def _keyless(text: str) -> dict[str, Any]:
    """A chunk of a gateway whose choices never carry the finish_reason key (one-api's own
    adaptors: Gemini, Baidu, Qwen, Ollama)."""
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


@pytest.mark.parametrize("chunk", [_delta, _keyless], ids=["null finish_reason", "no finish_reason key"])
async def test_done_after_text_with_no_finish_reason_is_a_cut_stream_not_a_success(
    chunk: Callable[[str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a gateway whose upstream broke after two pieces of text: it logs the error and sends
    # [DONE] all the same (one-api's relay and its own adaptors do), with no finish_reason
    monkeypatch.setattr(providers, "_told_done_without_finish_reason", False)
    provider = _streaming(_sse(chunk("Once upon a"), chunk(" time there"), "[DONE]"))
    # When the job calls it, then it is retried: half an answer is never a success
    with pytest.raises(TransientProviderError, match="stream ended before the generation finished"):
        await provider.generate(REQUEST, 5)
    # And the operator's log names the setting for a server that never names a finish_reason
    assert "provider.done_ends_answer" in caplog.text


@pytest.mark.parametrize("chunk", [_delta, _keyless], ids=["null finish_reason", "no finish_reason key"])
async def test_a_server_declared_to_name_no_finish_reason_ends_its_answer_with_done(
    chunk: Callable[[str], dict[str, Any]],
) -> None:
    # Given a provider the operator declared as a server that never names a finish_reason
    body = _sse(chunk("The capital"), chunk(" is Paris."), "[DONE]")
    provider = ChatCompletionsProvider(
        "http://provider.test/v1",
        lambda: "sk-test",
        True,
        httpx.MockTransport(lambda request: httpx.Response(200, text=body)),
        done_ends_answer=True,
    )
    # When the job calls it, then [DONE] finishes the answer: the whole, paid answer is kept
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("The capital is Paris.", None)


async def test_a_finish_reason_spelled_finishreason_finishes_the_answer() -> None:
    # Given a server that names the finish as `finishReason` (Google's OpenAI endpoint in beta)
    last = {
        "choices": [
            {"index": 0, "delta": {"content": " Paris."}, "finish_reason": None, "finishReason": "stop"}
        ]
    }
    # When the job calls it, then the answer is whole
    result = await _streaming(_sse(_delta("The capital is"), last, "[DONE]")).generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("The capital is Paris.", "stop")


async def test_a_finish_reason_of_any_length_is_kept_short() -> None:
    # Given a server that names the finish with 100,000 characters (hunt 248: kept whole, in the
    # job's item and result, and in the log line of the job's end)
    last = {"choices": [{"index": 0, "delta": {"content": " Paris."}, "finish_reason": "x" * 100_000}]}
    result = await _streaming(_sse(_delta("The capital is"), last, "[DONE]")).generate(REQUEST, 5)
    assert result.output == "The capital is Paris."
    assert result.finish_reason == "x" * 300


@pytest.mark.parametrize(
    ("line", "expected", "code"),
    [
        # llama.cpp's server (2025 builds) writes an error met while streaming on an `error:`
        # line, then [DONE]
        (
            'error: {"code":500,"message":"Input prompt is too big compared to KV size.","type":"server_error"}',
            TransientProviderError,
            ErrorCode.PROVIDER_UNAVAILABLE,
        ),
        (
            'error: {"code":400,"message":"the request exceeds the available context size",'
            '"type":"exceed_context_size_error","n_prompt_tokens":9000,"n_ctx":4096}',
            PermanentProviderError,
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        ),
        ("error: the model crashed", TransientProviderError, ErrorCode.PROVIDER_ERROR),
    ],
)
async def test_an_error_line_in_a_stream_is_an_error_not_an_answer(
    line: str, expected: type[ProviderError], code: ErrorCode
) -> None:
    # Given a stream that sends some text, then an error on an `error:` line, then [DONE]
    body = _sse(_delta("Once upon a")) + line + "\n\n" + _sse("[DONE]")
    # When the job calls it, then it fails as the error says, never with the text so far
    with pytest.raises(expected) as caught:
        await _streaming(body).generate(REQUEST, 5)
    assert caught.value.code is code


async def test_a_whole_completion_under_the_event_stream_type_is_kept_not_paid_for_again() -> None:
    # Given a server that answers `stream: true` with the whole completion as one JSON body,
    # labelled text/event-stream
    body = {
        "choices": [{"index": 0, "message": {"content": "Paid answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    calls: list[httpx.Request] = []
    provider = _provider(
        lambda request: (
            calls.append(request)
            or httpx.Response(
                200, content=json.dumps(body).encode(), headers={"content-type": "text/event-stream"}
            )
        ),
        stream=True,
    )
    # When the job calls it, then the answer is its result, from one call
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason, len(calls)) == ("Paid answer", "stop", 1)


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json", "text/plain"])
@pytest.mark.parametrize("lead", ["", ": keep-alive\n\n"])
async def test_a_stream_answered_to_a_request_for_one_body_is_kept_not_paid_for_again(
    content_type: str, lead: str
) -> None:
    # Given a provider configured not to stream, and a gateway that streams whatever it is asked:
    # a whole, finished stream, however labelled, after keep-alives or not
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]
    calls: list[httpx.Request] = []
    provider = _provider(
        lambda request: (
            calls.append(request)
            or httpx.Response(
                200, content=(lead + _sse(*chunks, "[DONE]")).encode(), headers={"content-type": content_type}
            )
        ),
        stream=False,
    )
    # When the job calls it
    result = await provider.generate(REQUEST, 5)
    # Then the answer is its result, from one call, asked as one body (hunt 329: read as a
    # malformed body, each paid answer was asked again, three times, and the job failed)
    assert (result.output, result.finish_reason, result.usage.output_tokens) == ("Hello", "stop", 2)
    assert len(calls) == 1 and "stream" not in json.loads(calls[0].content)
    # And a stream cut before its finish is no answer, as when it was asked for
    cut = _provider(
        lambda request: httpx.Response(
            200, content=(lead + _sse(*chunks[:1])).encode(), headers={"content-type": content_type}
        ),
        stream=False,
    )
    with pytest.raises(TransientProviderError):
        await cut.generate(REQUEST, 5)


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream", "text/plain"])
@pytest.mark.parametrize("lead", ["\n\n", "\ufeff", ": keep-alive\n\n", ": OPENROUTER PROCESSING\n\n: x\n\n"])
async def test_a_body_asked_for_is_read_past_what_leads_it(content_type: str, lead: str) -> None:
    # Given a provider configured not to stream, whose gateway sends whitespace, a byte order
    # mark or keep-alive comments before the whole completion
    body = {
        "choices": [{"index": 0, "message": {"content": "Paid answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    calls: list[httpx.Request] = []
    provider = _provider(
        lambda request: (
            calls.append(request)
            or httpx.Response(
                200, content=(lead + json.dumps(body)).encode(), headers={"content-type": content_type}
            )
        ),
        stream=False,
    )
    # When the job calls it, then the answer is its result, from one call (review 282: past a
    # comment, it was a malformed answer, paid for again at each attempt)
    result = await provider.generate(REQUEST, 5)
    assert (result.output, len(calls)) == ("Paid answer", 1)


async def test_a_stream_whose_chunks_carry_their_text_as_a_message_keeps_it() -> None:
    # Given a server that streams each piece as a `message`, as a completion holds it
    chunks = [
        {
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": None}
            ]
        },
        {"choices": [{"index": 0, "message": {"content": " world"}, "finish_reason": "stop"}]},
    ]
    # When the job calls it, then the answer is the text, not an empty success
    result = await _streaming(_sse(*chunks, "[DONE]")).generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("Hello world", "stop")


# MiniMax ends a stream with a chunk whose choice holds the whole answer again as a `message`,
# beside its finish_reason and usage, after every delta.
_SNAPSHOT_LAST = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}}]},
    {"choices": [{"index": 0, "delta": {"content": " world"}}]},
    {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello world"}}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 2},
    },
]


async def test_a_whole_message_after_the_deltas_is_not_the_answer_a_second_time() -> None:
    # Given a stream of deltas that ends with the whole answer as a message
    pieces: list[str] = []
    request = dataclasses.replace(REQUEST, on_output=pieces.append)
    # When the job calls it, then its output, and what was read live, is the answer once
    result = await _streaming(_sse(*_SNAPSHOT_LAST, "[DONE]")).generate(request, 5)
    assert (result.output, "".join(pieces), result.usage.output_tokens) == ("Hello world", "Hello world", 2)
    # And that last chunk leaves the answer whole: a drop before [DONE] keeps it, paid for once
    head = _sse(*_SNAPSHOT_LAST).encode()
    provider = _provider(lambda request: httpx.Response(200, stream=_Broken(head)), stream=True)
    assert (await provider.generate(REQUEST, 5)).output == "Hello world"


async def test_an_event_stream_is_utf8_whatever_charset_its_content_type_names() -> None:
    # Given a UTF-8 stream labelled with another charset (SSE is UTF-8 by definition)
    text = "\u4e2d\u6587 caf\u00e9 \U0001f600"
    raw = json.dumps(_delta(text), ensure_ascii=False)
    body = f"data: {raw}\n\n{_sse(_delta('', 'stop'), '[DONE]')}".encode()
    provider = _provider(
        lambda request: httpx.Response(
            200, content=body, headers={"content-type": "text/event-stream; charset=iso-8859-1"}
        ),
        stream=True,
    )
    # When the job calls it, then the text is as the provider wrote it
    assert (await provider.generate(REQUEST, 5)).output == text


class _Pieces(httpx.AsyncByteStream):
    """A 200 body sent in the given pieces."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


async def test_a_line_split_anywhere_is_read_whole_and_one_past_the_limit_is_malformed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a stream sent a few bytes at a time: inside lines, between a CR and its LF, and
    # inside a character
    body = (
        _sse(_delta("gr\u00fc\u00df "), _delta("\U0001f600", "stop"), "[DONE]").replace("\n", "\r\n").encode()
    )
    pieces = [body[i : i + 3] for i in range(0, len(body), 3)]
    provider = _provider(lambda request: httpx.Response(200, stream=_Pieces(*pieces)), stream=True)
    # When the job calls it, then the answer is whole
    assert (await provider.generate(REQUEST, 5)).output == "gr\u00fc\u00df \U0001f600"
    # While a line longer than the reader keeps is a malformed answer, not memory without end
    monkeypatch.setattr(providers, "_MAX_LINE_CHARS", 1000)
    huge = [b"data: {" + b"x" * 100] + [b"y" * 100] * 20
    provider = _provider(lambda request: httpx.Response(200, stream=_Pieces(*huge)), stream=True)
    with pytest.raises(TransientProviderError, match="malformed"):
        await provider.generate(REQUEST, 5)


# ---- finish_reason ----------------------------------------------------------------------------


@pytest.mark.parametrize("finish_reason", ["length", "content_filter"])
async def test_a_streamed_finish_reason_is_kept_as_the_provider_said(finish_reason: str) -> None:
    # Given a stream the provider ended for running out of tokens, or by its filter
    provider = _streaming(_sse(_delta("cut"), _delta("", finish_reason), "[DONE]"))
    # When the job calls it
    result = await provider.generate(REQUEST, 5)
    # Then it is a result, not an error, and the client sees why it ended
    assert (result.output, result.finish_reason) == ("cut", finish_reason)


@pytest.mark.parametrize("finish_reason", ["length", "content_filter"])
async def test_a_completions_finish_reason_is_kept_as_the_provider_said(finish_reason: str) -> None:
    body = {"choices": [{"message": {"content": "cut"}, "finish_reason": finish_reason}]}
    provider = _provider(lambda request: httpx.Response(200, json=body))
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("cut", finish_reason)


# ---- timeouts and connection errors -----------------------------------------------------------


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
async def test_failing_before_the_request_is_sent_is_transient(error: type[httpx.HTTPError]) -> None:
    # Given a provider the worker could not reach: nothing was sent, so nothing was billed
    with pytest.raises(TransientProviderError) as caught:
        await _provider(_raises(error)).generate(REQUEST, 5)
    # Then the job is retried
    assert caught.value.code is ErrorCode.PROVIDER_UNAVAILABLE


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.WriteTimeout])
async def test_a_timeout_after_sending_is_a_provider_timeout_not_a_retry(
    error: type[httpx.HTTPError],
) -> None:
    # Given a provider that received the request but did not answer in time
    with pytest.raises(ProviderTimeout) as caught:
        await _provider(_raises(error)).generate(REQUEST, 5)
    # Then the job is not retried behind the client's back: it may still be generating
    assert not isinstance(caught.value, TransientProviderError)
    assert caught.value.code is ErrorCode.PROVIDER_TIMEOUT
    assert "billing" in caught.value.message


async def test_a_stream_that_trickles_past_the_deadline_is_a_provider_timeout() -> None:
    # Given a stream that answered 200 and then only sends keep-alives
    provider = _provider(lambda request: httpx.Response(200, stream=_Trickle()), stream=True)
    # When the total deadline passes
    with pytest.raises(ProviderTimeout, match=r"did not finish within 0\.3s") as caught:
        await provider.generate(REQUEST, 0.3)
    # Then it is a provider timeout
    assert caught.value.code is ErrorCode.PROVIDER_TIMEOUT


async def test_a_deadline_that_passes_while_still_connecting_is_transient() -> None:
    # Given a transport still connecting when the deadline passes (it says so through the
    # trace extension, as httpcore does)
    async def connecting(request: httpx.Request) -> httpx.Response:
        await request.extensions["trace"]("connection.connect_tcp.started", {})
        await asyncio.sleep(5)
        raise AssertionError("the deadline should have ended the call")

    # When the job calls it, then it is retried: the request never left
    with pytest.raises(TransientProviderError, match="could not connect"):
        await _provider(connecting).generate(REQUEST, 0.2)


async def test_with_retry_timeouts_a_timeout_after_sending_is_transient() -> None:
    # Given an operator who chose to retry timeouts
    slow = _provider(_raises(httpx.ReadTimeout), retry_timeouts=True)
    trickle = _provider(lambda request: httpx.Response(200, stream=_Trickle()), True, retry_timeouts=True)
    # When a read times out, or the total deadline passes mid-stream
    for provider, deadline in ((slow, 5.0), (trickle, 0.3)):
        with pytest.raises(TransientProviderError) as caught:
            await provider.generate(REQUEST, deadline)
        # Then the job is retried as before
        assert caught.value.code is ErrorCode.PROVIDER_UNAVAILABLE


async def test_a_provider_key_that_cannot_be_read_is_transient_and_nothing_is_sent() -> None:
    # Given a key store that is throttled
    sent: list[httpx.Request] = []

    def unreadable_key() -> str:
        raise RuntimeError("secretsmanager throttled")

    provider = ChatCompletionsProvider(
        "http://provider.test/v1",
        unreadable_key,
        False,
        httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200)),
    )
    # When a generation starts
    with pytest.raises(TransientProviderError, match="provider key"):
        await provider.generate(REQUEST, 5)
    # Then it is an ordinary retry, and nothing reached the provider (nothing was billed)
    assert sent == []


class _KeyStore:
    """A Secrets Manager stand-in: a cached key, and the one the store holds now."""

    def __init__(self, cached: str, stored: str) -> None:
        self.cached = cached
        self.stored = stored
        self.fresh_reads = 0

    def read(self, fresh: bool) -> str:
        if fresh:
            self.fresh_reads += 1
            self.cached = self.stored
        return self.cached


def _keyed(store: _KeyStore, accepted: str, status: int = 401, stream: bool = False):
    sent: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != f"Bearer {accepted}":
            return httpx.Response(status, json={"error": {"message": "bad key", "code": "invalid_api_key"}})
        return httpx.Response(200, json=_completion_body())

    provider = ChatCompletionsProvider(
        "http://provider.test/v1", ProviderKey(store.read), stream, httpx.MockTransport(handler)
    )
    return provider, sent


def _completion_body() -> dict[str, Any]:
    return {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_is_read_again_at_once_and_the_call_made_with_the_new_one(status: int) -> None:
    # Given a worker whose cached key was rotated away
    store = _KeyStore(cached="sk-old", stored="sk-new")
    provider, sent = _keyed(store, accepted="sk-new", status=status)
    # When it generates
    result = await provider.generate(REQUEST, 5)
    # Then the refusal read the key fresh once, and the second call, with the new key, succeeded
    assert result.output == "ok"
    assert sent == ["Bearer sk-old", "Bearer sk-new"]
    assert store.fresh_reads == 1


async def test_a_wrong_key_is_read_again_once_per_invocation_only() -> None:
    # Given a key the provider refuses, and a store that holds no other
    store = _KeyStore(cached="sk-wrong", stored="sk-wrong")
    provider, sent = _keyed(store, accepted="sk-real")
    key = provider._api_key
    # When three jobs of one invocation meet the refusal
    for _ in range(3):
        with pytest.raises(TransientProviderError) as caught:
            await provider.generate(REQUEST, 5)
        assert caught.value.status_code == 401
    # Then the store was read fresh once, and each job called the provider once (no second try)
    assert store.fresh_reads == 1
    assert len(sent) == 3
    # And the next invocation may read it fresh again
    key.new_invocation()
    with pytest.raises(TransientProviderError):
        await provider.generate(REQUEST, 5)
    assert store.fresh_reads == 2


async def test_a_key_error_inside_a_200_answer_is_not_a_reason_to_call_again() -> None:
    # Given a provider whose streamed answer reports an authentication error after it began
    store = _KeyStore(cached="sk-old", stored="sk-new")
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, text=_sse({"error": {"type": "authentication_error", "message": "no"}}))

    provider = ChatCompletionsProvider(
        "http://provider.test/v1", ProviderKey(store.read), True, httpx.MockTransport(handler)
    )
    # When the worker calls it, then the error is an ordinary retry, with one call and no fresh read:
    # the generation may have begun, and been billed
    with pytest.raises(TransientProviderError):
        await provider.generate(REQUEST, 5)
    assert (len(calls), store.fresh_reads) == (1, 0)


class _SlowBody(httpx.AsyncByteStream):
    """An error answer whose body starts, then never finishes."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"error": {"code": "rate_'
        while True:
            await asyncio.sleep(0.05)
            yield b" "


@pytest.mark.parametrize("body", ["slow", "cut"])
async def test_a_429_whose_body_is_slow_or_cut_is_still_a_429_not_a_timeout(
    body: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that refuses with 429 and Retry-After, then trickles or drops the body
    monkeypatch.setattr(providers, "_ERROR_BODY_SECONDS", 0.2)
    stream = _SlowBody() if body == "slow" else _Broken(b'{"error": {"code": "rate_')
    provider = _provider(lambda request: httpx.Response(429, headers={"retry-after": "3"}, stream=stream))
    # When the job calls it with time to spare, then it is retried after the Retry-After: the
    # status refused the request, so nothing was generated or billed
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert (caught.value.status_code, caught.value.retry_after) == (429, 3.0)


async def test_an_error_answered_as_a_stream_keeps_its_code() -> None:
    # Given a 400 whose body is an SSE event carrying the error (a streamed request refused)
    body = _sse({"error": {"code": "context_length_exceeded", "message": "too long"}})
    provider = _provider(
        lambda request: httpx.Response(400, text=body, headers={"content-type": "text/event-stream"}),
        stream=True,
    )
    with pytest.raises(PermanentProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED


@pytest.mark.parametrize(
    ("error_type", "expected", "code"),
    [
        ("validation", PermanentProviderError, ErrorCode.INVALID_REQUEST),
        ("overloaded", TransientProviderError, ErrorCode.PROVIDER_UNAVAILABLE),
        ("generation", TransientProviderError, ErrorCode.PROVIDER_ERROR),
    ],
)
@pytest.mark.parametrize("shape", ["stream", "answer"])
async def test_a_tgi_error_is_classified_by_its_error_type(
    error_type: str, expected: type[Exception], code: ErrorCode, shape: str
) -> None:
    # Given Hugging Face TGI's error shape: the message as `error`, its kind as `error_type`
    error = {"error": "Input validation error: `inputs` must have less tokens", "error_type": error_type}
    if shape == "stream":
        provider = _streaming(_sse(error, "[DONE]"))
    else:
        provider = _provider(lambda request: httpx.Response(200, json=error))
    with pytest.raises(expected, match="Input validation error") as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is code


@pytest.mark.parametrize(
    ("usage", "counts"),
    [
        ({"prompt_tokens": "12", "completion_tokens": "n/a"}, (12, 0)),
        ({"prompt_tokens": 3.0, "completion_tokens": None, "output_tokens": 4}, (3, 4)),
        ({"prompt_tokens": -1, "completion_tokens": True}, (0, 0)),
        ({"prompt_tokens": "²", "completion_tokens": "7"}, (0, 7)),  # a digit int() cannot read
        ("unknown", (0, 0)),
        ([1, 2], (0, 0)),
    ],
)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "answer"])
async def test_usage_in_a_shape_we_do_not_know_never_fails_a_paid_answer(
    usage: object, counts: tuple[int, int], stream: bool
) -> None:
    # Given a whole answer whose usage is spelled oddly
    if stream:
        provider = _streaming(_sse(_delta("the answer", "stop"), {"choices": [], "usage": usage}, "[DONE]"))
    else:
        body = {"choices": [{"message": {"content": "the answer"}, "finish_reason": "stop"}], "usage": usage}
        provider = _provider(lambda request: httpx.Response(200, json=body))
    # When the job calls it, then the answer is its result, with the counts it could read
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("the answer", "stop")
    assert (result.usage.input_tokens, result.usage.output_tokens) == counts


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "answer"])
async def test_content_as_a_list_of_parts_keeps_only_its_text(stream: bool) -> None:
    # Given a reasoning model that answers with content parts (Mistral's shape), and a choice
    # that is not an object at all
    parts = [
        {"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
        {"type": "text", "text": "42"},
    ]
    if stream:
        chunks = [
            {"choices": ["junk", {"delta": {"content": parts[:1]}}]},
            {"choices": [{"delta": {"content": parts[1:]}, "finish_reason": "stop"}]},
            "[DONE]",
        ]
        provider = _streaming(_sse(*chunks))
    else:
        body = {"choices": [{"message": {"content": parts}, "finish_reason": "stop"}]}
        provider = _provider(lambda request: httpx.Response(200, json=body))
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("42", "stop")


async def test_a_429_whose_body_outlasts_the_calls_time_is_still_a_429() -> None:
    # Given a 429 whose body stalls, with less time left for the call than the body may take
    provider = _provider(
        lambda request: httpx.Response(429, headers={"retry-after": "3"}, stream=_SlowBody())
    )
    # When the call's time runs out while reading it, then it is the 429 it was, not a timeout
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 0.3)
    assert (caught.value.status_code, caught.value.retry_after) == (429, 3.0)


async def test_a_cancel_that_lands_as_a_refused_keys_answer_ends_sends_no_second_call() -> None:
    # Given a provider that refuses the key, and a new key in the store
    calls: list[str | None] = []
    generation: dict[str, asyncio.Task[Any]] = {}

    class RefusedThenCanceled(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"error": {"message": "bad key"}}'
            # the job's cancel lands just as the refusal's body has been read
            generation["task"].cancel()

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("authorization"))
        if len(calls) == 1:
            return httpx.Response(401, stream=RefusedThenCanceled())
        return httpx.Response(200, json=_completion_body())

    provider = ChatCompletionsProvider(
        "http://provider.test/v1",
        ProviderKey(lambda fresh: "new" if fresh else "old"),
        False,
        httpx.MockTransport(answer),
    )
    generation["task"] = asyncio.ensure_future(provider.generate(REQUEST, 30))
    # When it runs, then it ends canceled, and the new key is never sent: nothing is paid for
    with pytest.raises(asyncio.CancelledError):
        await generation["task"]
    assert calls == ["Bearer old"]


# ---- streams whose finish_reason is not the end ----------------------------------------------


class _Spaced(httpx.AsyncByteStream):
    """SSE events sent `gap` seconds apart, then [DONE]."""

    def __init__(self, events: list[dict[str, Any]], gap: float) -> None:
        self.events = events
        self.gap = gap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield _sse(event).encode()
            await asyncio.sleep(self.gap)
        yield b"data: [DONE]\n\n"


async def test_a_gateway_that_marks_every_chunk_finished_gets_its_whole_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a gateway (new-api, LiteLLM in front of Gemini) that puts finish_reason "stop" on
    # every chunk, and streams for longer than the silence allowed after a finish
    monkeypatch.setattr(providers, "_AFTER_FINISH_SECONDS", 0.15)
    monkeypatch.setattr(providers, "_AFTER_FINISH_WITH_TEXT_SECONDS", 0.15)
    words = [f"w{n} " for n in range(8)]
    stream = _Spaced([_delta(word, "stop") for word in words], gap=0.05)
    provider = _provider(lambda request: httpx.Response(200, stream=stream), stream=True)
    # When the job calls it, then the answer is all of it, not what came in the first moments
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("".join(words), "stop")


@pytest.mark.parametrize(
    "first",
    [
        {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]},
        {"choices": [{"delta": {"reasoning_content": "hmm"}, "finish_reason": "stop"}]},
    ],
    ids=["role chunk", "reasoning chunk"],
)
async def test_a_finish_reason_before_any_text_does_not_end_the_answer_early(
    monkeypatch: pytest.MonkeyPatch, first: dict[str, Any]
) -> None:
    # Given such a gateway whose first chunk, with no text, says "stop", and whose first text
    # comes later than the silence allowed after a finish that came alone
    monkeypatch.setattr(providers, "_AFTER_FINISH_SECONDS", 0.1)
    stream = _Spaced([first, _delta("Hello", "stop"), _delta(" world", "stop")], gap=0.3)
    provider = _provider(lambda request: httpx.Response(200, stream=stream), stream=True)
    # When the job calls it, then the answer is all of it
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("Hello world", "stop")


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"], ids=["LS", "PS", "NEL"])
async def test_a_line_separator_left_raw_inside_a_chunks_json_is_not_a_line_end(char: str) -> None:
    # Given a server that leaves U+2028, U+2029 or NEL unescaped inside a JSON string (vLLM's
    # pydantic serialisation does), in a stream split between those bytes
    raw = json.dumps(_delta(f"one{char}two", "stop"), ensure_ascii=False)
    body = f"data: {raw}\n\ndata: [DONE]\n\n"
    provider = _streaming(body)
    # When the job calls it, then the answer holds the character; SSE ends lines at CR and LF only
    result = await provider.generate(REQUEST, 5)
    assert result.output == f"one{char}two"


async def test_a_stream_labelled_as_json_is_read_as_the_stream_it_is() -> None:
    # Given a server that streams SSE under Content-Type: application/json
    body = _sse(_delta("Hello"), _delta(" world"), _delta("", "stop"), "[DONE]")
    provider = _provider(
        lambda request: httpx.Response(200, text=body, headers={"content-type": "application/json"}),
        stream=True,
    )
    # When the job calls it, then the answer is all of it, not a malformed one paid for again
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("Hello world", "stop")


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json"])
async def test_a_whole_answer_then_an_error_is_kept_however_the_stream_is_labelled(content_type: str) -> None:
    # Given a stream whose answer is whole (its finish_reason came) before an error took the
    # usage chunk's place, served under either label
    body = _sse(
        _delta("the whole answer"),
        _delta("", "stop"),
        {"error": {"message": "usage accounting failed", "code": 500}},
        "[DONE]",
    )
    provider = _provider(
        lambda request: httpx.Response(200, text=body, headers={"content-type": content_type}), stream=True
    )
    # When the job calls it, then the answer is kept: a retry would pay for it again
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("the whole answer", "stop")


async def test_key_refusals_of_a_batch_at_once_all_use_the_new_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a key rotated in the store while the cache still holds the old one, and a fresh
    # read that takes a while (Secrets Manager)
    import threading
    import time as clock

    store = {"secret": "new", "cached": "old"}
    fresh_reads = []
    lock = threading.Lock()

    def read(fresh: bool) -> str:
        if fresh:
            with lock:
                fresh_reads.append(1)
            clock.sleep(0.2)
            store["cached"] = store["secret"]
        return store["cached"]

    def answer(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] != "Bearer new":
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        return httpx.Response(200, json=_completion_body())

    provider = ChatCompletionsProvider(
        "http://provider.test/v1", ProviderKey(read), False, httpx.MockTransport(answer)
    )
    # When ten jobs meet the 401 together
    outcomes = await asyncio.gather(
        *(provider.generate(REQUEST, 5) for _ in range(10)), return_exceptions=True
    )
    # Then each is answered with the new key at once, from one fresh read
    assert [type(outcome).__name__ for outcome in outcomes] == ["JobResult"] * 10
    assert len(fresh_reads) == 1


async def test_a_cut_after_text_that_followed_a_finish_reason_is_retried_not_a_success() -> None:
    # Given such a gateway whose connection drops mid-answer
    head = _sse(_delta("w0 ", "stop"), _delta("w1 ", "stop")).encode()
    provider = _provider(lambda request: httpx.Response(200, stream=_Broken(head)), stream=True)
    # When the job calls it, then it is retried: its finish_reasons said nothing
    with pytest.raises(TransientProviderError, match="stream ended before the generation finished"):
        await provider.generate(REQUEST, 5)


@pytest.mark.parametrize(
    "trailer",
    [
        'data: {"usage": {"prompt_tokens": 3,\n\n',  # a usage chunk cut short
        'event: error\ndata: {"error": {"message": "late", "code": 500}}\n\n',
    ],
    ids=["malformed usage", "error event"],
)
async def test_a_whole_answer_followed_by_a_bad_trailer_is_kept_not_paid_for_again(trailer: str) -> None:
    # Given the whole answer and its finish_reason, then an unreadable chunk or an error event
    provider = _streaming(_sse(_delta("the whole"), _delta(" answer"), _delta("", "stop")) + trailer)
    # When the job calls it, then the paid answer is its result
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("the whole answer", "stop")
    # (the same trailer before any finish_reason is still an error, and so it is after a
    # finish_reason that came with text: a gateway that marks every chunk sends that one first)
    with pytest.raises(TransientProviderError):
        await _streaming(_sse(_delta("half an")) + trailer).generate(REQUEST, 5)
    with pytest.raises(TransientProviderError):
        await _streaming(_sse(_delta("Hello", "stop")) + trailer).generate(REQUEST, 5)


async def test_a_whole_answer_whose_done_is_late_is_kept_when_the_calls_time_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a finished answer whose [DONE] never comes, with less of the call's time left than
    # the silence allowed after a finish
    monkeypatch.setattr(providers, "_AFTER_FINISH_SECONDS", 30.0)
    provider = _provider(lambda request: httpx.Response(200, stream=_FinishedThenSilent()), stream=True)
    # When the call's time runs out, then the answer is kept, not a timeout
    result = await provider.generate(REQUEST, 0.6)
    assert (result.output, result.finish_reason) == ("the whole answer", "stop")


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ("\ufeff" + _sse(_delta("Hello"), _delta(" world", "stop"), "[DONE]"), {}),
        (
            'data: {"choices": [{"delta":\ndata: {"content": "Hello world"}, "finish_reason": "stop"}]}\n\n'
            "data: [DONE]\n\n",
            {},
        ),
        (json.dumps({"choices": [{"message": {"content": "Hello world"}, "finish_reason": "stop"}]}), None),
    ],
    ids=["byte order mark", "data over two lines", "json without a content type"],
)
async def test_a_stream_in_a_shape_sse_allows_is_read_whole(
    body: str, headers: dict[str, str] | None
) -> None:
    # Given a stream with a byte order mark, an event whose data spans lines, or a JSON answer
    # under no content type
    response = (
        (lambda request: httpx.Response(200, content=body.encode()))
        if headers is None
        else (lambda request: httpx.Response(200, text=body))
    )
    # When the job calls it, then the answer is all of it
    result = await _provider(response, stream=True).generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("Hello world", "stop")


async def test_an_error_event_whose_status_is_a_digit_int_cannot_read_is_still_an_error() -> None:
    # Given an error event whose code is a digit Python's int() refuses ("⁵⁰³".isdigit() holds)
    provider = _streaming('data: {"error": {"code": "\u2075\u2070\u00b3", "message": "busy"}}\n\n')
    # When the job calls it, then it is the transient error the event is, not a crash
    with pytest.raises(TransientProviderError, match="busy"):
        await provider.generate(REQUEST, 5)


async def test_the_provider_key_is_read_off_the_event_loop() -> None:
    # Given a key store whose read blocks (Secrets Manager, cold or refreshing)
    import threading

    readers: list[int] = []

    def key() -> str:
        readers.append(threading.get_ident())
        return "sk-test"

    provider = ChatCompletionsProvider(
        "http://provider.test/v1",
        key,
        False,
        httpx.MockTransport(lambda request: httpx.Response(200, json=_completion_body())),
    )
    # When a generation starts, then the key is read in another thread: the batch's other
    # generations and cancel watchers go on meanwhile
    await provider.generate(REQUEST, 5)
    assert readers and threading.get_ident() not in readers


async def test_a_proxys_tunnel_answer_is_not_taken_for_the_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the trace of an HTTPS call through a CONNECT proxy (httpcore passes the request's
    # trace to the tunnel's CONNECT too): the proxy's 200, then our request sent, unanswered
    progress = providers._Progress()
    connect = httpx.Request("CONNECT", "http://proxy.test:3128")
    post = httpx.Request("POST", "https://provider.test/v1/chat/completions")
    for event, request in [
        ("connection.connect_tcp.started", None),
        ("http11.send_request_headers.started", connect),
        ("http11.send_request_body.complete", connect),
        ("http11.receive_response_headers.complete", connect),
        ("connection.start_tls.started", None),
        ("http11.send_request_headers.started", post),
        ("http11.send_request_body.complete", post),
    ]:
        info = {} if request is None else {"request": _CoreRequest(request.method.encode())}
        await progress(event, info)
    # When the connection then drops a while after our request went out
    now = providers.time.monotonic()
    monkeypatch.setattr(providers.time, "monotonic", lambda: now + providers._UNANSWERED_AFTER_SECONDS)
    # Then the provider had our request and did not answer: a drop may leave it generating
    assert progress.unanswered


class _CoreRequest:
    """What httpcore puts in a trace event's info: its request, with the method as bytes."""

    def __init__(self, method: bytes) -> None:
        self.method = method


def _lone_surrogate_body(body: dict[str, Any]) -> bytes:
    # (json.dumps writes the lone half as the escape \ud83d, as a JavaScript proxy that cut an
    # emoji in two would)
    return json.dumps(body).encode()


def test_a_providers_message_with_half_an_emoji_is_kept_as_utf8_can_hold_it() -> None:
    """Stored on the job, a lone surrogate made every later read of it (GET, the list, the
    webhook) fail to serialize: a 500 for the job's whole retention."""
    body = {"error": {"message": "prompt too long: \ud83d", "code": "context_length_exceeded"}}
    provider = _provider(lambda request: httpx.Response(400, content=_lone_surrogate_body(body)))
    with pytest.raises(PermanentProviderError) as refused:
        asyncio.run(provider.generate(REQUEST, 5))
    assert refused.value.message == "prompt too long: \ufffd"
    refused.value.message.encode("utf-8")


def test_a_finish_reason_with_half_an_emoji_is_kept_as_utf8_can_hold_it() -> None:
    whole = {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop\udc00"}]}
    provider = _provider(lambda request: httpx.Response(200, content=_lone_surrogate_body(whole)))
    result = asyncio.run(provider.generate(REQUEST, 5))
    assert result.finish_reason == "stop\ufffd"
    streamed = _provider(
        lambda request: httpx.Response(200, text=_sse(_delta("hi"), _delta("", "len\ud83d"), "[DONE]")),
        stream=True,
    )
    assert asyncio.run(streamed.generate(REQUEST, 5)).finish_reason == "len\ufffd"


@pytest.mark.parametrize(
    ("status", "error", "told"),
    [
        (
            401,
            {"code": "invalid_api_key", "message": "Incorrect API key provided: sk-proj-****Zq9X."},
            "credentials",
        ),
        (
            403,
            {"code": 403, "message": "Your chosen model requires moderation and your input was flagged"},
            "refused the request for llmq's account",
        ),
        (
            429,
            {
                "code": "insufficient_quota",
                "type": "insufficient_quota",
                "message": "You exceeded your quota",
            },
            "out of credit",
        ),
        (
            429,
            {"code": "rate_limit_exceeded", "message": "Rate limit reached in organization org-OPERATOR123"},
            "rate-limiting",
        ),
    ],
    ids=["401 key", "403 not only a key", "429 out of credit", "429 rate"],
)
def test_an_account_error_is_told_in_llmqs_words_and_the_operator_logs_what_the_provider_said(
    status: int, error: dict[str, Any], told: str, caplog: pytest.LogCaptureFixture
) -> None:
    from llmq.providers import classify_response

    body = json.dumps({"error": error}).encode()
    with caplog.at_level("INFO"):
        classified = classify_response(httpx.Response(status, content=body), body)
    # The tenant reads what kind of refusal it was, and the provider's code once, never its text
    assert told in classified.message
    assert error["message"] not in classified.message
    if isinstance(error["code"], str):
        assert classified.message.count(error["code"]) == 1
    # And the operator's log keeps what the provider said, a key-like token cut out
    logged = [record for record in caplog.records if getattr(record, "provider_message", None)]
    assert len(logged) == 1
    said = str(logged[0].__dict__["provider_message"])
    assert "Zq9X" not in said and "OPERATOR123" not in said
    assert said.split(" ")[0] == error["message"].split(" ")[0]


def test_a_403_content_refusal_keeps_the_providers_reason() -> None:
    from llmq.providers import classify_response

    body = json.dumps(
        {"error": {"message": "Your prompt was flagged for violence.", "code": "content_policy_violation"}}
    ).encode()
    error = classify_response(httpx.Response(403, content=body), body, log=False)
    # The tenant's own prompt was refused: its reason, not a refusal of llmq's account
    assert isinstance(error, PermanentProviderError) and error.code is ErrorCode.CONTENT_FILTERED
    assert error.message == "Your prompt was flagged for violence."


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>404 Not Found</body></html>"),
        ("application/json", b'{"detail": "Not Found"}'),
        # (Databricks' REST front, for a path it has no API at)
        ("application/json", b'{"error_code": "ENDPOINT_NOT_FOUND", "message": "No API found for POST /v1"}'),
        ("application/json", b'{"error": "Bad Target: /v1/chat/completions"}'),
    ],
)
async def test_a_404_with_no_error_of_the_apis_own_is_the_operators_fault_not_the_clients_model(
    content_type: str, body: bytes
) -> None:
    # Given a base URL that names no chat-completions endpoint: a load balancer's page, or a
    # web framework's own not-found answer
    provider = _provider(
        lambda request: httpx.Response(404, content=body, headers={"content-type": content_type})
    )
    # When the job calls it, then it is retried slowly, as a refused key is, and never failed
    # as the client's unknown model
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert (caught.value.about_account, caught.value.status_code) == (True, 404)


@pytest.mark.parametrize("status", [424, 499])
async def test_a_model_failing_behind_the_provider_is_retried_not_the_clients_invalid_request(
    status: int,
) -> None:
    # Given a provider whose model failed behind it (424: Bedrock, SageMaker, Hugging Face), or a
    # gateway whose upstream call was cancelled (499)
    body = {"error": {"message": "The model failed while processing the request"}}
    provider = _provider(lambda request: httpx.Response(status, json=body))
    # When the job calls it, then it is retried
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.status_code == status


@pytest.mark.parametrize(
    ("status", "headers", "expected", "retry_after"),
    [
        (400, {}, PermanentProviderError, None),
        (429, {"retry-after": "120"}, TransientProviderError, 120.0),
    ],
)
async def test_an_error_answer_whose_body_cannot_be_decoded_keeps_its_status_and_retry_after(
    status: int, headers: dict[str, str], expected: type[ProviderError], retry_after: float | None
) -> None:
    # Given an error answer that says it is gzip, and is not
    provider = _provider(
        lambda request: httpx.Response(
            status, stream=_Pieces(b"not gzip at all"), headers={"content-encoding": "gzip", **headers}
        )
    )
    # When the job calls it, then it is judged by its status: a 400 is not retried, and a 429
    # waits as it asked
    with pytest.raises(expected) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.status_code == status
    assert getattr(caught.value, "retry_after", None) == retry_after


async def test_a_stream_whose_body_cannot_be_decoded_is_a_cut_not_a_crash() -> None:
    # Given a stream that says it is gzip, and is not
    provider = _provider(
        lambda request: httpx.Response(
            200, stream=_Pieces(b"not gzip at all"), headers={"content-encoding": "gzip"}
        ),
        stream=True,
    )
    # When the job calls it, then it is retried as a cut answer
    with pytest.raises(TransientProviderError) as caught:
        await provider.generate(REQUEST, 5)
    assert caught.value.code is ErrorCode.PROVIDER_ERROR


# ---- the stream's lines -----------------------------------------------------------------------

_ATOMS = [
    b"a",
    b"data: x",
    b"\r",
    b"\n",
    b"\r\n",
    "\u00e9".encode(),
    "\U0001f600".encode(),
    b"\xff",
    b"\xef\xbb\xbf",
    b"",
]


async def _lines_of(pieces: list[bytes]) -> list[str]:
    response = httpx.Response(200, stream=_Pieces(*pieces), headers={"content-type": "text/event-stream"})
    return [line async for line in providers._lines(response.aiter_bytes())]


def _whole_body_lines(body: bytes) -> list[str]:
    """The body's lines, read at once: split where SSE ends a line, the last line end closing no
    line after it."""
    text = body.decode("utf-8", "replace")
    lines = providers._LINE_END.split(text) if text else []
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_ATOMS), max_size=14), st.lists(st.integers(0, 60), max_size=8))
def test_a_stream_split_anywhere_reads_as_the_whole_body_does(atoms: list[bytes], cuts: list[int]) -> None:
    # Given a body of line ends, text, characters and bytes that are not UTF-8, sent in pieces
    # cut at any places (between a CR and its LF, inside a character)
    body = b"".join(atoms)
    points = sorted({min(cut, len(body)) for cut in cuts})
    pieces = [body[start:end] for start, end in itertools.pairwise([0, *points, len(body)])]
    # When its lines are read, then they are the lines of the whole body
    assert asyncio.run(_lines_of(pieces)) == _whole_body_lines(body)


def test_a_line_ended_by_a_cr_stays_ended_when_half_a_character_follows() -> None:
    # Given lines that end in CR, and a body whose last byte is half a character
    lines = asyncio.run(_lines_of([b'data: {"a":1}\r', b"\xe4"]))
    # Then the CR ended its line, and the half character is a line of its own
    assert lines == ['data: {"a":1}', "\ufffd"]


def test_many_short_lines_never_trip_the_line_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "_MAX_LINE_CHARS", 50)
    body = b"".join(b"data: %d\r\n\r\n" % n for n in range(2000))
    assert len(asyncio.run(_lines_of([body[i : i + 7] for i in range(0, len(body), 7)]))) == 4000


_WHOLE = json.dumps(
    {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "the whole answer"},
                "finish_reason": "stop",
            }
        ]
    }
).encode()
_CONTEXT_ERROR = json.dumps(
    {"error": {"message": "maximum context length is 8192 tokens", "code": "context_length_exceeded"}}
).encode()


def _answered(pieces: list[bytes], content_type: str, stream: bool = True) -> ChatCompletionsProvider:
    return _provider(
        lambda request: httpx.Response(200, stream=_Pieces(*pieces), headers={"content-type": content_type}),
        stream=stream,
    )


async def test_one_json_body_after_a_gateways_keep_alives_is_read_as_one() -> None:
    # (review 259: a keep-alive comment first made it read as a stream, cut: a paid completion
    # retried, paying again, and a request's own error retried until its retries ran out)
    keep_alive = b": keep-alive\n\n"
    kept = _answered([keep_alive, keep_alive, _WHOLE], "text/event-stream")
    assert (await kept.generate(REQUEST, 5)).output == "the whole answer"
    with pytest.raises(PermanentProviderError):
        await _answered([keep_alive, _CONTEXT_ERROR], "text/event-stream").generate(REQUEST, 5)


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream", "application/x-ndjson"])
async def test_json_lines_are_no_answer_at_their_first_line(content_type: str) -> None:
    # (review 259: taken as soon as its first line parsed, a job succeeded with "Hel")
    first = json.dumps({"choices": [{"index": 0, "message": {"content": "Hel"}}]}).encode() + b"\n"
    second = json.dumps(
        {"choices": [{"index": 0, "message": {"content": "lo"}, "finish_reason": "stop"}]}
    ).encode()
    provider = _answered([first, second + b"\n"], content_type)
    with pytest.raises(TransientProviderError):
        await provider.generate(REQUEST, 5)


@pytest.mark.parametrize(
    ("code", "for_good"),
    [
        ("ResourceNotFoundException", True),
        ("AccessDeniedException", True),
        ("DecryptionFailure", True),
        ("ThrottlingException", False),
        ("InternalServiceError", False),
    ],
)
async def test_a_key_store_refusing_for_good_is_the_operators_to_fix(code: str, for_good: bool) -> None:
    # Given a key store that refuses, as Powertools' parameters raise it (the AWS error the
    # context of its own), and a provider that would answer
    from aws_lambda_powertools.utilities.parameters.exceptions import GetParameterError
    from botocore.exceptions import ClientError

    def read(fresh: bool) -> str:
        try:
            status = 500 if code.startswith("Internal") else 400
            raise ClientError(
                {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetSecretValue"
            )
        except ClientError as exc:
            raise GetParameterError(str(exc))  # noqa: B904 (as Powertools raises it)

    sent: list[httpx.Request] = []
    provider = ChatCompletionsProvider(
        "http://provider.test/v1",
        ProviderKey(read),
        False,
        httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200, content=_WHOLE)),
    )
    with pytest.raises(TransientProviderError) as raised:
        await provider.generate(REQUEST, 5)
    # Then nothing is sent; one refusing for good (a secret deleted, a grant or KMS key gone) is
    # about llmq's account, as a provider refusing its key is: minutes between attempts and the
    # ProviderAccountRefused alarm (hunt 275: seconds apart, failed as not retryable, no page)
    assert sent == []
    assert raised.value.about_account is for_good


class _WholeThenOpen(httpx.AsyncByteStream):
    """A whole completion, then the connection held open (its chunked end never sent)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield _WHOLE
        await asyncio.sleep(3600)


async def test_a_whole_json_body_left_open_near_the_calls_end_is_kept_at_once() -> None:
    # (review 260: a 2 s wait for the body's end outlasted the call's time, and a cancel meanwhile
    # threw the paid answer away)
    provider = _provider(lambda request: httpx.Response(200, stream=_WholeThenOpen()))
    assert (await provider.generate(REQUEST, 1.5)).output == "the whole answer"


async def test_a_large_json_body_of_many_pieces_is_parsed_a_few_times_not_at_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a 1 MB completion whose content is JSON text, sent in a thousand pieces each ending
    # in a closing brace
    content = ('{"k": "' + "x" * 990 + '"}') * 1000
    body = json.dumps(
        {"choices": [{"index": 0, "message": {"content": content}, "finish_reason": "stop"}]}
    ).encode()
    pieces, start = [], 0
    while (end := body.find(b"}", start + 900)) >= 0:
        pieces.append(body[start : end + 1])
        start = end + 1
    pieces.append(body[start:])
    parsed: list[int] = []
    finished = providers._finished_completion
    monkeypatch.setattr(
        providers, "_finished_completion", lambda data: parsed.append(len(data)) or finished(data)
    )
    provider = _provider(lambda request: httpx.Response(200, stream=_Pieces(*pieces)))
    # When it is read, then it is whole, parsed only as it doubled (review 259: at each piece,
    # seconds of CPU for a few MB)
    assert (await provider.generate(REQUEST, 30)).output == content
    assert len(pieces) > 500 and len(parsed) <= 12, (len(pieces), len(parsed))


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
@pytest.mark.parametrize("stream", [False, True])
async def test_json_lines_each_marked_finished_are_no_answer_at_their_first_line(
    content_type: str, stream: bool
) -> None:
    # (review 261: taken at its first whole, finished line, a job succeeded with "Hel")
    first, second = (
        json.dumps(
            {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}]}
        ).encode()
        + b"\n"
        for text in ("Hel", "lo")
    )
    provider = _answered([first, second], content_type, stream=stream)
    with pytest.raises(TransientProviderError):
        await provider.generate(REQUEST, 5)


class _BigThenOpen(httpx.AsyncByteStream):
    """A whole completion whose text is full of braces, in two pieces, then held open."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.ended_at: float | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        cut = self.body.find(b"}", int(len(self.body) * 0.6)) + 1
        yield self.body[:cut]
        await asyncio.sleep(0.05)
        yield self.body[cut:]
        self.ended_at = time.monotonic()
        await asyncio.sleep(3600)


async def test_a_whole_finished_json_answer_is_marked_whole_as_its_last_byte_comes() -> None:
    # Given a whole, finished completion whose text is full of braces, its connection then held
    content = "a}" * 40_000
    stream = _BigThenOpen(
        json.dumps(
            {"choices": [{"index": 0, "message": {"content": content}, "finish_reason": "stop"}]}
        ).encode()
    )
    provider = _provider(lambda request: httpx.Response(200, stream=stream))
    answer = Answer()
    generation = asyncio.create_task(provider.generate(dataclasses.replace(REQUEST, answer=answer), 30))
    while stream.ended_at is None:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    # Then as soon as its last byte is in, it is whole: a cancel now keeps it (review 261: for
    # up to 2 s it was neither returned nor marked whole, and a cancel threw it away)
    assert answer.whole and answer.result is not None
    assert answer.result().output == content
    assert (await generation).output == content


class _ThenCutOrHeld(httpx.AsyncByteStream):
    def __init__(self, body: bytes, after: str) -> None:
        self.body, self.after = body, after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        if self.after == "cut":
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        await asyncio.sleep(3600)


@pytest.mark.parametrize("after", ["cut", "held open"])
@pytest.mark.parametrize("stream", [False, True])
async def test_json_lines_read_in_one_piece_are_no_answer_at_their_first_line(
    after: str, stream: bool
) -> None:
    # (review 262: only what came in a later piece was looked at after the first line's end)
    lines = b"".join(
        json.dumps(
            {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}]}
        ).encode()
        + b"\n"
        for text in ("Hel", "lo")
    )
    provider = _provider(
        lambda request: httpx.Response(
            200, stream=_ThenCutOrHeld(lines, after), headers={"content-type": "application/x-ndjson"}
        ),
        stream=stream,
    )
    answer = Answer()
    with pytest.raises(ProviderError):
        await provider.generate(dataclasses.replace(REQUEST, answer=answer), 3)
    assert not answer.whole


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json", None])
async def test_a_paid_json_answer_with_a_byte_that_is_not_utf_8_is_kept(
    stream: bool, content_type: str | None
) -> None:
    # Given a whole completion cut at max_tokens inside a character (or from a Latin-1 gateway)
    body = (
        b'{"choices":[{"index":0,"message":{"role":"assistant","content":"caf\xe9 \xe4\xbd"},'
        b'"finish_reason":"length"}]}'
    )
    headers = {"content-type": content_type} if content_type else {}
    provider = _provider(lambda request: httpx.Response(200, content=body, headers=headers), stream=stream)
    # Then it is the job's answer, the bytes read as a stream's are: never retried, paying
    # again (review 263: a streamed request answered so was, where 24a3360 kept it)
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("caf\ufffd \ufffd", "length")


class _Spaced(httpx.AsyncByteStream):
    """A stream whose events come `gap` seconds apart, then [DONE]."""

    def __init__(self, events: list[dict[str, Any]], gap: float) -> None:
        self.events, self.gap = events, gap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield _sse(event).encode()
            await asyncio.sleep(self.gap)
        yield b"data: [DONE]\n\n"


def _marked_with_usage(delta: dict[str, Any]) -> dict[str, Any]:
    """A chunk of a gateway that marks every chunk finished and repeats the usage in each."""
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": "stop"}], "usage": usage}


def _thinking_part(text: str) -> dict[str, Any]:
    """Thinking as Mistral's reasoning models (Magistral) stream it: content parts."""
    return {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": text}]}]}


@pytest.mark.parametrize(
    "thinking", [lambda text: {"reasoning_content": text}, _thinking_part], ids=["reasoning_content", "parts"]
)
async def test_thinking_a_gateway_marks_finished_is_never_a_whole_answer(
    monkeypatch: pytest.MonkeyPatch, thinking: Callable[[str], dict[str, Any]]
) -> None:
    monkeypatch.setattr(providers, "_WHOLE_TRAILER_SECONDS", 0.2)
    monkeypatch.setattr(providers, "_AFTER_FINISH_SECONDS", 0.2)
    # Given a gateway that marks each chunk finished, with usage, the reasoning's chunks too
    events = [_marked_with_usage(thinking(f"t{n} ")) for n in range(4)]
    events += [_marked_with_usage({"content": "Hello"}), _marked_with_usage({"content": " world"})]
    provider = _provider(lambda request: httpx.Response(200, stream=_Spaced(events, gap=0.3)), stream=True)
    # When the model thinks longer than the wait for a whole answer's trailer
    result = await provider.generate(REQUEST, 10)
    # Then its answer is read to the end, not taken empty mid-thought (review 283)
    assert (result.output, result.finish_reason) == ("Hello world", "stop")
    # And a cut mid-thought (after its first chunk, or more) is a cut, not an empty success
    for thought in (1, 2):
        head = _sse(*events[:thought]).encode()
        cut = _provider(lambda request, head=head: httpx.Response(200, stream=_Broken(head)), stream=True)
        with pytest.raises(TransientProviderError):
            await cut.generate(REQUEST, 5)


@pytest.mark.parametrize("index", [1, "0"])
@pytest.mark.parametrize("stream", [True, False])
async def test_an_answer_whose_one_choice_is_numbered_otherwise_is_kept(index: object, stream: bool) -> None:
    # Given a server that numbers its one choice from 1, or writes its index as a string
    if stream:
        body = _sse(
            {"choices": [{"index": index, "delta": {"content": "Paid answer"}, "finish_reason": None}]},
            {"choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]},
            "[DONE]",
        )
    else:
        choice = {"index": index, "message": {"content": "Paid answer"}, "finish_reason": "stop"}
        body = json.dumps({"choices": [choice]})
    provider = _provider(lambda request: httpx.Response(200, text=body), stream=stream)
    # When the job calls it, then the answer is kept (review 283: "answered without choices",
    # paid for again at each attempt)
    result = await provider.generate(REQUEST, 5)
    assert (result.output, result.finish_reason) == ("Paid answer", "stop")
