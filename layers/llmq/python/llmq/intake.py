"""The API side of a job's life: accept, look up, wait, list, cancel and redeliver."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from botocore.exceptions import ClientError

from llmq.batch_runs import item_ended
from llmq.config import LlmqConfig
from llmq.errors import (
    DomainError,
    IdempotencyConflict,
    InvalidIdempotencyKey,
    InvalidRequest,
    JobNotCancelable,
    JobNotTerminal,
    JobResultExpired,
    NoWebhook,
    PayloadTooLarge,
    QuotaExceeded,
    StoreContended,
    StoreUnavailable,
    WebhookNotFound,
)
from llmq.job_codec import write_token
from llmq.job_record import JobInput, JobRecord, new_job_id
from llmq.jobs import Admission
from llmq.lanes import lane_for_tier
from llmq.live_output import done_event, paged_events, result_deltas, retry_hint, status_event
from llmq.models import JobRequest, JobStatus, OutputDelta, WebhookEvent, WebhookLog
from llmq.offload import Offload
from llmq.policy import retention_error
from llmq.ports import BlobStore, JobStore, PollPlaces, QueueStore
from llmq.queues import announce_terminal
from llmq.request_rules import check_job_request
from llmq.telemetry import (
    MetricName,
    count_outcome,
    emit_count,
    error_fields,
    fingerprint,
    logger,
    traceback_fields,
)
from llmq.tenants import TenantIdentity

MAX_IDEMPOTENCY_KEY = 255

UrlGuard = Callable[[str], object]


@dataclass(frozen=True)
class Submission:
    job: JobRecord
    replayed: bool


@dataclass(frozen=True)
class Polled:
    job: JobRecord
    # The wait asked for was not granted: the tenant's long-polls were all taken (or their
    # store was busy), so the job is answered as it stood.
    wait_refused: bool = False


def request_hash(request: JobRequest) -> str:
    """The body as it was written, validated: what every version compares on a replay. Kept in
    `request_hash`, so a version rolled back to still recognises a replay of the same bytes."""
    return hashlib.sha256(
        request.model_dump_json(exclude_none=True, exclude_defaults=True).encode()
    ).hexdigest()


def request_digest(request: JobRequest) -> str:
    """What "the same body" means for an idempotent replay: the request in a canonical form.

    Bodies that mean the same request are the same body: an object's keys in any order
    (`metadata`, `params`), `prompt` or the one user message it stands for, and the webhook's
    events in any order or repeated, or left out for the default ones. A client whose JSON
    library writes keys in another order replays its job instead of meeting a conflict. Kept
    beside `request_hash` (`JobRecord.request_digest`); jobs stored before it have none."""
    data = request.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    if data.pop("prompt", None) is not None:
        data["messages"] = [
            message.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
            for message in request.chat_messages()
        ]
    if request.webhook is not None:
        data["webhook"]["events"] = sorted(event.value for event in request.webhook.subscribed_events())
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# How far past its wait's deadline an answer may be before it skips what can wait (giving back
# its place, the queue position, reading an S3-held result): about what one look at the job
# takes throttled, well within the gateway's reserve after the deadline (the api's
# ANSWER_RESERVE_SECONDS), which botocore's retries of two throttled calls would overrun.
LATE_AFTER_WAIT_SECONDS = 0.5


def _late(deadline: float) -> bool:
    return time.monotonic() > deadline + LATE_AFTER_WAIT_SECONDS


class JobIntake:
    def __init__(
        self,
        jobs: JobStore,
        queues: QueueStore,
        config: LlmqConfig,
        check_webhook_url: UrlGuard,
        sleep: Callable[[float], None] = time.sleep,
        payloads: BlobStore | None = None,
        polls: PollPlaces | None = None,
    ) -> None:
        self.jobs = jobs
        # None: waits are not capped per tenant (tests that do not look at it).
        self.polls = polls
        self.offload = Offload(payloads, config)
        self.queues = queues
        self.config = config
        self.check_webhook_url = check_webhook_url
        self._sleep = sleep

    def submit(self, tenant: TenantIdentity, request: JobRequest, idempotency_key: str | None) -> Submission:
        """One conditional PutItem, then one SendMessage. A replay sends nothing, and writes
        nothing but, at most once, the mark of a job whose message may be lost (`_replay`)."""
        now_ms = self.jobs.now_ms()
        try:
            self.validate(request, idempotency_key)
        except InvalidIdempotencyKey:
            raise
        except DomainError:
            # A retry of an accepted submit (its answer lost) is its replay, even if a check
            # that can change between the two tries now refuses it (the webhook host's DNS, a
            # limit or model the operator changed): the job exists and runs either way.
            existing = (
                self.jobs.find(new_job_id(tenant.tenant_id, idempotency_key, now_ms))
                if idempotency_key
                else None
            )
            if existing is None:
                raise
            return self._replay(
                existing, self._new_record(tenant, request, idempotency_key, now_ms), request, tenant
            )
        record = self._new_record(tenant, request, idempotency_key, now_ms)
        admission = Admission(
            caps=self.config.concurrency_caps(tenant.tier),
            max_active_jobs=self.config.tenant_limits(tenant.tier).max_active_jobs,
        )
        if self.offload.goes_to_store(record):
            # Before the input goes to S3: a submit refused (its key taken by another body, or
            # by the quota) writes nothing there, and a replay writes nothing either. (One that
            # loses a race after this look, or meets a fault, leaves its input object for the
            # bucket's lifecycle rule to delete.)
            existing = self.jobs.find(record.id, past_retention=True) if idempotency_key is not None else None
            if existing is not None and self._unretired(existing):
                # (before the quota is looked at, which it still counts in: review 234)
                self._retire(existing)
            elif existing is not None and existing.expires_at > now_ms // 1000:
                return self._replay(existing, record, request, tenant)
            if not self.offload.fits_by_reference(record):
                raise PayloadTooLarge(
                    "the job's metadata and webhook leave no room in its record, even with the "
                    "prompt stored apart: send fewer or shorter metadata values"
                )
            try:
                self.jobs.check_quota(record.tenant_id, admission)
            except QuotaExceeded:
                # (a first submit of the same key may have gone in since the look above: the
                # retry of a client whose connection dropped is its replay, never refused)
                existing = self.jobs.find(record.id) if idempotency_key is not None else None
                if existing is None:
                    raise
                return self._replay(existing, record, request, tenant)
            # The input goes to S3 first; the item holds its reference.
            record = self.offload.store_input(record)
        created = self.jobs.create(record, admission)
        if created.replayed and self._unretired(created.job):
            self._retire(created.job)
            created = self.jobs.create(record, admission)
        if created.replayed:
            if self._unretired(created.job):
                raise StoreUnavailable(
                    "this Idempotency-Key's earlier job is past its retention and not ended yet"
                )
            return self._replay(created.job, record, request, tenant)
        logger.info(
            "job accepted",
            extra={
                "job_id": record.id,
                "lane": record.lane,
                "prompt_sha": fingerprint(_prompt_text(request)),
            },
        )
        try:
            self.queues.enqueue_job(record.id, record.lane, record.tenant_id)
        except Exception as exc:
            # The job is stored durably as queued; the reconciler enqueues it after
            # `stale_queued_seconds`. The client keeps its 202 and its job id.
            logger.error(
                "enqueue failed; the reconciler will pick the job up",
                extra={"job_id": record.id, **traceback_fields(exc)},
            )
            # Counted, since no error metric sees it: the Lane<Name>EnqueueFailed alarm.
            from llmq.telemetry import MetricName, emit_job_metric

            emit_job_metric(MetricName.JOB_ENQUEUE_FAILED, 1, record.lane)
            try:
                # Its message is known lost: first in line for the next sweep, not behind the
                # lane's backlog (whose messages are only late).
                self.jobs.sweep_first(record.id)
            except Exception:
                logger.warning("could not put the job first for the reconciler", extra={"job_id": record.id})
        return Submission(job=record, replayed=False)

    def _unretired(self, job: JobRecord) -> bool:
        """A job past its retention (gone, as every read sees it) that has not ended: the
        reconciler, which ends such a job, has not come to it yet."""
        return not job.status.is_terminal and job.expires_at <= self.jobs.now_ms() // 1000

    def _retire(self, job: JobRecord) -> None:
        """An Idempotency-Key reused after its retention, over a job the reconciler has not yet
        ended (it was down): that job ends now, expired, giving back its tenant's quota and
        slot, before the key's new job takes its place. Overwritten, it would have held them
        for good. (Nothing, if a live worker holds it.) Its event is sent as the reconciler's
        would be; found past its retention, it is delivered only if its job is still found
        (README: Guarantees)."""
        ended = self.jobs.expire_at_retention(job, retention_error(job))
        if ended is not None:
            self._announce_ended(ended)

    def _replay(
        self, job: JobRecord, record: JobRecord, request: JobRequest, tenant: TenantIdentity
    ) -> Submission:
        """The job an accepted Idempotency-Key names (its id is derived from the key), if the
        body is the same request; never refused by a quota.

        A retry of a job the reconciler has not looked at yet, not yet claimed, may be the
        retry of a 503 whose try stored the job and never sent its message (its answer lost,
        and the read of it refused). The job goes first in the reconciler's sweep, which sends
        it one at its first look whatever the lane's depth says: a depth that counts messages
        of jobs already ended (a canceled job's, hidden for a retry's backoff) would otherwise
        hide the loss for hours (hunt 252). Only while its entry is where its accept put it (a
        conditional write, refused once the reconciler has looked), so replays add at most one
        message to a job's, however many there are."""
        same_body = job.request_hash == record.request_hash or (
            job.request_digest is not None and job.request_digest in self._spellings(request, job.model)
        )
        if job.tenant_id != tenant.tenant_id or not same_body:
            raise IdempotencyConflict("this Idempotency-Key was already used with a different body")
        young = self.jobs.now_ms() - job.created_ms < self.config.reconciler.stale_queued_seconds * 1000
        # (a job the provider refused, its attempt refunded, ran: its message is the copy's)
        ran = job.attempts or job.refusals
        if job.status is JobStatus.QUEUED and not ran and not job.cancel_requested and young:
            try:
                self.jobs.sweep_first(job.id, unlooked=job)
            except Exception as exc:
                logger.warning(
                    "replayed job not put first for the reconciler",
                    extra={"job_id": job.id, **error_fields(exc)},
                )
        return Submission(job=job, replayed=True)

    def _spellings(self, request: JobRequest, model: str) -> set[str]:
        """The request's digest; and when it asks for the model the job runs, by its name or by
        leaving it to the default, its digests with the model named and left out: a client whose
        SDK writes the documented default out replays the job it made without it (hunt 257)."""
        digests = {request_digest(request)}
        if (request.model or self.config.provider.default_model) == model:
            digests.add(request_digest(request.model_copy(update={"model": None})))
            digests.add(request_digest(request.model_copy(update={"model": model})))
        return digests

    def accepted_under(self, tenant: TenantIdentity, idempotency_key: str) -> bool:
        """Whether the tenant's Idempotency-Key already made a job (one GetItem): a submit the
        deployment's schema now refuses is then its replay (`submit`)."""
        return self.jobs.find(new_job_id(tenant.tenant_id, idempotency_key, self.jobs.now_ms())) is not None

    def validate(self, request: JobRequest, idempotency_key: str | None) -> None:
        """What the schema cannot say: this deployment's models, limits and webhook rules."""
        limits = self.config.limits
        if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
            raise InvalidIdempotencyKey(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        check_job_request(self.config, request)
        if request.deadline_seconds is not None and request.deadline_seconds > limits.max_deadline_seconds:
            raise InvalidRequest(f"deadline_seconds is at most {limits.max_deadline_seconds}")
        if request.webhook is not None:
            if WebhookEvent.OUTPUT in request.webhook.subscribed_events() and not request.stream:
                # (subscribed to nothing a job that does not stream ever sends, said at once)
                raise InvalidRequest("webhook.events: job.output is sent only for a job with stream: true")
            self.check_webhook_url(request.webhook.url)

    def _new_record(
        self, tenant: TenantIdentity, request: JobRequest, idempotency_key: str | None, now_ms: int
    ) -> JobRecord:
        webhook = request.webhook
        return JobRecord(
            id=new_job_id(tenant.tenant_id, idempotency_key, now_ms),
            tenant_id=tenant.tenant_id,
            status=JobStatus.QUEUED,
            lane=lane_for_tier(self.config, tenant.tier).name,
            model=request.model or self.config.provider.default_model,
            input=JobInput(messages=request.chat_messages(), params=request.params),
            request_hash=request_hash(request),
            request_digest=request_digest(request),
            metadata=request.metadata,
            created_ms=now_ms,
            deadline_ms=now_ms + request.deadline_seconds * 1000 if request.deadline_seconds else None,
            webhook_url=webhook.url if webhook else None,
            webhook_events=webhook.subscribed_events() if webhook else [],
            expires_at=now_ms // 1000 + self.config.retention_seconds,
            stream=True if request.stream else None,
            ids_by_creation=True,
        )

    def get(
        self, tenant: TenantIdentity, job_id: str, wait_seconds: float = 0, position: bool = False
    ) -> JobRecord:
        return self.long_poll(tenant, job_id, wait_seconds, position).job

    def long_poll(
        self, tenant: TenantIdentity, job_id: str, wait_seconds: float = 0, position: bool = False
    ) -> Polled:
        """The tenant's job; with a wait, the first terminal state seen within it. With
        `position`, a job still queued says where it stands among the tenant's queued jobs.

        A wait holds one of the tenant's long-poll places (llmq.long_polls); with none free,
        nothing waits and `wait_refused` says so. A job already finished needs no place. A
        place whose write failed (a throttle) is StoreUnavailable, as the job's read would be:
        not the tenant's limit (hunt 322: a 429 `too_many_long_polls`, counted as a refusal).
        """
        deadline = time.monotonic() + wait_seconds
        job = self.jobs.get(job_id, tenant.tenant_id)
        refused = False
        # (a first read that took the wait's time waits no more, and takes no place: hunt 289)
        if wait_seconds > 0 and not job.status.is_terminal and time.monotonic() < deadline:
            try:
                place = self._take_place(tenant, wait_seconds, deadline)
            except StoreUnavailable:
                if time.monotonic() < deadline:
                    raise
                # (the wait's time spent on the place's tries: answered with the job as read, as
                # when none was taken for want of time; review 277)
                place = None
            # (none for want of time is no refusal: the answer is due, with the job as read)
            refused = place is None and time.monotonic() < deadline
            if place is not None:
                try:
                    while not job.status.is_terminal and time.monotonic() < deadline:
                        self._sleep(
                            min(self.config.limits.wait_poll_seconds, max(0.0, deadline - time.monotonic()))
                        )
                        job = self.jobs.get(job_id, tenant.tenant_id)
                finally:
                    self._give_back(tenant, place, deadline)
        # Past its deadline by more than a look takes (a throttled read), a wait's answer skips
        # what can wait: API Gateway gives up `ANSWER_RESERVE_SECONDS` after it (hunt 262).
        late = wait_seconds > 0 and _late(deadline)
        # A batch's item is not in the tenant's job index: its batch's counts say where it stands.
        if position and not refused and not late and job.status is JobStatus.QUEUED and job.batch_id is None:
            try:
                job = job.model_copy(update={"queue_position": 1 + self.jobs.queued_ahead(job)})
            except StoreUnavailable:
                logger.warning("queue position unavailable", extra={"job_id": job.id})
        # (late, an S3-held result is a link to it: no read)
        return Polled(
            self.offload.link_result(job) if late else self.offload.load_result(job), wait_refused=refused
        )

    def has_ended(self, tenant: TenantIdentity, job_id: str) -> bool:
        """Whether the tenant's job has ended: its item alone, never its S3-held result."""
        return self.jobs.get(job_id, tenant.tenant_id).status.is_terminal

    def output_events(self, tenant: TenantIdentity, job_id: str, seen: int, wait_seconds: float = 0) -> str:
        """GET /v1/jobs/{id}/events: a long poll answered as server-sent events.

        A response opens with the job's status unless it resumes after a delta (`seen`, from
        Last-Event-ID or ?after=); then come the deltas after `seen`, a `status` event when the
        status changes, and, once the job has ended and every delta is out, its terminal
        status and `done` with the terminal Job. It answers as soon as it has something new,
        or when `wait_seconds` ran out, and ends with a `retry:` hint. While it waits it reads
        only the job's head (`JobStore.output_head`) and holds one of the tenant's long-poll
        places, as `?wait` does; with none free it answers at once, its retry hint the
        long-poll Retry-After (a 429 would end an EventSource for good).
        """
        streaming = self.config.streaming
        # From the request's start, as `long_poll`'s: the reads and the place taken before the
        # wait come out of the budget the handler gave it, so a slow store never makes the
        # answer outlive API Gateway's timeout.
        deadline = time.monotonic() + wait_seconds
        job = self.jobs.get(job_id, tenant.tenant_id)
        if job.status.is_terminal:
            # The end is told after the last delta, whenever the client comes.
            return self._events_now(job, seen, [], ended=True)
        opening = [] if seen > 0 else [status_event(job.status)]
        if wait_seconds <= 0:
            return self._events_now(job, seen, opening)
        try:
            place = self._take_place(tenant, wait_seconds, deadline) if time.monotonic() < deadline else None
        except StoreUnavailable:
            # (a reconnect a retry hint later, as with the places all taken)
            logger.warning("long-poll place unavailable: answering without a wait")
            place = None
        if place is None and time.monotonic() >= deadline:
            # Its first read (or the place's writes) took the wait's time: what is written is
            # served as without a wait (review 265: not a hint alone, at every reconnect while
            # the store is slow), and once late the reconnect reads on, a retry hint away
            # (hunt 289: the place taken late answered past API Gateway).
            if not _late(deadline):
                return self._events_now(job, seen, opening)
            return "".join(opening) + retry_hint(streaming.retry_ms)
        if place is None:
            later = self.config.fair_share.long_poll_retry_after_seconds * 1000
            return self._events_now(job, seen, opening, retry_ms=later)
        status, last = job.status, job.stream_seq or 0
        # Through here nothing can be served (gone past its TTL, or an abandoned attempt's rest):
        # gone stays gone, so a wait reads only what is written after it.
        read_from = seen
        try:
            while True:
                if last > read_from:
                    deltas = self._unread_deltas(job, read_from, last)
                    if deltas:
                        hint = retry_hint(streaming.retry_ms)
                        return paged_events("".join(opening), deltas, hint, hint)
                    read_from = last
                if status.is_terminal or time.monotonic() >= deadline:
                    break
                self._sleep(min(streaming.poll_interval_ms / 1000, max(0.0, deadline - time.monotonic())))
                head = self.jobs.output_head(job.id)
                if head is None:
                    break
                if head.status is not status and not head.status.is_terminal:
                    # The end is told after the last deltas, with `done`.
                    opening.append(status_event(head.status))
                    return "".join(opening) + retry_hint(streaming.retry_ms)
                status, last = head.status, head.stream_seq
                if _late(deadline):
                    # What the head found is the reconnect's to read, a retry hint away: a
                    # wait past its deadline makes no more calls (hunt 267: the job's read, its
                    # chunks' and its S3-held result's, throttled, took the answer past API
                    # Gateway's timeout, a 504 that ends an EventSource for good).
                    break
        finally:
            self._give_back(tenant, place, deadline)
        if status.is_terminal and not _late(deadline):
            return self._events_now(self.jobs.get(job_id, tenant.tenant_id), seen, opening, ended=True)
        return "".join(opening) + retry_hint(streaming.retry_ms)

    def _events_now(
        self,
        job: JobRecord,
        seen: int,
        opening: list[str],
        *,
        ended: bool = False,
        retry_ms: int | None = None,
    ) -> str:
        """The events a job has for the client now: its unread deltas (a page of them); once
        it has ended and nothing is left unread, the end of its output no chunk holds (from
        its result), its terminal status if it ended during this response (`ended`), and
        `done` with the Job."""
        streaming = self.config.streaming
        hint = retry_hint(streaming.retry_ms if retry_ms is None else retry_ms)
        last = job.stream_seq or 0
        opened = "".join(opening)
        deltas: list[OutputDelta] = []
        whole = False
        if not job.status.is_terminal:
            return paged_events(
                opened, self._unread_deltas(job, seen, last) if last > seen else [], hint, hint
            )
        if last > seen:
            # (one page: whether the client's next chunk is there is all that decides)
            page_end = min(last, seen + streaming.max_deltas_per_response)
            deltas = self.jobs.read_output(job, seen + 1, page_end, limit=streaming.max_deltas_per_response)
            if not deltas or deltas[0].seq > seen + 1:
                # Output the client has not read is past its TTL: the result holds it all,
                # served whole as a reset (the chunks left may hold only its end).
                deltas, whole = [], True
            elif deltas[-1].seq < last:
                # More to read, or a read AWS left unfinished: the next request reads on.
                return paged_events(opened, deltas, hint, hint)
        expired = False
        if job.stream and job.status is JobStatus.SUCCEEDED:
            try:
                loaded = self.offload.load_result(job)
            except JobResultExpired:
                # (its text read as deltas, if the client read them in time: the stream ends,
                # with no link to what is gone: review 283)
                loaded, expired = job, True
            if loaded.result is not None:
                deltas += result_deltas(job, loaded.result.output, seen, whole=whole)
            if len(deltas) > streaming.max_deltas_per_response:
                return paged_events(opened, deltas[: streaming.max_deltas_per_response], hint, hint)
        # A result held in S3 goes as its presigned URL: the deltas carried its text already,
        # and the event must fit in the Lambda's response. A page too large for it ends early,
        # before the end, which the client's next request reads.
        linked = job if expired else self.offload.link_result(job)
        end = (status_event(job.status) if ended else "") + done_event(linked.to_job())
        return paged_events(opened, deltas, end, hint)

    def _unread_deltas(self, job: JobRecord, seen: int, last: int) -> list[OutputDelta]:
        """A running job's deltas after `seen`, a page at most.

        Chunks past their TTL are not served, nor the rest of an attempt whose first chunks
        are: an attempt ends long before its first chunk expires (the TTL is longer than a
        worker's timeout), so that attempt was abandoned, its retry's reset drops its text
        anyway, and served alone its rest would read as the beginning of the output. So a
        client whose next chunk is gone reads on at the latest attempt's first chunk
        (`JobRecord.stream_from`), when that is still there and unread, without reading the
        gone ones in between. A throttled read that read nothing raises StoreUnavailable."""
        limit = self.config.streaming.max_deltas_per_response
        start = job.stream_from
        # Behind the latest attempt: one key says whether the client's next chunk is there.
        if (
            start is not None
            and seen + 1 < start
            and not self.jobs.read_output(job, seen + 1, seen + 1, limit=1)
        ):
            opening = self.jobs.read_output(job, start, last, limit=limit)
            return opening if opening and opening[0].seq == start else []
        deltas = self.jobs.read_output(job, seen + 1, min(last, seen + limit), limit=limit)
        if not deltas or deltas[0].seq == seen + 1:
            return deltas
        if start is not None:
            # Inside the latest attempt, whose next chunk is gone: it was abandoned.
            return []
        # (a job whose chunks were written before `stream_from` was kept: the rest of the page
        # from the first attempt's first chunk left, and on, page by page)
        while True:
            first_kept = next((index for index, delta in enumerate(deltas) if delta.reset), None)
            if first_kept is not None:
                return deltas[first_kept:]
            if deltas[-1].seq >= last:
                return []
            deltas = self.jobs.read_output(job, deltas[-1].seq + 1, last, limit=limit)
            if not deltas:
                return []

    def _take_place(self, tenant: TenantIdentity, seconds: float, deadline: float) -> str | None:
        """A long-poll place, or None when the tenant's are all taken (a refusal, counted);
        StoreUnavailable when the place's write failed, which is no refusal."""
        if self.polls is None:
            return ""
        place = self.polls.enter(tenant.tenant_id, self.config.long_poll_cap(tenant.tier), seconds, deadline)
        if place is None and time.monotonic() < deadline:
            logger.info(
                "long-polls all taken: answering without a wait", extra={"tenant_id": tenant.tenant_id}
            )
            emit_count(MetricName.LONG_POLL_REFUSED)
        return place

    def _give_back(self, tenant: TenantIdentity, place: str, deadline: float) -> None:
        """The wait's place given back; not when the wait is answering late (`_late`): the
        place lapses by itself moments after (llmq.long_polls), and the answer is due now."""
        if self.polls is None or not place:
            return
        if _late(deadline):
            logger.info("long-poll place left to lapse: the answer is late")
            return
        try:
            self.polls.leave(tenant.tenant_id, place)
        except (StoreUnavailable, ClientError) as exc:
            # The place lapses by itself after its wait (llmq.long_polls); the wait is over
            # and its answer is due, so a failure here must not turn it into an error.
            logger.warning("long-poll place not given back", extra={"why": type(exc).__name__})

    def list(
        self, tenant: TenantIdentity, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        return self.jobs.list_for_tenant(tenant.tenant_id, status, limit, cursor)

    def cancel(self, tenant: TenantIdentity, job_id: str) -> JobRecord:
        job, ended_here = self._cancel(job_id, tenant.tenant_id)
        if ended_here:
            self._announce_ended(job)
        return job

    def _announce_ended(self, job: JobRecord) -> None:
        """The event of a job this request ended. If SQS will not take it, its delivery stays
        pending and the reconciler sends it: answering an error here would make the client's
        retry a 409 for a job that ended."""
        count_outcome(job.status, job.lane, job.error.code if job.error else None)
        try:
            announce_terminal(self.queues, job, carry=self.config.webhooks.trust_carried_job)
        except Exception as exc:
            logger.warning("cancel webhook enqueue failed", extra={"job_id": job.id, **error_fields(exc)})
        # A batch's item ended alone may have been its batch's last: a worker looks.
        item_ended(None, self.queues, job)

    def _cancel(self, job_id: str, tenant_id: str) -> tuple[JobRecord, bool]:
        """Queued: canceled at once. Running: cancel_requested, the worker stops it. Ended
        otherwise before the request (succeeded, failed, expired): 409. With whether this
        request's own write ended the job (its event is then this request's to send).

        A job found canceled is answered as canceled (200), not 409, whoever canceled it: the
        outcome asked for. A client's retry of a cancel whose answer it never had (a lost
        answer and a throttled look, a gateway timeout, a dropped connection) meets the job
        it canceled itself, and a 409 "already finished" would tell it the job ran (hunt 322);
        a flag's write applied with its answer lost, which the worker obeyed before this
        request's retried write, is the same. What ended the job sent its event. One token
        for the whole request tells its own write from another's.

        A write DynamoDB did not answer (every try's answer lost, or throttled) may have been
        applied: the next look tells, by this request's token or the flag, before the request
        answers 503. (Answered 503 at once, the client's retry met a job it had canceled
        itself as one "already finished", a 409, and the job's event waited for the
        reconciler's look at its unsent webhook.)
        """
        token = write_token("cancel")
        unanswered: StoreUnavailable | None = None
        for _ in range(3):
            job = self.jobs.get(job_id, tenant_id)
            if job.status is JobStatus.CANCELED:
                return job, job.last_write == token
            if job.status.is_terminal:
                raise JobNotCancelable(f"job {job_id} is {job.status.value}")
            if unanswered is not None:
                # The look after a write left unanswered: its flag there, it was applied (or
                # another cancel's was: asked either way); else it is a 503 to retry, without
                # a try more of a write DynamoDB is refusing.
                if job.cancel_requested:
                    return job, False
                raise unanswered
            try:
                done = self._cancel_once(job, token)
            except StoreContended:
                raise  # (a transaction refused, never applied)
            except StoreUnavailable as exc:
                unanswered = exc
                continue  # applied, perhaps: look again
            if done is not None:
                return done
        if unanswered is not None:
            raise unanswered
        # Moved at each try: ended meanwhile (a worker's write came first), it is answered as
        # ended; else contention to retry, not a 409 (a client does not retry "already finished"
        # for a job that has not ended; review 264: nor a 503 for one that has).
        job = self.jobs.get(job_id, tenant_id)
        if job.status is JobStatus.CANCELED:
            # (this request's, or another cancel's that came first: canceled as asked; review 265)
            return job, job.last_write == token
        if job.status.is_terminal:
            raise JobNotCancelable(f"job {job_id} is {job.status.value}")
        raise StoreContended(f"job {job_id} changed state at each try to cancel it; retry")

    def _cancel_once(self, job: JobRecord, token: str) -> tuple[JobRecord, bool] | None:
        """One write of `_cancel` for the job as read; None when the job moved on meanwhile."""
        if job.status is JobStatus.QUEUED and job.attempts:
            ended = self._cancel_requeued(job, token)
            # (None: it ended with what an earlier attempt paid for, or moved on)
            return (ended, ended.status.is_terminal) if ended is not None else None
        if job.status is JobStatus.QUEUED:
            canceled = self.jobs.cancel_queued(job, token)
            return (canceled, True) if canceled is not None else None  # (or it started meanwhile)
        flagged = self.jobs.request_cancel(job)
        return (flagged, False) if flagged is not None else None

    def _cancel_requeued(self, job: JobRecord, token: str) -> JobRecord | None:
        """A queued job that ran before (queued again after a failed attempt, a hand-back or a
        crash) may have a paid result an earlier attempt parked, which a look S3 could not
        answer left there (`Offload.record_parked`): it ends with that result instead, which
        the cancel then finds (409, as for any job that finished first). Nothing parked: it
        is canceled at once, as any queued job is. S3 unable to say now: the cancel is asked,
        not done, and whatever ends the job unrun (its next claim, the reconciler) looks
        again first: a message is sent for that claim now (its own may be hidden for a
        retry's backoff), and, should that send fail, by the reconciler's next run (the flag
        puts the job first in its sweep). None when the job moved on meanwhile."""
        try:
            recorded = self.offload.record_parked(self.jobs, job, ends=True)
        except StoreUnavailable:
            logger.warning(
                "parked result not looked for: S3 unavailable; cancel asked", extra={"job_id": job.id}
            )
            flagged = self.jobs.request_cancel(job, JobStatus.QUEUED)
            # (once: a cancel asked again finds the flag, and its message, there already)
            if flagged is not None and not job.cancel_requested:
                try:
                    self.queues.enqueue_job(job.id, job.lane, job.tenant_id, redrive_round=job.redrive_round)
                except Exception as exc:  # the flag holds: the reconciler's next run sends one
                    logger.warning(
                        "cancel asked; its claim's message waits for the reconciler",
                        extra={"job_id": job.id, **error_fields(exc)},
                    )
            return flagged
        if recorded is not None:
            self._announce_ended(recorded)
            return None
        return self.jobs.cancel_queued(job, token)

    def webhook_log(self, tenant: TenantIdentity, job_id: str) -> WebhookLog:
        """The job's webhook and its delivery log: one read, like any GET of the job."""
        log = self.jobs.get(job_id, tenant.tenant_id).webhook_log()
        if log is None:
            raise WebhookNotFound(f"job {job_id} was submitted without a webhook")
        return log

    def redeliver(self, tenant: TenantIdentity, job_id: str) -> JobRecord:
        """Queue the terminal event again; the dispatcher reuses the same webhook-id."""
        job = self.jobs.get(job_id, tenant.tenant_id)
        event = job.terminal_event
        if event is None:
            raise JobNotTerminal(f"job {job_id} is {job.status.value}")
        if not job.wants(event):
            raise NoWebhook(f"job {job_id} has no webhook subscribed to {event.value}")
        pending = self.jobs.mark_delivery_pending(job_id, tenant.tenant_id, read=job)
        try:
            self.queues.enqueue_webhook(
                job_id, event, tenant_id=tenant.tenant_id, delivery_round=pending.delivery_round
            )
        except StoreUnavailable as exc:
            # The new round is written, pending, and in the reconciler's sweep, whose look sends
            # its event: the redelivery is accepted, not a 503 whose retry starts another round
            # (hunt 289).
            logger.warning(
                "redelivery's event not sent; the reconciler sends it",
                extra={"job_id": job_id, **error_fields(exc)},
            )
        return pending


def _prompt_text(request: JobRequest) -> str:
    return "\n".join(message.content for message in request.chat_messages())
