"""An OpenAI-compatible chat-completions client, and the classification of every failure.

Every failure becomes either a `TransientProviderError` (retry later, maybe after
`retry_after` seconds) or a `PermanentProviderError` with a code from the closed set.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from llmq.models import ChatMessage, ErrorCode, GenerationParams, JobResult, Usage

_PERMANENT_CODES = {
    "context_length_exceeded": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    "string_above_max_length": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    "content_filter": ErrorCode.CONTENT_FILTERED,
    "content_filtered": ErrorCode.CONTENT_FILTERED,
    "content_policy_violation": ErrorCode.CONTENT_FILTERED,
    "model_not_found": ErrorCode.MODEL_NOT_FOUND,
}
# Statuses worth retrying. 401/403 are included: they mean our key is wrong or rotated,
# which an operator fixes; the job itself is not at fault and should not fail at once.
_TRANSIENT_STATUSES = {401, 403, 408, 409, 425, 429}
_MAX_MESSAGE = 300


class ProviderError(Exception):
    def __init__(self, code: ErrorCode, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message[:_MAX_MESSAGE]
        self.status_code = status_code


class TransientProviderError(ProviderError):
    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        retry_after: float | None = None,
        code: ErrorCode = ErrorCode.PROVIDER_UNAVAILABLE,
    ) -> None:
        super().__init__(code, message, status_code)
        self.retry_after = retry_after


class PermanentProviderError(ProviderError):
    pass


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    messages: list[ChatMessage]
    params: GenerationParams
    # Sent as a header so a provider (or our fake) can correlate calls without the prompt.
    job_id: str | None = None


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify_response(response: httpx.Response, body: bytes) -> ProviderError:
    """The error for a non-2xx answer."""
    status = response.status_code
    code, message = _error_fields(body)
    message = message or f"provider answered {status}"
    if status in _TRANSIENT_STATUSES or status >= 500:
        return TransientProviderError(message, status, parse_retry_after(response.headers))
    if code in _PERMANENT_CODES:
        return PermanentProviderError(_PERMANENT_CODES[code], message, status)
    if status == 404:
        return PermanentProviderError(ErrorCode.MODEL_NOT_FOUND, message, status)
    return PermanentProviderError(ErrorCode.INVALID_REQUEST, message, status)


def classify_exception(exc: httpx.HTTPError) -> TransientProviderError:
    if isinstance(exc, httpx.TimeoutException):
        return TransientProviderError("the provider did not answer in time")
    return TransientProviderError(f"could not reach the provider: {type(exc).__name__}")


def _error_fields(body: bytes) -> tuple[str | None, str | None]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, None
    code = error.get("code") or error.get("type")
    message = error.get("message")
    return (str(code) if code else None), (str(message) if message else None)


class ChatCompletionsProvider:
    """POST {base_url}/chat/completions, streaming or not."""

    def __init__(
        self,
        base_url: str,
        api_key: Callable[[], str | None],
        stream: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.stream = stream
        self._transport = transport

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        payload = self._payload(request)
        headers = {"content-type": "application/json"}
        if request.job_id:
            headers["x-llmq-job-id"] = request.job_id
        key = self._api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds))
        try:
            # httpx bounds each read; this bounds the whole call, so a stream that trickles
            # forever still ends before the Lambda does.
            async with (
                asyncio.timeout(timeout_seconds),
                httpx.AsyncClient(timeout=timeout, transport=self._transport) as client,
            ):
                if self.stream:
                    return await self._generate_streaming(client, payload, headers)
                response = await client.post(
                    f"{self.base_url}/chat/completions", json=payload, headers=headers
                )
                if response.status_code >= 300:
                    raise classify_response(response, response.content)
                return _parse_completion(response.content)
        except TimeoutError as exc:
            raise TransientProviderError("the provider did not finish in time") from exc
        except httpx.HTTPError as exc:
            raise classify_exception(exc) from exc

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": [message.model_dump() for message in request.messages],
            **request.params.model_dump(exclude_none=True),
        }
        if self.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    async def _generate_streaming(
        self, client: httpx.AsyncClient, payload: dict[str, Any], headers: dict[str, str]
    ) -> JobResult:
        url = f"{self.base_url}/chat/completions"
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code >= 300:
                raise classify_response(response, await response.aread())
            # Cancelling the task that awaits here closes the connection between chunks,
            # which is how a running job stops being billed.
            parts: list[str] = []
            finish_reason: str | None = None
            usage = Usage()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = _json_or_error(data.encode())
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        parts.append(delta["content"])
                    finish_reason = choice.get("finish_reason") or finish_reason
                if chunk.get("usage"):
                    usage = _usage(chunk["usage"])
            return JobResult(output="".join(parts), finish_reason=finish_reason, usage=usage)


def _json_or_error(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TransientProviderError(
            "the provider sent a malformed answer", code=ErrorCode.PROVIDER_ERROR
        ) from exc
    if not isinstance(data, dict):
        raise TransientProviderError("the provider sent a malformed answer", code=ErrorCode.PROVIDER_ERROR)
    return data


def _usage(raw: dict[str, Any]) -> Usage:
    return Usage(
        input_tokens=int(raw.get("prompt_tokens") or raw.get("input_tokens") or 0),
        output_tokens=int(raw.get("completion_tokens") or raw.get("output_tokens") or 0),
    )


def _parse_completion(body: bytes) -> JobResult:
    data = _json_or_error(body)
    choices = data.get("choices") or []
    if not choices:
        raise TransientProviderError("the provider answered without choices", code=ErrorCode.PROVIDER_ERROR)
    first = choices[0]
    message = first.get("message") or {}
    return JobResult(
        output=str(message.get("content") or ""),
        finish_reason=first.get("finish_reason"),
        usage=_usage(data.get("usage") or {}),
    )
