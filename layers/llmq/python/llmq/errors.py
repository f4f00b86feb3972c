"""Domain exceptions. Each carries a stable machine code; the API maps them to HTTP in one place."""

from __future__ import annotations


class DomainError(Exception):
    code = "internal_error"
    title = "Internal error"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title


class InvalidRequest(DomainError):
    code = "invalid_request"
    title = "The request is invalid"


class MalformedJson(DomainError):
    code = "malformed_json"
    title = "The body is not valid JSON"


class UnknownModel(InvalidRequest):
    code = "model_not_allowed"
    title = "The model is not available"


class InvalidWebhookUrl(InvalidRequest):
    code = "invalid_webhook_url"
    title = "The webhook URL is not allowed"


class InvalidIdempotencyKey(InvalidRequest):
    code = "invalid_idempotency_key"
    title = "The Idempotency-Key header is invalid"


class UnsupportedMediaType(DomainError):
    code = "unsupported_media_type"
    title = "The body must be application/json"


class PayloadTooLarge(DomainError):
    code = "payload_too_large"
    title = "The request is too large"


class PromptTooLarge(PayloadTooLarge):
    code = "prompt_too_large"
    title = "The prompt is longer than the configured limit"


class IdempotencyConflict(DomainError):
    code = "idempotency_key_reused"
    title = "The Idempotency-Key was used with a different request"


class JobNotFound(DomainError):
    code = "job_not_found"
    title = "No such job"


class JobNotCancelable(DomainError):
    code = "job_not_cancelable"
    title = "The job has already finished"


class JobNotTerminal(DomainError):
    code = "job_not_terminal"
    title = "The job has not finished yet"


class NoWebhook(DomainError):
    code = "no_webhook"
    title = "The job has no webhook subscription for its terminal event"


class InvalidCursor(InvalidRequest):
    code = "invalid_cursor"
    title = "The cursor is invalid"


class LeaseLost(DomainError):
    """Our lease on a running job was taken over; another worker owns it now (fencing)."""

    code = "lease_lost"
    title = "The job's lease is held by another worker"


class PoisonMessage(DomainError):
    """A queue message that can never be processed: not JSON, or naming no job."""

    code = "poison_message"
    title = "The queue message cannot be processed"


class StoreUnavailable(DomainError):
    """DynamoDB, SQS or S3 throttled or failed after botocore's own retries: try again later.

    Whether the write was applied is unknown; every conditional write recognises its own
    earlier success, so repeating it is safe.
    """

    code = "service_unavailable"
    title = "A storage service is busy; retry shortly"


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
