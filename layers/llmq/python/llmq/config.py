"""The one typed configuration of llmq.

The CDK app reads it from `cdk.json` context, passes it to every function as the
`LLMQ_CONFIG` environment variable, and each function validates it at cold start with
the same model. The sandbox reads the same model. No number lives in two places.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator

from llmq.model_base import Model
from llmq.models import MAX_CONTENT_CHARS

CONFIG_ENV_VAR = "LLMQ_CONFIG"
# What a tier may be called: the authorizer hands it to every request of its tenants, and
# `llmq tenants create` refuses any other (1 to 64 of A-Z, a-z, 0-9 and _ . : -, from a letter
# or a digit).
TIER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# The template's Metadata key that records `LlmqConfig.in_flight_settings`.
IN_FLIGHT_SETTINGS_METADATA = "LlmqInFlightSettings"
# SQS caps a message's visibility timeout (hence any delay before a retry) at 12 hours.
MAX_VISIBILITY_SECONDS = 43_200
# SQS caps a message's visibility at 12 hours from the ReceiveMessage that returned it, not
# from the ChangeMessageVisibility call; asking for more is refused (InvalidParameterValue).
# The event source mapping received the batch before the function started, up to Lambda's
# longest timeout (900 s) plus the longest batching window (300 s) ago, so that much is kept:
# the longest a message can be hidden again, and so the longest wait for a retry.
MAX_REDELIVERY_DELAY_SECONDS = MAX_VISIBILITY_SECONDS - 900 - 300
# The shortest retention a deployment may have (`retention_days`): what a batch under a reused
# key tells its own items from an earlier batch's by (`BatchRepository._own_items_since_ms`).
MIN_RETENTION_DAYS = 1
# API Gateway's REST integration timeout: the whole invoke, authorizer and cold start
# included, must answer within it, or the client gets 504 while the function runs on.
GATEWAY_TIMEOUT_SECONDS = 29.0
# Lambda's lowest MaximumConcurrency for an SQS event source mapping; each lane DLQ's mapping
# to the dead-letter function uses it.
MIN_MAPPING_CONCURRENCY = 2
# The DLQs see crashes and poison only: their mappings run as few as Lambda allows.
DEAD_LETTER_MAX_CONCURRENCY = MIN_MAPPING_CONCURRENCY


class _Frozen(Model):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LaneConfig(_Frozen):
    """A priority lane: one SQS queue, one DLQ and one event source mapping."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")]
    tiers: list[str] = Field(min_length=1, description="Tenant tiers routed to this lane")
    # Lambda's event source mapping accepts MaximumConcurrency from 2 to 1000.
    max_concurrency: Annotated[int, Field(ge=2, le=1000)]
    batch_size: Annotated[int, Field(ge=1, le=10)] = 10
    batching_window_seconds: Annotated[int, Field(ge=0, le=300)] = 0


class RetryPolicy(_Frozen):
    """Backoff between provider attempts: exponential with full jitter, floored by Retry-After."""

    base_seconds: Annotated[float, Field(ge=0)] = 2.0
    max_seconds: Annotated[float, Field(ge=0, le=MAX_VISIBILITY_SECONDS)] = 900.0
    # After a refusal of llmq's own provider account (a refused key, no credit: HTTP 401, 402,
    # 403), the next attempt waits at least this long, doubling with each attempt: an operator
    # paged has minutes to fix the key before the backlog's attempts run out, not seconds.
    account_error_seconds: Annotated[float, Field(ge=0, le=MAX_VISIBILITY_SECONDS)] = 120.0
    # A provider that refuses a request before generating (a 429 rate limit, a 503 or 529
    # overload: nothing paid for) hands the job back with its attempt refunded, this many times
    # at most, backing off as attempts do (from `base_seconds`, doubling, to `max_seconds`,
    # Retry-After honoured): with the defaults, a provider refusing for about a quarter of an
    # hour. Past them, a refusal spends an attempt as any transient error does. Hunt 335: each
    # refusal spent one of `max_attempts`, and a six-second outage failed every job claimed in
    # it `retries_exhausted`, nothing paid for.
    max_refusals: Annotated[int, Field(ge=0, le=100)] = 10


class WebhookPolicy(_Frozen):
    # Standard Webhooks' recommended schedule, after the first attempt. A step is at most what
    # SQS can hide a message for, less the margins a retry's delay keeps (a longer one came
    # about 20 minutes early).
    schedule_seconds: list[Annotated[int, Field(ge=0, le=MAX_REDELIVERY_DELAY_SECONDS)]] = [
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
    ]
    jitter_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 15.0
    # Above this many bytes of JSON the result is left out of the body and a result_url given.
    inline_result_limit_bytes: Annotated[int, Field(ge=1024)] = 128 * 1024
    # Only the sandbox turns this on: http:// receivers on loopback.
    allow_loopback_http: bool = False
    # A dispatcher environment reuses a tenant's signing secrets this long before it reads
    # them again: a rotated secret signs within this time (the previous one signs on
    # meanwhile, and after it until the next rotation, so receivers that keep the last two
    # never fail, for rotations at least this far apart: README). 0: read them for every
    # delivery.
    secrets_cache_seconds: Annotated[float, Field(ge=0, le=3600)] = 60.0
    # On: a terminal event's first receive is sent from the job its message carries, with no
    # read (a warm delivery is 1 AWS call, not 2). Off by default: a duplicate of that first
    # receive (SQS delivers at least once) then POSTs once more at once, off the retry
    # schedule, where a read would have made it wait for the next attempt.
    trust_carried_job: bool = False
    # The dispatcher mapping's MaximumConcurrency (Lambda accepts 2..1000): after a receiver
    # outage the backlog drains at this pace instead of taking the account's concurrency.
    max_concurrency: Annotated[int, Field(ge=2, le=1000)] = 5


