"""The public API v1: submit, get, list, cancel, redeliver, and the OpenAPI document.

Routes are thin: read the tenant from the authorizer context, call one intake method,
shape the response. Every error becomes problem+json through `problem`, from the catalogue
in `llmq.errors`, and nowhere else.
"""

from __future__ import annotations

import gc

gc.disable()  # for the imports below (llmq.startup)

import base64
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Body, Header, Path, Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from llmq import aws, errors, startup
from llmq.batch_intake import BatchIntake
from llmq.batches import BatchRecord, BatchRepository, batch_key
from llmq.config import (
    GATEWAY_TIMEOUT_SECONDS,
    MAX_OBJECT_MEMBERS,
    MAX_REQUEST_BODY_BYTES,
    MAX_RESPONSE_BODY_BYTES,
    ApiEnvironment,
    response_body_bytes,
)
from llmq.intake import MAX_IDEMPOTENCY_KEY, JobIntake
from llmq.job_codec import batch_cursor_after, cursor_after
from llmq.jobs import JobRecord, JobRepository
from llmq.live_output import finished_reading, resume_point, retry_hint
from llmq.long_polls import LongPolls
from llmq.model_base import build_all
from llmq.models import (
    BATCH_ID_PATTERN,
    JOB_ID_PATTERN,
    MAX_JSON_DEPTH,
    Batch,
    BatchList,
    BatchRequest,
    BatchRequestCounts,
    BatchWebhookLog,
    Job,
    JobList,
    JobOutputEvent,
    JobRequest,
    JobStatus,
    OutputDelta,
    Problem,
    StoredBatchRequest,
    StoredJobRequest,
    Upload,
    UploadRequest,
    WebhookLog,
    batch_request_model,
    job_request_model,
    stored_batch_request_model,
)
from llmq.payloads import payload_store
from llmq.queues import QueueRepository
from llmq.ssrf import SUBMIT_LOOKUP_SECONDS, bounded, check_webhook_url, resolver_answers, system_resolver
from llmq.telemetry import MetricName, emit_count, error_fields, logger, traceback_fields
from llmq.tenants import TenantIdentity

ENV = ApiEnvironment.load(function_name="api")
PROBLEM_JSON = "application/problem+json"
JOB_ID = JOB_ID_PATTERN
BATCH_ID = BATCH_ID_PATTERN
# A results cursor is the index of the next item.
RESULTS_CURSOR = r"^[0-9]{1,7}$"
# A list cursor is unpadded URL-safe base64 of the key it resumes from.
CURSOR = r"^[A-Za-z0-9_-]{1,2048}$"
LIMITS = ENV.config.limits
STREAMING = ENV.config.streaming

# The request model carries this deployment's limits, so the document states what is enforced.
if TYPE_CHECKING:
    SubmitRequest = JobRequest
    SubmitBatchRequest = BatchRequest
else:
    SubmitRequest = job_request_model(ENV.config)
    SubmitBatchRequest = batch_request_model(ENV.config, SubmitRequest)

app = APIGatewayRestResolver(enable_validation=True)

DOCS_PATH = "/v1/docs"


@cache
def enable_docs() -> None:
    """The Swagger UI at /v1/docs, registered at its first request: Powertools' OpenAPI document
    models, which registering it imports, are a third of the api's imports and nothing else on
    the cold path needs them. Powertools matches routes per request, so a late route serves."""
    app.enable_swagger(path=DOCS_PATH, title="llmq", version="1.0.0")


@cache
def intake() -> JobIntake:
    config = ENV.config
    return JobIntake(
        jobs=JobRepository(ENV.jobs_table, config, dynamodb=aws.client("dynamodb")),
        payloads=payload_store(ENV.payload_bucket, s3=aws.lazy_client("s3")),
        queues=QueueRepository(ENV.lane_queue_urls, ENV.webhook_queue_url, sqs=aws.lazy_client("sqs")),
        config=config,
        check_webhook_url=lambda url: check_webhook_url(
            url,
            allow_loopback_http=config.webhooks.allow_loopback_http,
            resolver=bounded(system_resolver, SUBMIT_LOOKUP_SECONDS),
        ),
        polls=LongPolls(ENV.jobs_table, dynamodb=aws.client("dynamodb")),
    )


@cache
def batch_intake() -> BatchIntake:
    config = ENV.config
    jobs = intake()
    return BatchIntake(
        jobs=jobs,
        batches=BatchRepository(ENV.jobs_table, config, dynamodb=aws.client("dynamodb")),
        job_store=jobs.jobs,
        queues=jobs.queues,
        payloads=payload_store(ENV.payload_bucket, s3=aws.lazy_client("s3")),
        config=config,
    )


# ---- errors: the one mapping to HTTP ----------------------------------------------------

# How long a client should wait after a 503 before it tries again.
_RETRY_AFTER_UNAVAILABLE_SECONDS = 2
# How long a 503 webhook_host_unavailable waits to learn whose the failure is (`resolver_answers`).
RESOLVER_CHECK_SECONDS = 1.0
# Checks the schema states, answered with the domain's own code rather than the generic
# `invalid_request`, so a client meets the same code whichever layer refused it.
_DOMAIN_ERROR_AT: dict[tuple[str, ...], type[errors.DomainError]] = {
    ("header", "idempotency-key"): errors.InvalidIdempotencyKey,
    ("body", "model"): errors.UnknownModel,
    ("body", "prompt"): errors.PromptTooLarge,
}


def problem(entry: errors.ProblemType, detail: str | None = None) -> Problem:
    """The problem+json body of a catalogue entry: the only way this API builds one."""
    return Problem(type=entry.type, title=entry.title, status=entry.status, detail=detail, code=entry.code)


def problem_for(exc: errors.DomainError) -> tuple[int, Problem]:
    entry = errors.problem_type(type(exc))
    return entry.status, problem(entry, exc.detail)


