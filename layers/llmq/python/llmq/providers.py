"""An OpenAI-compatible chat-completions client, and the classification of every failure.

Every failure becomes one of three errors:
- `TransientProviderError`: retry later, maybe after `retry_after` seconds;
- `PermanentProviderError`, with a code from the closed set: the request itself is at fault;
- `ProviderTimeout`: the request may have reached the provider, which may still be generating
  (and billing) it, so a retry could pay twice. With `retry_timeouts` it is transient instead.

An error reported inside a 200 answer (an SSE error event, or a JSON body that is only an
`error`) is classified like the HTTP error it stands for, and an answer that stops before the
generation finished is never a success.

A 401 or 403 means the provider refused our key: the key is read again at once, bypassing its
cache, and the call is made once more if the key changed (`ProviderKey`).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import contextvars
import json
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import httpx

from llmq.live_output import printable
from llmq.models import ChatMessage, ErrorCode, GenerationParams, JobResult, Usage
from llmq.retry_after import parse_retry_after
from llmq.telemetry import logger

_PERMANENT_CODES = {
    "context_length_exceeded": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    "string_above_max_length": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
    "content_filter": ErrorCode.CONTENT_FILTERED,
    "content_filtered": ErrorCode.CONTENT_FILTERED,
    "content_policy_violation": ErrorCode.CONTENT_FILTERED,
    "model_not_found": ErrorCode.MODEL_NOT_FOUND,
    # llama.cpp's server, inside its 200 stream
    "exceed_context_size_error": ErrorCode.CONTEXT_LENGTH_EXCEEDED,
}
# The codes by which a 404 says the model is unknown (OpenAI's, vLLM's and Anthropic's error
# types, Databricks' error_code, lower-cased): any other 404 is the operator's to fix.
_MODEL_MISSING_CODES = frozenset(
    {"model_not_found", "notfounderror", "not_found_error", "resource_does_not_exist"}
)
# Statuses worth retrying. 401/403 are included: they mean our key is wrong or rotated,
# which an operator fixes; the job itself is not at fault and should not fail at once. So does
# 402 (the provider account is out of credit: DeepSeek, OpenRouter), and so does a redirect
# (a base URL that moved): failing them would fail the whole backlog as the client's fault.
# 424 is a provider's model failing behind it (Bedrock's ModelErrorException, SageMaker's and
# Hugging Face endpoints' model errors), 499 a gateway whose upstream call was cancelled: the
# provider's fault, not the request's.
_TRANSIENT_STATUSES = {401, 402, 403, 408, 409, 424, 425, 429, 499}
# The statuses that say the provider refused our key.
_KEY_REFUSED_STATUSES = {401, 403}
# The HTTP status an in-band error's type stands for, when the error carries no status
# (OpenAI, Anthropic, vLLM and Ollama spellings, lower-cased).
_STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "badrequesterror": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "notfounderror": 404,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "server_error": 500,
    "internal_server_error": 500,
    "api_error": 500,
    "overloaded_error": 503,
    "service_unavailable": 503,
    # Hugging Face TGI's `error_type`, beside an `error` that is only its message.
    "validation": 400,
    "template_error": 400,
    "tool_error": 400,
    "overloaded": 503,
}
_MAX_MESSAGE = 300
# An error answer's body is read for its code and message only: this much of it, for at most
# this long. The status alone already says whether the request was refused.
_MAX_ERROR_BODY = 64 * 1024
_ERROR_BODY_SECONDS = 5.0
_STREAM_CUT = "the provider's stream ended before the generation finished"
# A connection that drops this long after the whole request went out, unanswered, may have left
# the provider generating it (`_Progress.unanswered`).
_UNANSWERED_AFTER_SECONDS = 1.0
# What a gateway in front of the model answers when it gave up waiting for it: 504 (nginx's
# proxy_read_timeout, an ALB's idle timeout, API gateways), Cloudflare's 524 (its 100 s to the
# origin's first byte) and 598 (a network read timeout, some proxies). Answered after the
# gateway held the whole request a while, the model behind it may be generating, and billing,
# it still: a timeout (`_Progress.held`), as a dropped connection is (hunt 303).
_GATEWAY_TIMEOUTS = frozenset({504, 524, 598})
_ANSWER_CUT = "the provider's answer was cut off before it was complete"
_CUT_BEFORE_ANSWER = "the provider's connection closed before its answer began"


class _CutBeforeAnswer(Exception):
    """The answer ended after its headers but before any of its content: only keep-alive
    whitespace (OpenRouter's, under a non-streamed call), SSE comments, heartbeats or chunks
    that carry no answer (a role, Azure's prompt filter results) came, and then the connection
    broke or the body ended; or a gateway's timeout said so in the body (`error`: OpenRouter
    answers 200 once a model starts, and reports a later timeout in band). The model may be
    generating, and billing, the request still: `_call` judges it as a drop before any answer
    (`_Progress.unanswered`), not as an answer cut part way (hunt 303, review 269)."""

    def __init__(self, error: ProviderError | None = None) -> None:
        super().__init__(
            _CUT_BEFORE_ANSWER
            if error is None
            else f"a gateway reported a timeout ({error.status_code}) before the answer began"
        )
        self.error = error


# An in-band error that says a gateway gave up waiting: its timeouts, and 408 (OpenRouter's
# "your request timed out").
_IN_BAND_TIMEOUTS = frozenset({408, *_GATEWAY_TIMEOUTS})


def _before_answer(error: ProviderError) -> Exception:
    """An in-band error that came before any of the answer: a gateway's timeout is judged as
    a drop before any answer, anything else raised as it is."""
    if isinstance(error, TransientProviderError) and error.status_code in _IN_BAND_TIMEOUTS:
        return _CutBeforeAnswer(error)
    return error


# The provider keys of the call under way, and its request's texts: what no message a job keeps
# may carry (a key), nor any the operator's log keeps (either), whatever the provider's answer
# quotes (hunt 325: a proxy's 500 quoting the request's `Authorization: Bearer <key>` put the
# operator's key in the tenant's job and webhook; a 401 echoing a short key, or the input, put
# it in the log, which `_KEY_LIKE` alone does not recognise).
_CALL_KEYS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("llmq_call_keys", default=())
_CALL_TEXTS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("llmq_call_texts", default=())
# Shorter request texts are not cut out of the log (a prompt "hi" would cut words apart), nor
# shorter keys out of any message (a sandbox's or a test's "x" is no secret).
_MIN_TEXT_CUT = 8
_MIN_KEY_CUT = 6


@contextlib.contextmanager
def _unsaid(keys: Iterable[str | None], texts: Iterable[str] = ()) -> Iterator[None]:
    """Within: `keys` (and `texts`, for the log) are cut out of what the provider says."""
    cut = [key.strip() for key in keys if key and len(key.strip()) >= _MIN_KEY_CUT]
    kept = _CALL_KEYS.set((*_CALL_KEYS.get(), *cut))
    said = _CALL_TEXTS.set((*_CALL_TEXTS.get(), *(text for text in texts if len(text) >= _MIN_TEXT_CUT)))
    try:
        yield
    finally:
        _CALL_TEXTS.reset(said)
        _CALL_KEYS.reset(kept)


def _cut_keys(text: str) -> str:
    """`text` without the call's keys, in any case (a code name is lower-cased), nor a part of
    one at either end (a proxy's message cut at its own length limit; review 280)."""
    for key in sorted(set(_CALL_KEYS.get()), key=len, reverse=True):
        text = re.sub(re.escape(key), "[…]", text, flags=re.IGNORECASE)
        lowered = text.lower()
        for size in range(len(key) - 1, _MIN_KEY_CUT - 1, -1):
            if lowered.endswith(key[:size].lower()):
                text = text[:-size] + "[…]"
                break
        lowered = text.lower()
        for size in range(len(key) - 1, _MIN_KEY_CUT - 1, -1):
            if lowered.startswith(key[-size:].lower()):
                text = "[…]" + text[size:]
                break
    return text


# A run this long shared with the request's text (or its JSON form, as a gateway quoting the
# request's body writes it) is the request quoted: the provider's message is not logged.
_QUOTED_RUN = 16


def _quotes_the_request(text: str) -> bool:
    """Whether `text` quotes the call's request texts, whole, cut short or JSON-escaped (review
    280: only the whole text as sent was cut out, so a gateway's echo of the body reached the
    log)."""
    text = text[:_MAX_MESSAGE]
    texts = [
        form
        for said in _CALL_TEXTS.get()
        for form in (said, json.dumps(said)[1:-1], json.dumps(said, ensure_ascii=False)[1:-1])
    ]
    return any(
        text[start : start + _QUOTED_RUN] in form
        for start in range(max(0, len(text) - _QUOTED_RUN + 1))
        for form in texts
    )


class ProviderError(Exception):
    def __init__(self, code: ErrorCode, message: str, status_code: int | None = None) -> None:
        message = _cut_keys(message)
        super().__init__(message)
        self.code = code
        # Kept on the job: as UTF-8 can hold it (a provider's message may carry half an emoji,
        # a proxy having cut it, which no store, queue or JSON answer takes); never the key.
        self.message = printable(message[:_MAX_MESSAGE])
        # The HTTP status, or the one an in-band error event reported.
        self.status_code = status_code
        # The provider answered 401 or 403: it refused our key before generating anything.
        self.key_refused = False
        # It refused llmq's own account (a key, a 402 or a quota out of credit): an operator's
        # to fix, not the job's fault; retried slowly (`RetryPolicy.account_error_seconds`).
        self.about_account = False


# Statuses by which a provider refuses a request before generating anything, for a while: its
# rate limit, its capacity (503; Anthropic-compatible gateways' 529 "overloaded"). Not a 5xx
# that may come after the request was processed, nor a gateway's timeout.
_UNBILLED_REFUSALS = frozenset({429, 503, 529})


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
        # The provider refused the request at once, before generating (`_UNBILLED_REFUSALS`):
        # nothing was paid for (`RetryPolicy.max_refusals`).
        self.refused = False


class PermanentProviderError(ProviderError):
    pass


class ProviderTimeout(ProviderError):
    """The call ran out of time after the request may have been sent.

    Not transient on purpose: the provider may still be generating, and billing, the answer
    nobody will read; retrying would start a second one. The client decides.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.PROVIDER_TIMEOUT, message)


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    messages: list[ChatMessage]
    params: GenerationParams
    # Sent as a header so a provider (or our fake) can correlate calls without the prompt.
    job_id: str | None = None
    # Called with each piece of output text as it streams in (a `stream: true` job's
    # `llmq.live_output.OutputRecorder`) when the provider streams (`provider.stream`); not
    # compared, hashed or sent.
    on_output: Callable[[str], None] | None = field(default=None, compare=False)
    # Set by the provider as the stream goes (`Answer.whole`), for the worker to read; not
    # compared, hashed or sent.
    answer: Answer | None = field(default=None, compare=False)


@dataclass
class Answer:
    """What a streamed generation has said so far. `whole`: it finished, alone, and only its
    trailer (the usage chunk, [DONE]) is awaited, at most `TRAILER_WAIT_SECONDS` more: a cancel
    that comes now would throw away an answer already paid for."""

    whole: bool = False
    # Once whole: the answer as it stands (its trailer may still come), kept should the call's
    # deadline cut the wait for that trailer short.
    result: Callable[[], JobResult] | None = field(default=None, repr=False)


def classify_response(response: httpx.Response, body: bytes, *, log: bool = True) -> ProviderError:
    """The error for a non-2xx answer; `log`: an account error's text goes to the operator's
    log (once per answer: not for a look at its status alone)."""
    status = response.status_code
    found = _error_object(_body_object(body))
    names, message = _error_fields(found)
    message = message or f"provider answered {status}"
    if status == 403 and found is not None and _flagged(found):
        # A moderated model's refusal of the prompt (OpenRouter answers it 403, with the
        # reasons): the request's own fault, never retried, and not a refused key.
        return PermanentProviderError(ErrorCode.CONTENT_FILTERED, message, status)
    wait = parse_retry_after(response.headers, time.time())
    if wait is None and status == 429:
        wait = _stated_wait(response.headers, found)
    if status == 404 and not _MODEL_MISSING_CODES & set(names):
        # No unknown model named (an HTML page, a web framework's `{"detail": "Not Found"}`, a
        # gateway's `endpoint_not_found`, a bare error string): most likely a base URL that
        # names no chat-completions endpoint, or a model the provider does not serve to llmq's
        # account; either way the operator's to fix (the models are theirs to allow), and
        # failing it as the client's unknown model would fail the whole backlog.
        return _missing_endpoint(status, log)
    if 300 <= status < 400 or status == 405 or (status == 400 and found is None and _html(body)):
        # A redirect (an http:// base URL behind "always HTTPS"), a method not allowed, or a
        # proxy's HTML 400 (plain HTTP to an HTTPS port): the base URL is wrong, the operator's
        # to fix; not the request's, which failed the backlog for good, nor a retry seconds
        # apart that spent its attempts (hunt 297).
        return _missing_endpoint(status, log)
    if status < 500 and _OUT_OF_CREDIT_CODES & set(names):
        # (LiteLLM answers a budget exceeded 400: llmq's account, never the request's)
        return _account_error(status, names, message, status, wait, log)
    if status < 500 and _KEY_REFUSED_REASONS & _reasons(found):
        # (Google's OpenAI-compatible endpoint answers a bad or expired key 400)
        refused = _account_error(status, names, message, status, wait, log, reads_as=401)
        refused.key_refused = True
        return refused
    if (
        status in (400, 413, 422)
        and not _PERMANENT_CODES.keys() & set(names)
        and _CONTEXT_TOO_LONG.search(message)
    ):
        # (vLLM, TGI and OpenRouter say a prompt past the model's context only in words)
        return PermanentProviderError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, message, status)
    error = _classify(status, names, message, status, wait, log=log)
    # Only an HTTP answer counts: it refused the request before any generation started.
    error.key_refused = status in _KEY_REFUSED_STATUSES
    return error


# How vLLM, TGI and OpenRouter word a prompt past the model's context, with no code for it.
_CONTEXT_TOO_LONG = re.compile(
    r"maximum context length|context length (?:is|of) \d|`inputs` tokens \+ `max_new_tokens` must be", re.I
)


def _html(body: bytes) -> bool:
    """An HTML page (a proxy's), not an API's error."""
    return body.lstrip()[:1] == b"<"


def _reasons(error: dict[str, Any] | None) -> set[str]:
    """A Google error's ErrorInfo reasons, lower-cased."""
    return {str(detail.get("reason", "")).lower() for detail in _dicts((error or {}).get("details"))}


def _flagged(error: dict[str, Any]) -> bool:
    metadata = error.get("metadata")
    return isinstance(metadata, dict) and bool(metadata.get("reasons") or metadata.get("flagged_input"))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_RESET_HEADERS = ("x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-reset")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float | None:
    """A Go-style duration (`6m0s`, `1.5s`, `20ms`) or a protobuf one (`37s`), in seconds."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(number + unit for number, unit in parts) != text.strip():
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _stated_wait(headers: httpx.Headers, error: dict[str, Any] | None) -> float | None:
    """The wait a 429 states other than by Retry-After: OpenAI's `x-ratelimit-reset-*` of a
    limit with nothing remaining, or a Google RetryInfo's `retryDelay` in the body."""
    waits = []
    for kind in ("requests", "tokens"):
        reset = _duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
        if reset is not None and headers.get(f"x-ratelimit-remaining-{kind}", "0").strip() == "0":
            waits.append(reset)
    # OpenRouter's `X-RateLimit-Reset`, epoch milliseconds, in the headers or its error's
    # metadata (hunt 297: not read, a job's attempts were spent inside the limit's minute);
    # the IETF draft's `RateLimit-Reset`, seconds
    stated = (error or {}).get("metadata")
    inner = stated.get("headers") if isinstance(stated, dict) else None
    named = {
        str(key).lower(): str(value) for key, value in (inner.items() if isinstance(inner, dict) else ())
    }
    named.update({key: value for key, value in headers.items() if key in _RESET_HEADERS})
    if named.get("x-ratelimit-remaining", "0").strip() == "0":
        reset_at = named.get("x-ratelimit-reset", "").strip()
        if reset_at.isascii() and reset_at.isdigit() and len(reset_at) <= 16:
            value = int(reset_at)
            waits.append(
                value / 1000 - time.time()
                if value > 10**11
                else value - time.time()
                if value > 10**9
                else value
            )
    draft = named.get("ratelimit-reset", "").strip()
    if draft.isascii() and draft.isdigit() and len(draft) <= 9:
        waits.append(float(draft))
    waits = [wait for wait in waits if wait > 0]
    for detail in _dicts((error or {}).get("details")):
        if str(detail.get("@type", "")).endswith("RetryInfo") and isinstance(detail.get("retryDelay"), str):
            delay = _duration(detail["retryDelay"])
            if delay is not None:
                waits.append(delay)
    return max(waits) if waits else None


def classify_error_event(error: object) -> ProviderError:
    """The error for an `error` object inside a 200 answer: an SSE event or a JSON body.

    It is classified like the HTTP error it stands for: by its status when it reports one
    (`"code": 503`, `"status": 429`); else a known permanent code (`context_length_exceeded`)
    fails the job; else its type stands for a status (`server_error`, `overloaded_error`,
    `rate_limit_exceeded`, `invalid_request_error`). Anything else is transient: the provider
    accepted the request and then failed while generating, its fault until it says otherwise.
    """
    fields = error if isinstance(error, dict) else {"message": str(error)}
    names = _names(fields)
    reported = _status_hint(fields)
    message = str(fields.get("message") or "the provider reported an error in its answer")
    if reported is not None:
        return _classify(reported, names, message, reported, None)
    permanent = next((_PERMANENT_CODES[name] for name in names if name in _PERMANENT_CODES), None)
    if permanent is not None:
        return PermanentProviderError(permanent, message)
    implied = next((_STATUS_OF_TYPE[name] for name in names if name in _STATUS_OF_TYPE), None)
    if implied is not None:
        return _classify(implied, names, message, None, None)
    return TransientProviderError(message, code=ErrorCode.PROVIDER_ERROR)


# What a tenant reads of an error about llmq's own provider account rather than its request: in
# llmq's words. The provider's own text can quote the operator's key (OpenAI's 401 shows its
# last characters), name its organization and the account's usage across every tenant (a 429),
# or an upstream host of a proxy. Its code names stay (`invalid_api_key`, `insufficient_quota`).
_ACCOUNT_ERRORS = {
    401: "the provider refused llmq's credentials",
    403: "the provider refused the request for llmq's account",
    402: "the provider account is out of credit",
    429: "the provider is rate-limiting llmq's account",
}
# Codes that say more than the status (OpenAI answers an account out of credit with a 429).
_OUT_OF_CREDIT_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "budget_exceeded"})
# Google's ErrorInfo reasons of a key refused (its OpenAI-compatible endpoint answers them 400).
_KEY_REFUSED_REASONS = frozenset({"api_key_invalid", "api_key_expired"})
_CODE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# What a bearer token in a header may hold: printable ASCII.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def key_fits_a_header(key: str) -> bool:
    """Whether a provider key, stripped, can be sent in an HTTP header (the worker refuses one
    that cannot: curly quotes or a zero-width space from a paste, a key wrapped over lines)."""
    return bool(_HEADER_SAFE.fullmatch(key.strip()))


# What the operator's log keeps of the provider's own text: a key-like token is cut out.
_KEY_LIKE = re.compile(
    r"\b(?:(?:sk|pk|rk|gsk|key|org|proj)[-_]|ABSK)[A-Za-z0-9_*.+/=-]{4,}|[A-Za-z0-9_+/=-]{32,}"
)


def _account_error(
    status: int,
    names: list[str],
    provider_said: str,
    status_code: int | None,
    retry_after: float | None,
    log: bool,
    reads_as: int | None = None,
) -> TransientProviderError:
    """An error about llmq's provider account, in llmq's own words with the provider's code
    names; never the provider's message, which goes to the operator's log only (key-like
    tokens cut out): a warning when the account is refused, a note for a rate limit."""
    codes = _codes(names)
    out_of_credit = bool(_OUT_OF_CREDIT_CODES & set(codes))
    said = _ACCOUNT_ERRORS[402] if out_of_credit else _ACCOUNT_ERRORS[reads_as or status]
    error = TransientProviderError(
        f"{said} (HTTP {status})" + (f": {', '.join(codes)}" if codes else ""), status_code, retry_after
    )
    error.about_account = (reads_as or status) != 429 or out_of_credit
    _tell_operator(
        logger.warning if error.about_account else logger.info, said, status, codes, provider_said, log
    )
    return error


def _missing_endpoint(status: int, log: bool) -> TransientProviderError:
    said = (
        f"the provider answered {status} with no error of its own: check provider.base_url, "
        "and that the provider serves the model to llmq's account"
    )
    error = TransientProviderError(f"{said} (HTTP {status})", status)
    error.about_account = True
    _tell_operator(logger.warning, said, status, [], "", log)
    return error


def _codes(names: list[str]) -> list[str]:
    """The provider's code names a tenant may read: identifiers, each once."""
    return list(dict.fromkeys(name for name in names if _CODE_NAME.fullmatch(name)))


def _tell_operator(
    log_at: Callable[..., None], said: str, status: int, codes: list[str], provider_said: str, log: bool
) -> None:
    """What the provider said, for the operator's log only (the call's keys, key-like tokens
    and the request's texts cut out)."""
    if log:
        kept = _cut_keys(provider_said)
        if _quotes_the_request(kept):
            kept = "[withheld: it quotes the request]"
        log_at(
            said,
            extra={
                "status_code": status,
                "provider_codes": [_cut_keys(code) for code in codes],
                "provider_message": _KEY_LIKE.sub("[…]", kept)[:_MAX_MESSAGE],
            },
        )


def _classify(
    status: int,
    names: list[str],
    message: str,
    status_code: int | None,
    retry_after: float | None,
    *,
    log: bool = True,
) -> ProviderError:
    permanent = next((_PERMANENT_CODES[name] for name in names if name in _PERMANENT_CODES), None)
    if status == 403 and permanent is ErrorCode.CONTENT_FILTERED:
        # (a refusal of the prompt, for all its status: its text is about the tenant's request)
        return PermanentProviderError(permanent, message, status_code)
    if status == 403 and permanent is not None:
        # (a refusal of the request itself, for all its status: OpenAI's 403 model_not_found;
        # its text names the operator's project, so it is told in llmq's words too)
        codes = _codes(names)
        _tell_operator(
            logger.warning,
            "the provider refused this request for llmq's account",
            status,
            codes,
            message,
            log,
        )
        return PermanentProviderError(
            permanent,
            f"the provider refused this request for llmq's account (HTTP {status}): {', '.join(codes)}",
            status_code,
        )
    if status in _TRANSIENT_STATUSES or status >= 500 or status < 400:
        if status in _ACCOUNT_ERRORS:
            # (about llmq's account with the provider, not the tenant's request)
            return _account_error(status, names, message, status_code, retry_after, log)
        return TransientProviderError(message, status_code, retry_after)
    if permanent is not None:
        return PermanentProviderError(permanent, message, status_code)
    if status == 404:
        return PermanentProviderError(ErrorCode.MODEL_NOT_FOUND, message, status_code)
    return PermanentProviderError(ErrorCode.INVALID_REQUEST, message, status_code)


def classify_exception(
    exc: httpx.HTTPError, retry_timeouts: bool = False, unanswered: bool = False
) -> ProviderError:
    """`unanswered`: the whole request went out a while ago, and no answer came back."""
    # Nothing was sent yet: a retry costs nothing at the provider.
    if isinstance(exc, httpx.ConnectTimeout):
        return TransientProviderError("could not connect to the provider in time")
    if isinstance(exc, httpx.PoolTimeout):
        return TransientProviderError("no connection to the provider was free in time")
    if isinstance(exc, httpx.TimeoutException):
        return timed_out("the provider stopped answering", retry_timeouts)
    if unanswered and isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError)):
        # The connection dropped while the provider had the whole request (a load balancer's
        # idle timeout under a non-streamed generation): it may be generating, and billing, it
        # still, exactly as after a timeout.
        return timed_out(
            f"the provider's connection closed before it answered ({type(exc).__name__})", retry_timeouts
        )
    return TransientProviderError(f"could not reach the provider: {type(exc).__name__}")


