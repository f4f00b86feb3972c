"""Logging, metrics and tracing, shared by every function. Prompts and outputs are never logged."""

from __future__ import annotations

import hashlib
import logging
import os
import traceback
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger, Metrics, single_metric
from aws_lambda_powertools.metrics import MetricUnit

from llmq.errors import StoreUnavailable
from llmq.models import JobStatus

# The CDK app sets POWERTOOLS_METRICS_NAMESPACE from this, and POWERTOOLS_SERVICE_NAME to the
# stack's name (`stack_service_name`); its dashboard and alarms read the metrics under both.
METRICS_NAMESPACE = "llmq"
# Outside a deployed function (tests, the CLI): the service as no stack names it.
DEFAULT_SERVICE_NAME = "llmq"
SERVICE_NAME = os.environ.get("POWERTOOLS_SERVICE_NAME") or DEFAULT_SERVICE_NAME
# What X-Ray instruments (see `tracer`): never a client used from concurrent asyncio tasks.
TRACED_MODULES = ("botocore",)
logger = Logger(service=SERVICE_NAME)
# Libraries whose records below WARNING quote what llmq never logs: botocore's DEBUG has every
# request's parameters and every answer's body (a job's prompt and output, an API key's hash),
# Powertools' event handler's DEBUG the parsed request (the prompt), httpx's INFO each request's
# URL (a webhook's path and query, where integrators put tokens). They reach a log only when the
# root logger is set below WARNING, as Lambda does for a function whose application log level is
# INFO or DEBUG (advanced logging controls), so they are held at WARNING here whatever the root's
# level is. llmq's own logger (LOG_LEVEL) is not among them.
QUIET_LIBRARY_LOGGERS = (
    "aws_lambda_powertools",
    # (its DEBUG has each trace segment sent, with the messages of the errors it captured)
    "aws_xray_sdk",
    "boto3",
    "botocore",
    "httpcore",
    "httpx",
    "s3transfer",
    "urllib3",
)


def quiet_libraries() -> None:
    """Hold the loggers of `QUIET_LIBRARY_LOGGERS` at WARNING (a higher level set is kept)."""
    for name in QUIET_LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        if library.level < logging.WARNING:
            library.setLevel(logging.WARNING)


quiet_libraries()
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)
if TYPE_CHECKING:
    from aws_lambda_powertools import Tracer


@cache
def tracer() -> Tracer:
    """X-Ray tracing for the long-running functions only: importing the X-Ray SDK costs
    about 35 ms of cold start on Lambda, which the API and the authorizer should not pay.
    (Outside Lambda, without LAMBDA_TASK_ROOT, the SDK also builds clients for centralized
    sampling as it is imported: about 140 ms.)

    Only botocore is patched. The X-Ray SDK keeps the open subsegment per thread, not per
    asyncio task, so with httpx patched two concurrent requests on the event loop (a worker
    batch streaming from the provider, the dispatcher posting webhooks) nest into each other,
    and the second to end raises AlreadyEndedException out of the request itself: the job's
    record fails after its claim. AWS calls run one per thread (`asyncio.to_thread`), where
    the per-thread context is right.
    """
    from aws_lambda_powertools import Tracer

    return Tracer(service=SERVICE_NAME, patch_modules=TRACED_MODULES)


def stack_service_name(stack_name: str) -> str:
    """The `service` of a stack's logs, metrics and traces, the dimension its alarms and dashboard
    read: its own name, so two stacks in one account and region (dev and staging) never count
    each other's jobs, nor page for each other's faults."""
    return stack_name


