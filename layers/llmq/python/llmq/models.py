"""The public models of API v1. They validate requests and generate the OpenAPI document."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, ConfigDict, Field, create_model, model_validator

from llmq.model_base import Model

# The most characters a prompt or a message's content may have in any deployment: what
# `limits.max_prompt_chars` may be set to (llmq.config).
MAX_CONTENT_CHARS = 2_000_000
# The most dead-letter rounds a lane message can name (llmq sends a handful at most).
MAX_REDRIVE_ROUND = 1_000_000
# How deep a request's JSON may nest, arrays and objects inside one another: no request of the
# schema comes near it; a body past Python's parser's recursion limit is refused as malformed
# with this figure (the api), and the CLI refuses a body past it before sending it.
MAX_JSON_DEPTH = 100


def blank_line(line: bytes) -> bool:
    """Whether a line of a batch file is blank, and skipped: ASCII whitespace alone, as the
    worker reads an upload and the CLI an inline file (hunt 271: the CLI skipped a line of
    U+00A0 or U+3000 that failed the same file uploaded). Any other character makes it a line
    to parse, which is no JSON."""
    return not line.strip()


if TYPE_CHECKING:
    from llmq.config import LlmqConfig


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


# The ids the API gives, as its paths take them (and the CLI checks before it builds a path).
JOB_ID_PATTERN = r"^job_[a-z0-9]{1,64}$"
BATCH_ID_PATTERN = r"^bat_[a-z0-9]{1,64}$"

TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED})


class WebhookEvent(StrEnum):
    STARTED = "job.started"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELED = "job.canceled"
    EXPIRED = "job.expired"
    # The output of a `stream: true` job as it is generated, at most one per
    # `streaming.output_webhook_interval_ms`; opt-in only (docs/streaming.md).
    OUTPUT = "job.output"


TERMINAL_EVENTS = [WebhookEvent.SUCCEEDED, WebhookEvent.FAILED, WebhookEvent.CANCELED, WebhookEvent.EXPIRED]

EVENT_FOR_STATUS = {
    JobStatus.RUNNING: WebhookEvent.STARTED,
    JobStatus.SUCCEEDED: WebhookEvent.SUCCEEDED,
    JobStatus.FAILED: WebhookEvent.FAILED,
    JobStatus.CANCELED: WebhookEvent.CANCELED,
    JobStatus.EXPIRED: WebhookEvent.EXPIRED,
}


class ErrorCode(StrEnum):
    """The closed set of job error codes."""

    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    CONTENT_FILTERED = "content_filtered"
    MODEL_NOT_FOUND = "model_not_found"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_ERROR = "provider_error"
    PROVIDER_TIMEOUT = "provider_timeout"
    RETRIES_EXHAUSTED = "retries_exhausted"
    WORKER_CRASHED = "worker_crashed"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DISABLED = "disabled"


# At most this many stop sequences (OpenAI takes 4; some servers more), and event names in a
# subscription (each event at most once is all a subscription can mean).
MAX_STOP_SEQUENCES = 16
MAX_EVENT_NAMES = 16


class _Strict(Model):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]


class GenerationParams(_Strict):
    """Allow-listed generation parameters, passed through to the provider."""

    # Bounds are written as ge/le rather than gt so the OpenAPI document states them exactly.
    # Strict: a JSON boolean or string is not a number here, as the schema says (lax pydantic
    # would take `true` as 1 and "3" as 3).
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000, strict=True)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, strict=True)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, strict=True)] | None = None
    # (fail_fast: unbounded here, as stored, so a list of many wrong elements is one error, not
    # one each: `StoredJobRequest` reads a refused body's replay with these)
    stop: (
        Annotated[list[Annotated[str, Field(max_length=256)]], Field(fail_fast=True)]
        | Annotated[str, Field(max_length=256)]
        | None
    ) = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, strict=True)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, strict=True)] | None = None
    seed: Annotated[int, Field(strict=True)] | None = None


class RequestParams(GenerationParams):
    """The parameters as a request may give them. Bounded, as every list a request holds: each
    wrong element of an unbounded list is an error of its own, and a small body could make the
    api build millions. (A job stored before the bound keeps its parameters: `GenerationParams`.)"""

    stop: (
        Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=MAX_STOP_SEQUENCES)]
        | Annotated[str, Field(max_length=256)]
        | None
    ) = None
    # A signed 64-bit integer, as providers take it: a larger one would be accepted here and
    # refused by the provider, failing the job later instead of answering 422 now.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1, strict=True)] | None = None


class WebhookSubscription(_Strict):
    url: Annotated[str, Field(min_length=8, max_length=2048, description="https URL of the receiver")]
    events: list[WebhookEvent] | None = Field(
        default=None, min_length=1, max_length=MAX_EVENT_NAMES, description="Defaults to every terminal event"
    )

    def subscribed_events(self) -> list[WebhookEvent]:
        return list(dict.fromkeys(self.events)) if self.events else list(TERMINAL_EVENTS)


class JobRequest(_Strict):
    """POST /v1/jobs. Give `messages`, or `prompt` as shorthand for one user message."""

    model: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1000, fail_fast=True)
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_CONTENT_CHARS)] | None = None
    params: RequestParams = Field(default_factory=RequestParams)
    webhook: WebhookSubscription | None = None
    metadata: dict[
        Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=512)]
    ] = Field(default_factory=dict)
    deadline_seconds: Annotated[int, Field(ge=1, strict=True)] | None = None
    stream: bool = Field(
        default=False,
        strict=True,
        description="Keep the output as it is generated: GET /v1/jobs/{id}/events streams it "
        "(server-sent events), polls show `progress` and `output_partial`, and `job.output` "
        "webhooks can carry it (docs/streaming.md). Off, a job costs what it always did",
    )

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` or `prompt`")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        if self.messages is not None:
            return self.messages
        return [ChatMessage(role="user", content=self.prompt or "")]

    def prompt_chars(self) -> int:
        return sum(len(message.content) for message in self.chat_messages())


def job_request_model(config: LlmqConfig) -> type[JobRequest]:
    """JobRequest with the deployment's limits written into its schema, so the OpenAPI
    document states every rule the API enforces: the model allow-list, the allowed
    parameters, the prompt length, the metadata key count and the deadline."""
    limits = config.limits
    allowed_model: Any = Literal[tuple(config.provider.models)]
    content = Annotated[str, Field(max_length=limits.max_prompt_chars)]
    message = create_model("ChatMessage", __base__=ChatMessage, content=(content, ...))
    # A parameter this deployment does not allow can only be null: a subclass keeps the type
    # the domain expects while the schema says so.
    refused: dict[str, Any] = {
        name: (None, Field(default=None, description="Not allowed by this deployment"))
        for name in GenerationParams.model_fields
        if name not in config.provider.allowed_params
    }
    params = create_model("GenerationParams", __base__=RequestParams, **refused) if refused else RequestParams
    return create_model(
        "JobRequest",
        __base__=JobRequest,
        __doc__=(
            f"{JobRequest.__doc__} The messages' contents together hold at most "
            f"{limits.max_prompt_chars} characters."
        ),
        model=(
            allowed_model | None,
            Field(default=None, description=f"Defaults to {config.provider.default_model}"),
        ),
        messages=(list[message] | None, Field(default=None, min_length=1, max_length=1000, fail_fast=True)),
        prompt=(
            Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars)] | None,
            None,
        ),
        params=(params, Field(default_factory=params)),
        metadata=(
            dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(default_factory=dict, max_length=limits.max_metadata_keys),
        ),
        deadline_seconds=(
            Annotated[int, Field(ge=1, le=limits.max_deadline_seconds, strict=True)] | None,
            None,
        ),
    )


class Usage(Model):
    input_tokens: int = 0
    output_tokens: int = 0


class JobResult(Model):
    output: str
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)


class JobError(Model):
    code: ErrorCode
    message: str
    retryable: bool = False


class WebhookDelivery(Model):
    status: DeliveryStatus | None = None
    attempts: int = 0
    last_status_code: int | None = None
    delivered_at: str | None = None


class JobWebhook(Model):
    url: str
    events: list[WebhookEvent]
    delivery: WebhookDelivery = Field(default_factory=WebhookDelivery)


# How much of a receiver's answer the delivery log keeps.
RESPONSE_HEAD_BYTES = 256
# Attempts the delivery log keeps for an event: the latest ones.
DELIVERY_LOG_ATTEMPTS = 10


class DeliveryAttempt(Model):
    """One attempt to deliver a webhook, as the delivery log shows it."""

    # The attempt's number in its round: a redelivery starts a new round at 1.
    attempt: int
    # When the request was sent (or, with no request, when the attempt was given up).
    at: str
    # The receiver's HTTP status; None when no status line came (a timeout, a refused connection).
    status_code: int | None = None
    # From sending the request to its status line (to the failure, when the headers after that
    # line could not be read); None when no request was sent.
    latency_ms: int | None = None
    # Why no usable answer came: the error's class (`ConnectError`, `Timeout`, `InvalidWebhookUrl`);
    # beside a status code, what became of the headers after its status line.
    error_class: str | None = None
    # The first 256 bytes of the receiver's answer, as UTF-8 (bytes that are not, replaced).
    response_head: str | None = None


class EventDeliveries(Model):
    event: WebhookEvent
    status: DeliveryStatus | None = None
    attempts: list[DeliveryAttempt] = Field(default_factory=list)


class WebhookLog(Model):
    """`GET /v1/jobs/{id}/webhook`: what became of each delivery of the job's terminal event."""

    object: Literal["webhook_log"] = "webhook_log"
    job_id: str
    url: str
    events: list[WebhookEvent]
    deliveries: list[EventDeliveries] = Field(default_factory=list)


