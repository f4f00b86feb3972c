"""The API side of a batch: accept, read with its counts, list its results, cancel.

An accept validates every item before anything is written, reads the tenant's quota, stores
the requests in S3 as JSON Lines, writes the batch (one transaction with the tenant's share,
where its items become active jobs) and queues one "expand" message: four AWS calls, whatever
the batch's size. The items are written by the worker
(`llmq.batch_runs`).
"""

from __future__ import annotations

import hashlib
import json
import secrets

from llmq.batch_requests import StoredRequests
from llmq.batch_results import result_line
from llmq.batch_runs import ask_running_items_to_stop, encode_requests, settle
from llmq.batches import (
    BatchRecord,
    BatchRepository,
    batch_fits,
    exceeds_quota,
    new_batch_id,
    over_quota,
    send_expand,
)
from llmq.config import LlmqConfig
from llmq.errors import (
    BatchNotCancelable,
    BatchNotEnded,
    BatchResultsExpired,
    DomainError,
    IdempotencyConflict,
    InvalidIdempotencyKey,
    InvalidRequest,
    InvalidWebhookUrl,
    NoWebhook,
    PayloadTooLarge,
    StoreContended,
    StoreUnavailable,
    UploadNotFound,
    WebhookNotFound,
)
from llmq.intake import MAX_IDEMPOTENCY_KEY, JobIntake, request_digest
from llmq.job_record import iso
from llmq.lanes import lane_for_tier
from llmq.models import (
    BatchRequest,
    BatchRequestCounts,
    BatchResultLine,
    BatchStatus,
    BatchWebhookLog,
    DeliveryStatus,
    JobStatus,
    Upload,
    WebhookEvent,
)
from llmq.payloads import ObjectStat, PresignedUrl
from llmq.ports import BlobStore, JobStore, QueueStore
from llmq.request_rules import check_item
from llmq.telemetry import MetricName, emit_job_metric, error_fields, logger
from llmq.tenants import TenantIdentity

# Where the api stores a batch's requests (the worker may read under inputs/).
REQUESTS_PREFIX = "inputs/batches/"
# Where a tenant's uploads are PUT: the key names the tenant, so an upload id of another
# tenant's finds nothing.
UPLOADS_PREFIX = "inputs/uploads/"


def upload_key(tenant_id: str, upload_id: str) -> str:
    return f"{UPLOADS_PREFIX}{tenant_id}/{upload_id}.jsonl"


# A results page's text: a Lambda response holds 6 MB, after the runtime escapes the body
# once more (a quote or a non-ASCII character can take up to six bytes).
RESULTS_PAGE_BYTES = 900_000