def _http_url(value: str) -> str:
    """An absolute http(s) URL with a host, as written. Checked here rather than with pydantic's
    `AnyHttpUrl`, whose module imports `importlib.metadata` and whose default builds a validator
    of its own as this module is imported: every function paid that at cold start for one field
    (BENCHMARKS §4)."""
    if not value or any(char.isspace() or ord(char) < 32 for char in value):
        raise ValueError("must be a URL without spaces or control characters")
    parts = urlsplit(value)
    _ = parts.port  # (raises ValueError on a port that is not a number in range)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL with a host")
    return value


HttpUrl = Annotated[str, Field(max_length=2083), AfterValidator(_http_url)]


class ProviderConfig(_Frozen):
    base_url: HttpUrl = "https://api.openai.com/v1"
    default_model: str = "gpt-4o-mini"
    models: list[str] = Field(default_factory=lambda: ["gpt-4o-mini", "gpt-4o"], min_length=1)
    # None: whatever the worker can afford, its remaining time less the write-back reserve.
    # A number caps that further.
    timeout_seconds: Annotated[float, Field(gt=0, le=900)] | None = None
    # A generation that timed out may still be running, and billing, at the provider: a retry
    # would pay for it twice. By default such a job fails as retryable `provider_timeout` and
    # the client decides; True retries it like a 503.
    retry_timeouts: bool = False
    # Ask the provider for a streamed answer (a stream that stops is told from a finished one).
    # Off (a provider that cannot stream), a `stream: true` job's output comes all at once,
    # when it ends.
    stream: bool = True
    # A streamed answer is finished when the generation says so, by its finish_reason; `[DONE]`
    # alone is a cut stream, retried: a gateway whose upstream broke ends with it all the same,
    # and the bytes cannot tell that from a server that never names a finish_reason. True, for
    # such a server (one-api's Gemini channel, some local servers): `[DONE]` finishes the
    # answer, and a cut behind it passes for one. Without it, each of its answers is paid for
    # `max_attempts` times and fails; the worker logs a warning naming this setting.
    done_ends_answer: bool = False
    allowed_params: list[str] = Field(
        default_factory=lambda: [
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "seed",
        ]
    )

    @model_validator(mode="after")
    def _default_model_is_allowed(self) -> Self:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not in models")
        return self


# "Total size of environment variables set: 4 KB", names and values (Lambda quotas:
# https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html). Beside LLMQ_CONFIG,
# a function holds up to this many resource names, URLs and ARNs other than the lanes' (a table,
# the webhook queue, the bucket, the secret...), each at most this long, and the stack's other
# variables and names (Powertools', the tables' and queues' variable names): measured on the
# synthesized template by tests/infra/test_stack.py.
LAMBDA_ENVIRONMENT_BYTES = 4096
_RESOURCE_VALUE_BYTES = 128
_OTHER_RESOURCE_VALUES = 5
_STACK_VARIABLES_BYTES = 512

# No object of a request llmq takes has more members than this: the api refuses one that does
# before validation, which builds an error for each unknown member (a body of a few MB can hold
# hundreds of thousands, more than the function's memory and time allow).
MAX_OBJECT_MEMBERS = 1000


# A request body Lambda can be handed: its 6 MB request payload holds the event around the
# body, and the body travels base64-encoded (the API's binary media type), a third larger.
# Past about 4.7 MB API Gateway answers 502 without calling llmq; up to this, llmq answers 413.
MAX_REQUEST_BODY_BYTES = 4_500_000
# The most items a batch's expansion writes in one transaction (at most 100 actions: the items
# and the batch's checkpoint). Whatever `batches.expand_chunk` a deployment had, no more than
# this many items at the checkpoint's end can lack their lane messages.
MAX_EXPAND_CHUNK = 99

# A Lambda response holds 6 MB (Lambda quotas), counted after the runtime serializes it, where
# the body, a JSON string, is escaped once more: a quote or a backslash doubles, a control
# character's \uXXXX gains a byte, and a runtime that escapes non-ASCII makes a UTF-8 character
# six or twelve bytes. Room is kept for the status, the headers and the envelope.
MAX_RESPONSE_BODY_BYTES = 6 * 1024 * 1024 - 64 * 1024


def response_body_bytes(body: str) -> int:
    """`body`'s size inside a Lambda's response, as the strictest runtime escapes it."""
    return len(json.dumps(body, ensure_ascii=True))


class LimitsConfig(_Frozen):
    max_body_bytes: Annotated[int, Field(ge=1024, le=MAX_REQUEST_BODY_BYTES)] = 1024 * 1024
    max_prompt_chars: Annotated[int, Field(ge=1, le=MAX_CONTENT_CHARS)] = 200_000
    max_metadata_keys: Annotated[int, Field(ge=0, le=MAX_OBJECT_MEMBERS)] = 16
    max_submit_wait_seconds: Annotated[int, Field(ge=0, le=25)] = 25
    max_get_wait_seconds: Annotated[int, Field(ge=0, le=20)] = 20
    max_deadline_seconds: Annotated[int, Field(ge=1)] = 86_400
    wait_poll_seconds: Annotated[float, Field(gt=0)] = 0.5
    # The most a job's item may weigh, measured as DynamoDB measures it (attribute names plus
    # UTF-8 values, input and result together); what would not fit goes to S3. An item holds
    # 400 KB, and a few KB stay free for the attributes later writes add.
    max_item_payload_bytes: Annotated[int, Field(ge=1024, le=350_000)] = 350_000
    # GET returns an S3-held result inline up to this size, and a presigned URL above it
    # (a Lambda response holds 6 MB).
    max_inline_result_bytes: Annotated[int, Field(ge=1024, le=5_000_000)] = 4_000_000
    # API Gateway stage throttling: the ceiling for all tenants together, answered with 429.
    # API Gateway applies a tenant's usage plan before the stage's limit, so this must stay
    # well above any one tier's rate, or one tenant within its plan takes every other's share
    # (LlmqConfig refuses a tier rate at or above it).
    stage_rate_per_second: Annotated[int, Field(ge=1)] = 200
    stage_burst: Annotated[int, Field(ge=1)] = 400
    # A revoked key keeps working for at most this long (API Gateway's authorizer cache).
    authorizer_cache_seconds: Annotated[int, Field(ge=0, le=3600)] = 60