class JobProgress(Model):
    """How far a running `stream: true` job's generation has come."""

    output_tokens: int = Field(
        description="Output deltas the provider has streamed so far (one token each from "
        "OpenAI-compatible servers); the final count is the result's usage"
    )
    updated_at: str


class Job(Model):
    """The Job object of API v1."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    lane: str
    model: str
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    result: JobResult | None = None
    result_url: str | None = Field(
        default=None,
        description="Set when the result is too large to inline: a short-lived presigned S3 URL "
        "in GET /v1/jobs/{id}, else (the list, webhooks) the job's own URL, to GET for a fresh one",
    )
    result_url_expires_at: str | None = Field(
        default=None,
        description="Until this time a presigned result_url works; after it, GET the job again "
        "for a fresh URL",
    )
    error: JobError | None = None
    webhook: JobWebhook | None = None
    queue_position: int | None = Field(
        default=None,
        description="In GET /v1/jobs/{id} of a queued job: its approximate place among your queued "
        "jobs in its lane (1: next), counted among your jobs submitted just before it (at most "
        "1,000 of them, so in a longer backlog a lower bound), a second behind. Your jobs start "
        "in about this order as your concurrency cap frees slots (docs/limits.md)",
    )
    batch_id: str | None = Field(default=None, description="The batch this job is an item of")
    custom_id: str | None = Field(default=None, description="The item's name in its batch")
    stream: bool = Field(default=False, description="Its output is kept as it is generated")
    progress: JobProgress | None = Field(
        default=None, description="A running `stream: true` job's progress, as of its last output write"
    )
    output_partial: str | None = Field(
        default=None,
        description="A running `stream: true` job's output so far (of its current attempt), as of "
        "its last output write; only its start when `output_partial_truncated`",
    )
    output_partial_truncated: bool | None = Field(
        default=None,
        description="True when `output_partial` holds only the start of the output so far: "
        "GET /v1/jobs/{id}/events has all of it",
    )


class OutputDelta(Model):
    """The data of an `output.delta` event, and of a `job.output` webhook's output."""

    seq: int = Field(description="This delta's place in the job's output (1, 2, ...); the event's id")
    delta: str = Field(description="The text generated since the previous delta")
    attempt: int = Field(description="The attempt that generated it")
    reset: bool = Field(
        default=False,
        description="True on the first delta of a retried attempt: drop the text of earlier deltas, "
        "the generation started again",
    )