def _problem_response(status: int, body: Problem, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(
        status_code=status,
        content_type=PROBLEM_JSON,
        body=body.model_dump_json(exclude_none=True),
        headers=headers,
    )


@app.exception_handler(errors.DomainError)
def handle_domain_error(exc: errors.DomainError) -> Response[Any]:
    status, body = problem_for(exc)
    if status == 500:
        # Answered, not raised: Lambda counts no error for it, so without this metric no alarm
        # would see a missing grant, a deleted table or a bug (docs/operations.md).
        emit_count(MetricName.API_UNEXPECTED_ERROR)
    if isinstance(exc, errors.WebhookHostUnavailable) and resolver_answers(
        bounded(system_resolver, RESOLVER_CHECK_SECONDS), aws.endpoint_host("dynamodb")
    ):
        # (a tenant's webhook host's name servers failing, while the resolver answers for
        # others: Api5xx leaves these out, hunt 294; a resolver failing still pages, review 266)
        emit_count(MetricName.WEBHOOK_HOST_UNAVAILABLE)
    return _problem_response(status, body, _retry_after(exc, status))


def _retry_after(exc: errors.DomainError, status: int) -> dict[str, str] | None:
    """A 503's (or a 429's) Retry-After, as README promises of each."""
    retry_after = exc.retry_after or (_RETRY_AFTER_UNAVAILABLE_SECONDS if status == 503 else None)
    return {"Retry-After": str(retry_after)} if retry_after else None


def _where(loc: list[Any]) -> tuple[str, ...]:
    parts = tuple(str(part).lower() for part in loc)
    # A batch item's body is a job's: its errors get the codes the same error has for a job.
    if len(parts) > 4 and parts[:2] == ("body", "requests") and parts[3] == "body":
        parts = ("body", *parts[4:])
    # A message's content is the prompt too: `messages[i].content` counts as `prompt`.
    if parts[:2] == ("body", "messages") and parts[-1:] == ("content",):
        return ("body", "prompt")
    return parts[:2]


def _domain_error_at(found: Sequence[Any]) -> type[errors.DomainError] | None:
    """The domain error that stands for these validation errors (pydantic's, with the input),
    if they all share one."""
    kinds = {_DOMAIN_ERROR_AT.get(_where(list(error.get("loc", ())))) for error in found}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    # Only an over-long prompt is too large; a prompt of the wrong type is just invalid.
    if kind is errors.PromptTooLarge and any(error.get("type") != "string_too_long" for error in found):
        return None
    # Only a name off the list is a model not available; a model of the wrong type (5, a list)
    # is just invalid, as it is in an uploaded batch's line (hunt 311).
    if kind is errors.UnknownModel and any(not isinstance(error.get("input"), str) for error in found):
        return None
    return kind


@app.exception_handler(RequestValidationError)
def handle_validation_error(exc: RequestValidationError) -> Response[Any]:
    # Never echo `input`: it could hold the prompt.
    details = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
        for error in exc.errors()
    ]
    if any(detail["type"] == "json_invalid" for detail in details):
        return handle_domain_error(errors.MalformedJson("parse error"))
    replayed = _replay_despite_the_schema()
    if replayed is not None:
        return replayed
    kind = _domain_error_at(exc.errors())
    if kind is not None:
        messages = dict.fromkeys(_located(detail) for detail in details[:_MAX_ERRORS_SHOWN])
        return handle_domain_error(kind("; ".join(messages)))
    # A small body can hold many thousands of errors (each unknown field is one): the answer
    # names the first few, so it stays small whatever the body held.
    shown = [
        detail
        | {"loc": [part if isinstance(part, int) else str(part)[:_MAX_LOC_CHARS] for part in detail["loc"]]}
        for detail in details[:_MAX_ERRORS_SHOWN]
    ]
    more = f" ({len(details)} errors; the first {len(shown)} are listed)" if len(details) > len(shown) else ""
    status, body = problem_for(errors.InvalidRequest(f"the request does not match the schema{more}"))
    body.errors = shown
    return _problem_response(status, body)


_MAX_ERRORS_SHOWN = 20