# The longest reconciler schedule: a day. Its alarms need it bounded (CloudWatch refuses a
# window of period x evaluation periods over 7 days: ReconcilerNotRunning watches two periods,
# ReconcilerFallingBehind three), and a crashed worker's slot comes back one period late.
MAX_RECONCILER_SCHEDULE_MINUTES = 24 * 60


class ReconcilerConfig(_Frozen):
    schedule_minutes: Annotated[int, Field(ge=1, le=MAX_RECONCILER_SCHEDULE_MINUTES)] = 5
    # A queued job untouched this long may have lost its message between PutItem and SendMessage.
    stale_queued_seconds: Annotated[int, Field(ge=1)] = 300
    # A running job whose lease expired this long ago was left behind by a crash. The lease
    # already outlasts the Lambda that took it, so none is needed: the next run recovers the
    # job and gives its slot back (DESIGN §3.11: within the lease plus one reconciler period).
    expired_lease_grace_seconds: Annotated[int, Field(ge=0)] = 0
    stale_webhook_seconds: Annotated[int, Field(ge=1)] = 900
    max_items_per_run: Annotated[int, Field(ge=1)] = 500
    # A job still queued, or running with no live worker, this close to the end of its
    # retention ends expired (its tenant's slot and quota given back) before DynamoDB's TTL
    # deletes it, which would leave them counted for good. It must exceed the time between two
    # looks at a queued job: the reconciler's (`stale_queued_seconds` and the schedule), and for
    # a batch's queued item, which the reconciler does not sweep, its claims' (at most two
    # deferrals: a copy spoken for by its batch's first claim makes none of its own).
    retention_margin_seconds: Annotated[int, Field(ge=600)] = 10_800
    # Partitions of the sparse reconciler index, so job writes never pile onto one hot key.
    # Raise it freely; lowering it strands the entries of the dropped shards.
    sweep_shards: Annotated[int, Field(ge=1, le=256)] = 16


class FunctionSizing(_Frozen):
    memory_mb: Annotated[int, Field(ge=128, le=10240)] = 256
    # The default is the api's: below API Gateway's 29 s, so the function never outlives the
    # request it answers (LlmqConfig refuses an api timeout above it).
    timeout_seconds: Annotated[int, Field(ge=1, le=900)] = 28


class ApiSizing(FunctionSizing):
    # Lambda SnapStart for the api function (Python 3.12+ runtimes, arm64 included): Lambda
    # initialises it once per published version and resumes new environments from that
    # snapshot, so a cold request skips the imports and the handler's warm-up
    # (functions/api/handler.py `warm`). Off by default: a SnapStart version is billed for
    # its cache while it is active and for each restore, and every deploy publishes a version
    # (docs/operations.md "Cold starts").
    snap_start: bool = False
    # Lambda provisioned concurrency for the front door (the api and its authorizer): this many
    # environments of each are initialised ahead of any request, and the api's also run its
    # warm-up then (Lambda tells them apart by AWS_LAMBDA_INITIALIZATION_TYPE), so the first
    # requests after a deploy or a quiet hour meet no cold start. Off by default: Lambda bills
    # them for as long as they are configured, used or not. Not with `snap_start` (Lambda
    # does not combine the two), and within each function's reserved concurrency (so only
    # with `concurrency.reserve`).
    provisioned_environments: Annotated[int, Field(ge=0, le=1000)] = 0


def _worker_sizing() -> FunctionSizing:
    return FunctionSizing(memory_mb=256, timeout_seconds=300)


def _dispatcher_sizing() -> FunctionSizing:
    return FunctionSizing(memory_mb=256, timeout_seconds=60)


class ConcurrencyConfig(_Frozen):
    """Each function's share of the account's Lambda concurrency (README "Concurrency budget").

    A reservation both guarantees a function its share and caps it there, so a flood of
    long-polls cannot take the concurrency every other function in the account needs. Lambda
    keeps 100 of the regional quota unreserved, so the reservations need a quota of at least
    their sum plus 100: turn `reserve` off in an account whose quota is lower. Then no function
    reserves any, the queue consumers stay bounded by their mappings' MaximumConcurrency, and
    the api and the authorizer only by the stage throttle and the account's quota.
    """

    reserve: bool = True
    # A `GET ?wait=20` holds one api environment for up to 20 s.
    api: Annotated[int, Field(ge=1, le=1000)] = 50
    # The authorizer's answers are cached per key (limits.authorizer_cache_seconds); it runs briefly.
    authorizer: Annotated[int, Field(ge=1, le=1000)] = 20


# The most jobs one tenant may run at once in a lane: each is held by its id on the tenant's one
# share item (llmq.shares), a batch item in two maps, in its own lane and in `batches.lane`,
# about 46 bytes each; four maps of this many fit DynamoDB's 400 KB with room for the rest
# (hunt 287: a cap of 5,000, half a lane of 1,000 x 10, failed the claims past about 4,500 as
# ItemTooLarge, burning their receives). docs/scale.md: a tenant beyond it is sharded.
MAX_TENANT_SLOTS = 2_000


class TenantLimits(_Frozen):
    """What one tenant may use; a tier's defaults, which `llmq tenants set-limits` overrides.

    docs/limits.md says what a client sees at each limit.
    """

    # Jobs running at once, in each lane. None: half the lane's job capacity (its
    # max_concurrency times its batch size, since an invocation runs a whole batch at once),
    # so one tenant can never take a whole lane; never more than MAX_TENANT_SLOTS.
    max_concurrency: Annotated[int, Field(ge=1, le=MAX_TENANT_SLOTS)] | None = None
    # Queued plus running jobs; a submit over it is refused with 429 quota_exceeded.
    max_active_jobs: Annotated[int, Field(ge=1)] = 1000
    # API Gateway usage plan throttling of the tenant's requests (all routes together).
    rate_per_second: Annotated[float, Field(gt=0)] = 10.0
    burst: Annotated[int, Field(ge=1)] = 20
    # Requests waiting at once (`?wait`, `Prefer: wait`), each holding an api environment;
    # one more answers at once, without waiting (llmq.long_polls).
    max_long_polls: Annotated[int, Field(ge=1)] = 5