class JobOutputEvent(Model):
    """The `data` of a `job.output` webhook: the text since the previous one."""

    id: str
    object: Literal["job.output"] = "job.output"
    seq_from: int = Field(description="The first output delta it holds")
    seq_to: int = Field(description="The last output delta it holds")
    attempt: int
    reset: bool = Field(default=False, description="It starts a retried attempt's output")
    delta: str


class JobList(Model):
    object: Literal["list"] = "list"
    data: list[Job]
    next_cursor: str | None = None


class Problem(Model):
    """RFC 9457 problem details, with a stable machine `code`."""

    type: str
    title: str
    status: int
    detail: str | None = None
    code: str
    errors: list[dict[str, Any]] | None = None


class BatchStatus(StrEnum):
    # Accepted; its items are being written (each is queued as soon as it is).
    VALIDATING = "validating"
    # Every item written; some not yet finished.
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELING = "canceling"
    # Every item has ended; its results file is being written (then its terminal status).
    FINALIZING = "finalizing"
    CANCELED = "canceled"
    EXPIRED = "expired"
    # An uploaded file refused by its validation (its `errors` say where), or over the quota:
    # no item was written.
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (BatchStatus.COMPLETED, BatchStatus.CANCELED, BatchStatus.EXPIRED, BatchStatus.FAILED)