def batch_request_hash(request: BatchRequest, upload: ObjectStat | None = None) -> str:
    """The body's hash as it is written: what versions before `batch_request_digest` compare,
    kept so that a version rolled back to still recognises a replay. An upload counts by its
    content (ETag and size), not its id: a client that lost the answer and uploads the same
    file again, under a new upload id, replays its batch instead of meeting a conflict."""
    if upload is not None:
        request = request.model_copy(update={"upload_id": f"{upload.etag}:{upload.size}"})
    canonical = request.model_dump_json(exclude_none=True, exclude_defaults=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def batch_request_digest(request: BatchRequest, upload: ObjectStat | None = None) -> str:
    """What "the same body" means for a replay, as for a job (`llmq.intake.request_digest`):
    an object's keys in any order, an item's `prompt` or the one message it stands for, event
    names in any order or repeated; an upload by its content."""
    data = request.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    if upload is not None:
        data["upload_id"] = f"{upload.etag}:{upload.size}"
    if request.requests is not None:
        data["requests"] = [[item.custom_id, request_digest(item.body)] for item in request.requests]
    if request.webhook is not None:
        data["webhook"]["events"] = sorted(event.value for event in request.webhook.subscribed_events())
        data["webhook"]["item_events"] = sorted({event.value for event in request.webhook.item_events})
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _same_body(stored: BatchRecord, digest: str, request_hash: str) -> bool:
    """Whether a request of this `digest` and hash has the body `stored` was created with: by
    its digest, or, for a batch stored before digests, by its hash."""
    if stored.request_digest is not None:
        return stored.request_digest == digest
    return stored.request_hash == request_hash


class BatchIntake:
    def __init__(
        self,
        jobs: JobIntake,
        batches: BatchRepository,
        job_store: JobStore,
        queues: QueueStore,
        payloads: BlobStore | None,
        config: LlmqConfig,
    ) -> None:
        self.job_intake = jobs
        self.batches = batches
        self.job_store = job_store
        self.queues = queues
        self.payloads = payloads
        self.config = config

    # ---- accept -------------------------------------------------------------------------

    def submit(
        self, tenant: TenantIdentity, request: BatchRequest, idempotency_key: str | None
    ) -> tuple[BatchRecord, bool]:
        """(The batch, replayed). Nothing is written unless every item is valid."""
        now_ms = self.batches.now_ms()
        batch_id = new_batch_id(tenant.tenant_id, idempotency_key, now_ms)
        try:
            lane = self._validate(tenant, request, idempotency_key)
            if self.payloads is None:
                raise PayloadTooLarge("batches need the payload bucket, which is not configured")
            # Before anything goes to S3, a replay (its id is derived from the key) is answered
            # from the stored batch, and one with another body refused, leaving nothing behind;
            # the quota never refuses a replay of an accepted key.
            stored = self._under_key(batch_id, idempotency_key, now_ms)
            upload = self._upload(tenant, request.upload_id, stored) if request.upload_id else None
        except InvalidIdempotencyKey:
            raise
        except DomainError:
            # A retry of an accepted batch (its answer lost) is its replay, even if a check that
            # can change between the two tries now refuses it (the webhook host's DNS, a limit,
            # a model or a lane the operator changed): the batch exists and runs either way.
            stored = self._under_key(batch_id, idempotency_key, now_ms) if self.payloads is not None else None
            if stored is None:
                raise
            upload = self._upload_as_stored(tenant, request, stored)
            return self._replayed(
                stored, tenant, batch_request_digest(request, upload), batch_request_hash(request, upload)
            ), True
        digest = batch_request_hash(request, upload)
        webhook = request.webhook
        record = BatchRecord(
            id=batch_id,
            tenant_id=tenant.tenant_id,
            status=BatchStatus.VALIDATING,
            lane=lane,
            total=len(request.requests or []),
            # Named by the body's hash: a replay with another body never overwrites these. An
            # upload's validated requests are parts under this prefix.
            requests_ref=f"{REQUESTS_PREFIX}{batch_id}/{digest[:16]}" + ("/" if upload else ".jsonl"),
            upload_id=request.upload_id,
            upload_ref=upload_key(tenant.tenant_id, request.upload_id) if request.upload_id else None,
            upload_etag=upload.etag if upload else None,
            upload_size=upload.size if upload else None,
            validated=upload is None,
            tier=tenant.tier,
            request_hash=digest,
            request_digest=batch_request_digest(request, upload),
            created_ms=now_ms,
            ids_by_creation=True,
            expires_at=now_ms // 1000 + self.config.retention_seconds,
            metadata=request.metadata,
            deadline_ms=now_ms + request.deadline_seconds * 1000 if request.deadline_seconds else None,
            webhook_url=webhook.url if webhook else None,
            webhook_events=webhook.subscribed_events() if webhook else [],
            item_events=list(dict.fromkeys(webhook.item_events)) if webhook else [],
        )
        if stored is not None:
            return self._replayed(stored, tenant, record.request_digest, digest), True
        default_max_active = self.config.tenant_limits(tenant.tier).max_active_jobs
        state = self.batches.share(tenant.tenant_id)
        limit = state.max_active_jobs or default_max_active
        if state.active + record.total > limit:
            # (a first submit of the same key may have gone in since the look above: the retry
            # of a client whose connection dropped is its replay, never refused by the quota)
            stored = self._under_key(batch_id, idempotency_key, now_ms)
            if stored is not None:
                return self._replayed(stored, tenant, record.request_digest, digest), True
            if record.total > limit:
                raise exceeds_quota(record.total, limit)
            raise over_quota(state, record.total, default_max_active, self.config)
        if not batch_fits(record, self.config.batches.upload_errors_shown):
            raise PayloadTooLarge(
                "the batch's metadata and webhook leave no room in its record: send fewer or "
                "shorter metadata values"
            )
        if request.requests is not None:
            self.payloads.put(record.requests_ref, encode_requests(request.requests))
        stored, replayed = self.batches.create(
            record, self.config.concurrency_caps(tenant.tier, record.lane), state, default_max_active
        )
        if replayed and not stored.status.is_terminal and stored.expires_at <= now_ms // 1000:
            # An earlier batch under the key, past its retention but not ended (the reconciler
            # was down): its items still count, and end as their claims or the reconciler end
            # them; then the key is free (review 234).
            raise StoreUnavailable(
                "this Idempotency-Key's earlier batch is past its retention and has not ended yet"
            )
        if replayed:  # (a first submit of the same key, concurrent with this one)
            return self._replayed(stored, tenant, record.request_digest, digest), True
        logger.info("batch accepted", extra={"batch_id": batch_id, "items": record.total, "lane": lane})
        self._expand(stored)
        return stored, False

    def accepted_under(self, tenant: TenantIdentity, idempotency_key: str) -> bool:
        """Whether the tenant's Idempotency-Key already made a batch (one GetItem): a submit the
        deployment's schema now refuses is then its replay (`submit`)."""
        return self.batch_under(tenant, idempotency_key) is not None

    def batch_under(self, tenant: TenantIdentity, idempotency_key: str) -> BatchRecord | None:
        """The batch the tenant's Idempotency-Key made, if any (one GetItem)."""
        now_ms = self.batches.now_ms()
        return self._under_key(
            new_batch_id(tenant.tenant_id, idempotency_key, now_ms), idempotency_key, now_ms
        )

    def _under_key(self, batch_id: str, idempotency_key: str | None, now_ms: int) -> BatchRecord | None:
        """The batch an Idempotency-Key made, if any. One past its retention, not yet deleted,
        counts as none: the key is free again, as `create` sees it."""
        stored = self.batches.find(batch_id) if idempotency_key is not None else None
        return stored if stored is not None and stored.expires_at > now_ms // 1000 else None

    def _upload(
        self, tenant: TenantIdentity, upload_id: str, stored: BatchRecord | None = None
    ) -> ObjectStat:
        """The tenant's uploaded file, as it is now (its ETag pins it: the worker validates
        exactly this file). Another tenant's upload is as missing as one never made. One gone
        that the batch `stored` under the request's key was made from (the upload's lifecycle
        is shorter than the batch's retention) is that batch's file, for its replay."""
        assert self.payloads is not None
        found = self.payloads.stat(upload_key(tenant.tenant_id, upload_id))
        if found is None:
            if (
                stored is not None
                and stored.upload_id == upload_id
                and stored.upload_etag is not None
                and stored.upload_size is not None
            ):
                return ObjectStat(stored.upload_size, stored.upload_etag)
            raise UploadNotFound(f"no upload {upload_id}, or nothing was PUT to its URL yet")
        limit = self.config.batches.max_upload_bytes
        if found.size > limit:
            raise PayloadTooLarge(f"upload {upload_id} holds {found.size} bytes, over {limit}")
        if found.size == 0:
            raise InvalidRequest(f"upload {upload_id} is empty")
        return found

    def new_upload(self, tenant: TenantIdentity, size_bytes: int) -> Upload:
        """Where to PUT a JSON Lines file of requests of `size_bytes`: a presigned S3 URL of the
        tenant's own, signed for that Content-Length, so the bucket never takes a larger file."""
        if self.payloads is None:
            raise PayloadTooLarge("uploads need the payload bucket, which is not configured")
        limit = self.config.batches.max_upload_bytes
        if size_bytes > limit:
            raise PayloadTooLarge(f"an upload holds at most {limit} bytes, not {size_bytes}")
        upload_id = f"upl_{secrets.token_hex(13)}"
        url = self.payloads.presigned_put(
            upload_key(tenant.tenant_id, upload_id), self.config.batches.upload_url_seconds, size_bytes
        )
        return Upload(
            id=upload_id,
            upload_url=url.url,
            size_bytes=size_bytes,
            expires_at=iso(url.expires_ms),
            max_bytes=self.config.batches.max_upload_bytes,
            max_requests=self.config.batches.max_upload_requests,
        )

    def _upload_as_stored(
        self, tenant: TenantIdentity, request: BatchRequest, stored: BatchRecord
    ) -> ObjectStat | None:
        """The request's upload as it is now, whatever the limits say of it now (a replay's
        body is compared, not checked again); else the one `stored` was made from."""
        if not request.upload_id or self.payloads is None:
            return None
        found = self.payloads.stat(upload_key(tenant.tenant_id, request.upload_id))
        if found is None and stored.upload_id == request.upload_id and stored.upload_etag is not None:
            return ObjectStat(stored.upload_size or 0, stored.upload_etag)
        return found

    def _replayed(
        self, stored: BatchRecord, tenant: TenantIdentity, digest: str | None, request_hash: str
    ) -> BatchRecord:
        if stored.tenant_id != tenant.tenant_id or not _same_body(stored, digest or "", request_hash):
            raise IdempotencyConflict("this Idempotency-Key was already used with a different body")
        if stored.status is BatchStatus.VALIDATING:
            # Its expand message may have been lost with the first answer: a second one is
            # harmless (the expansions race on the checkpoint).
            self._expand(stored)
        return stored

    def _expand(self, batch: BatchRecord) -> None:
        try:
            send_expand(self.queues, batch)
        except Exception as exc:
            # The batch is stored and in the reconciler's sweep index: it sends the expand
            # message after `stale_queued_seconds`. The client keeps its 202 and batch id: a
            # 500 would have its retry (without a key) store and pay for the batch again.
            logger.warning(
                "expand enqueue failed; the reconciler will send it",
                extra={"batch_id": batch.id, **error_fields(exc)},
            )
            emit_job_metric(MetricName.JOB_ENQUEUE_FAILED, 1, batch.lane)

    def _validate(self, tenant: TenantIdentity, request: BatchRequest, idempotency_key: str | None) -> str:
        limits = self.config.limits
        if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
            raise InvalidIdempotencyKey(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        if len(request.requests or []) > self.config.batches.max_requests:
            raise InvalidRequest(f"a batch holds at most {self.config.batches.max_requests} requests")
        own = lane_for_tier(self.config, tenant.tier).name
        lanes = {own, *([self.config.batches.lane] if self.config.batches.lane else [])}
        lane = request.lane or self.config.batches.lane or own
        if lane not in lanes:
            raise InvalidRequest(f"lane {lane!r} is not one of {sorted(lanes)}")
        if len(request.metadata) > limits.max_metadata_keys:
            raise InvalidRequest(f"metadata holds at most {limits.max_metadata_keys} keys")
        if request.deadline_seconds is not None and request.deadline_seconds > limits.max_deadline_seconds:
            raise InvalidRequest(f"deadline_seconds is at most {limits.max_deadline_seconds}")
        if request.webhook is not None:
            if WebhookEvent.OUTPUT in request.webhook.item_events:
                # (a batch's items never stream: a subscription nothing would ever answer)
                raise InvalidRequest(
                    "webhook.item_events: job.output is sent only for a job with stream: true"
                )
            try:
                self.job_intake.check_webhook_url(request.webhook.url)
            except InvalidWebhookUrl as exc:
                raise InvalidWebhookUrl(f"webhook.url: {exc.detail}") from exc
        seen: dict[str, str] = {}
        for index, item in enumerate(request.requests or []):
            check_item(self.config, f"requests[{index}]", item, seen)
        return lane

    # ---- read ---------------------------------------------------------------------------

    def get(self, tenant: TenantIdentity, batch_id: str) -> tuple[BatchRecord, BatchRequestCounts]:
        batch = self.batches.get(batch_id, tenant.tenant_id)
        counts = self.batches.counts(batch)
        unsent = (
            batch.status.is_terminal
            and batch.delivery_status is DeliveryStatus.PENDING
            and not batch.webhook_sent
        )
        if unsent or (
            not batch.status.is_terminal and batch.expansion_over and counts.queued + counts.running == 0
        ):
            # Every item ended, but the batch did not (or its webhook was not sent): the worker
            # of the last one stopped short.
            try:
                ended = settle(self.batches, self.queues, batch.id)
            except StoreUnavailable:
                ended = None  # the reader still gets the batch; a later look ends it
            if ended is not None:
                return ended, ended.final_counts or counts
        return batch, counts

    def results_file(self, batch: BatchRecord) -> PresignedUrl | None:
        """A GET URL of the ended batch's results file, short-lived as a result URL is."""
        if batch.results_key is None or self.payloads is None or not batch.status.is_terminal:
            return None
        return self.payloads.presigned_url(batch.results_key)

    def list_page(
        self, tenant: TenantIdentity, limit: int, cursor: str | None
    ) -> tuple[list[tuple[BatchRecord, BatchRequestCounts]], str | None]:
        """A page of the tenant's batches, newest first, each with its counts (an ended batch's
        are stored with it; an open one's take its two reads)."""
        records, following = self.batches.list_for_tenant(tenant.tenant_id, limit, cursor)
        return [(batch, self.batches.counts(batch)) for batch in records], following

    def results(
        self, tenant: TenantIdentity, batch_id: str, cursor: int, status: JobStatus | None, api_base: str
    ) -> tuple[list[BatchResultLine], int | None]:
        """One page of the items' results from `cursor` (an item index), and the next cursor.

        A page holds up to `results_page` items and RESULTS_PAGE_BYTES of text, so it always
        fits a Lambda response; a result too large for that comes as its job's URL."""
        batch = self.batches.get(batch_id, tenant.tenant_id)
        found = self.batches.items(batch, cursor, self.config.batches.results_page)
        missing = [index for index, job in found if job is None]
        if batch.status.is_terminal and any(index < batch.expanded for index in missing):
            # Written, ended, and gone since: DynamoDB's TTL deleted an item that ended well
            # before its batch, which its end kept longer (hunt 253: its line read `queued`).
            where = "its results file (results_file_url)" if batch.results_key else "no page"
            raise BatchResultsExpired(
                f"batch {batch_id}'s items have passed their retention; {where} holds their lines"
            )
        names: dict[int, str] = {}
        if missing and self.payloads is not None:
            # Items not written yet: still queued, named from the stored requests.
            stored = StoredRequests(self.payloads, batch)
            names = {index: stored.item(index).custom_id for index in missing}
        page: list[BatchResultLine] = []
        size = 0
        following: int | None = cursor + len(found)
        for index, job in found:
            line = result_line(batch, index, job, names, api_base)
            weight = len(line.model_dump_json(exclude_none=True).encode())
            if page and size + weight > RESULTS_PAGE_BYTES:
                following = index
                break
            size += weight
            if status is None or line.status is status:
                page.append(line)
        return page, following if following is not None and following < batch.total else None

    # ---- the webhook --------------------------------------------------------------------

    def webhook_log(self, tenant: TenantIdentity, batch_id: str) -> BatchWebhookLog:
        log = self.batches.get(batch_id, tenant.tenant_id).webhook_log()
        if log is None:
            raise WebhookNotFound(f"batch {batch_id} was submitted without a webhook")
        return log

    def redeliver(self, tenant: TenantIdentity, batch_id: str) -> BatchRecord:
        """Send the ended batch's event again; the dispatcher reuses its webhook-id."""
        batch = self.batches.get(batch_id, tenant.tenant_id)
        event = batch.terminal_event
        if event is None:
            raise BatchNotEnded(f"batch {batch_id} is {batch.status.value}")
        if not batch.wants(event):
            raise NoWebhook(f"batch {batch_id} has no webhook subscribed to {event.value}")
        pending = self.batches.mark_redelivery(batch)
        try:
            self.queues.enqueue_webhook(
                batch.id, event, tenant_id=tenant.tenant_id, delivery_round=pending.delivery_round
            )
        except StoreUnavailable as exc:
            # The new round is written, unsent and due in the reconciler's sweep, whose poke
            # sends its event: accepted, not a 503 whose retry starts another round (hunt 289).
            logger.warning(
                "redelivery's event not sent; the reconciler sends it",
                extra={"batch_id": batch.id, **error_fields(exc)},
            )
            return pending
        try:
            self.batches.mark_webhook_sent(batch.id, pending.delivery_round)
        except StoreUnavailable as exc:
            # The round went: its batch, still marked unsent, is poked by the reconciler, whose
            # message is then dropped as a copy. Accepted, not a 503 whose retry starts another
            # round and sends its event again (hunt 321).
            logger.warning(
                "redelivery's event sent, not marked so; the reconciler looks",
                extra={"batch_id": batch.id, **error_fields(exc)},
            )
        return pending

    # ---- cancel -------------------------------------------------------------------------

    def cancel(self, tenant: TenantIdentity, batch_id: str) -> BatchRecord:
        """Canceling: no item starts any more (a queued one ends canceled at its claim, with no
        provider call), each running one is asked to stop as a job is, and items not written yet
        are never written. The batch ends `canceled` once every item has ended. A batch
        canceled already is answered as it is, not 409 (hunt 322: a retry of a cancel whose
        answer was lost met the batch its own cancel had ended as one "already finished")."""
        batch = self.batches.get(batch_id, tenant.tenant_id)
        if batch.status is BatchStatus.CANCELED:
            return batch
        if batch.status.is_terminal:
            raise BatchNotCancelable(f"batch {batch_id} is {batch.status.value}")
        try:
            flagged = self.batches.request_cancel(batch, by_client=True)
        except StoreContended:
            raise  # (refused, never applied)
        except StoreUnavailable:
            # Applied with every answer lost, perhaps: its flag tells. Answered 503, the
            # client's retry could meet the batch its own cancel had ended as a 409.
            flagged = self.batches.get(batch_id, tenant.tenant_id)
            if not flagged.client_canceled:
                raise
        if flagged is None:
            batch = self.batches.get(batch_id, tenant.tenant_id)
            if batch.client_canceled:
                # Ending since this request's look, canceled (finalizing: its results file is
                # being written), by a try of this request's own write, applied with its
                # answer lost, or by another cancel: as asked, not a 409.
                return batch
            raise BatchNotCancelable(f"batch {batch_id} is {batch.status.value}")
        if flagged.status.is_terminal:
            return flagged
        ask_running_items_to_stop(self.batches, self.job_store, flagged)
        if not flagged.expansion_over:
            # The expansion stops at its next chunk; if none runs, this message ends it.
            try:
                send_expand(self.queues, flagged)
            except Exception as exc:
                # (SQS refused it, or its lane is no longer deployed: the cancel holds, and the
                # reconciler's next look at the open batch sends it)
                logger.warning(
                    "canceled batch's expand message not sent",
                    extra={"batch_id": batch_id, **error_fields(exc)},
                )
        try:
            return settle(self.batches, self.queues, flagged.id) or flagged
        except StoreUnavailable:
            return flagged  # canceling, as flagged: a later look ends it
