"""Domain exceptions and the problem catalogue: each code's HTTP status, title and type URI.

Every problem+json answer, whether the api function's or API Gateway's own gateway response,
is built from an entry of `PROBLEMS`; a new code is added here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBLEM_TYPE_BASE = "https://llmq.dev/problems/"


@dataclass(frozen=True)
class ProblemType:
    """One entry of the catalogue: what a client reads in `type`, `title`, `status` and `code`."""

    code: str
    status: int
    title: str

    @property
    def type(self) -> str:
        return f"{PROBLEM_TYPE_BASE}{self.code}"


class DomainError(Exception):
    code = "internal_error"
    title = "Internal error"
    status = 500
    # Seconds a client should wait before trying again (the answer's Retry-After), if any.
    retry_after: int | None = None

    def __init__(self, detail: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidRequest(DomainError):
    code = "invalid_request"
    title = "The request is invalid"
    status = 422


class MalformedJson(DomainError):
    code = "malformed_json"
    title = "The body is not valid JSON"
    status = 400


class UnknownModel(InvalidRequest):
    code = "model_not_allowed"
    title = "The model is not available"
    status = 422


class InvalidWebhookUrl(InvalidRequest):
    code = "invalid_webhook_url"
    title = "The webhook URL is not allowed"
    status = 422


class WebhookHostUnavailable(DomainError):
    """The webhook URL's host could not be looked up for now (the resolver failed, rather than
    said it does not exist): the URL is not known to be bad, so nothing is refused for good."""

    code = "webhook_host_unavailable"
    title = "The webhook host could not be looked up just now; retry shortly"
    status = 503


class InvalidIdempotencyKey(InvalidRequest):
    code = "invalid_idempotency_key"
    title = "The Idempotency-Key header is invalid"
    status = 400


class UnsupportedMediaType(DomainError):
    code = "unsupported_media_type"
    title = "The body must be application/json"
    status = 415


class PayloadTooLarge(DomainError):
    code = "payload_too_large"
    title = "The request is too large"
    status = 413


class PromptTooLarge(PayloadTooLarge):
    code = "prompt_too_large"
    title = "The prompt is longer than the configured limit"
    status = 413


class IdempotencyConflict(DomainError):
    code = "idempotency_key_reused"
    title = "The Idempotency-Key was used with a different request"
    status = 422


class JobNotFound(DomainError):
    code = "job_not_found"
    title = "No such job"
    status = 404


class JobResultExpired(DomainError):
    """A job whose S3-held result is gone before its record: the bucket's lifecycle, shortened
    by a deploy that lowered `retention_days`, deleted it (docs/operations.md)."""

    code = "result_expired"
    title = "The job's result is no longer kept"
    status = 410


class JobNotCancelable(DomainError):
    code = "job_not_cancelable"
    title = "The job has already finished"
    status = 409


class JobNotTerminal(DomainError):
    code = "job_not_terminal"
    title = "The job has not finished yet"
    status = 409


class WebhookNotFound(DomainError):
    code = "webhook_not_found"
    title = "The job has no webhook"
    status = 404


class NoWebhook(DomainError):
    code = "no_webhook"
    title = "The job has no webhook subscription for its terminal event"
    status = 409


class BatchNotFound(DomainError):
    code = "batch_not_found"
    title = "No such batch"
    status = 404


class UploadNotFound(DomainError):
    # A field of the request names it: the request is what cannot be processed.
    code = "upload_not_found"
    title = "No such upload"
    status = 422


class BatchNotEnded(DomainError):
    code = "batch_not_ended"
    title = "The batch has not ended yet"
    status = 409


class BatchResultsExpired(DomainError):
    """An ended batch, kept for its webhook's retries, whose items' records passed their own
    retention before it: its pages cannot say what they were (its results file can)."""

    code = "batch_results_expired"
    title = "The batch's item records have passed their retention"
    status = 410


class BatchNotCancelable(DomainError):
    code = "batch_not_cancelable"
    title = "The batch has already finished"
    status = 409


class InvalidCursor(InvalidRequest):
    code = "invalid_cursor"
    title = "The cursor is invalid"
    status = 400


class LeaseLost(DomainError):
    """Our lease on a running job was taken over; another worker owns it now (fencing)."""

    code = "lease_lost"
    title = "The job's lease is held by another worker"


class ReadCutShort(Exception):
    """A read of many pages stopped between two: the time its caller gave it was up, and what
    it had read is no answer (a count of part of an index)."""


class StoreUnavailable(DomainError):
    """DynamoDB, SQS or S3 throttled or failed after botocore's own retries: try again later.

    Whether the write was applied is unknown; every conditional write recognises its own
    earlier success, so repeating it is safe.
    """

    code = "service_unavailable"
    title = "A storage service is busy; retry shortly"
    status = 503


class QuotaExceeded(DomainError):
    """The tenant has its max_active_jobs queued or running: nothing was written."""

    code = "quota_exceeded"
    title = "Too many active jobs; retry when some have finished"
    status = 429


class BatchExceedsQuota(DomainError):
    """A batch with more requests than the tenant may have active at all: no wait would let it
    in, so it is not a 429 (whose Retry-After a client would obey for ever). Nothing was written."""

    code = "batch_exceeds_quota"
    title = "The batch has more requests than your max_active_jobs; split it"
    status = 422


class TooManyLongPolls(DomainError):
    """The tenant has `max_long_polls` requests waiting already (llmq.long_polls): nothing waited."""

    code = "too_many_long_polls"
    title = "Too many of your requests are waiting at once; retry after Retry-After"
    status = 429


class StoreContended(StoreUnavailable):
    """A DynamoDB transaction canceled by conflicts or throttles, try after try: it was not
    applied (unlike a throttled single write, which may have been)."""

    code = "storage_contended"
    title = "Other writes to the same account data won; retry shortly"
    # Set by a caller that retried: an earlier try of the same write failed in a way that may
    # have applied it (its answer lost), so this refusal proves nothing about that try.
    after_unanswered: bool = False


class ItemTooLarge(DomainError):
    """DynamoDB refused an item over 400 KB: the sizing let something through it should not."""

    code = "item_too_large"
    title = "The job does not fit in one item"


class CancelRequested(DomainError):
    """A write that would keep the job alive found that its client asked to cancel it."""

    code = "cancel_requested"
    title = "The job's client asked to cancel it"


class Unauthenticated(DomainError):
    code = "unauthenticated"
    title = "A valid API key is required"
    status = 401


# Answers that no domain exception stands for: the API's routing, and API Gateway's own
# gateway responses (the api function never runs for those).
METHOD_NOT_ALLOWED = ProblemType("method_not_allowed", 405, "Method not allowed")
ROUTE_NOT_FOUND = ProblemType("route_not_found", 404, "No such route")
FORBIDDEN = ProblemType("forbidden", 403, "Access denied")
RATE_LIMITED = ProblemType("rate_limited", 429, "Too many requests")
BAD_GATEWAY = ProblemType("bad_gateway", 502, "The API failed to answer")
GATEWAY_TIMEOUT = ProblemType("gateway_timeout", 504, "The API did not answer in time")


def problem_type(kind: type[DomainError]) -> ProblemType:
    return ProblemType(code=kind.code, status=kind.status, title=kind.title)


def domain_error_types(kind: type[DomainError] = DomainError) -> list[type[DomainError]]:
    """`kind` and every exception below it."""
    return [kind, *(sub for child in kind.__subclasses__() for sub in domain_error_types(child))]


PROBLEMS: dict[str, ProblemType] = {
    entry.code: entry
    for entry in [
        *(problem_type(kind) for kind in domain_error_types()),
        METHOD_NOT_ALLOWED,
        ROUTE_NOT_FOUND,
        FORBIDDEN,
        RATE_LIMITED,
        BAD_GATEWAY,
        GATEWAY_TIMEOUT,
    ]
}