class BatchEvent(StrEnum):
    COMPLETED = "batch.completed"
    CANCELED = "batch.canceled"
    EXPIRED = "batch.expired"
    FAILED = "batch.failed"


BATCH_EVENT_FOR_STATUS = {
    BatchStatus.COMPLETED: BatchEvent.COMPLETED,
    BatchStatus.CANCELED: BatchEvent.CANCELED,
    BatchStatus.EXPIRED: BatchEvent.EXPIRED,
    BatchStatus.FAILED: BatchEvent.FAILED,
}
# A custom_id names an item in the results: printable, no spaces, like OpenAI's and Anthropic's.
CUSTOM_ID = r"^[A-Za-z0-9_.:@-]{1,64}$"
UPLOAD_ID = r"^upl_[a-z0-9]{26}$"


class BatchWebhook(_Strict):
    url: Annotated[str, Field(min_length=8, max_length=2048, description="https URL of the receiver")]
    events: list[BatchEvent] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_EVENT_NAMES,
        description="Defaults to every batch event: it ends once",
    )
    item_events: list[WebhookEvent] = Field(
        default_factory=list,
        max_length=MAX_EVENT_NAMES,
        description="Per-item job events to send to the same URL too; none unless asked (not job.output: "
        "a batch's items never stream)",
    )

    def subscribed_events(self) -> list[BatchEvent]:
        return list(dict.fromkeys(self.events)) if self.events else list(BatchEvent)


class BatchItemRequest(_Strict):
    custom_id: Annotated[str, Field(pattern=CUSTOM_ID)]
    body: JobRequest


class StoredJobRequest(JobRequest):
    """A job request with the bounds any release accepted it under (a version before
    `RequestParams` bounded the stop sequences or the seed): what was stored, read back."""

    params: GenerationParams = Field(default_factory=GenerationParams)  # type: ignore[assignment]  # (wider on purpose: as stored)


class StoredBatchItem(BatchItemRequest):
    """A batch's item as it was stored: read with the bounds it was accepted under (a version
    before `RequestParams` took any number of stop sequences)."""

    body: StoredJobRequest


class BatchRequest(_Strict):
    """POST /v1/batches: many JobRequests at once, each named by a `custom_id` unique in the batch:
    inline as `requests`, or as a JSON Lines file uploaded first (`upload_id`, POST /v1/uploads)."""

    requests: list[BatchItemRequest] | None = Field(default=None, min_length=1, fail_fast=True)
    upload_id: Annotated[str, Field(pattern=UPLOAD_ID)] | None = Field(
        default=None, description="An upload (POST /v1/uploads) holding one request per line"
    )
    webhook: BatchWebhook | None = None
    metadata: dict[
        Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=512)]
    ] = Field(default_factory=dict)
    deadline_seconds: Annotated[int, Field(ge=1, strict=True)] | None = None
    lane: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BatchRequest:
        if (self.requests is None) == (self.upload_id is None):
            raise ValueError("give either requests or upload_id")
        return self


class StoredBatchRequest(BatchRequest):
    """A batch request with the bounds any release accepted its items under (`StoredBatchItem`);
    `stored_batch_request_model` gives it the deployment's size."""

    requests: list[StoredBatchItem] | None = Field(default=None, min_length=1, fail_fast=True)  # type: ignore[assignment]  # (wider on purpose)