def _key_unreadable(exc: Exception) -> TransientProviderError:
    """The key store (Secrets Manager) failed: nothing was sent, so nothing was billed. One that
    refuses for good (the secret deleted or scheduled for deletion, its grant or its KMS key
    gone, a wrong id) is the operator's to fix, as a provider refusing the key is: attempts
    minutes apart, the job retryable once they run out, and the ProviderAccountRefused alarm
    (hunt 275: its jobs failed seconds apart as not retryable, and nothing paged)."""
    error = TransientProviderError(f"could not read the provider key: {type(exc).__name__}")
    refusal = _aws_refusal(exc)
    if refusal is not None:
        error.about_account = True
        logger.warning("the provider key cannot be read", extra={"error_code": refusal})
    return error


def _aws_refusal(exc: BaseException) -> str | None:
    """The code of an AWS error, in `exc`'s chain, that no retry fixes; None if there is none
    (a throttle, a 5xx, a timeout: the store is failing for now)."""
    from botocore.exceptions import ClientError

    from llmq.aws import is_transient

    seen: BaseException | None = exc
    for _ in range(8):  # (a chain is a few links long; never follow a cycle for ever)
        if seen is None:
            return None
        if isinstance(seen, ClientError):
            return None if is_transient(seen) else str(seen.response.get("Error", {}).get("Code") or "")
        seen = seen.__cause__ or seen.__context__
    return None