class MetricName(StrEnum):
    """Every custom metric llmq emits: the functions emit these and the dashboard graphs them."""

    QUEUE_WAIT_MS = "QueueWaitMs"
    RUN_TIME_MS = "RunTimeMs"
    JOB_SUCCEEDED = "JobSucceeded"
    JOB_FAILED = "JobFailed"
    # Failed for what its request asked (past the model's context, filtered): the client's to
    # fix, counted apart so JobsFailing pages on llmq's failures, not a tenant's.
    JOB_REFUSED = "JobRefused"
    JOB_CANCELED = "JobCanceled"
    JOB_EXPIRED = "JobExpired"
    WEBHOOK_DELIVERED = "WebhookDelivered"
    WEBHOOK_RETRIED = "WebhookRetried"
    WEBHOOK_FAILED = "WebhookFailed"
    WEBHOOK_SKIPPED = "WebhookSkipped"
    # Faults that no Lambda error metric shows: each has an alarm (stacks/monitoring.py).
    API_UNEXPECTED_ERROR = "ApiUnexpectedError"
    JOB_DEAD_LETTERED = "JobDeadLettered"
    JOB_ENQUEUE_FAILED = "JobEnqueueFailed"
    RECONCILE_ENTRY_FAILED = "ReconcileEntryFailed"
    # Swept entries a reconciler run left for the next one, its time running out: its alarm
    # fires when every run for a quarter of an hour fell behind.
    RECONCILE_LEFT = "ReconcileLeft"
    # A request that asked to wait was refused a long-poll place (llmq.long_polls): a tenant
    # at its max_long_polls, or their store busy.
    LONG_POLL_REFUSED = "LongPollRefused"
    # The authorizer refused a request's API key (401): Lambda counts each refusal as an error
    # (the refusal is an exception), so the authorizer's error alarm is on AuthorizerFailed.
    AUTHENTICATION_REFUSED = "AuthenticationRefused"
    # The authorizer failed for any other reason (its store unavailable, a bug): the 500 API
    # Gateway answers then. (A timeout or a crash shows as API Gateway's 5XX.)
    AUTHORIZER_FAILED = "AuthorizerFailed"
    # A queue record failed unexpectedly (not a retry the code asked for, not poison), with the
    # queue's name as its dimension: every invocation can succeed while each of its records
    # fails, which no Lambda error shows; WebhooksOldestMessage counts the webhooks queue's.
    RECORD_FAILED = "RecordFailed"
    # The provider refused llmq's own account (401, 403, 402 or a quota out of credit): every
    # job fails with it, after retries minutes apart, until an operator fixes the key.
    PROVIDER_ACCOUNT_REFUSED = "ProviderAccountRefused"
    # The provider refused a request before generating (a 429 rate limit, a 503 or 529
    # overload), its attempt refunded (`RetryPolicy.max_refusals`): an outage or a limit set too
    # low shows here while the jobs wait, before any fails.
    PROVIDER_REFUSED = "ProviderRefused"
    # The api answered 503 webhook_host_unavailable: a tenant's webhook host whose own name
    # servers fail, which Api5xx leaves out (API Gateway's 5XXError counts it).
    WEBHOOK_HOST_UNAVAILABLE = "WebhookHostUnavailable"


# One count per terminal job, with the lane as its dimension.
JOB_OUTCOME_METRICS: dict[JobStatus, MetricName] = {
    JobStatus.SUCCEEDED: MetricName.JOB_SUCCEEDED,
    JobStatus.FAILED: MetricName.JOB_FAILED,
    JobStatus.CANCELED: MetricName.JOB_CANCELED,
    JobStatus.EXPIRED: MetricName.JOB_EXPIRED,
}
# One count per delivery outcome, with the service dimension only.
WEBHOOK_OUTCOME_METRICS = (
    MetricName.WEBHOOK_DELIVERED,
    MetricName.WEBHOOK_RETRIED,
    MetricName.WEBHOOK_FAILED,
    MetricName.WEBHOOK_SKIPPED,
)
# Something went wrong that the function handled, so Lambda counts no error:
# - ApiUnexpectedError: the api answered a 500 (service dimension only);
# - JobDeadLettered: the dead-letter function failed a job as worker_crashed (lane dimension);
# - JobEnqueueFailed: the api stored a job but could not send its message, so the client got
#   its 202 and the job waits for the reconciler (lane dimension);
# - ReconcileEntryFailed: the reconciler could not settle something it swept (an entry, the
#   lanes' depths), and went on with the rest (service dimension only);
# - RecordFailed: a queue record failed unexpectedly (queue dimension: the queue's name);
# - ProviderAccountRefused: the provider refused llmq's own key or account (service only);
# - ReconcileLeft: swept entries a reconciler run left for the next, out of time (service only).
FAULT_METRICS = (
    MetricName.API_UNEXPECTED_ERROR,
    MetricName.JOB_DEAD_LETTERED,
    MetricName.JOB_ENQUEUE_FAILED,
    MetricName.RECONCILE_ENTRY_FAILED,
    MetricName.RECONCILE_LEFT,
    MetricName.AUTHORIZER_FAILED,
    MetricName.RECORD_FAILED,
    MetricName.PROVIDER_ACCOUNT_REFUSED,
)
# Refusals, not faults (service dimension only): the api's waits refused a place (a tenant's
# limit at work), the authorizer refused a key, a tenant's webhook host could not be looked up,
# the provider refused a request before generating (its rate limit, its capacity).
LIMIT_METRICS = (
    MetricName.LONG_POLL_REFUSED,
    MetricName.AUTHENTICATION_REFUSED,
    MetricName.WEBHOOK_HOST_UNAVAILABLE,
    MetricName.PROVIDER_REFUSED,
)