def stored_batch_request_model(max_requests: int) -> type[StoredBatchRequest]:
    """StoredBatchRequest held to `max_requests` items: validating one item takes memory, and
    `api.memory_mb` is sized for `batches.max_requests` of them (or a stored batch's total)."""
    return _sized(StoredBatchRequest, StoredBatchItem, max_requests)


def batch_request_model(config: LlmqConfig, job_request: type[JobRequest]) -> type[BatchRequest]:
    """BatchRequest whose items are `job_request` (the deployment's JobRequest) and whose size is
    the deployment's, so the OpenAPI document states both."""
    return _sized(BatchRequest, batch_item_model(job_request), config.batches.max_requests)


B = TypeVar("B", bound=BatchRequest)


def _sized(base: type[B], item: Any, max_requests: int) -> type[B]:
    """`base` whose `requests` are at most `max_requests` `item`s. (fail_fast: the
    first bad item is named, and validation stops there: a body of thousands of bad items
    would otherwise build an error for each)"""
    items: Any = list[item] | None
    return create_model(
        base.__name__,
        __base__=base,
        requests=(
            items,
            Field(default=None, min_length=1, max_length=max_requests, fail_fast=True),
        ),
    )


def batch_item_model(job_request: type[JobRequest]) -> type[BatchItemRequest]:
    """A batch item whose body is `job_request` (the deployment's JobRequest): one line of an
    uploaded file is validated by it, as an inline item is."""
    return create_model("BatchItemRequest", __base__=BatchItemRequest, body=(job_request, ...))


class BatchRequestCounts(Model):
    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0


class BatchWebhookState(Model):
    url: str
    events: list[BatchEvent]
    item_events: list[WebhookEvent] = Field(default_factory=list)
    delivery: WebhookDelivery = Field(default_factory=WebhookDelivery)


# A line's error says where and what, briefly: a field name can be a whole prompt (a JSON key),
# and ten such errors once made a batch item too large to write (400 KB), and the batch list's
# page too large for Lambda's answer.
MAX_LINE_ERROR_CHARS = 500
# ...and at most this many bytes as it is stored (JSON text, where a control character takes 6:
# 500 of them once passed the room a batch item keeps for each error, and the batch's failing
# write was refused as too large, leaving it validating, its errors never shown).
MAX_LINE_ERROR_BYTES = MAX_LINE_ERROR_CHARS * 4


def _brief(message: str) -> str:
    if len(message) > MAX_LINE_ERROR_CHARS:
        message = message[: MAX_LINE_ERROR_CHARS - 1] + "\u2026"
    if len(json.dumps(message, ensure_ascii=False).encode()) - 2 <= MAX_LINE_ERROR_BYTES:
        return message
    kept, size = 0, 0
    for char in message:
        size += len(json.dumps(char, ensure_ascii=False).encode()) - 2
        if size > MAX_LINE_ERROR_BYTES - 3:  # (the ellipsis: 3 bytes)
            break
        kept += 1
    return message[:kept] + "\u2026"


class BatchLineError(Model):
    """Why an uploaded file was refused: its line (from 1), and what is wrong there."""

    line: int
    code: str
    message: Annotated[str, AfterValidator(_brief)]


class BatchEventDeliveries(Model):
    event: BatchEvent
    status: DeliveryStatus | None = None
    attempts: list[DeliveryAttempt] = Field(default_factory=list)


class BatchWebhookLog(Model):
    """`GET /v1/batches/{id}/webhook`: what became of each delivery of the batch's event."""

    object: Literal["webhook_log"] = "webhook_log"
    batch_id: str
    url: str
    events: list[BatchEvent]
    deliveries: list[BatchEventDeliveries] = Field(default_factory=list)


class UploadRequest(_Strict):
    """POST /v1/uploads: the size of the file that will be PUT."""

    size_bytes: int = Field(
        ge=1,
        strict=True,  # a count, never "16" or true
        description="The file's exact size in bytes: the URL answered is signed for a PUT of this "
        "Content-Length, and S3 refuses any other",
    )