def _tier_limits() -> dict[str, TenantLimits]:
    return {
        "enterprise": TenantLimits(
            max_active_jobs=10_000, rate_per_second=50.0, burst=100, max_long_polls=20
        ),
        "free": TenantLimits(max_active_jobs=100, rate_per_second=5.0, burst=10, max_long_polls=2),
    }


class FairShareConfig(_Frozen):
    """Per-tenant caps, quotas and rate limits (README "Limits", docs/limits.md)."""

    tiers: dict[str, TenantLimits] = Field(default_factory=_tier_limits)
    # For a tier not listed.
    default: TenantLimits = TenantLimits()
    # Retry-After of a 429 quota_exceeded: active jobs only drop as jobs finish.
    quota_retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 5
    # Retry-After of a `GET ?wait` answered at once because the tenant's long-polls were all
    # taken: a place frees when one of them answers, within a wait.
    long_poll_retry_after_seconds: Annotated[int, Field(ge=1, le=60)] = 2
    # A message whose tenant is at its cap comes back after about backlog x run time / cap,
    # divided by this: above 1, deferred messages return a little faster than slots free up,
    # so a freed slot is taken soon, at the cost of that many refused claims per job run.
    # 1.4 keeps a 2,000-job backlog within 3 claim attempts per job with the slot handoff's
    # own (`llmq.slot_handoff`, BENCHMARKS.md §3b's model).
    deferral_pressure: Annotated[float, Field(ge=1, le=10)] = 1.4
    # The shortest and longest deferral. One longer than SQS's 900 s delay travels as a chain
    # of delayed copies of the message, and only the last one tries a claim.
    min_deferral_seconds: Annotated[float, Field(ge=1)] = 1.0
    max_deferral_seconds: Annotated[float, Field(ge=1, le=MAX_VISIBILITY_SECONDS)] = 3600.0
    # A message refused at the cap while its own batch runs jobs of the same tenant in the lane
    # waits for one of them to end and is re-sent then (`llmq.slot_handoff`). Off: it is
    # deferred at once, as any other.
    slot_handoff: bool = True


# What a webhook delivery needs besides its POST: the answer's head (a second at most), the
# host's lookup, the attempt's record, and for a terminal event the wait for its job's live
# output in the same batch to go first (`WEBHOOK_OUTPUT_FIRST_SECONDS`).
WEBHOOK_OUTPUT_FIRST_SECONDS = 1.0
WEBHOOK_OVERHEAD_SECONDS = 5

# What a chunk of a batch's items may weigh: a DynamoDB transaction holds 4 MB, with room kept
# for the checkpoint.
MAX_TRANSACTION_BYTES = 3_500_000
# What an item's record holds besides its request: the batch's webhook URL, when the batch asked
# for item events (2,048 characters, up to 4 bytes each in UTF-8), and its ids, names, status
# and times (about 730 bytes measured; a KB more kept). Counted at most, or a chunk of items
# at the limit with a non-ASCII URL passed 4 MB and was refused at every try (hunt 299).
ITEM_RECORD_OVERHEAD_BYTES = 4 * 2048 + 2048


def id_part(name: str) -> str:
    """A lane's or tier's name as its resources' CloudFormation id part: `short-batch` ->
    `ShortBatch`."""
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))