def fingerprint(text: str) -> str:
    """A short, stable hash that lets operators correlate a prompt without ever seeing it."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def emit_job_metric(name: MetricName, value: float, lane: str) -> None:
    """One metric with the lane as its dimension (the dashboard graphs per lane)."""
    unit = MetricUnit.Milliseconds if name.endswith("Ms") else MetricUnit.Count
    with single_metric(name=name, unit=unit, value=value, namespace=metrics.namespace) as metric:
        metric.add_dimension(name="lane", value=lane)


# Every count of a terminal job, by lane: one per terminal status, and the failures that were
# the request's (`count_outcome`).
JOB_OUTCOMES = (*JOB_OUTCOME_METRICS.values(), MetricName.JOB_REFUSED)
# Job errors that are the request's (the client's to fix), not llmq's or the provider's. Not
# `invalid_request`: a provider's 400 without a code of these is read so, and every job fails
# with it when the provider stops taking what llmq sends (review 266).
REQUEST_ERROR_CODES = frozenset({"context_length_exceeded", "content_filtered"})


def count_outcome(status: JobStatus, lane: str, error_code: str | None = None) -> None:
    """One terminal job in `lane`, counted by whatever write ended it (a worker, the
    reconciler, the dead-letter function, a client's cancel); nothing for one not terminal. A
    failure for what its request asked (`error_code`: past the model's context, or filtered)
    counts as JobRefused (hunt 294: five prompts over the model's context paged JobsFailing)."""
    name = JOB_OUTCOME_METRICS.get(status)
    if name is MetricName.JOB_FAILED and error_code in REQUEST_ERROR_CODES:
        name = MetricName.JOB_REFUSED
    if name is not None:
        emit_job_metric(name, 1, lane)


def emit_count(name: MetricName, value: int = 1) -> None:
    """`value` occurrences of `name` (one by default), with the service dimension only,
    written at once.

    Written as it happens rather than at the end of the invocation, so a function that does
    not flush `metrics` (the api) still reports it.
    """
    with single_metric(
        name=name,
        unit=MetricUnit.Count,
        value=value,
        namespace=metrics.namespace,
        default_dimensions={"service": SERVICE_NAME},
    ):
        pass


def error_fields(exc: BaseException) -> dict[str, str | None]:
    """What a log may say of an unexpected exception: its class and AWS error code, never its
    text, which can quote a payload."""
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return {"error_class": type(exc).__name__, "error_code": code}


def traceback_fields(exc: BaseException) -> dict[str, str | None]:
    """`error_fields`, and where the exception was raised: the frames of it and of every
    exception it was raised from or while handling, each named by its class only. Never
    `logger.exception`, whose text of a chained exception can quote a request (a validation
    error's holds the refused prompt)."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}:\n{''.join(traceback.format_tb(current.__traceback__))}")
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return {**error_fields(exc), "traceback": "raised while handling ".join(parts)}


def reconcile_fault(exc: BaseException, what: str, message: str) -> None:
    """Something the reconciler swept that it could not settle or read: logged by the error's
    class and AWS code only, and counted as ReconcileEntryFailed, which has an alarm (the run
    goes on, so no Lambda error shows it)."""
    logger.error(message, extra={"what": what, **error_fields(exc)})
    emit_count(MetricName.RECONCILE_ENTRY_FAILED)


def log_record_failure(
    exc: BaseException, message_id: str, job_id: str | None, queue_arn: str | None = None
) -> None:
    """An unexpected exception in a record handler, which the batch processor would swallow:
    logged, and counted as RecordFailed for the queue the record came from (`queue_arn`),
    unless it is AWS unavailable for now (StoreUnavailable).

    The class and the AWS error code only: an exception's text can quote the payload.
    """
    logger.error(
        "record failed unexpectedly; it will be retried",
        extra={"message_id": message_id, "job_id": job_id, **error_fields(exc)},
    )
    if queue_arn and not isinstance(exc, StoreUnavailable):
        # (AWS throttling or failing for a while is no fault of the code's: other alarms show
        # it, and counted here, with one receiver's Retry-After holding a message back, it
        # would page WebhooksOldestMessage)
        with single_metric(
            name=MetricName.RECORD_FAILED, unit=MetricUnit.Count, value=1, namespace=metrics.namespace
        ) as metric:
            metric.add_dimension(name="queue", value=queue_arn.rsplit(":", 1)[-1])