class Upload(Model):
    """POST /v1/uploads: where to PUT a JSON Lines file of batch requests, then name it in
    POST /v1/batches as `upload_id`."""

    id: str
    object: Literal["upload"] = "upload"
    upload_url: str = Field(description="PUT the file's bytes here (one request), before `expires_at`")
    method: Literal["PUT"] = "PUT"
    size_bytes: int = Field(description="The Content-Length the PUT must carry")
    expires_at: str
    max_bytes: int
    max_requests: int


class Batch(Model):
    """The Batch object of API v1."""

    id: str
    object: Literal["batch"] = "batch"
    status: BatchStatus
    lane: str
    metadata: dict[str, str] = Field(default_factory=dict)
    request_counts: BatchRequestCounts
    created_at: str
    finished_at: str | None = None
    cancel_requested: bool = False
    results_url: str = Field(
        description="GET it for the items' results as JSON Lines, while the batch runs too"
    )
    webhook: BatchWebhookState | None = None
    upload_id: str | None = None
    results_file_url: str | None = Field(
        default=None,
        description="Once the batch has ended: every item's result line in one JSON Lines file, "
        "a presigned S3 URL that works until `results_file_expires_at` (GET the batch again "
        "for a fresh one)",
    )
    results_file_expires_at: str | None = None
    errors: list[BatchLineError] | None = Field(
        default=None,
        description="Why the batch failed (the uploaded file's first bad lines), or why llmq gave up on "
        "it (`batch_crashed`: its worker crashed at every try)",
    )


class BatchList(Model):
    object: Literal["list"] = "list"
    data: list[Batch]
    next_cursor: str | None = None


class BatchResultLine(Model):
    """One line of GET /v1/batches/{id}/results."""

    custom_id: str
    job_id: str
    status: JobStatus
    result: JobResult | None = None
    result_url: str | None = None
    error: JobError | None = None


class LaneMessage(Model):
    """The body of a lane queue message: ids only, never the prompt.

    A field it does not know is ignored, not poison: during a deploy two versions read the
    lanes, and after a rollback the newer one's messages are still in flight.

    `kind` "expand": the message names a batch (in `job_id`) whose items the worker writes.
    """

    job_id: Annotated[str, Field(min_length=1, max_length=128)]
    kind: Literal["job", "expand"] = "job"
    lane: str | None = None
    # The job's tenant, so a claim can take the tenant's slot without reading the job first.
    tenant_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    # A deferral longer than SQS's 900 s delay: no claim before this time (epoch ms).
    not_before_ms: int | None = None
    # The dead letters its job (or batch) had counted when it was sent: when copies sent in
    # one round dead-letter, one counts (`policy.fresh_letter_condition`).
    # (bounded: a number DynamoDB cannot store would fail its dead letter for good)
    redrive_round: Annotated[int, Field(ge=0, le=MAX_REDRIVE_ROUND)] = 0
    # A copy deferred on its batch's first claim's refusal at the cap, without a claim of its
    # own (`llmq.slot_handoff`): its next receive claims for itself, so that no job goes
    # unlooked-at (a deadline, a cancel, its retention) for two deferrals in a row.
    spoken_for: bool = False


class WebhookMessage(Model):
    """The body of a webhooks queue message.

    A field it does not know is ignored, not poison, as a lane message's (`LaneMessage`): during
    a deploy two versions read the queue, and after a rollback the newer one's messages are
    still in flight."""

    job_id: Annotated[str, Field(min_length=1, max_length=128)]
    # A batch's event names the batch in `job_id`.
    event: WebhookEvent | BatchEvent
    # job.output: the text it delivers (the job item holds only the start of the output).
    output: JobOutputEvent | None = None
    # A terminal event sent right after the job's terminal write: the job as that write left
    # it (a JobRecord without its input), so the first receive needs no read
    # (`llmq.queues.job_snapshot`); None when it would make the message too large.
    job: dict[str, Any] | None = None
    # A terminal event's round of delivery: the redeliveries its job (or batch) had when it was
    # sent. One of an earlier round is dropped once a redelivery's message carries the event,
    # instead of waking after each of the new round's attempts until the webhooks DLQ (hunt
    # 211). Carried as the SQS message attribute DELIVERY_ROUND_ATTRIBUTE, not in the body, which
    # a version before it refuses with a field it does not know (`llmq.queues.delivery_round_of`).
    delivery_round: Annotated[int, Field(ge=0)] = 0