# The integer query parameters of each route, read as ASCII digits before validation
# (`_loose_number`); tests/integration/test_api.py holds this to the OpenAPI document.
INTEGER_QUERIES: dict[str, frozenset[str]] = {
    "/v1/jobs": frozenset({"limit"}),
    "/v1/batches": frozenset({"limit"}),
    "/v1/jobs/{job_id}": frozenset({"wait"}),
    "/v1/jobs/{job_id}/events": frozenset({"wait", "after"}),
}
_INTEGER_QUERY_ROUTES = [
    (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", route) + "/*$"), names)
    for route, names in INTEGER_QUERIES.items()
]


def _loose_number(event: dict[str, Any]) -> errors.DomainError | None:
    """A query's integer not written in ASCII digits, as the schema's integer is: validation
    reads a query's text by Python's rules, which took `1_0` for 10 and `5.0`, `+5` or ` 5` for 5
    (a long poll held ten seconds, a page of another size; hunt 311)."""
    if event.get("httpMethod") != "GET":
        return None
    path = str(event.get("path") or "")
    names = next((names for pattern, names in _INTEGER_QUERY_ROUTES if pattern.match(path)), frozenset())
    given = event.get("multiValueQueryStringParameters") or {
        name: [value] for name, value in (event.get("queryStringParameters") or {}).items()
    }
    for name in sorted(names & set(given)):
        for value in given[name] or []:
            if not (isinstance(value, str) and value.isascii() and value.isdigit()):
                return errors.InvalidRequest(
                    f"the query parameter {name} must be a whole number in ASCII digits"
                )
    return None


def _first_of_an_array(body: str) -> str:
    """The body, or its first object where it is an array of objects."""
    if not body.lstrip().startswith("["):
        return body
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return json.dumps(value[0], ensure_ascii=False)
    return body


@cache
def _stored_batch_request() -> type[StoredBatchRequest]:
    return stored_batch_request_model(ENV.config.batches.max_requests)


def _replay_despite_the_schema() -> Response[Any] | None:
    """A retry of an accepted submit (its answer lost) is its replay even when this deployment's
    schema now refuses the body: a model taken off the list, a limit lowered, between the two
    tries. The job or batch exists and runs either way; a refusal would read as "not accepted"
    and invite a second, paid one. The body must still be a request (the models without the
    deployment's limits, and with the bounds of any release: an earlier one may have accepted
    it), which the intake answers as the replay, or refuses as another body
    under the key. None when it is no such retry: the refusal stands, for a body no deployment
    takes with no read at all."""
    event = app.current_event
    key = event.get_header_value("Idempotency-Key")
    if event.http_method != "POST" or not key or len(key) > MAX_IDEMPOTENCY_KEY:
        return None
    path = event.path.rstrip("/")
    prefer = event.get_header_value("Prefer")
    # (an array of objects reaches this only under a key that made a job or a batch: read as
    # releases before hunt 310 read it, its first object; review 274)
    body = _first_of_an_array(event.decoded_body or "")
    looked = False
    try:
        tenant = _tenant()
        if path == "/v1/jobs":
            job = StoredJobRequest.model_validate_json(body)
            accepted, submit = intake().accepted_under, lambda: handle_submit_job(job, key, prefer)
        elif path == "/v1/batches":
            accepted = batch_intake().accepted_under
            try:
                batch = _stored_batch_request().model_validate_json(body)
            except ValidationError as exc:
                if not _too_many_items_only(exc):
                    return None
                # More items than this deployment takes, which an earlier one may have taken
                # (`batches.max_requests` lowered): only the batch the key made says how many,
                # and a body of more than that is no replay of it, so none of its items is
                # read beyond that count (each item takes memory).
                stored = _looked_up(lambda: batch_intake().batch_under(tenant, key))
                if not isinstance(stored, BatchRecord):
                    return stored if isinstance(stored, Response) else None
                looked = True
                try:
                    batch = stored_batch_request_model(stored.total).model_validate_json(body)
                except ValidationError:
                    return handle_domain_error(
                        errors.IdempotencyConflict(
                            "this Idempotency-Key was already used with a different body"
                        )
                    )
            submit = lambda: handle_submit_batch(batch, key)  # noqa: E731
        else:
            return None
    except Exception:
        return None  # (a body no deployment takes, or no tenant)
    if not looked:
        found = _looked_up(lambda: accepted(tenant, key))
        if found is not True:
            return found if isinstance(found, Response) else None
    return _answered(submit)


T = TypeVar("T")


def _too_many_items_only(exc: ValidationError) -> bool:
    """A batch refused for its number of items alone."""
    return all(error["type"] == "too_long" and tuple(error["loc"]) == ("requests",) for error in exc.errors())


def _looked_up(look: Callable[[], T]) -> T | Response[Any] | None:
    """What `look` found (the job or batch under a key); None when nothing (the refusal stands),
    or the 503 of a look DynamoDB did not answer."""
    try:
        return look() or None
    except errors.StoreUnavailable as exc:
        # A body a deployment takes, perhaps this key's accepted job's: not known until
        # DynamoDB answers, so a 503 to retry rather than a refusal that may be false.
        return handle_domain_error(exc)
    except Exception as exc:
        logger.warning("no replay looked for under a refused body", extra=error_fields(exc))
        return None


def _answered(submit: Callable[[], Response[Any]]) -> Response[Any]:
    """The replay's answer: a domain error as any route's, anything else as an unexpected
    error's (an exception handler's own exception would fail the invocation, a 502)."""
    try:
        return submit()
    except errors.DomainError as exc:
        return handle_domain_error(exc)
    except Exception as exc:
        return handle_unexpected(exc)


def _located(detail: dict[str, Any]) -> str:
    """A domain error's message; a batch item's names the item (`requests[3]: ...`)."""
    loc = detail["loc"]
    if len(loc) > 2 and tuple(loc[:2]) == ("body", "requests") and isinstance(loc[2], int):
        return f"requests[{loc[2]}]: {detail['msg']}"
    return str(detail["msg"])


# (a field's name is the client's: an unknown one may be long)
_MAX_LOC_CHARS = 64


# The methods each path serves, so a known path with another method is 405, not 404.
_METHODS = [
    (re.compile(r"^/v1/jobs/?$"), "GET, POST"),
    (re.compile(r"^/v1/jobs/[^/]+/?$"), "GET"),
    (re.compile(r"^/v1/jobs/[^/]+/cancel/?$"), "POST"),
    (re.compile(r"^/v1/jobs/[^/]+/events/?$"), "GET"),
    (re.compile(r"^/v1/jobs/[^/]+/webhook/?$"), "GET"),
    (re.compile(r"^/v1/jobs/[^/]+/webhook/redeliver/?$"), "POST"),
    (re.compile(r"^/v1/batches/?$"), "GET, POST"),
    (re.compile(r"^/v1/uploads/?$"), "POST"),
    (re.compile(r"^/v1/batches/[^/]+/?$"), "GET"),
    (re.compile(r"^/v1/batches/[^/]+/results/?$"), "GET"),
    (re.compile(r"^/v1/batches/[^/]+/cancel/?$"), "POST"),
    (re.compile(r"^/v1/batches/[^/]+/webhook/?$"), "GET"),
    (re.compile(r"^/v1/batches/[^/]+/webhook/redeliver/?$"), "POST"),
    (re.compile(r"^/v1/openapi\.json$"), "GET"),
]


@app.not_found
def handle_not_found(exc: NotFoundError) -> Response[Any]:
    path = app.current_event.path
    allowed = next((methods for pattern, methods in _METHODS if pattern.match(path)), None)
    if allowed is not None and app.current_event.http_method in allowed.split(", "):
        # A path of a route's shape, asked with a method the route takes, that the router did
        # not match: an id holding a character the router's pattern has not (`"`, `\`, a
        # control character), as an id's pattern would refuse it percent-encoded (hunt 281: a
        # 405 saying "use GET" to a GET).
        return handle_domain_error(errors.InvalidRequest("the path holds an id with a character no id has"))
    if allowed is not None:
        entry = errors.METHOD_NOT_ALLOWED
        return _problem_response(entry.status, problem(entry, f"use {allowed}"), {"Allow": allowed})
    return _problem_response(errors.ROUTE_NOT_FOUND.status, problem(errors.ROUTE_NOT_FOUND))


@app.exception_handler(Exception)
def handle_unexpected(exc: Exception) -> Response[Any]:
    # The body as the parser read it: API Gateway passes a binary media type's body in base64.
    if isinstance(exc, RecursionError) and _nests_deeper_than(
        app.current_event.decoded_body or "", MAX_JSON_DEPTH
    ):
        # A body nested too deeply for the JSON parser (a valid document of a few KB can be):
        # the client's, as malformed JSON is.
        return handle_domain_error(
            errors.MalformedJson(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        )
    event = app.current_event
    if (
        isinstance(exc, ValueError)
        and event.http_method == "POST"
        and _unreadable_json(event.decoded_body or "")
    ):
        # Valid JSON Python's parser still refuses with a plain ValueError, which validation
        # never sees: an integer of more than 4,300 digits (sys.get_int_max_str_digits).
        return handle_domain_error(errors.MalformedJson("the body holds a number too long to read"))
    # An exception's text, and the text of one it was raised while handling, can quote what a
    # request sent (a validation error's quotes the values it refused: a prompt, never in
    # logs): the classes, AWS codes and the code's path only; a validation error's fields.
    fields: dict[str, Any] = traceback_fields(exc)
    if isinstance(exc, ValidationError):
        fields["errors"] = exc.errors(include_url=False, include_input=False, include_context=False)
    logger.error("unhandled error", extra=fields)
    return handle_domain_error(errors.DomainError("see server logs"))


# No request llmq takes nests anywhere near this deep; Python's parser gives up at about 1,000.
def _unreadable_json(text: str) -> bool:
    """Whether the body is JSON that Python's parser refuses with a plain ValueError (read only
    when handling a request has already failed). Not JSON at all, validation said so already;
    no body, the failure was not the body's."""
    if not text.strip():
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    except ValueError:
        return True
    return False


def _nests_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON text opens more than `limit` arrays or objects inside one another,
    strings skipped (read only when parsing it has failed)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


# ---- routes -----------------------------------------------------------------------------


def _tenant() -> TenantIdentity:
    return _tenant_of(app.current_event.request_context.authorizer.raw_event or {})


def _tenant_of(context: dict[str, Any]) -> TenantIdentity:
    """The tenant the authorizer's context names."""
    tenant_id, tier = context.get("tenant_id"), context.get("tier")
    if not tenant_id or not tier:
        raise errors.Unauthenticated("no tenant in the authorizer context")
    return TenantIdentity(tenant_id=str(tenant_id), tier=str(tier))


def _public_base() -> str:
    """Where the client reached the API: scheme, host and the prefix before the resource path.

    On the execute-api domain the prefix is the stage (`/prod`); on a custom domain it is the
    base path mapping, possibly empty. A link without it would be a 403 on AWS.
    """
    event = app.current_event
    context = event.request_context
    proto = event.get_header_value("X-Forwarded-Proto", default_value="https") or "https"
    requested = context.path or ""
    prefix = requested[: -len(event.path)] if event.path and requested.endswith(event.path) else ""
    if not requested:
        prefix = f"/{context.stage}" if context.stage else ""
    return f"{proto}://{context.domain_name}{prefix.rstrip('/')}"


def _job_response(job: JobRecord, status_code: int, headers: dict[str, str] | None = None) -> Response:
    body = job.to_job(api_base=_public_base()).model_dump_json()
    if job.result is not None and job.result_ref and response_body_bytes(body) > MAX_RESPONSE_BODY_BYTES:
        # Inline, the answer would be a 502: the S3-held result goes by presigned URL instead.
        body = intake().offload.link_result(job).to_job(api_base=_public_base()).model_dump_json()
    return Response(status_code=status_code, content_type="application/json", body=body, headers=headers)


def _responses(success: int, description: str, model: type = Job, *errors_: int) -> dict[int, Any]:
    documented: dict[int, Any] = {
        success: {"description": description, "content": {"application/json": {"model": model}}}
    }
    # Every operation can meet the gateway's own answers (401, 403, 413, 429, 502, 504; see
    # GATEWAY_PROBLEMS in stacks/api.py), the body checks made before validation (413, 415),
    # a busy store (503) and an unexpected failure (500), as well as its own errors.
    for status in (400, 401, 403, 404, 413, 415, 422, 429, 500, 502, 503, 504, *errors_):
        documented[status] = {"description": "Problem", "content": {PROBLEM_JSON: {"model": Problem}}}
    return documented


# What an answer needs after a wait: a last read, an S3-held result of up to 4 MB, the response.
ANSWER_RESERVE_SECONDS = 4.0
# What an answer needs after a send given up (`aws.answering_by`): its job's mark for the
# reconciler (one write, which botocore's retries of two throttles can stretch to a few
# seconds: review 262 saw a 1 s reserve overrun; given up itself, should DynamoDB stall) and
# the response. Less than a wait's: a
# request that comes late (a cold start, a slow authorizer) still sends its job's message,
# rather than leave the job to the reconciler's next sweep.
SEND_RESERVE_SECONDS = 2.5
# What the answer needs after that mark, should it be given up too (`aws.answering_by`).
MARK_RESERVE_SECONDS = 0.5


def _wait_budget(requested: float) -> float:
    """The longest wait that still answers before API Gateway gives up.

    The gateway's 29 s run from when it received the request (`requestTimeEpoch`), so the
    authorizer and a cold start have already spent some; the function's own remaining time
    bounds it too. A client asking for 25 s on a cold path gets less, never a 504 for a job
    that was accepted.
    """
    received_ms = app.current_event.request_context.request_time_epoch
    left = _seconds_left(received_ms, getattr(app, "lambda_context", None))
    return max(0.0, min(float(requested), left - ANSWER_RESERVE_SECONDS))


def _seconds_left(received_ms: int | None, context: LambdaContext | None) -> float:
    """How long the request has before API Gateway gives up on it (its 29 s run from when it
    received the request) or the function's own time runs out."""
    left = GATEWAY_TIMEOUT_SECONDS
    if received_ms:
        left -= max(0.0, time.time() - received_ms / 1000)
    if context is not None:
        left = min(left, context.get_remaining_time_in_millis() / 1000)
    return left


def _prefer_wait(prefer: str | None) -> int:
    """The `wait` preference's seconds (RFC 7240: preferences apart by commas, each a name of
    any case, "=", a token or quoted string, then its parameters after ";"); 0 without one.
    Only ASCII digits are seconds (hunt 273: `wait=٣` and `x-wait=3` were waited on)."""
    digits = None
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() == "wait":
            digits = value.strip().removeprefix('"').removesuffix('"')
            break
    if digits is None or not (digits.isascii() and digits.isdigit()):
        return 0
    # (a run of digits longer than any wait reads as the longest wait: `int()` refuses over
    # 4,300 digits, and the job is accepted before the preference is read)
    digits = digits.lstrip("0") or "0"
    return (
        LIMITS.max_submit_wait_seconds
        if len(digits) > 9
        else min(int(digits), LIMITS.max_submit_wait_seconds)
    )


@app.post(
    "/v1/jobs",
    summary="Submit a job",
    responses={
        **_responses(202, "Accepted; or 200 when `Prefer: wait` saw it finish", Job, 409),
        200: {
            "description": "Finished within `Prefer: wait`",
            "content": {"application/json": {"model": Job}},
        },
    },
)
def handle_submit_job(
    request: Annotated[SubmitRequest, Body()],
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY)
    ] = None,
    prefer: Annotated[
        str | None,
        Header(
            alias="Prefer",
            description=(
                "`wait=N` (RFC 7240): wait up to N seconds for a terminal state before answering; "
                f"N above {LIMITS.max_submit_wait_seconds} waits {LIMITS.max_submit_wait_seconds}. "
                "Other preferences are ignored."
            ),
        ),
    ] = None,
) -> Response[Any]:
    tenant = _tenant()
    submission = intake().submit(tenant, request, idempotency_key)
    job, status = submission.job, 202
    headers = {"Location": f"{_public_base()}/v1/jobs/{job.id}"}
    if submission.replayed:
        headers["Idempotent-Replayed"] = "true"
    wait = _prefer_wait(prefer)
    budget = _wait_budget(wait)
    if budget > 0:
        try:
            polled = intake().long_poll(tenant, job.id, wait_seconds=budget)
        except Exception as exc:
            # The job is accepted and queued: a failed wait must not answer an error that a
            # client retries into a second, paid job. It gets the 202, without the preference.
            logger.warning("submit's wait failed", extra={"job_id": job.id, **error_fields(exc)})
            return _job_response(job, status, headers)
        job = polled.job
        if not polled.wait_refused:
            # Honoured, if perhaps shorter than asked (RFC 7240 lets a server apply less).
            headers["Preference-Applied"] = f"wait={wait}"
        status = 200 if job.status.is_terminal else 202
    return _job_response(job, status, headers)


def _long_polls_taken(instead: str) -> errors.TooManyLongPolls:
    return errors.TooManyLongPolls(
        "the tenant's requests waiting at once are at their limit (docs/limits.md); "
        f"retry after Retry-After, or {instead}",
        retry_after=ENV.config.fair_share.long_poll_retry_after_seconds,
    )


@app.get("/v1/jobs/<job_id>", summary="Get a job", responses=_responses(200, "The job", Job, 410))
def handle_get_job(
    job_id: Annotated[str, Path(pattern=JOB_ID)],
    wait: Annotated[
        int,
        Query(
            ge=0,
            description=f"Long-poll up to this many seconds; a longer wait than {LIMITS.max_get_wait_seconds} "
            "is cut to it",
            # (the bound stated, not enforced: a longer wait is cut, below)
            json_schema_extra={"maximum": LIMITS.max_get_wait_seconds},
        ),
    ] = 0,
) -> Response[Any]:
    tenant = _tenant()
    # Cut, not refused, as `Prefer: wait` is: a client written for the documented bound (the
    # CLI's, an integrator's) keeps working where an operator lowered it (hunt 302).
    wait = min(wait, LIMITS.max_get_wait_seconds)
    polled = intake().long_poll(tenant, job_id, wait_seconds=_wait_budget(wait), position=True)
    if polled.wait_refused:
        # The tenant's long-polls are all taken: a 429 with Retry-After, which every client's
        # backoff honours, rather than a 200 that a polling loop would repeat at once.
        raise _long_polls_taken("poll without ?wait")
    return _job_response(polled.job, 200)


@app.get(
    "/v1/jobs",
    summary="List jobs, newest first",
    # The list reads a DynamoDB global secondary index, which follows the table asynchronously.
    description="The list follows writes within about a second: a job just submitted may be "
    "missing, and one that just changed may show its previous status, for that long. "
    "GET /v1/jobs/{id} always answers the job as it is.",
    responses=_responses(200, "A page of jobs", JobList),
)
def handle_list_jobs(
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(pattern=CURSOR, description="The `next_cursor` of the previous page")
    ] = None,
) -> Response[Any]:
    jobs, next_cursor = intake().list(_tenant(), status, limit, cursor)
    base = _public_base()
    # The tenant index holds no live output (`stacks/jobs_table.py`): its items would all say
    # `stream: false` and show no progress, so the list leaves those out; a GET shows them.
    live = {"stream", "progress", "output_partial", "output_partial_truncated"}
    shown = [job.to_job(api_base=base) for job in jobs]
    return _page_that_fits(
        len(shown),
        next_cursor,
        lambda count, following: JobList(data=shown[:count], next_cursor=following).model_dump_json(
            exclude={"data": {"__all__": live}}
        ),
        lambda last: cursor_after(jobs[last]),
    )


def _page_that_fits(
    count: int,
    next_cursor: str | None,
    body_of: Callable[[int, str | None], str],
    cursor_at: Callable[[int], str],
) -> Response[Any]:
    """A list page of the first `count` entries, or of fewer if Lambda could not answer it: a
    page the store sized by its bytes can hold more than Lambda may answer, once its results
    and metadata are escaped (a control character takes 6 bytes, then 7). It ends early, its
    cursor at its last entry (`cursor_at(index)`), as a shorter `limit` would."""
    while True:
        body = body_of(count, next_cursor)
        if count <= 1 or response_body_bytes(body) <= MAX_RESPONSE_BODY_BYTES:
            return Response(status_code=200, content_type="application/json", body=body)
        count //= 2
        next_cursor = cursor_at(count - 1)


@app.post(
    "/v1/jobs/<job_id>/cancel",
    summary="Cancel a job",
    description="A queued job is canceled at once (200); a running one is asked to stop (202). "
    "A job canceled already answers 200 with it (a retried cancel's answer); one that succeeded, "
    "failed or expired answers 409.",
    responses={
        **_responses(200, "Canceled", Job, 409),
        202: {"description": "Cancel requested", "content": {"application/json": {"model": Job}}},
    },
)
def handle_cancel_job(job_id: Annotated[str, Path(pattern=JOB_ID)]) -> Response[Any]:
    job = intake().cancel(_tenant(), job_id)
    return _job_response(job, 200 if job.status.is_terminal else 202)


# One server-sent event of GET /v1/jobs/{id}/events, as SSE parsers read it; its data is
# one line of JSON, named per event in `x-llmq-events` (`_with_event_schemas`).
_SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["status", "output.delta", "done"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}


@app.get(
    "/v1/jobs/<job_id>/events",
    summary="Follow a job: its status and, for `stream: true`, its output as it is generated",
    description=(
        'Server-sent events (docs/streaming.md): `status` (`{"status"}`) when the status '
        "changes, `output.delta` (`OutputDelta`, its id the delta's `seq`) for each piece of "
        "output, and `done` with the terminal Job. Each response is a long poll: it answers as "
        "soon as there is something new, or after `wait` seconds, and ends with a `retry:` hint; "
        "reconnect with `Last-Event-ID` (EventSource does) or `?after=` to read on (the later "
        "of the two counts). It holds one of the tenant's long-poll places while it waits; with "
        "none free it answers at once, its `retry:` the long-poll Retry-After. `done` has the id "
        "`done`, and a reconnect with it is answered 204, which stops EventSource."
    ),
    responses={
        200: {
            "description": "A text/event-stream of status, output.delta and done events",
            # Before OpenAPI 3.2's itemSchema, a stream's schema describes each of its events.
            "content": {"text/event-stream": {"schema": _SSE_EVENT_SCHEMA}},
        },
        204: {"description": "`Last-Event-ID: done`: the stream has ended"},
        **{status: body for status, body in _responses(200, "", OutputDelta).items() if status != 200},
    },
)
def handle_job_events(
    job_id: Annotated[str, Path(pattern=JOB_ID)],
    wait: Annotated[
        int,
        Query(
            ge=0,
            description="Hold the response open up to this many seconds; a longer wait than "
            f"{STREAMING.max_wait_seconds} is cut to it",
            json_schema_extra={"maximum": STREAMING.max_wait_seconds},
        ),
    ] = STREAMING.max_wait_seconds,
    after: Annotated[
        int | None,
        Query(ge=0, description="Read the deltas after this seq (or Last-Event-ID's, if later)"),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", max_length=32, description="The id of the last event read"),
    ] = None,
) -> Response[Any]:
    tenant = _tenant()
    try:
        if finished_reading(last_event_id) and intake().has_ended(tenant, job_id):
            # The client read `done`: 204 is how the SSE standard stops EventSource
            # reconnecting. (Only for a job that has ended: an id carried over from another
            # job's stream must not stop this one's for good, nor a busy store's 503, hunt 267.
            # Otherwise the stream starts from its beginning.)
            return Response(status_code=204, body="", headers={"Cache-Control": "no-cache"})
        body = intake().output_events(
            tenant,
            job_id,
            resume_point(last_event_id, after),
            wait_seconds=_wait_budget(min(wait, STREAMING.max_wait_seconds)),
        )
    except errors.StoreUnavailable as exc:
        # Any answer but 200 ends an EventSource for good: a busy store says when to come back.
        logger.warning("events answered with a retry", extra={"why": exc.code})
        body = retry_hint(int((exc.retry_after or _RETRY_AFTER_UNAVAILABLE_SECONDS) * 1000))
    return Response(
        status_code=200, content_type="text/event-stream", body=body, headers={"Cache-Control": "no-cache"}
    )


@app.get(
    "/v1/jobs/<job_id>/webhook",
    summary="The job's webhook and its delivery log",
    description="The delivery status of the job's terminal event and its latest 10 attempts: when, "
    "the receiver's status code, the latency, the error class when no answer came, and the first "
    "256 bytes of the receiver's answer. job.started is sent but not logged.",
    responses=_responses(200, "The delivery log", WebhookLog),
)
def handle_get_webhook_log(job_id: Annotated[str, Path(pattern=JOB_ID)]) -> Response[Any]:
    log = intake().webhook_log(_tenant(), job_id)
    return Response(status_code=200, content_type="application/json", body=log.model_dump_json())


@app.post(
    "/v1/jobs/<job_id>/webhook/redeliver",
    summary="Send the job's terminal webhook again",
    responses=_responses(202, "Queued for delivery", Job, 409),
)
def handle_redeliver_webhook(job_id: Annotated[str, Path(pattern=JOB_ID)]) -> Response[Any]:
    return _job_response(intake().redeliver(_tenant(), job_id), 202)


def _batch_response(batch: Batch, status_code: int, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(
        status_code=status_code,
        content_type="application/json",
        body=batch.model_dump_json(),
        headers=headers,
    )


@app.post(
    "/v1/batches",
    summary="Submit a batch of jobs",
    description="Inline `requests` are validated before anything is written: a bad one is answered as "
    "a problem naming `requests[i]` and its field. An `upload_id` (POST /v1/uploads) must name a file "
    "already PUT; its lines are validated after the 202 (a bad one fails the batch, naming its line). "
    "Accepted, the batch answers 202 at once; its items are written and queued asynchronously "
    "(status `validating`, then `in_progress`).",
    responses=_responses(202, "Accepted", Batch, 409),
)
def handle_submit_batch(
    request: Annotated[SubmitBatchRequest, Body()],
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=MAX_IDEMPOTENCY_KEY)
    ] = None,
) -> Response[Any]:
    tenant = _tenant()
    batch, replayed = batch_intake().submit(tenant, request, idempotency_key)
    headers = {"Location": f"{_public_base()}/v1/batches/{batch.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    # A new batch has nothing running or ended yet: its counts need no read.
    counts = (
        batch_intake().batches.counts(batch)
        if replayed
        else BatchRequestCounts(total=batch.total, queued=batch.total)
    )
    return _batch_response(batch.to_batch(counts, _public_base()), 202, headers)


@app.post(
    "/v1/uploads",
    summary="Get a URL to upload a batch file to",
    description="Answers a presigned S3 URL: PUT a JSON Lines file there (one "
    '`{"custom_id", "body"}` per line, up to `max_bytes` and `max_requests`), then create the batch '
    "with `upload_id`. The URL is signed for a PUT of exactly `size_bytes` (its Content-Length); S3 "
    "refuses any other. The file is validated after the 202, before any item is written: a bad line "
    "ends the batch `failed`, its `errors` naming the line and field.",
    responses=_responses(201, "Where to PUT the file", Upload),
)
def handle_new_upload(request: Annotated[UploadRequest, Body()]) -> Response[Any]:
    upload = batch_intake().new_upload(_tenant(), request.size_bytes)
    return Response(status_code=201, content_type="application/json", body=upload.model_dump_json())


@app.get(
    "/v1/batches",
    summary="List batches, newest first",
    description="Each with its counts. Like the job list, it follows writes within about a second.",
    responses=_responses(200, "A page of batches", BatchList),
)
def handle_list_batches(
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(pattern=CURSOR, description="The `next_cursor` of the previous page")
    ] = None,
) -> Response[Any]:
    listed, next_cursor = batch_intake().list_page(_tenant(), limit, cursor)
    base = _public_base()
    shown = [batch.to_batch(counts, base) for batch, counts in listed]
    return _page_that_fits(
        len(shown),
        next_cursor,
        lambda count, following: BatchList(data=shown[:count], next_cursor=following).model_dump_json(),
        lambda last: _batch_cursor_after(listed[last][0]),
    )


def _batch_cursor_after(batch: BatchRecord) -> str:
    return batch_cursor_after(batch_key(batch.id), batch.id, batch.tenant_id, batch.created_ms)


@app.get(
    "/v1/batches/<batch_id>",
    summary="Get a batch and its counts",
    responses=_responses(200, "The batch", Batch),
)
def handle_get_batch(batch_id: Annotated[str, Path(pattern=BATCH_ID)]) -> Response[Any]:
    batch, counts = batch_intake().get(_tenant(), batch_id)
    results_file = batch_intake().results_file(batch)
    return _batch_response(batch.to_batch(counts, _public_base(), results_file), 200)


@app.get(
    "/v1/batches/<batch_id>/webhook",
    summary="The batch's webhook and its delivery log",
    description="The delivery status of the batch's event and its latest 10 attempts, as a job's "
    "(GET /v1/jobs/{id}/webhook).",
    responses=_responses(200, "The delivery log", BatchWebhookLog),
)
def handle_get_batch_webhook_log(batch_id: Annotated[str, Path(pattern=BATCH_ID)]) -> Response[Any]:
    log = batch_intake().webhook_log(_tenant(), batch_id)
    return Response(status_code=200, content_type="application/json", body=log.model_dump_json())


@app.post(
    "/v1/batches/<batch_id>/webhook/redeliver",
    summary="Send the ended batch's webhook again",
    description="A new round of attempts, under the same webhook-id (receivers de-duplicate by it).",
    responses=_responses(202, "Queued for delivery", Batch, 409),
)
def handle_redeliver_batch_webhook(batch_id: Annotated[str, Path(pattern=BATCH_ID)]) -> Response[Any]:
    batch = batch_intake().redeliver(_tenant(), batch_id)
    counts = batch.final_counts or batch_intake().batches.counts(batch)
    return _batch_response(batch.to_batch(counts, _public_base()), 202)


@app.get(
    "/v1/batches/<batch_id>/results",
    summary="The items' results, as JSON Lines",
    description="One line per item, in the batch's order: `custom_id`, `job_id`, `status`, and `result` "
    "(or `result_url` for a large one) or `error`. Available while the batch runs. A page holds the "
    "items from `cursor` on; the `Llmq-Next-Cursor` header names the next page, absent on the last. "
    "`status` keeps only the items in that status.",
    responses={
        200: {
            "description": "A page of results",
            "content": {"application/jsonl": {"schema": {"type": "string"}}},
        },
        **{code: entry for code, entry in _responses(200, "", Batch, 410).items() if code != 200},
    },
)
def handle_batch_results(
    batch_id: Annotated[str, Path(pattern=BATCH_ID)],
    cursor: Annotated[
        str, Query(pattern=RESULTS_CURSOR, description="The previous page's Llmq-Next-Cursor")
    ] = "0",
    status: Annotated[JobStatus | None, Query()] = None,
) -> Response[Any]:
    lines, following = batch_intake().results(_tenant(), batch_id, int(cursor), status, _public_base())
    body = "".join(line.model_dump_json(exclude_none=True) + "\n" for line in lines)
    headers = {"Llmq-Next-Cursor": str(following)} if following is not None else None
    return Response(status_code=200, content_type="application/jsonl", body=body, headers=headers)


@app.post(
    "/v1/batches/<batch_id>/cancel",
    summary="Cancel a batch",
    description="Queued items end canceled without a provider call, running ones are stopped as a "
    "job is, and items not yet written never are. The batch is `canceling` until every item has "
    "ended, then `canceled`. A batch canceled already answers 200 with it; one that ended "
    "otherwise answers 409.",
    responses={
        **_responses(202, "Canceling", Batch, 409),
        200: {"description": "Canceled", "content": {"application/json": {"model": Batch}}},
    },
)
def handle_cancel_batch(batch_id: Annotated[str, Path(pattern=BATCH_ID)]) -> Response[Any]:
    tenant = _tenant()
    batch = batch_intake().cancel(tenant, batch_id)
    counts = batch.final_counts or batch_intake().batches.counts(batch)
    return _batch_response(batch.to_batch(counts, _public_base()), 200 if batch.status.is_terminal else 202)


@app.get("/v1/openapi.json", summary="This document", include_in_schema=False)
def handle_get_openapi() -> Response[Any]:
    # Powertools' OpenAPI document models take a third of the api's imports, and only this
    # route (and the SnapStart warm-up, which calls it) needs them: imported here, at first use.
    from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer, Server

    document = app.get_openapi_json_schema(
        title="llmq",
        version="1.0.0",
        description="Asynchronous jobs for long-running LLM requests",
        security_schemes={"bearer": HTTPBearer(description="Bearer <API key>")},
        security=[{"bearer": []}],
        # Where this document was fetched, stage included: a client generated from it calls
        # the API there, not at the host's root (a 403 on AWS).
        servers=[Server(url=_public_base())],
    )
    return Response(status_code=200, content_type="application/json", body=_with_event_schemas(document))


def _with_event_schemas(document: str) -> str:
    """The schemas of what the events stream and job.output webhooks carry, which no JSON
    operation names: each event's data is named on the stream's response (`x-llmq-events`)."""
    schema = json.loads(document)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (OutputDelta, JobOutputEvent):
        components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    events = schema["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    events["text/event-stream"]["schema"]["x-llmq-events"] = {
        "status": {"type": "object", "properties": {"status": {"$ref": "#/components/schemas/JobStatus"}}},
        "output.delta": {"$ref": "#/components/schemas/OutputDelta"},
        "done": {"$ref": "#/components/schemas/Job"},
    }
    return json.dumps(schema)


# ---- SnapStart (LlmqConfig.api.snap_start) ------------------------------------------------


# Requests that build what a first request would otherwise build, and touch no AWS service:
# the OpenAPI document (every route's models, Powertools' schema models) and a submit that
# validation refuses (the request models' validators, the problem path).
# Every AWS service the api calls (DynamoDB, SQS, S3 for payloads and uploads).
_SERVICES = ("dynamodb", "sqs", "s3")


def _warm_event(method: str, path: str, resource: str, body: str | None = None) -> dict[str, Any]:
    context = {"stage": "warm", "path": f"/warm{path}", "httpMethod": method, "domainName": "warm.invalid"}
    headers = {"Content-Type": "application/json"}
    return {
        "httpMethod": method,
        "path": path,
        "resource": resource,
        "headers": headers,
        "multiValueHeaders": {key: [value] for key, value in headers.items()},
        "body": body,
        "requestContext": context,
    }


_WARM_EVENTS = (
    _warm_event("GET", "/v1/openapi.json", "/v1/openapi.json"),
    _warm_event("POST", "/v1/jobs", "/v1/{proxy+}", body="{}"),
)


def warm() -> None:
    """Before Lambda takes the snapshot, and as a provisioned environment initialises
    (`llmq.startup`): the composition roots, every client they use (the lazily created ones
    too), every lazily built model and the request paths, so a restored or provisioned
    environment answers its first request as a warm one would. No request reaches AWS; the
    clients hold the runtime's refreshable credentials, which boto3 renews after a restore."""
    intake()
    batch_intake()
    for service in _SERVICES:
        aws.client(service)
    build_all()
    enable_docs()
    for event in _WARM_EVENTS:
        app.resolve(event, None)  # type: ignore[arg-type]


def refresh() -> None:
    """After a restore. Every environment restored from one snapshot starts with the same
    memory: `random`'s state (the jitter of retries and backoffs) would repeat across them,
    so it is drawn afresh, and the composition roots are rebuilt around new generators. The
    clients stay: boto3 refreshes their credentials itself, and re-opens a pooled connection
    that the restore cut. Ids come from `secrets`, which reads the OS at each call."""
    random.seed()
    intake.cache_clear()
    batch_intake.cache_clear()


try:  # Shipped in Lambda's Python runtimes (3.12+); elsewhere nothing is ever snapshotted.
    from snapshot_restore_py import register_after_restore, register_before_snapshot
except ImportError:
    pass
else:
    register_before_snapshot(warm)
    register_after_restore(refresh)


# ---- entry point ------------------------------------------------------------------------


def _unless_an_accepted_retry(
    event: dict[str, Any], too_large: errors.DomainError
) -> errors.DomainError | None:
    """A body over this deployment's limit, but within any deployment's, under a key that
    already made a job or batch: the retry of an accepted submit after the limit was lowered,
    answered as its replay (or refused as another body) by the route, as a schema's refusal is
    (`_replay_despite_the_schema`); a 413 would read as "not accepted" and invite a second,
    paid one (hunt 231). So is an array of objects, which releases before hunt 310 took as its
    first (review 273). One GetItem, for such a body with a key only."""
    headers = {key.lower(): value for key, value in (event.get("headers") or {}).items()}
    key = headers.get("idempotency-key")
    path = str(event.get("path") or "").rstrip("/")
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or path not in ("/v1/jobs", "/v1/batches"):
        return too_large
    accepted = intake().accepted_under if path == "/v1/jobs" else batch_intake().accepted_under
    try:
        tenant = _tenant_of((event.get("requestContext") or {}).get("authorizer") or {})
        return None if accepted(tenant, key) else too_large
    except errors.Unauthenticated:
        return too_large
    except errors.StoreUnavailable as exc:
        return exc  # (a 503 to retry: the refusal may be false)
    except Exception as exc:
        logger.warning("no replay looked for under an oversized body", extra=error_fields(exc))
        return too_large


def _reject_unacceptable_body(
    event: dict[str, Any], limit: int | None = None
) -> errors.DomainError | _ArrayOfObjects | None:
    """Size and media type are checked before validation parses the body (`limit`: instead of
    the deployment's body limit)."""
    body = event.get("body")
    if body is None or event.get("httpMethod") != "POST":
        return None
    raw = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode("utf-8", "surrogateescape")
    # (Powertools routes /v1/batches/ as /v1/batches)
    batch = str(event.get("path") or "").rstrip("/") == "/v1/batches"
    limit = limit or (ENV.config.batches.max_body_bytes if batch else LIMITS.max_body_bytes)
    if len(raw) > limit:
        return errors.PayloadTooLarge(f"the body exceeds {limit} bytes")
    headers = {key.lower(): value for key, value in (event.get("headers") or {}).items()}
    media_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
    if raw.strip() and media_type != "application/json" and not media_type.endswith("+json"):
        return errors.UnsupportedMediaType(f"Content-Type {media_type or '(none)'} is not application/json")
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    if raw.strip() and encoding != "identity":
        # (the API compresses nothing: a gzip body would otherwise be read as broken JSON, and
        # a plain one that claims gzip as if it were not)
        return errors.UnsupportedMediaType(
            f"Content-Encoding {encoding} is not supported: send the body as is"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return errors.MalformedJson("the body is not UTF-8 text")
    # Before validation (`MAX_OBJECT_MEMBERS`).
    try:
        value = json.loads(text, object_pairs_hook=_within_members)
    except _TooManyMembers as exc:
        return errors.InvalidRequest(str(exc))
    except (ValueError, RecursionError):
        return None  # (not JSON the parser reads: validation says how)
    route = str(event.get("path") or "").rstrip("/")
    if route in _OBJECT_BODY_ROUTES and not isinstance(value, dict):
        # (validation takes a list given for one value as its first element, as it would a
        # repeated query parameter: `[{"prompt": "a"}, {"prompt": "b"}]` was one job, 202, and
        # the rest dropped unsaid; hunt 310)
        detail = f"the body must be a JSON object, not {_json_kind(value)}"
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return _ArrayOfObjects(errors.InvalidRequest(detail))
        return errors.InvalidRequest(detail)
    return None


class _ArrayOfObjects(Exception):
    """An array of objects, which releases before hunt 310 took as its first: refused as
    `refusal`, unless it is, under a key that made a job or a batch, the retry of a submit they
    accepted (`_unless_an_accepted_retry`). (Not a problem type of its own: its code is
    `invalid_request`.)"""

    def __init__(self, refusal: errors.InvalidRequest) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


# The routes whose body is one object (a job, a batch, an upload).
_OBJECT_BODY_ROUTES = frozenset({"/v1/jobs", "/v1/batches", "/v1/uploads"})


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


class _TooManyMembers(ValueError):
    pass


def _within_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_OBJECT_MEMBERS:
        raise _TooManyMembers(f"an object of the body has {len(pairs)} members; at most {MAX_OBJECT_MEMBERS}")
    return dict(pairs)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST, log_event=False)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # (first: the body's limit is chosen by the path, a batch's or a job's)
    _route_on_the_resource(event)
    found = _reject_unacceptable_body(event) or _loose_number(event)
    rejection = found.refusal if isinstance(found, _ArrayOfObjects) else found
    # (a body over any deployment's limit is no retry of an accepted one: no lookup for it)
    if rejection is not None and (
        isinstance(found, _ArrayOfObjects)
        or (
            isinstance(rejection, errors.PayloadTooLarge)
            and isinstance(
                _reject_unacceptable_body(event, MAX_REQUEST_BODY_BYTES), (type(None), _ArrayOfObjects)
            )
        )
    ):
        rejection = _unless_an_accepted_retry(event, rejection)
    if rejection is not None:
        status, body = problem_for(rejection)
        return {
            "statusCode": status,
            "headers": {"Content-Type": PROBLEM_JSON, **(_retry_after(rejection, status) or {})},
            "body": body.model_dump_json(exclude_none=True),
            "isBase64Encoded": False,
        }
    if str(event.get("path") or "").rstrip("/") == DOCS_PATH:  # (Powertools serves /v1/docs/ too)
        enable_docs()
    _read_as_json(event)
    _one_prefer(event)
    # SQS sends after a write (a job's lane message, an ended job's event) end in time for the
    # answer: each is one the reconciler makes too, and a stalled one took 40 s (hunt 273),
    # making an accepted submit, or a done cancel, a 504 whose retry paid twice or met a 409.
    received_ms = (event.get("requestContext") or {}).get("requestTimeEpoch")
    left = _seconds_left(received_ms if isinstance(received_ms, int) else None, context)
    now = time.monotonic()
    with aws.answering_by(now + left - SEND_RESERVE_SECONDS, marks_by=now + left - MARK_RESERVE_SECONDS):
        return app.resolve(event, context)


def _one_prefer(event: dict[str, Any]) -> None:
    """Prefer header lines are one list of preferences (RFC 7240 §2: a client may send several;
    API Gateway passes each in `multiValueHeaders`), which the parameter, one string, refused
    as a 422 (hunt 289)."""
    multi = event.get("multiValueHeaders") or {}
    for key in [key for key in multi if key.lower() == "prefer"]:
        values = multi[key]
        if isinstance(values, list) and len(values) > 1:
            joined = ", ".join(str(value) for value in values)
            multi[key] = [joined]
            headers = event.get("headers") or {}
            for name in [name for name in headers if name.lower() == "prefer"]:
                headers[name] = joined


def _read_as_json(event: dict[str, Any]) -> None:
    """A POST `_reject_unacceptable_body` let through is read as JSON: its Content-Type was JSON
    in any case (media types are case-insensitive) or a `+json` type, or it has no body. The
    validation's parser matches only `application/json` as written, and refused the others as
    an unexpected error, a 500 (hunt 257)."""
    if event.get("httpMethod") != "POST":
        return
    for name in ("headers", "multiValueHeaders"):
        headers = event.get(name) or {}
        for key in [key for key in headers if key.lower() == "content-type"]:
            values = headers[key] if isinstance(headers[key], list) else [headers[key]]
            read = [_as_json(str(value)) for value in values]
            headers[key] = read if isinstance(headers[key], list) else read[0]


def _as_json(content_type: str) -> str:
    _, semicolon, parameters = content_type.partition(";")
    return f"application/json{semicolon}{parameters}"


def _route_on_the_resource(event: dict[str, Any]) -> None:
    """Through a custom domain's API mapping, API Gateway's `path` carries the mapping's base
    path (`/llmq/v1/jobs`), where the routes know the resource's own (`/v1/jobs`): every route
    would be a 404. The path the resource and its proxy parameter name is routed on instead;
    the base path stays in `requestContext.path`, where the links find it (`_public_base`)."""
    resource = str(event.get("resource") or "")
    proxy = (event.get("pathParameters") or {}).get("proxy")
    if "{proxy+}" in resource and isinstance(proxy, str):
        own = resource.replace("{proxy+}", proxy)
    elif "{" not in resource:
        own = resource
    else:
        return
    path = str(event.get("path") or "")
    if own and path != own and path.endswith(own):
        event["path"] = own


startup.imports_done(warm)