def _distinct_ids(what: str, names: list[str]) -> None:
    """Names that would call two resources by one id (`pro-plan`, `pro_plan`; `a--b`, `a-b`)
    are refused here, not by the synth's error."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(id_part(name), name)
        if other != name:
            raise ValueError(f"{what}: {other!r} and {name!r} would name the same resources; rename one")


def _lane_ids_free(names: list[str]) -> None:
    """Lane names whose queues would take another's id in the lanes' construct (hunt 280):
    lane `x`'s DLQ is `XDlq`, so lanes `a` and `a-dlq` clash, and `Poison` is the poison
    queue's. The synth failed with a construct clash that named no setting. And `llmq dlq`
    names the webhooks' DLQ `webhooks`: a lane of that name made `--queue webhooks` redrive both
    (hunt 302)."""
    parts = {id_part(name): name for name in names}
    for name in names:
        part = id_part(name)
        if part == "Poison":
            raise ValueError(f"lane names: {name!r} would name the poison queue's resources; rename it")
        if part in ("Webhooks", "ReconcilerFailures"):
            raise ValueError(f"lane names: {name!r} is the name of another queue in `llmq dlq`; rename it")
        if part.endswith("Dlq") and part[: -len("Dlq")] in parts:
            raise ValueError(
                f"lane names: {name!r} would name the resources of lane {parts[part[: -len('Dlq')]]!r}'s "
                "DLQ; rename one"
            )


def batch_cap(cap: int, reserve: float) -> int:
    """A tenant's batch items running at once in a lane where its cap is `cap`: the cap less
    the reserve for its other jobs (`reserve` of the cap, rounded up), at least one. A cap of
    one keeps no reserve, or its batches would never run."""
    # (rounded first: 100 x 0.07 is 7.000000000000001 in floating point, not over 7)
    return max(1, cap - math.ceil(round(cap * reserve, 9))) if reserve > 0 else cap


class BatchConfig(_Frozen):
    """Batches: one request for many jobs (docs/batches.md)."""

    # Items in one inline batch. Validating 100,000 small items at once takes about 270 MB, more
    # than the api's default 256 MB: raise `api.memory_mb` with this (Anthropic's Message
    # Batches take 100,000).
    max_requests: Annotated[int, Field(ge=1, le=100_000)] = 20_000
    # A POST /v1/batches body (MAX_REQUEST_BODY_BYTES, docs/sandbox.md).
    max_body_bytes: Annotated[int, Field(ge=1024, le=MAX_REQUEST_BODY_BYTES)] = MAX_REQUEST_BODY_BYTES
    # One item's body as JSON: a chunk of items is written in one transaction (at most 4 MB
    # and 100 actions), so a chunk of `expand_chunk` items stays well within it.
    max_item_bytes: Annotated[int, Field(ge=1024, le=140_000)] = 100_000
    # Items written per transaction (with the checkpoint); their messages go 10 per send.
    expand_chunk: Annotated[int, Field(ge=1, le=MAX_EXPAND_CHUNK)] = 25
    # The lane batch items run in when the batch names none; None: the tenant's own lane.
    lane: str | None = None
    # The part of a tenant's cap in a lane that its batch items never take (rounded up; a cap
    # of one keeps none): its own jobs submitted alone start at once while its batches run
    # there. 0: batch items may take the whole cap.
    interactive_reserve: Annotated[float, Field(ge=0, lt=1)] = 0.25
    # Terminal counts are spread over this many items, so a batch finishing a hundred items
    # a second never makes one hot item (each takes a few a second). Raise it at will; never
    # lower it while a batch runs: the ends counted on the shards no longer read would be
    # lost to its counts, and it would never end.
    count_shards: Annotated[int, Field(ge=1, le=100)] = 16
    # Lines per page of GET /v1/batches/{id}/results.
    results_page: Annotated[int, Field(ge=1, le=1000)] = 100
    # The upload form (POST /v1/uploads): a JSON Lines file PUT to S3, validated by the worker
    # as it streams it (Anthropic's Message Batches: 100,000 requests, 256 MB).
    max_upload_bytes: Annotated[int, Field(ge=1024, le=5_000_000_000)] = 256 * 1024 * 1024
    max_upload_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 100_000
    # How long an upload URL works (bounded by the api's credentials, as a result URL is).
    upload_url_seconds: Annotated[int, Field(ge=60, le=43_200)] = 3600
    # The validated requests are stored in parts of this many lines (or bytes, whichever
    # comes first): the expansion reads one part at a time, never the whole file.
    upload_part_requests: Annotated[int, Field(ge=1, le=100_000)] = 1000
    upload_part_bytes: Annotated[int, Field(ge=150_000, le=64_000_000)] = 4_000_000
    # A refused file's first bad lines, reported in the batch's `errors`.
    upload_errors_shown: Annotated[int, Field(ge=1, le=100)] = 10
    # An ended batch's results in one file (`results_file_url`), written by the worker before
    # the batch's terminal status, in S3 multipart parts of this size (S3's minimum is 5 MiB).
    results_file: bool = True
    # At most 16 MiB: a part is held twice (its lines, then joined) in the worker's memory.
    results_part_bytes: Annotated[int, Field(ge=5 * 1024 * 1024, le=16 * 1024 * 1024)] = 8 * 1024 * 1024


class StreamingConfig(_Frozen):
    """Live output of `stream: true` jobs (docs/streaming.md)."""

    # A running job's output is written (one transaction: a chunk item and the job's
    # progress) at most this often; each write also tells the worker of a cancel.
    partial_interval_ms: Annotated[int, Field(ge=100, le=60_000)] = 1000
    # How long a chunk item is kept after it is written (DynamoDB's TTL deletes it); the
    # result stays with the job for the job's retention.
    chunk_ttl_seconds: Annotated[int, Field(ge=3600, le=30 * 86_400)] = 86_400
    # `output_partial` on the job holds at most this many characters of the output so far
    # (then `output_partial_truncated`): each output write rewrites the job item, so this
    # bounds what it costs in write units.
    partial_max_chars: Annotated[int, Field(ge=0, le=32_000)] = 4000
    # A streaming job's input stays in its item up to this size (JSON), else it goes to S3 as
    # a large input does: every output write rewrites the item, so its size is its cost.
    max_inline_input_bytes: Annotated[int, Field(ge=0, le=350_000)] = 16_000
    # job.output webhooks: at most one per job this often, each with the text since the last.
    output_webhook_interval_ms: Annotated[int, Field(ge=500, le=600_000)] = 2000
    # GET /v1/jobs/{id}/events holds its response open at most this long (`?wait`), looking
    # at the job this often, and answers as soon as it has something new.
    max_wait_seconds: Annotated[int, Field(ge=0, le=25)] = 25
    poll_interval_ms: Annotated[int, Field(ge=50, le=5000)] = 250
    # The `retry:` hint each response ends with: how soon a client reconnects.
    retry_ms: Annotated[int, Field(ge=0, le=60_000)] = 100
    # Output deltas in one response at most; the client's reconnect reads on.
    max_deltas_per_response: Annotated[int, Field(ge=1, le=100)] = 100


class LlmqConfig(_Frozen):
    """Everything an operator may tune. Read from cdk.json context key `llmq`."""

    lanes: list[LaneConfig] = Field(
        default_factory=lambda: [
            LaneConfig(name="high", tiers=["enterprise"], max_concurrency=8),
            LaneConfig(name="low", tiers=["free"], max_concurrency=2),
        ],
        min_length=1,
    )
    default_lane: str = "low"
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    # SQS redrives to the DLQ after this many receives; it must exceed max_attempts so the
    # DLQ only ever sees crashes and poison, never ordinary retries. A job's crashes are
    # counted by its own attempts (a takeover of a lapsed lease is one). A message whose
    # tenant is at its cap is replaced by a delayed copy, not received again, so waiting for
    # a slot never counts here (`JobRunner._defer`).
    max_receive_count: Annotated[int, Field(ge=5, le=1000)] = 6
    retention_days: Annotated[int, Field(ge=MIN_RETENTION_DAYS, le=365)] = 7
    # Added to the Lambda's remaining time to form the lease.
    lease_margin_seconds: Annotated[int, Field(ge=0)] = 30
    # How often a running job re-reads cancel_requested while waiting on the provider.
    cancel_check_seconds: Annotated[float, Field(gt=0)] = 5.0
    retry: RetryPolicy = RetryPolicy()
    webhooks: WebhookPolicy = WebhookPolicy()
    provider: ProviderConfig = ProviderConfig()
    limits: LimitsConfig = LimitsConfig()
    reconciler: ReconcilerConfig = ReconcilerConfig()
    # The api, the authorizer, the dead-letter function and the reconciler.
    api: ApiSizing = ApiSizing()
    worker: FunctionSizing = Field(default_factory=_worker_sizing)
    dispatcher: FunctionSizing = Field(default_factory=_dispatcher_sizing)
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    fair_share: FairShareConfig = FairShareConfig()
    batches: BatchConfig = BatchConfig()
    streaming: StreamingConfig = StreamingConfig()

    @model_validator(mode="after")
    def _check_lanes(self) -> Self:
        names = [lane.name for lane in self.lanes]
        if len(set(names)) != len(names):
            raise ValueError(f"lane names must be unique: {names}")
        _distinct_ids("lane names", names)
        _lane_ids_free(names)
        # (each tier's usage plan is named, and its resources called, by the tier; the plan of
        # tiers not listed is `default`'s)
        if any(tier.lower() == "default" for tier in self.fair_share.tiers):
            raise ValueError(
                "fair_share.tiers: `default` names the plan of tiers not listed; use fair_share.default"
            )
        _distinct_ids("fair_share.tiers", list(self.fair_share.tiers))
        named = [*self.fair_share.tiers, *(tier for lane in self.lanes for tier in lane.tiers)]
        unnamable = sorted({tier for tier in named if not TIER_NAME.fullmatch(tier)})
        if unnamable:
            # (the config would deploy, and no tenant could ever be made in the tier: hunt 263)
            raise ValueError(
                f"tiers {unnamable} cannot be tenants' tiers: a tier is 1 to 64 of A-Z, a-z, 0-9 and "
                "_ . : -, starting with a letter or digit"
            )
        if self.default_lane not in names:
            raise ValueError(f"default_lane {self.default_lane!r} is not a lane")
        tiers = [tier for lane in self.lanes for tier in lane.tiers]
        if len(set(tiers)) != len(tiers):
            raise ValueError("a tier may be routed to one lane only")
        if self.max_receive_count <= self.max_attempts:
            raise ValueError("max_receive_count must be greater than max_attempts")
        if self.batches.lane is not None and self.batches.lane not in names:
            raise ValueError(f"batches.lane {self.batches.lane!r} is not a lane")
        chunk_bytes = self.batches.expand_chunk * (self.batches.max_item_bytes + ITEM_RECORD_OVERHEAD_BYTES)
        if chunk_bytes > MAX_TRANSACTION_BYTES:
            raise ValueError(
                f"batches.expand_chunk x (batches.max_item_bytes + {ITEM_RECORD_OVERHEAD_BYTES}, an item "
                f"record's other attributes at most) must stay within {MAX_TRANSACTION_BYTES} bytes: a chunk "
                "of items is one DynamoDB transaction (4 MB at most)"
            )
        for tier, limits in {**self.fair_share.tiers, "(default)": self.fair_share.default}.items():
            if limits.rate_per_second >= self.limits.stage_rate_per_second:
                raise ValueError(
                    f"fair_share tier {tier}: rate_per_second {limits.rate_per_second:g} must stay below "
                    f"limits.stage_rate_per_second ({self.limits.stage_rate_per_second}): one tenant "
                    "within its plan would take the whole stage"
                )
        between_looks = self.reconciler.stale_queued_seconds + self.reconciler.schedule_minutes * 60
        if self.reconciler.retention_margin_seconds < 2 * between_looks:
            raise ValueError(
                "reconciler.retention_margin_seconds must be at least twice stale_queued_seconds plus "
                f"the schedule ({2 * between_looks} s): a queued job must be looked at within it"
            )
        between_claims = 2 * self.fair_share.max_deferral_seconds + between_looks
        if self.reconciler.retention_margin_seconds < between_claims:
            raise ValueError(
                "reconciler.retention_margin_seconds must be at least twice "
                "fair_share.max_deferral_seconds plus stale_queued_seconds and the schedule "
                f"({between_claims:g} s): a batch's queued item, deferred at its tenant's cap, is looked "
                "at only by its own claims, at most two deferrals apart"
            )
        # (a run ends within the worker's timeout of its claim, and a crashed one's lease
        # lapses a lease margin later, when the reconciler can end it: review 265)
        a_run = self.worker.timeout_seconds + self.lease_margin_seconds
        if self.reconciler.retention_margin_seconds <= a_run:
            raise ValueError(
                "reconciler.retention_margin_seconds must be more than worker.timeout_seconds plus "
                f"lease_margin_seconds ({a_run} s): a job claimed just before the margin would end "
                "after its retention, its paid result gone to every read (hunt 283)"
            )
        if self.reconciler.retention_margin_seconds * 2 > self.retention_seconds:
            raise ValueError(
                "reconciler.retention_margin_seconds must be at most half the retention "
                f"({self.retention_seconds} s): jobs would be expired long before their retention"
            )
        if self.api.provisioned_environments and self.api.snap_start:
            raise ValueError(
                "api.provisioned_environments and api.snap_start exclude each other: "
                "Lambda does not combine provisioned concurrency with SnapStart"
            )
        if self.api.provisioned_environments and not self.concurrency.reserve:
            # Unreserved, they would come out of the account's shared pool, which Lambda keeps
            # at 100 or more, and which nothing here can check before CloudFormation refuses.
            raise ValueError(
                "api.provisioned_environments needs concurrency.reserve: provisioned environments "
                "are held within the api's and the authorizer's reservations, which the doctor checks "
                "against the account's quota"
            )
        for function in ("api", "authorizer"):
            reserved = self.reserved_concurrency.get(function)
            if reserved is not None and self.api.provisioned_environments > reserved:
                raise ValueError(
                    f"api.provisioned_environments ({self.api.provisioned_environments}) exceeds the "
                    f"{function}'s reserved concurrency (concurrency.{function}: {reserved}); "
                    "Lambda refuses more provisioned concurrency than a function reserves"
                )
        if self.api.timeout_seconds > GATEWAY_TIMEOUT_SECONDS:
            raise ValueError(
                f"api.timeout_seconds must not exceed API Gateway's {GATEWAY_TIMEOUT_SECONDS:g} s "
                "integration timeout: the client would get a 504 while the function runs on"
            )
        # A POST, its answer's head (a second), the host's lookup, the record of the attempt
        # and a terminal event's wait for its job's output all fit in the dispatcher's time: a receiver that hangs then costs a failed attempt,
        # not the invocation (whose every message would come back unrecorded, towards the DLQ).
        needed = self.webhooks.timeout_seconds + WEBHOOK_OVERHEAD_SECONDS
        if needed > self.dispatcher.timeout_seconds:
            raise ValueError(
                f"webhooks.timeout_seconds must leave {WEBHOOK_OVERHEAD_SECONDS:g} s of "
                f"dispatcher.timeout_seconds ({self.dispatcher.timeout_seconds} s) for the rest of a delivery"
            )
        if self.function_environment_bytes > LAMBDA_ENVIRONMENT_BYTES:
            raise ValueError(
                f"this config makes a function's environment about {self.function_environment_bytes} bytes "
                f"(its LLMQ_CONFIG, the part that differs from the defaults, is {len(self.to_env().encode())}); "
                f"Lambda refuses more than {LAMBDA_ENVIRONMENT_BYTES} and the deploy would fail: "
                "leave out what repeats a default, or shorten the lists (models, tiers, lanes)"
            )
        return self

    @property
    def function_environment_bytes(self) -> int:
        """The most any function's environment holds with this config, as Lambda counts it (its
        names and values), the stack's resource names and URLs at their longest."""
        lane_urls = sum(len(lane.name) + 8 + _RESOURCE_VALUE_BYTES for lane in self.lanes)
        return (
            len("LLMQ_CONFIG")
            + len(self.to_env().encode())
            + lane_urls
            + _OTHER_RESOURCE_VALUES * _RESOURCE_VALUE_BYTES
            + _STACK_VARIABLES_BYTES
        )

    @cached_property
    def lanes_by_name(self) -> dict[str, LaneConfig]:
        return {lane.name: lane for lane in self.lanes}

    def tenant_limits(self, tier: str) -> TenantLimits:
        """A tier's default limits (a tenant's overrides live on its share item)."""
        return self.fair_share.tiers.get(tier, self.fair_share.default)

    def long_poll_cap(self, tier: str) -> int:
        """Requests of one tenant of `tier` waiting at once, by default: the tier's
        `max_long_polls`, and never more than half the api's reserved concurrency, so one
        tenant cannot hold it all (an operator's per-tenant override is not bounded)."""
        cap = self.tenant_limits(tier).max_long_polls
        if self.concurrency.reserve:
            cap = min(cap, max(1, self.concurrency.api // 2))
        return cap

    def concurrency_cap(self, tier: str) -> int:
        """Jobs of one tenant of `tier` running at once in its lane, by default."""
        limits = self.tenant_limits(tier)
        if limits.max_concurrency is not None:
            return limits.max_concurrency
        lane = self.lane_for_tier(tier)
        return max(1, min(MAX_TENANT_SLOTS, lane.max_concurrency * lane.batch_size // 2))

    def concurrency_caps(self, tier: str, lane: str | None = None) -> tuple[int, int]:
        """A tenant of `tier`'s default caps in `lane` (its own by default): all its jobs, and
        its batch items. In a lane other than its own (`batches.lane`) no job of its runs but
        batch items, and they take the whole cap."""
        cap = self.concurrency_cap(tier)
        if lane is not None and lane != self.lane_for_tier(tier).name:
            return cap, cap
        return cap, batch_cap(cap, self.batches.interactive_reserve)

    def lane_for_tier(self, tier: str) -> LaneConfig:
        for lane in self.lanes:
            if tier in lane.tiers:
                return lane
        return self.lanes_by_name[self.default_lane]

    @property
    def total_lane_concurrency(self) -> int:
        return sum(lane.max_concurrency for lane in self.lanes)

    @property
    def mapped_concurrency(self) -> int:
        """What the queue consumers' event source mappings can run at once, together: each
        lane's, the dead-letter function's on each lane's DLQ, and the dispatcher's
        MaximumConcurrency. With nothing reserved, a backlog can take that much of the
        account's pool."""
        return (
            self.total_lane_concurrency
            + DEAD_LETTER_MAX_CONCURRENCY * len(self.lanes)
            + self.webhooks.max_concurrency
        )

    @property
    def reserved_concurrency(self) -> dict[str, int]:
        """Each function's reserved concurrency, by its folder under functions/; empty when
        `concurrency.reserve` is off. Its sum plus 100 is the quota an account needs."""
        if not self.concurrency.reserve:
            return {}
        return {
            "api": self.concurrency.api,
            "authorizer": self.concurrency.authorizer,
            # The sum of the lanes' MaximumConcurrency: every lane can run its share at once.
            "worker": self.total_lane_concurrency,
            "dead_letter": DEAD_LETTER_MAX_CONCURRENCY * len(self.lanes),
            "webhook_dispatcher": self.webhooks.max_concurrency,
            # Two overlapping sweeps would only enqueue duplicates.
            "reconciler": 1,
        }

    @property
    def lane_visibility_timeout_seconds(self) -> int:
        # AWS guidance: at least six times the consuming function's timeout. A message the
        # mapping holds while its batching window gathers more is in flight already: the
        # longest window is added, or a message waiting out a window longer than the rest
        # would be received again, and again, into the DLQ untried (hunt 260).
        return 6 * self.worker.timeout_seconds + max(lane.batching_window_seconds for lane in self.lanes)

    @property
    def webhook_visibility_timeout_seconds(self) -> int:
        return 6 * self.dispatcher.timeout_seconds

    @property
    def retention_seconds(self) -> int:
        return self.retention_days * 86_400

    @property
    def terminal_event_seconds(self) -> int:
        """How long a terminal event's delivery may take: its retry schedule at its most
        jittered, and three sweeps of the reconciler (a first send SQS refused, re-sent by the
        next sweep, and a delivery left pending). A job or batch that ends nearer its retention
        than this is kept until then."""
        schedule = math.ceil(sum(self.webhooks.schedule_seconds) * (1 + self.webhooks.jitter_fraction))
        return schedule + 3 * self.reconciler.stale_webhook_seconds

    @property
    def delivery_keep_seconds(self) -> int:
        """The longest a job or batch is kept past its retention for its terminal event: one
        round at its slowest, every attempt's wait the longest receiver's Retry-After honoured
        (`MAX_REDELIVERY_DELAY_SECONDS`), and three sweeps. However often it is redelivered,
        and whatever its receiver asks, never longer (hunt 281: each round's Retry-After kept
        it again, for good, past its S3 payloads' lifetime); its payloads outlive this."""
        slowest = len(self.webhooks.schedule_seconds) * MAX_REDELIVERY_DELAY_SECONDS
        return max(self.terminal_event_seconds, slowest + 3 * self.reconciler.stale_webhook_seconds)

    def kept_until_s(self, created_ms: int, ended_ms: int | None = None) -> int:
        """The latest a job or batch created at `created_ms` is ever kept (epoch seconds); a
        batch that ended after its retention (`ended_ms`: its results file came late, and is
        kept from then), from its end."""
        since_s = max(created_ms // 1000 + self.retention_seconds, (ended_ms or 0) // 1000)
        return since_s + self.delivery_keep_seconds

    def to_env(self) -> str:
        return self.model_dump_json(exclude_defaults=True)

    def in_flight_settings(self) -> dict[str, Any]:
        """What a deploy must never lower while jobs are in flight (docs/operations.md), with
        their values as this version reads them, defaults included: the template records them
        (`IN_FLIGHT_SETTINGS_METADATA`), so the next deploy's preflight compares values, not
        two versions' defaults (`llmq doctor`)."""
        return {
            "reconciler.sweep_shards": self.reconciler.sweep_shards,
            "batches.count_shards": self.batches.count_shards,
            "lanes": sorted(self.lanes_by_name),
        }

    @classmethod
    def from_context(cls, context: Mapping[str, Any] | None) -> LlmqConfig:
        return cls.model_validate(dict(context or {}))


class ConfigError(RuntimeError):
    """Raised at cold start when a function's environment is incomplete or invalid."""


class FunctionEnvironment(Model):
    """The environment every llmq function receives from the stack.

    Each function declares the subclass it needs; a missing variable fails the cold start
    with the function's name in the message.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    config: LlmqConfig = Field(alias=CONFIG_ENV_VAR)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, function_name: str | None = None) -> Self:
        environ = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if key in environ:
                raw[key] = _decode(key, environ[key])
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            who = function_name or environ.get("AWS_LAMBDA_FUNCTION_NAME", cls.__name__)
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
            )
            raise ConfigError(f"{who}: invalid environment: {problems}") from exc


def _decode(key: str, value: str) -> Any:
    if key in _JSON_VARS:
        return json.loads(value) if value else {}
    return value


_JSON_VARS = {CONFIG_ENV_VAR, "LLMQ_LANE_QUEUE_URLS"}


class ApiEnvironment(FunctionEnvironment):
    payload_bucket: str | None = Field(default=None, alias="LLMQ_PAYLOAD_BUCKET")
    jobs_table: str = Field(alias="LLMQ_JOBS_TABLE", min_length=1)
    lane_queue_urls: dict[str, str] = Field(alias="LLMQ_LANE_QUEUE_URLS")
    webhook_queue_url: str = Field(alias="LLMQ_WEBHOOK_QUEUE_URL", min_length=1)


class AuthorizerEnvironment(FunctionEnvironment):
    tenants_table: str = Field(alias="LLMQ_TENANTS_TABLE", min_length=1)


class WorkerEnvironment(FunctionEnvironment):
    payload_bucket: str | None = Field(default=None, alias="LLMQ_PAYLOAD_BUCKET")
    jobs_table: str = Field(alias="LLMQ_JOBS_TABLE", min_length=1)
    lane_queue_urls: dict[str, str] = Field(alias="LLMQ_LANE_QUEUE_URLS")
    webhook_queue_url: str = Field(alias="LLMQ_WEBHOOK_QUEUE_URL", min_length=1)
    # Either a Secrets Manager secret name/ARN (deployed) or a literal key (sandbox, tests).
    provider_secret_id: str | None = Field(default=None, alias="LLMQ_PROVIDER_SECRET_ID")
    provider_api_key: str | None = Field(default=None, alias="LLMQ_PROVIDER_API_KEY")
    provider_base_url: str | None = Field(default=None, alias="LLMQ_PROVIDER_BASE_URL")


class DeadLetterEnvironment(FunctionEnvironment):
    payload_bucket: str | None = Field(default=None, alias="LLMQ_PAYLOAD_BUCKET")
    jobs_table: str = Field(alias="LLMQ_JOBS_TABLE", min_length=1)
    lane_queue_urls: dict[str, str] = Field(alias="LLMQ_LANE_QUEUE_URLS")
    webhook_queue_url: str = Field(alias="LLMQ_WEBHOOK_QUEUE_URL", min_length=1)
    # Where a dead letter that names no job is set aside (`QueueRepository.set_aside_poison`).
    poison_queue_url: str = Field(alias="LLMQ_POISON_QUEUE_URL", min_length=1)


class DispatcherEnvironment(FunctionEnvironment):
    payload_bucket: str | None = Field(default=None, alias="LLMQ_PAYLOAD_BUCKET")
    jobs_table: str = Field(alias="LLMQ_JOBS_TABLE", min_length=1)
    tenants_table: str = Field(alias="LLMQ_TENANTS_TABLE", min_length=1)
    webhook_queue_url: str = Field(alias="LLMQ_WEBHOOK_QUEUE_URL", min_length=1)
    public_api_url: str = Field(default="", alias="LLMQ_PUBLIC_API_URL")


class ReconcilerEnvironment(FunctionEnvironment):
    payload_bucket: str | None = Field(default=None, alias="LLMQ_PAYLOAD_BUCKET")
    jobs_table: str = Field(alias="LLMQ_JOBS_TABLE", min_length=1)
    lane_queue_urls: dict[str, str] = Field(alias="LLMQ_LANE_QUEUE_URLS")
    webhook_queue_url: str = Field(alias="LLMQ_WEBHOOK_QUEUE_URL", min_length=1)