def timed_out(message: str, retry_timeouts: bool) -> ProviderError:
    """A timeout after the request may have been sent."""
    if retry_timeouts:
        return TransientProviderError(message)
    return ProviderTimeout(f"{message}; it may still be generating, and billing, this request")


def _error_fields(error: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """An error object's code names and message."""
    if error is None:
        return [], None
    message = error.get("message")
    return _names(error), (str(message) if message else None)


# What reading a provider's JSON can raise: not JSON, not UTF-8, or nested deeper than Python's
# parser goes (a valid answer of a few KB can be: RecursionError, a RuntimeError).
_UNREADABLE_JSON = (ValueError, UnicodeDecodeError, RecursionError)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except _UNREADABLE_JSON:
        return None
    return data if isinstance(data, dict) else None


def _body_object(body: bytes) -> dict[str, Any] | None:
    """An error answer's JSON object: the body's, the first of a list (Gemini's
    OpenAI-compatible endpoint answers `[{"error": …}]`), or the first an SSE body holds."""
    try:
        data = json.loads(body)
    except _UNREADABLE_JSON:
        data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data[0]
    return data if isinstance(data, dict) else _first_sse_object(body)


def _first_sse_object(body: bytes) -> dict[str, Any] | None:
    """The first JSON object in an SSE body's `data:` lines (an error answered as a stream)."""
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("data:"):
            data = _json_object(line[5:].strip().encode())
            if data is not None:
                return data
    return None


def _error_object(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The error a body reports: `{"error": {…}}`, TGI's `{"error": "…", "error_type": "…"}`,
    or vLLM's own fields at the top level (`"object": "error"`)."""
    if data is None:
        return None
    error = data.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str) and error:
        return {"message": error, "type": data.get("error_type")}
    if data.get("object") == "error":
        return data
    if isinstance(data.get("error_code"), str) and data["error_code"]:
        # (Databricks: `{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": …}`)
        return {"code": data["error_code"], "message": data.get("message")}
    return None


def _names(error: dict[str, Any]) -> list[str]:
    """The error's code and type, lower-cased; a numeric code is a status, not a name."""
    found = []
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and value and not value.isdigit():
            found.append(value.lower())
    return found


def _status_hint(error: dict[str, Any]) -> int | None:
    for key in ("status", "status_code", "code"):
        value = error.get(key)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    return None


def _in_band_error(data: dict[str, Any]) -> ProviderError | None:
    """The error a 200 answer reports in its body: `{"error": …}`, or vLLM's `"object": "error"`."""
    if data.get("error"):
        return classify_error_event(_error_object(data) or data["error"])
    if data.get("object") == "error":
        return classify_error_event(data)
    return None


class _Progress:
    """Whether the request may have reached the provider, from httpcore's trace events.

    A transport that reports nothing (a test's MockTransport) counts as having sent it.
    """

    def __init__(self) -> None:
        self.connecting = False
        self.sending = False
        # When the request's body went out (only a trace says so: a MockTransport's never
        # does), and whether an answer's headers came back since.
        self.sent_at: float | None = None
        self.answered = False
        # How long the answer's headers took after the body went out.
        self.answer_wait: float | None = None
        # The provider refused the request by its status: what it means before its body is
        # read, should the call's time run out while reading it.
        self.refused: ProviderError | None = None

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith(("connect_tcp.started", "start_tls.started")):
            self.connecting = True
            return
        request = info.get("request")
        if request is not None and getattr(request, "method", None) == b"CONNECT":
            return  # (a proxy's tunnel, not our request: its 200 answers nothing of ours)
        if ".send_request_headers." in event:
            self.sending = True
        elif event.endswith(".send_request_body.complete"):
            self.sent_at = time.monotonic()
            self.answered = False
            self.answer_wait = None
        elif event.endswith(".receive_response_headers.complete"):
            self.answered = True
            if self.sent_at is not None:
                self.answer_wait = time.monotonic() - self.sent_at

    @property
    def nothing_sent(self) -> bool:
        return self.connecting and not self.sending

    @property
    def unanswered(self) -> bool:
        """The provider had the whole request for a while and did not answer: a drop now may
        leave it generating. (One that comes at once is a server that never read it: one
        restarting, or a port that speaks TLS.)"""
        return self.out_a_while and not self.answered

    @property
    def out_a_while(self) -> bool:
        """The whole request went out at least `_UNANSWERED_AFTER_SECONDS` ago."""
        return self.sent_at is not None and time.monotonic() - self.sent_at >= _UNANSWERED_AFTER_SECONDS

    @property
    def held(self) -> bool:
        """The answer came only after the whole request had been out a while: a gateway's
        timeout then may have left the model behind it generating."""
        return self.answer_wait is not None and self.answer_wait >= _UNANSWERED_AFTER_SECONDS


class ProviderKey:
    """The provider's API key from a cached store, read again at once when the provider refuses it.

    `read(fresh)` returns the key: from its cache when `fresh` is False (the worker's Secrets
    Manager read keeps it five minutes), from the store itself when True. A refused key is read
    fresh at most once per invocation (`new_invocation()` starts one), so a key that is simply
    wrong costs one extra Secrets Manager call per worker invocation, not one per job or retry.
    """

    def __init__(self, read: Callable[[bool], str | None]) -> None:
        self._read = read
        self._fresh_read_spent = False
        # The jobs of a batch refused together ask at once, each from a thread: the first reads
        # fresh, and the others wait for it and find the new key in the cache it refreshed.
        self._replacing = threading.Lock()

    def __call__(self) -> str | None:
        return self._read(False)

    def new_invocation(self) -> None:
        self._fresh_read_spent = False

    def replacing(self, refused: str | None) -> str | None:
        """A key other than the `refused` one, or None when the store has none newer."""
        with self._replacing:
            current = self._read(False)
            if current != refused:
                # Another job of this batch already read the new key.
                return current
            if self._fresh_read_spent:
                return None
            self._fresh_read_spent = True
            fresh = self._read(True)
            return fresh if fresh != refused else None


@cache
def verified_context() -> ssl.SSLContext:
    """The TLS context of every provider call in this environment, made once.

    Each job still opens its own client and connection (closing it is how a cancelled job
    stops being billed), but loading the CA bundle costs about 20 ms of CPU, which a new
    client per job paid every time. As httpx's default client: verified, and SSL_CERT_FILE
    or SSL_CERT_DIR honoured.
    """
    return httpx.create_ssl_context(verify=True, trust_env=True)


class ChatCompletionsProvider:
    """POST {base_url}/chat/completions, streaming or not."""

    def __init__(
        self,
        base_url: str,
        api_key: Callable[[], str | None] | ProviderKey,
        stream: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_timeouts: bool = False,
        done_ends_answer: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key if isinstance(api_key, ProviderKey) else ProviderKey(lambda _fresh: api_key())
        self.stream = stream
        self._transport = transport
        # True: a timeout after sending is a TransientProviderError (retried); see ProviderConfig.
        self.retry_timeouts = retry_timeouts
        # True: [DONE] alone finishes a stream (a server known to send no finish_reason).
        self.done_ends_answer = done_ends_answer

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult:
        # The call's time counts from here: the key's read too, or a slow key store would let
        # the call outlast what the worker gave it (its write-back reserve, the Lambda's end).
        deadline = time.monotonic() + timeout_seconds
        # The key store's read (Secrets Manager, when the cache is cold or refreshing) blocks:
        # in a thread, the batch's other generations and cancel watchers go on meanwhile.
        try:
            async with asyncio.timeout(timeout_seconds):
                key = await asyncio.to_thread(self._api_key)
        except Exception as exc:
            raise _key_unreadable(exc) from exc
        given = timeout_seconds
        left = deadline - time.monotonic()
        if left < given / 2:
            # A generation sent with a sliver of its time would be cut off, billed and failed
            # as provider_timeout: not sent, it costs nothing and is retried.
            raise TransientProviderError(
                f"reading the provider key took {timeout_seconds - left:.1f} s of the call's "
                f"{timeout_seconds:.1f} s; the request was not sent"
            )
        timeout_seconds = left
        timeout = httpx.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds))
        with _unsaid([key], (message.content for message in request.messages)):
            return await self._generate(request, key, timeout, timeout_seconds, deadline, given)

    async def _generate(
        self,
        request: GenerationRequest,
        key: str | None,
        timeout: httpx.Timeout,
        timeout_seconds: float,
        deadline: float,
        given: float,
    ) -> JobResult:
        progress = _Progress()
        try:
            # httpx bounds each read; this bounds the whole call, so a stream that trickles
            # forever still ends before the Lambda does.
            async with (
                asyncio.timeout(timeout_seconds),
                httpx.AsyncClient(
                    timeout=timeout, transport=self._transport, verify=verified_context()
                ) as client,
            ):
                try:
                    return await self._call(
                        client,
                        self._payload(request),
                        self._headers(request, key),
                        progress,
                        request.on_output,
                        deadline,
                        request.answer,
                    )
                except TransientProviderError as exc:
                    if not exc.key_refused:
                        raise
                    # The key was refused before any generation: nothing was billed. A new key
                    # (set by the operator, or rotated within the cache's five minutes) is
                    # tried at once instead of after a backoff, and only once.
                    newer = await self._replacing(key)
                    if newer is None:
                        raise
                    with _unsaid([newer]):
                        if deadline - time.monotonic() < given / 2:
                            # The refusal and the fresh read took half the call's time: a request
                            # sent into the rest would be cut off and billed. The new key is kept
                            # for the next attempt, which this is no refusal of.
                            raise TransientProviderError(
                                "the provider refused the old key, and reading the new one took half "
                                "the call's time; the request was not sent again"
                            ) from None
                        # A cancel asked for meanwhile (the job's, or its deadline's) lands here, at
                        # a point that yields, before the second call is sent: a cancel is only
                        # delivered where the task yields, and sending may not.
                        await asyncio.sleep(0)
                        progress = _Progress()
                        return await self._call(
                            client,
                            self._payload(request),
                            self._headers(request, newer),
                            progress,
                            request.on_output,
                            deadline,
                            request.answer,
                        )
        except TimeoutError as exc:
            answer = request.answer
            if answer is not None and answer.whole and answer.result is not None:
                # Whole before the deadline, only its trailer awaited: the wait for that is cut
                # short by its own margin, unless the event loop was late (another job of the
                # batch holding it) and the call's deadline fired first. Paid for: kept.
                return answer.result()
            if progress.refused is not None:
                # Refused by its status before any generation; only the body was slow.
                raise progress.refused from exc
            if progress.nothing_sent:
                raise TransientProviderError("could not connect to the provider in time") from exc
            message = f"the provider did not finish within {timeout_seconds:.1f}s"
            raise timed_out(message, self.retry_timeouts) from exc
        except httpx.HTTPError as exc:
            raise classify_exception(exc, self.retry_timeouts, progress.unanswered) from exc

    async def _replacing(self, refused: str | None) -> str | None:
        try:
            return await asyncio.to_thread(self._api_key.replacing, refused)
        except Exception as exc:
            raise _key_unreadable(exc) from exc

    @staticmethod
    def _headers(request: GenerationRequest, key: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if request.job_id:
            headers["x-llmq-job-id"] = request.job_id
        # (a key stored with a trailing newline or space, from a file or the console, would be
        # an illegal header: every call refused before it is sent, as if the provider were down)
        if key and key.strip():
            if not key_fits_a_header(key):
                # (curly quotes or a zero-width space from a paste: no header can carry it, and
                # httpx's refusal escaped as an unreadable answer, failing the backlog in seconds
                # with nothing paged; hunt 297) Nothing was sent. The operator's to fix, as a
                # refused key is, and the secret read again at once, as for a refusal.
                error = TransientProviderError("the provider key holds characters no HTTP header can carry")
                error.about_account = error.key_refused = True
                logger.warning("the provider key holds characters no HTTP header can carry")
                raise error
            headers["authorization"] = f"Bearer {key.strip()}"
        return headers

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

    async def _call(
        self,
        client: httpx.AsyncClient,
        payload: dict[str, Any],
        headers: dict[str, str],
        progress: _Progress,
        on_output: Callable[[str], None] | None = None,
        deadline: float | None = None,
        answer: Answer | None = None,
    ) -> JobResult:
        url = f"{self.base_url}/chat/completions"
        extensions = {"trace": progress}
        async with client.stream(
            "POST", url, json=payload, headers=headers, extensions=extensions
        ) as response:
            if response.status_code in _GATEWAY_TIMEOUTS and progress.held and not self.retry_timeouts:
                # (retried, it is a 5xx as ever, its Retry-After honoured: review 269)
                raise timed_out(
                    f"a gateway answered {response.status_code} after holding the request "
                    f"{progress.answer_wait or 0:.0f}s",
                    retry_timeouts=False,
                )
            if response.status_code >= 300:
                progress.refused = _marked_refused(
                    classify_response(response, b"", log=False), response, progress
                )
                raise _marked_refused(
                    classify_response(response, await _error_body(response)), response, progress
                )
            try:
                if self.stream:
                    return await _read_stream(response, on_output, deadline, answer, self.done_ends_answer)
                return await _read_whole(response, deadline, answer, self.done_ends_answer)
            except _CutBeforeAnswer as exc:
                # (hunt 303: retried as a cut answer, each retry a new paid generation)
                if exc.error is not None and (self.retry_timeouts or not progress.out_a_while):
                    raise exc.error from None  # (a 5xx as ever, its Retry-After honoured)
                if progress.out_a_while:
                    raise timed_out(str(exc), self.retry_timeouts) from exc
                raise TransientProviderError(_CUT_BEFORE_ANSWER, code=ErrorCode.PROVIDER_ERROR) from exc
            except httpx.TimeoutException:
                raise
            except (httpx.TransportError, httpx.DecodingError) as exc:
                # The connection broke after the answer began: the generation is incomplete.
                raise TransientProviderError(
                    _STREAM_CUT if self.stream else _ANSWER_CUT, code=ErrorCode.PROVIDER_ERROR
                ) from exc


def _marked_refused(error: ProviderError, response: httpx.Response, progress: _Progress) -> ProviderError:
    """`error`, marked `refused` when its status refused the request before generating: a rate
    limit or an overload answered at once, not after the request was held a while (a gateway's
    503 when the model behind it crashed mid-generation may have been paid for: review 285),
    nor a refusal of llmq's own account (retried as the operator's to fix)."""
    if isinstance(error, TransientProviderError) and response.status_code in _UNBILLED_REFUSALS:
        error.refused = not error.about_account and not progress.held
    return error


async def _error_body(response: httpx.Response) -> bytes:
    """The start of an error answer's body; empty when it is slow or cut.

    The status already refused the request: a 429 whose body trickles is still a 429 (retried
    after its Retry-After), never a timeout that may have been billed.
    """
    body = bytearray()

    async def read() -> None:
        async for piece in response.aiter_bytes():
            body.extend(piece)
            if len(body) >= _MAX_ERROR_BODY:
                return

    try:
        # (`asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` can swallow a cancel
        # that lands as the read ends, and a canceled job would go on to its next call)
        async with asyncio.timeout(_ERROR_BODY_SECONDS):
            await read()
    except (TimeoutError, httpx.TransportError, httpx.DecodingError):
        return b""
    return bytes(body[:_MAX_ERROR_BODY])


# finish_reasons that say the server stopped the generation itself, not that it finished.
_GAVE_UP = frozenset({"abort", "error"})
# How long a stream may stay silent after its finish_reason before the answer is taken as whole:
# after a finish_reason that came alone (in a chunk of its own, after the answer's text), and
# after any other. A gateway that marks every chunk (new-api or LiteLLM in front of Gemini)
# sends the second kind mid-answer too, so that silence is waited out longer, and a cut or an
# error after it is not an answer; once text follows a finish_reason, the server's
# finish_reasons say nothing, and only [DONE] or the stream's clean end finish the answer.
_AFTER_FINISH_SECONDS = 2.0
# How long a whole answer's trailer may still take: what a cancel then waits before it stops
# the call (`Answer`).
TRAILER_WAIT_SECONDS = _AFTER_FINISH_SECONDS + 0.5
_AFTER_FINISH_WITH_TEXT_SECONDS = 10.0
# How long a whole answer's trailer may take in all, from the answer's end, however many lines
# it comes in (an annotation chunk, the usage chunk, [DONE]: review 255 saw usage lost when the
# trailer's silence counted from the answer's end alone).
_WHOLE_TRAILER_SECONDS = _AFTER_FINISH_WITH_TEXT_SECONDS
# What may share a chunk with a finish_reason that came alone: nothing but an empty text.
_NOT_MORE = frozenset({"content", "role"})
# SSE's line ends; not str.splitlines()'s, which also splits at U+2028, U+0085 and others that a
# server may leave raw inside a JSON string.
_LINE_END = re.compile(r"\r\n|\r|\n")
# What a whole answer keeps of the call's time when its silence is cut short by the deadline.
_DEADLINE_MARGIN_SECONDS = 0.25
# The longest line of a stream read: a chat chunk is a few hundred bytes, a whole completion
# sent as one line a few MB.
_MAX_LINE_CHARS = 32 * 1024 * 1024


class _Stream:
    """A streamed answer as it arrives, line by line (server-sent events)."""

    def __init__(self, on_output: Callable[[str], None] | None, done_ends_answer: bool = False) -> None:
        self.on_output = on_output
        self.done_ends_answer = done_ends_answer
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        # The finish_reason came alone: after the answer's text, in a chunk with nothing else.
        self.finish_alone = False
        # Text came after a finish_reason: the server marks chunks before the end.
        self.marks_every_chunk = False
        self.done = False
        # A chunk carried its text as a `delta`: a `message` after that is the whole answer
        # again (MiniMax ends its stream so), never more of it.
        self.deltas = False
        self.usage = Usage()
        self.event = ""
        # The data lines of an event not yet whole (SSE lets one event's data span lines).
        self.pending: list[str] = []
        self.last_data_at = time.monotonic()
        # When the answer became whole: its trailer, however many lines it comes in, is awaited
        # `_WHOLE_TRAILER_SECONDS` from then at most.
        self.whole_since: float | None = None
        self.started = False
        # A delta carried something of the generation besides its text (`began`).
        self.generating = False
        # The index of the answer's choice, from the first chunk that names one.
        self.answer_index: object = None

    @property
    def began(self) -> bool:
        """The generation showed itself: text, a finish_reason, or tokens of another kind (a
        reasoning model's thinking, a refusal, tool calls); or [DONE] where it ends the answer.
        Not a role alone, nor a chunk with no choices (Azure's prompt filter results), which a
        server sends before the generation's first token."""
        return (
            bool(self.parts)
            or self.finish_reason is not None
            or self.generating
            or (self.done and self.done_ends_answer)
        )

    def _answer_choices(self, value: object) -> list[dict[str, Any]]:
        """The choices of the one answer llmq asks for: those of the first index the stream
        named (0, but a server may number from 1 or name it "0"), or of none. A server that sends
        more than one (a gateway that ignores `n`) interleaves their chunks; read together,
        their texts mixed into one output, and one's finish made the other's cut answer whole
        (hunt 332)."""
        choices = _dicts(value)
        for choice in choices:
            if self.answer_index is None and choice.get("index") is not None:
                self.answer_index = _choice_index(choice)
        return [
            choice
            for choice in choices
            if choice.get("index") is None or _choice_index(choice) == self.answer_index
        ]

    @property
    def _generated(self) -> bool:
        """Something of the generation came before its finish: text, or tokens of another kind
        (hunt 332: a reasoning model that spent `max_tokens` thinking finishes with no text; its
        answer, cut before its usage chunk, was never whole, and was paid for three times)."""
        return bool(self.parts) or self.generating

    @property
    def whole(self) -> bool:
        """The generation said it finished, alone, and nothing since has said otherwise: what
        follows (the usage chunk, [DONE]) may be lost or garbled without losing the answer."""
        return (
            self.finish_alone
            and self.finish_reason is not None
            and self.finish_reason not in _GAVE_UP
            and not self.marks_every_chunk
        )

    def silence_allowed(self, deadline: float | None) -> float | None:
        """How much longer to wait for the next line; None: as long as the call's time lasts."""
        if self.finish_reason is None or self.marks_every_chunk:
            return None
        limit = _AFTER_FINISH_SECONDS if self.finish_alone else _AFTER_FINISH_WITH_TEXT_SECONDS
        now = time.monotonic()
        allowed = limit - (now - self.last_data_at)
        if self.whole and self.whole_since is not None:
            # (and the whole trailer within `_WHOLE_TRAILER_SECONDS` of the answer's end: lines
            # that come apart, each within the silence, do not hold the call for ever; a cancel
            # meanwhile keeps the answer as it stands, `JobRunner._execute`)
            allowed = min(allowed, _WHOLE_TRAILER_SECONDS - (now - self.whole_since))
        if deadline is not None:
            # A whole answer whose [DONE] is late is kept, not lost to the call's deadline.
            allowed = min(allowed, deadline - now - _DEADLINE_MARGIN_SECONDS)
        return max(0.0, allowed)

    def feed(self, line: str) -> None:
        if not self.started:
            line = line.removeprefix("\ufeff")  # (a byte order mark, which SSE ignores)
        if line.startswith("event:"):
            self.event = line[6:].strip()
            return
        if not line:
            if self.pending:
                raise _malformed()
            self.event = ""  # (an SSE event ends at a blank line; the next names its own type)
            return
        if line.startswith("error:"):
            # A field SSE itself ignores, which llama.cpp's server writes an error in (then
            # [DONE]): never part of an answer.
            raise classify_error_event(_error_line(line[6:].strip()))
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if not self.pending and not data:
            # An empty `data:` (a gateway's heartbeat): an event with no data, which SSE never
            # dispatches, not a malformed answer to abandon (and pay for again); nor, like a
            # comment, a sign of life that would hold a whole answer open past its trailer.
            return
        self.started = True
        self.last_data_at = time.monotonic()
        if not self.pending and data == "[DONE]":
            self.done = True
            return
        if not self.pending and self.event == "error" and not data.startswith("{"):
            # An error event whose data is plain text: classified by what it says.
            raise classify_error_event({"message": data})
        self.pending.append(data)
        try:
            chunk = json.loads("\n".join(self.pending))
        except _UNREADABLE_JSON:
            return  # (the rest of the event's data may follow on its next lines)
        self.pending.clear()
        if not isinstance(chunk, dict):
            raise _malformed()
        self._chunk(chunk)
        if not self.whole:
            self.whole_since = None
        elif self.whole_since is None:
            self.whole_since = self.last_data_at

    def _chunk(self, chunk: dict[str, Any]) -> None:
        error = _in_band_error(chunk)
        if error is None and self.event == "error":
            # An SSE `error` event, whatever its data holds: never part of an answer.
            error = classify_error_event(chunk.get("error") or chunk)
        if error is not None:
            raise error
        had_finished = self.finish_reason is not None
        with_text = False
        # (tokens of any kind: a reasoning model's thinking, a refusal, tool calls; or text)
        with_tokens = False
        for choice in self._answer_choices(chunk.get("choices")):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self.deltas = True
            elif not self.deltas:
                # (a server that streams each piece as a `message`, as a completion holds it)
                delta = choice.get("message")
            text = _text(delta.get("content")) if isinstance(delta, dict) else ""
            tokens = isinstance(delta, dict) and _generates(delta)
            if tokens:
                self.generating = True
                with_tokens = True
            if text:
                with_text = True
                self.parts.append(text)
                if self.on_output is not None:
                    self.on_output(text)
            reason = _reason(choice)
            if reason is not None:
                self.finish_reason = reason
                more = isinstance(delta, dict) and any(
                    value for key, value in delta.items() if key not in _NOT_MORE
                )
                # (tokens with it, as content parts, Magistral's thinking, are more: review 284)
                self.finish_alone = not text and not more and not tokens and self._generated
        if (with_text or with_tokens) and had_finished:
            # (a gateway that marks its reasoning chunks finished too, review 283: its thinking
            # is never a whole answer, however long it lasts)
            self.marks_every_chunk = True
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
            if self.finish_reason is not None and not (with_text or with_tokens) and self._generated:
                # The usage chunk a stream ends with (vLLM's final text carries its
                # finish_reason): the finish stands alone now.
                self.finish_alone = True

    def result(self) -> JobResult:
        # The generation's own finish_reason says it finished; [DONE] alone does not: a gateway
        # whose upstream broke ends with it all the same (one-api's adaptors, whether or not
        # their chunks name a null finish_reason), and the bytes cannot tell that from a server
        # that never names one, which the operator declares (`provider.done_ends_answer`).
        # Some servers omit [DONE]. The stream also stopped mid-generation when the server
        # says it gave up on the request (vLLM's `abort`, or `error`).
        if self.pending and not self.whole:
            raise _malformed()
        finished = self.finish_reason is not None or (self.done and self.done_ends_answer)
        if not finished and self.done and self.parts:
            _done_without_finish_reason()
        if not finished or self.finish_reason in _GAVE_UP:
            raise TransientProviderError(_STREAM_CUT, code=ErrorCode.PROVIDER_ERROR)
        return JobResult(output="".join(self.parts), finish_reason=self.finish_reason, usage=self.usage)


async def _opened(response: httpx.Response) -> tuple[AsyncIterator[bytes], bytes, bytes]:
    """The body's pieces, with its start and that start's significant part (`_body_start`)."""
    pieces = aiter(response.aiter_bytes())
    try:
        start, significant = await _body_start(pieces)
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise _CutBeforeAnswer() from exc
    return pieces, start, significant


async def _read_whole(
    response: httpx.Response,
    deadline: float | None = None,
    answer: Answer | None = None,
    done_ends_answer: bool = False,
) -> JobResult:
    """The answer to a request that asked for no stream: one JSON body, or, from a gateway
    that streams whatever it is asked, a stream (hunt 329: each such answer, whole and paid
    for, was read as a malformed body and paid for again, three times, and the job failed)."""
    opened = await _opened(response)
    pieces, _start, significant = opened
    if _SSE_FIELD.match(significant):
        return await _read_stream(response, None, deadline, answer, done_ends_answer, opened=opened)
    # (past the keep-alive comments a gateway sends while its upstream works: review 282)
    return await _whole_json(_prefixed(significant, pieces), deadline, answer)


async def _read_stream(
    response: httpx.Response,
    on_output: Callable[[str], None] | None = None,
    deadline: float | None = None,
    answer: Answer | None = None,
    done_ends_answer: bool = False,
    *,
    opened: tuple[AsyncIterator[bytes], bytes, bytes] | None = None,
) -> JobResult:
    """`deadline`: when the call's time ends (`time.monotonic()`); `answer` is kept up to
    date with whether the answer is whole yet; `opened`: the body as `_opened` read its start,
    if it did."""
    # Cancelling the task that awaits here closes the connection between chunks,
    # which is how a running job stops being billed.
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    labelled_json = media_type == "application/json" or media_type.endswith("+json")
    stream = _Stream(on_output, done_ends_answer)
    pieces, start, significant = opened or await _opened(response)
    if _one_json_body(significant, labelled_json):
        # A server that answers a streamed request with one JSON body: an error, classified as
        # its code says, or the whole completion, paid for and kept (the worker writes it all
        # as the job's output at the end, as for a provider that does not stream).
        return await _whole_json(_prefixed(significant, pieces), deadline, answer)
    # (a stream, however it is labelled: read line by line, as it comes; hunt 272: read whole
    # first, a stream labelled JSON lost its paid answer to a cut or a stall after it)
    lines = _lines(_prefixed(start, pieces)).__aiter__()
    try:
        while not stream.done:
            # After a finish_reason only the usage chunk and [DONE] are left: a server that
            # then stalls, keep-alives or not, does not turn a whole answer into a timeout.
            try:
                async with asyncio.timeout(stream.silence_allowed(deadline)):
                    line = await lines.__anext__()
            except (StopAsyncIteration, TimeoutError):
                break
            try:
                stream.feed(line)
            except ProviderError as error:
                if not stream.whole:
                    raise error if stream.began else _before_answer(error) from None
                # A whole answer, then an unreadable line or an error (a cut usage chunk):
                # the answer is paid for; a retry would pay for it again.
                break
            if answer is not None:
                answer.whole = stream.whole
                answer.result = stream.result if stream.whole else None
    except (httpx.TransportError, httpx.DecodingError) as exc:
        # Cut, stalled or garbled after the generation said it finished (only the usage chunk
        # or [DONE] lost): the output is whole and paid for; a retry would pay for it again.
        if not stream.whole:
            if not stream.began:
                raise _CutBeforeAnswer() from exc
            raise
    if not stream.began:
        # (nothing but keep-alives, a role or chunks with no choices, then the body's clean end
        # or a [DONE]: a gateway ends the stream so whether or not the model behind it gave up)
        raise _CutBeforeAnswer()
    return stream.result()


async def _lines(pieces: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The body's lines, split where SSE ends a line (CR LF, CR or LF) and nowhere else, and
    decoded as UTF-8 whatever charset the content type names (SSE is UTF-8 by definition). Only
    the text that arrived is searched, so a huge line sent in small pieces costs linear time; a
    line longer than `_MAX_LINE_CHARS` is a malformed answer."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # The unfinished line's pieces, and whether a CR ended the last piece (the first half of a
    # CR LF, or a line end of its own).
    line: list[str] = []
    length = 0
    # A CR ended the last piece: its line is yielded at once (a lone CR ends an SSE line), and an
    # LF that starts the next piece is the second half of a CR LF. (Held until that next byte,
    # a whole answer whose finish line's CR LF was cut between the two was lost: hunt 306.)
    after_cr = False
    async for piece in pieces:
        text = decoder.decode(piece)
        if not text:
            continue
        if after_cr and text.startswith("\n"):
            text = text[1:]
        after_cr = text.endswith("\r")
        if not text:
            continue
        parts = _LINE_END.split(text)
        for part in parts[:-1]:
            line.append(part)
            yield "".join(line)
            line, length = [], 0
        line.append(parts[-1])
        length += len(parts[-1])
        if length > _MAX_LINE_CHARS:
            raise _malformed()
    tail = decoder.decode(b"", final=True)
    rest = "".join(line) + tail
    if rest:
        yield rest


_told_done_without_finish_reason = False


def _done_without_finish_reason() -> None:
    """Tell the operator, once per environment, that text ended by [DONE] with no finish_reason
    is taken for a cut (and retried, paying again): a server that never names one needs
    `provider.done_ends_answer`."""
    global _told_done_without_finish_reason
    if not _told_done_without_finish_reason:
        _told_done_without_finish_reason = True
        logger.warning(
            "the provider ended a stream with [DONE] and no finish_reason: taken for a cut and "
            "retried; if this provider never names a finish_reason, set provider.done_ends_answer"
        )


def _error_line(data: str) -> object:
    """What an `error:` line says: its JSON object's error, or its text."""
    found = _json_object(data.encode())
    if found is None:
        return {"message": data or "the provider reported an error in its answer"}
    return _error_object(found) or found


def _malformed() -> TransientProviderError:
    return TransientProviderError("the provider sent a malformed answer", code=ErrorCode.PROVIDER_ERROR)


def _answer_json(body: bytes | bytearray) -> Any:
    """A completion's JSON, read as its bytes say (UTF-8, or the UTF-16 or -32 json detects);
    a byte that is not UTF-8 (a model cut inside a character, a Latin-1 gateway) becomes
    U+FFFD, as a stream's lines are read (`_lines`): a paid answer is never retried for it
    (review 263: one sent as a JSON body to a streamed request was, and 24a3360 kept it)."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        return json.loads(bytes(body).decode("utf-8", "replace").removeprefix("\ufeff"))


def _json_or_error(body: bytes) -> dict[str, Any]:
    try:
        data = _answer_json(body)
    except _UNREADABLE_JSON as exc:
        raise _malformed() from exc
    if not isinstance(data, dict):
        raise _malformed()
    return data


def _usage(raw: object) -> Usage:
    """The token counts as reported; a count in a shape we do not know is 0, never a failure.

    Usage only informs: an answer that is whole and paid for must not fail over how a server
    spells its counts.
    """
    if not isinstance(raw, dict):
        return Usage()
    return Usage(
        input_tokens=_count(raw.get("prompt_tokens")) or _count(raw.get("input_tokens")),
        output_tokens=_count(raw.get("completion_tokens")) or _count(raw.get("output_tokens")),
    )


def _count(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, str):
        value = value.strip()
        # (ASCII only: "²".isdigit() holds, and int("²") raises)
        return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value.is_integer() and 0 <= value < 1e18:
        return int(value)
    return 0


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of a list of content parts (Mistral's
    reasoning models answer with a list; only its `text` parts are the answer)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and isinstance(part.get("text"), str)
            and part.get("type", "text") in ("text", "output_text")
        )
    return ""


# Delta keys that carry the generation's own tokens besides its text: a reasoning model's
# thinking (DeepSeek and vLLM, OpenRouter), a refusal, tool calls, audio. Not metadata a server
# sends before the first token (Azure On Your Data's `context` with its citations: review 271).
_GENERATED_KEYS = (
    "reasoning_content",
    "reasoning",
    "reasoning_details",
    "refusal",
    "tool_calls",
    "function_call",
    "audio",
)


def _generates(delta: dict[str, Any]) -> bool:
    """The delta carries tokens of the generation: a key above, or content parts holding
    something (Mistral's thinking parts), not an empty text part."""
    if any(delta.get(key) for key in _GENERATED_KEYS):
        return True
    return any(value for part in _dicts(delta.get("content")) for key, value in part.items() if key != "type")


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _choice_index(choice: dict[str, Any]) -> object:
    """A choice's index, a number however it is written (`0`, `"0"`)."""
    index = choice.get("index")
    if isinstance(index, str) and index.strip().isascii() and index.strip().isdigit():
        return int(index)
    return index


def _answer_choice(value: object) -> dict[str, Any] | None:
    """The answer's choice in a completion: index 0 (however written), else the first."""
    choices = _dicts(value)
    return next((choice for choice in choices if _choice_index(choice) == 0), choices[0] if choices else None)


async def _whole_json(
    pieces: AsyncIterator[bytes], deadline: float | None = None, answer: Answer | None = None
) -> JobResult:
    """A completion sent as one JSON body. Where its top-level object closes is found as its
    pieces come (`_JsonEnd`, linear in its size: review 259 saw a large body parsed at each
    piece cost seconds of CPU); a whole, finished answer there (its finish_reason said so) is
    `answer.whole`, kept from a cancel or the call's deadline as a stream's is, and taken when
    the body ends, is cut, or is silent for `_AFTER_FINISH_SECONDS` (within the call's time):
    hunt 272 saw a cut retried, paying again, and a body left open fail as a timeout. Anything
    but whitespace after it makes it no answer (a JSON-lines body, each line marked finished,
    is not its first line: review 261), and the body's end decides."""
    body = bytearray()
    ends = _JsonEnd()
    held: JobResult | None = None
    upcoming: asyncio.Future[bytes] | None = None
    try:
        while True:
            if upcoming is None:
                upcoming = asyncio.ensure_future(anext(pieces))
            if held is not None:
                wait = _AFTER_FINISH_SECONDS
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic() - _DEADLINE_MARGIN_SECONDS))
                done, _ = await asyncio.wait({upcoming}, timeout=wait)
                if not done:
                    return held
            try:
                piece = await upcoming
            except StopAsyncIteration:
                break
            upcoming = None
            body.extend(piece)
            end = ends.feed(piece)
            if end is not None:
                try:
                    held = _finished_completion(body[:end])
                except ProviderError as error:
                    # (a body that is one error: nothing of an answer came before it)
                    raise _before_answer(error) from None
            if held is not None and ends.end is not None and body[ends.end :].strip(_JSON_SPACE):
                # (more after it, in this piece too: review 262 saw JSON lines read in one
                # piece taken as their first)
                held = None
            _mark_whole(answer, held)
    except (httpx.TransportError, httpx.DecodingError) as exc:
        if held is not None:
            return held
        if not body.strip(_LEADING):
            raise _CutBeforeAnswer() from exc
        raise
    finally:
        if upcoming is not None and not upcoming.done():
            upcoming.cancel()
    if not body.strip(_LEADING):
        raise _CutBeforeAnswer()  # (nothing but keep-alives, then the body's clean end)
    try:
        return _parse_completion(bytes(body))
    except ProviderError as error:
        # (a body that is one error: nothing of an answer came before it)
        raise _before_answer(error) from None


def _mark_whole(answer: Answer | None, held: JobResult | None) -> None:
    if answer is not None:
        answer.whole = held is not None
        answer.result = (lambda: held) if held is not None else None


# What JSON allows between its tokens (not `bytes.strip()`'s \x0b and \x0c).
_JSON_SPACE = b" \t\r\n"
# What moves a JSON body's nesting: a brace, a quote, a backslash (in a string, it escapes the
# next byte).
_JSON_TOKENS = re.compile(rb'[{}"\\]')


class _JsonEnd:
    """Where a JSON body's top-level object closes, found as its pieces come: braces counted
    outside strings, escapes honoured, a piece looked at once."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False  # (the next piece's first byte is escaped)
        self.seen = 0
        self.end: int | None = None

    def feed(self, piece: bytes) -> int | None:
        """The offset just past the top-level object's closing brace, if this piece holds it."""
        base, self.seen = self.seen, self.seen + len(piece)
        if self.end is not None or not piece:
            return None
        skip = 0 if self.escaped else -1
        self.escaped = False
        for found in _JSON_TOKENS.finditer(piece):
            at = found.start()
            if at == skip:
                continue
            char = piece[at : at + 1]
            if self.in_string:
                if char == b"\\":
                    if at + 1 < len(piece):
                        skip = at + 1
                    else:
                        self.escaped = True
                elif char == b'"':
                    self.in_string = False
            elif char == b'"':
                self.in_string = True
            elif char == b"{":
                self.depth += 1
            elif char == b"}":
                self.depth -= 1
                if self.depth == 0:
                    self.end = base + at + 1
                    return self.end
        return None


# What a body may start with before what tells one JSON body from a stream: a byte order mark
# and whitespace.
_LEADING = b"\xef\xbb\xbf \t\r\n"
# Enough of a body's start to tell an SSE field's line (`data:`, `event:`, `id:`, `retry:`) from
# anything else.
_SNIFF_BYTES = len(b"retry:")
_SSE_FIELD = re.compile(rb"(?:data|event|id|retry):")


async def _body_start(pieces: AsyncIterator[bytes]) -> tuple[bytes, bytes]:
    """The body's first pieces, read until they hold `_SNIFF_BYTES` past what may lead it (or
    it ended), and that part of them (`_significant`)."""
    start = b""
    while True:
        significant = _significant(start)
        if significant is not None and len(significant) >= _SNIFF_BYTES:
            return start, significant
        try:
            start += await anext(pieces)
        except StopAsyncIteration:
            return start, significant or b""


def _significant(start: bytes) -> bytes | None:
    """What the body starts with past a byte order mark, whitespace and whole SSE comment lines
    (the keep-alives a gateway sends while its upstream works, before an answer sent as one
    JSON body: review 259); None while a comment line is unfinished."""
    rest = start.lstrip(_LEADING)
    while rest.startswith(b":"):
        ends = [at for at in (rest.find(b"\n"), rest.find(b"\r")) if at >= 0]
        if not ends:
            return None
        rest = rest[min(ends) + 1 :].lstrip(_LEADING)
    return rest


def _one_json_body(significant: bytes, labelled_json: bool) -> bool:
    """An answer sent as one JSON body, however it is labelled: no SSE line starts with `{` (a
    server that answers `text/event-stream` with the whole completion, or an error); labelled
    JSON, anything but an SSE field's line is one (a gateway that streams under a JSON label
    may open each event with its `id:` or `event:`: hunt 306 saw every call of such a stream
    read as a malformed body, and paid for again)."""
    if significant.startswith(b"{"):
        return True
    return labelled_json and not _SSE_FIELD.match(significant)


async def _prefixed(start: bytes, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if start:
        yield start
    async for piece in pieces:
        yield piece


def _finished_completion(body: bytes | bytearray) -> JobResult | None:
    """The completion `body` holds if it is whole JSON and finished (an error body raises,
    classified); None while it is not."""
    try:
        data = _answer_json(body)
    except _UNREADABLE_JSON:
        return None
    if not isinstance(data, dict):
        return None
    result = _completion(data)
    return result if result.finish_reason is not None else None


def _parse_completion(body: bytes) -> JobResult:
    return _completion(_json_or_error(body))


def _completion(data: dict[str, Any]) -> JobResult:
    error = _in_band_error(data)
    if error is not None:
        raise error
    first = _answer_choice(data.get("choices"))
    if first is None:
        raise TransientProviderError("the provider answered without choices", code=ErrorCode.PROVIDER_ERROR)
    if _reason(first) in _GAVE_UP:
        # The server stopped the generation itself (SGLang's and vLLM's abort): not an answer.
        raise TransientProviderError(_ANSWER_CUT, code=ErrorCode.PROVIDER_ERROR)
    message = first.get("message")
    return JobResult(
        output=_text(message.get("content")) if isinstance(message, dict) else "",
        finish_reason=_reason(first),
        usage=_usage(data.get("usage")),
    )


def _reason(choice: dict[str, Any]) -> str | None:
    # (`finishReason`: Google's OpenAI-compatible endpoint, in its beta, named it so)
    reason = choice.get("finish_reason") or choice.get("finishReason")
    # (a short word from any real provider; kept short whatever one sends: it goes in the job's
    # item and its result, and in the log line of its end, whose event CloudWatch cuts at 256 KB)
    return printable(reason)[:_MAX_MESSAGE] if isinstance(reason, str) and reason else None
