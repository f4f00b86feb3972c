"""The stores and the provider the use cases depend on, as Protocols.

`JobRunner`, `JobIntake`, `Reconciler`, `WebhookDispatcher` and `mark_dead_letter` are
written against these, not against the DynamoDB, SQS and S3 repositories: production passes
the repositories (each satisfies its Protocol, which mypy checks), the unit tests pass the
in-memory fakes of `tests/support/stores.py`, which honour the same conditional-write
contracts (DESIGN §3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

# For annotations only: the ports import nothing at run time, so any module may use them.
if TYPE_CHECKING:
    from collections import Counter
    from collections.abc import Callable, Iterator

    from llmq.job_record import JobRecord
    from llmq.jobs import Admission, Created, SweepEntry, SweepPass
    from llmq.live_output import OutputChunk, OutputHead
    from llmq.models import (
        BatchEvent,
        DeliveryAttempt,
        DeliveryStatus,
        JobError,
        JobOutputEvent,
        JobResult,
        JobStatus,
        OutputDelta,
        WebhookEvent,
    )
    from llmq.payloads import ObjectStat, PresignedUrl
    from llmq.policy import Claim
    from llmq.providers import GenerationRequest
    from llmq.tenants import Tenant, TenantIdentity


class JobStore(Protocol):
    """The jobs table: every write conditional, every write recognising its own earlier success."""

    def now_ms(self) -> int: ...

    # ---- accept and read (the API) --------------------------------------------------------
    def create(self, record: JobRecord, admission: Admission) -> Created: ...
    def check_quota(self, tenant_id: str, admission: Admission) -> None: ...
    def find(self, job_id: str, *, past_retention: bool = False) -> JobRecord | None: ...
    def get(self, job_id: str, tenant_id: str) -> JobRecord: ...
    def list_for_tenant(
        self, tenant_id: str, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]: ...
    def queued_ahead(self, job: JobRecord, limit: int = ...) -> int: ...

    # ---- cancel (the API) -----------------------------------------------------------------
    def cancel_queued(self, job: JobRecord, token: str) -> JobRecord | None: ...
    def request_cancel(self, job: JobRecord, status: JobStatus = ...) -> JobRecord | None: ...
    def is_cancel_requested(self, job_id: str) -> bool: ...

    # ---- the worker's lease ---------------------------------------------------------------
    def claim(
        self, job_id: str, owner: str, lease_seconds: float, tenant: tuple[str, str] | None = None
    ) -> Claim: ...
    def complete(
        self,
        job: JobRecord,
        owner: str,
        *,
        result: JobResult | None = None,
        result_ref: str | None = None,
        timed: bool = ...,
    ) -> JobRecord: ...
    def fail_leased(self, job: JobRecord, owner: str, error: JobError) -> JobRecord: ...
    def cancel_leased(self, job: JobRecord, owner: str) -> JobRecord: ...
    def requeue(
        self, job: JobRecord, owner: str, error: JobError, delay_seconds: float, *, refused: bool = False
    ) -> JobRecord: ...
    def release(self, job: JobRecord, owner: str, delay_seconds: float) -> JobRecord: ...

    # ---- live output (llmq.live_output) ---------------------------------------------------
    def write_output(self, job: JobRecord, owner: str, chunk: OutputChunk, *, final: bool = ...) -> None: ...
    def output_head(self, job_id: str) -> OutputHead | None: ...
    def read_output(
        self, job: JobRecord, first: int, last: int, *, limit: int = ...
    ) -> list[OutputDelta]: ...

    # ---- jobs no live worker holds --------------------------------------------------------
    def expire(self, job: JobRecord, error: JobError) -> JobRecord | None: ...
    def fail_unleased(self, job: JobRecord, error: JobError) -> JobRecord | None: ...
    def expire_at_retention(self, job: JobRecord, error: JobError) -> JobRecord | None: ...
    def recover(self, job: JobRecord) -> JobRecord | None: ...
    def cancel_unleased(self, job: JobRecord) -> JobRecord | None: ...
    def end_with_parked(
        self,
        job: JobRecord,
        *,
        result: JobResult | None = None,
        result_ref: str | None = None,
        error: JobError | None = None,
    ) -> JobRecord | None: ...
    def note_dead_letter(
        self, job: JobRecord, message_id: str, redrive_round: int = 0
    ) -> JobRecord | None: ...
    def fail_queued_dead_letter(self, job: JobRecord, error: JobError) -> JobRecord | None: ...

    # ---- webhook delivery -----------------------------------------------------------------
    def record_delivery(
        self,
        job_id: str,
        status: DeliveryStatus,
        status_code: int | None,
        next_attempt_in_seconds: float | None = None,
        previous_attempts: int | None = None,
        next_attempt_at_ms: int | None = None,
        attempt: DeliveryAttempt | None = None,
        log_seq: int = ...,
        carrier: str | None = None,
        expires_at: int | None = None,
        created_ms: int | None = None,
    ) -> bool: ...
    def mark_webhook_gone(self, job_id: str) -> None: ...
    def mark_delivery_pending(
        self, job_id: str, tenant_id: str, *, read: JobRecord | None = None
    ) -> JobRecord: ...

    # ---- the reconciler's sparse index ----------------------------------------------------
    def sweep(
        self,
        due_before_ms: int,
        limit: int,
        only: SweepPass | None = None,
        *,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[SweepEntry]: ...
    def count_unfinished(self, stop: Callable[[], bool] | None = None) -> Counter[str]: ...
    def sweep_first(self, job_id: str, unlooked: JobRecord | None = None) -> None: ...
    def postpone_sweep(
        self,
        job_id: str,
        seconds: float,
        *,
        retention_margin_s: int | None = None,
        status: JobStatus | None = None,
        seen_at: int | None = None,
        not_after_ms: int | None = None,
    ) -> bool: ...


class QueueStore(Protocol):
    """The lane queues and the webhooks queue; messages carry ids only."""

    def enqueue_job(
        self,
        job_id: str,
        lane: str,
        tenant_id: str,
        delay_seconds: int = 0,
        not_before_ms: int | None = None,
        *,
        redrive_round: int = 0,
        spoken_for: bool = False,
    ) -> None: ...
    def enqueue_jobs(self, job_ids: list[str], lane: str, tenant_id: str) -> None: ...
    def enqueue_expand(
        self, batch_id: str, lane: str, tenant_id: str, delay_seconds: int = 0, *, redrive_round: int = 0
    ) -> None: ...
    def enqueue_webhook(
        self,
        job_id: str,
        event: WebhookEvent | BatchEvent,
        output: JobOutputEvent | None = None,
        snapshot: dict[str, Any] | None = None,
        *,
        tenant_id: str | None = None,
        delivery_round: int = 0,
    ) -> None: ...
    def lane_depth(self, lane: str) -> int: ...
    def delay_redelivery(self, queue_arn: str, receipt_handle: str, seconds: float) -> None: ...


class PollPlaces(Protocol):
    """Each tenant's places for waiting requests (llmq.long_polls)."""

    def enter(
        self, tenant_id: str, cap: int, seconds: float, deadline: float | None = None
    ) -> str | None: ...
    def leave(self, tenant_id: str, place: str) -> None: ...


class BlobStore(Protocol):
    """Where inputs and results too large for a job item live (S3)."""

    def put(self, key: str, data: bytes) -> str: ...
    def put_new(self, key: str, data: bytes) -> bool: ...
    def get(self, key: str) -> bytes: ...
    def presigned_url(self, key: str, expires_seconds: int = ...) -> PresignedUrl: ...
    def presigned_put(self, key: str, expires_seconds: int, content_length: int) -> PresignedUrl: ...
    def stat(self, key: str) -> ObjectStat | None: ...
    def stream(self, key: str, start: int, etag: str) -> Iterator[bytes]: ...
    def start_multipart(self, key: str) -> str: ...
    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str: ...
    def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None: ...


class TenantStore(Protocol):
    """API keys (by hash) and webhook secrets."""

    def authenticate(self, api_key: str) -> TenantIdentity | None: ...
    def get(self, tenant_id: str) -> Tenant: ...


class GenerationProvider(Protocol):
    """The LLM behind the jobs: one generation, or a `ProviderError` that says how it failed."""

    async def generate(self, request: GenerationRequest, timeout_seconds: float) -> JobResult: ...
