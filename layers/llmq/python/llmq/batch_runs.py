"""A batch's life after its accept: its items written (the expansion) and its end.

The expansion runs in the worker, for an "expand" message of the batch's lane:
- it reads the batch's requests from S3 and writes its items `expand_chunk` at a time, each
  chunk one transaction (the items' conditional puts and the checkpoint moved past them), then
  queues them with SendMessageBatch, ten to a call;
- a crash, a timeout or a throttle leaves the checkpoint where the last transaction put it. The
  message comes back (SQS's own retry, or the copy this worker sends before its time runs
  out), and the next run first queues the last chunk again, since the crash may have come
  between its write and its sends: a duplicate message is harmless, its claim is conditional;
- an item is never written twice (a chunk's transaction is conditional on the checkpoint) and
  never overwrites a job (each put is conditional on the item being absent). Two runs at once
  (a duplicate message) race on the checkpoint, and only one writes each chunk.

The batch ends when every item has: the worker that writes an item's terminal state looks at
the batch's counts (one BatchGetItem) and, when none is left, makes the batch's one terminal
write and queues its webhook. The API's GET of the batch does the same, should that worker
have crashed in between.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable

from llmq.batch_requests import StoredRequests, request_lines
from llmq.batch_results import ResultsCompiler, ResultsFileStalled
from llmq.batch_uploads import UploadScanner
from llmq.batches import BatchRecord, BatchRepository, batch_of, item_job_id, out_of_time, send_expand
from llmq.config import MAX_EXPAND_CHUNK, LlmqConfig
from llmq.errors import StoreUnavailable
from llmq.job_codec import write_token
from llmq.job_record import JobInput, JobRecord
from llmq.models import (
    BatchItemRequest,
    BatchLineError,
    BatchRequestCounts,
    BatchStatus,
    DeliveryStatus,
    JobRequest,
    JobStatus,
)
from llmq.policy import MAX_DEAD_LETTER_REDRIVES
from llmq.ports import BlobStore, JobStore, QueueStore
from llmq.sqs_edge import PoisonMessage
from llmq.telemetry import MetricName, emit_job_metric, error_fields, logger


def request_hash(request: JobRequest) -> str:
    from llmq.intake import request_hash as job_request_hash

    return job_request_hash(request)


def item_record(
    batch: BatchRecord, index: int, item: BatchItemRequest, config: LlmqConfig, now_ms: int
) -> JobRecord:
    """Item `index` of the batch as the job it becomes: queued in the batch's lane, under the
    batch's deadline, with the batch's webhook only for the item events the batch asked for."""
    body = item.body
    return JobRecord(
        id=item_job_id(batch.id, index),
        tenant_id=batch.tenant_id,
        status=JobStatus.QUEUED,
        lane=batch.lane,
        model=body.model or config.provider.default_model,
        input=JobInput(messages=body.chat_messages(), params=body.params),
        request_hash=request_hash(body),
        metadata=body.metadata,
        created_ms=now_ms,
        deadline_ms=batch.deadline_ms,
        webhook_url=batch.webhook_url if batch.item_events else None,
        webhook_events=list(batch.item_events),
        expires_at=batch.expires_at,
        batch_id=batch.id,
        custom_id=item.custom_id,
        shared=True,
        last_write=write_token("expand"),
        ids_by_creation=True,
    )


def parse_requests(data: bytes) -> list[BatchItemRequest]:
    """The batch's stored requests, one JSON line each (validated when the batch was accepted)."""
    return [BatchItemRequest.model_validate_json(line) for line in request_lines(data)]


def encode_requests(items: list[BatchItemRequest]) -> bytes:
    lines = [
        json.dumps(item.model_dump(mode="json", exclude_none=True), ensure_ascii=False) for item in items
    ]
    return ("\n".join(lines) + "\n").encode()


def settle(batches: BatchRepository, queues: QueueStore, batch_id: str) -> BatchRecord | None:
    """End the batch if every item has: its terminal write, then its webhook queued. The batch
    as ended, or None when it has not (or another caller ended it first).

    Whoever ends the batch sends its webhook message. Should SQS refuse it (or the sender stop
    in between), a later caller sends it, once the sender has had WEBHOOK_SEND_GRACE_SECONDS:
    until then a caller hears StoreUnavailable with that Retry-After, so a worker's message
    comes back to look again rather than being acknowledged with the webhook unsent.
    """
    batch = batches.find(batch_id)
    if batch is None:
        return None
    if batch.status.is_terminal:
        if _webhook_unsent(batch):
            # From its end, or from the redelivery asked for since: its sender's grace.
            waited = batches.now_ms() - max(batch.finished_ms or 0, batch.redelivered_ms or 0)
            if waited < WEBHOOK_SEND_GRACE_SECONDS * 1000:
                raise StoreUnavailable(
                    f"batch {batch_id}: its webhook is being sent", retry_after=WEBHOOK_SEND_GRACE_SECONDS
                )
            _send_webhook(batches, queues, batch)
        return None
    if batch.status is BatchStatus.FINALIZING:
        # Its results file is being written, and its writer ends it. Unless the message that
        # asks for it was never sent (SQS refused it): sent here, once its sender had its grace.
        # Until then a caller hears StoreUnavailable with the grace left, so an item's message
        # comes back to look again rather than being acknowledged with nothing asked for.
        if not batch.compile_queued:
            left = RESULTS_ASK_GRACE_SECONDS - (batches.now_ms() - (batch.finalizing_ms or 0)) / 1000
            if left > 0:
                raise StoreUnavailable(
                    f"batch {batch_id}: its results file is being asked for", retry_after=math.ceil(left)
                )
            _ask_for_results_file(batches, queues, batch)
        return None
    counts = batches.ended(batch)
    if counts is None:
        return None
    if batches.config.batches.results_file and batch.total > 0:
        # The results file first (`llmq.batch_results`), by a worker, for the expand message
        # sent here.
        begun = batches.begin_finalizing(batch, counts)
        if begun is not None:
            _ask_for_results_file(batches, queues, begun)
            return None
        # Another caller began it, or this one did and its answer was lost (botocore's retry
        # then found it finalizing): whoever began it may not ask for the results file, so
        # this caller looks again once the asker's grace is over, as any caller would.
        found = batches.find(batch_id)
        if found is not None and found.status is BatchStatus.FINALIZING and not found.compile_queued:
            raise StoreUnavailable(
                f"batch {batch_id}: its results file is being asked for",
                retry_after=RESULTS_ASK_GRACE_SECONDS + 1,
            )
        return None
    done = batches.finish(batch, counts)
    if done is None:
        # Another caller ended it, or this one did and its answer was lost (botocore's retry
        # then found it ended): whoever ended it may not send its webhook, so this caller looks
        # again once the sender's grace is over, as any caller would.
        found = batches.find(batch_id)
        if found is not None and found.status.is_terminal and _webhook_unsent(found):
            raise StoreUnavailable(
                f"batch {batch_id}: its webhook is being sent", retry_after=WEBHOOK_SEND_GRACE_SECONDS + 1
            )
        return None
    logger.info("batch ended", extra={"batch_id": batch_id, "status": done.status.value})
    if _webhook_unsent(done):
        _send_webhook(batches, queues, done)
    return done


# How long the caller that ended a batch has to send its webhook message before another sends it.
WEBHOOK_SEND_GRACE_SECONDS = 15
# How long the caller that began a batch's finalizing has to ask for its results file (one
# SendMessage and one UpdateItem) before another asks.
RESULTS_ASK_GRACE_SECONDS = 5


def _ask_for_results_file(batches: BatchRepository, queues: QueueStore, batch: BatchRecord) -> None:
    """The message that has a worker write the results file. Refused, the caller's own message
    comes back once the grace is over, and this caller (or any) sends it then."""
    try:
        send_expand(queues, batch)
    except StoreUnavailable as exc:
        raise StoreUnavailable(str(exc), retry_after=RESULTS_ASK_GRACE_SECONDS + 1) from exc
    batches.mark_compile_queued(batch.id)


def _webhook_unsent(batch: BatchRecord) -> bool:
    return (
        batch.terminal_event is not None
        and batch.delivery_status is DeliveryStatus.PENDING
        and not batch.webhook_sent
    )


def _send_webhook(batches: BatchRepository, queues: QueueStore, batch: BatchRecord) -> None:
    event = batch.terminal_event
    if event is None:
        return
    queues.enqueue_webhook(batch.id, event, tenant_id=batch.tenant_id, delivery_round=batch.delivery_round)
    batches.mark_webhook_sent(batch.id, batch.delivery_round)


def item_ended(batches: BatchRepository | None, queues: QueueStore, job: JobRecord | None) -> None:
    """After any terminal write: a batch's item may have been its batch's last. Without
    `batches` (the reconciler, the dead-letter function) a worker is asked to look, by the
    batch's expand message, which ends a batch whose items are all written and ended. A
    failure here is logged, not raised: the batch then ends at its next item's end, or when
    its client reads it (`BatchIntake.get`)."""
    if job is None or job.batch_id is None or not job.status.is_terminal:
        return
    try:
        if batches is None:
            queues.enqueue_expand(job.batch_id, job.lane, job.tenant_id)
        else:
            settle(batches, queues, job.batch_id)
    except Exception as exc:
        logger.warning("batch end check failed", extra={"batch_id": job.batch_id, **error_fields(exc)})


class BatchExpander:
    def __init__(
        self,
        batches: BatchRepository,
        queues: QueueStore,
        payloads: BlobStore,
        config: LlmqConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.batches = batches
        self.queues = queues
        self.payloads = payloads
        self.config = config
        self._clock = clock
        self.scanner = UploadScanner(batches, queues, payloads, config)
        self.compiler = ResultsCompiler(batches, queues, payloads, config)

    def expand(self, batch_id: str, remaining_seconds: Callable[[], float]) -> None:
        """Write the batch's items from its checkpoint on, and queue them. Raises
        StoreUnavailable when AWS stays unavailable: the message comes back and resumes."""
        batch = self.batches.find(batch_id)
        if batch is None:
            return
        if batch.status is BatchStatus.FINALIZING:
            self._finalize(batch, remaining_seconds)
            return
        if batch.status.is_terminal or batch.expansion_over:
            # Asked to look after an item ended elsewhere (`item_ended`), or a duplicate; or
            # the expansion's own next message after the last chunk's sends failed (or its
            # worker stopped after the write): those items have no message yet.
            # (a batch of a version before queued_to: its last chunk, as many as any chunk
            # could hold, is sent again once, and marked queued)
            if not batch.status.is_terminal and (batch.queued_to is None or batch.queued_to < batch.expanded):
                # (only the last chunk can lack them: every run, this version's and earlier
                # ones, queues a chunk before it writes the next; earlier ones leave queued_to)
                self._queue(batch, unqueued_from(batch), batch.expanded)
                self.batches.mark_queued(batch.id, batch.expanded)
            settle(self.batches, self.queues, batch.id)
            return
        if batch.cancel_requested:
            self._stop(batch)
            return
        if not batch.validated:
            # An uploaded file: validated and admitted first, or the batch fails.
            scan = self.scanner.scan(batch, remaining_seconds)
            if scan.errors:
                self._fail(batch, scan.errors)
                return
            if scan.batch is None:
                return  # handed on to a new message, or another run got further
            batch = scan.batch
        requests = StoredRequests(self.payloads, batch)
        chunk = self.config.batches.expand_chunk
        # This run's name on the chunks it writes: refused by the checkpoint, it tells its own
        # write (whose answer was lost) from another run's, which goes on without it.
        writer = secrets.token_hex(6)
        # The last chunk written may have been written but not queued.
        if batch.expanded:
            self._queue(batch, unqueued_from(batch), batch.expanded)
        start = first = batch.expanded
        slowest = 0.0
        while start < batch.total:
            if start > first and out_of_time(remaining_seconds(), slowest):
                # The rest goes to a new message, so a large batch never spends its receives.
                send_expand(self.queues, batch)
                logger.info("batch expansion continues", extra={"batch_id": batch.id, "expanded": start})
                return
            end = min(batch.total, start + chunk)
            began = time.monotonic()
            now_ms = int(self._clock() * 1000)
            items = [
                item_record(batch, index, requests.item(index), self.config, now_ms)
                for index in range(start, end)
            ]
            if not self.batches.write_items(batch, start, items, writer):
                found = self.batches.find(batch.id)
                if found is None or found.status.is_terminal:
                    return
                if found.cancel_requested:
                    self._stop(found)
                    return
                if found.expanded == start:
                    # Applied on a try whose answer was lost? Then the checkpoint would have moved.
                    # Refused, then, by an item in the way: an earlier batch's under the same id
                    # (a reused key), still running. It ends with its lease, or is recovered:
                    # minutes, not the few seconds of a throttle (each look reads the batch and
                    # its requests and refuses a whole transaction).
                    raise StoreUnavailable(
                        f"batch {batch.id}: chunk at {start} refused, checkpoint unchanged",
                        retry_after=_blocked_chunk_wait(found, now_ms),
                    )
                if found.expand_writer is not None and found.expand_writer != writer:
                    # Written by another run of this expansion (a duplicate message, a look the
                    # reconciler or an item's end asked for), which queues each chunk before it
                    # writes the next and goes on with the rest: this run stops, or two runs
                    # would each send every later item again. Only that run's last chunk may
                    # still lack its messages (were it to stop now): queued here too.
                    self._queue(found, max(start, found.queued_to or start), found.expanded)
                    logger.info(
                        "batch expansion goes on in another run",
                        extra={"batch_id": batch.id, "expanded": found.expanded},
                    )
                    return
                # Written by this run, on a try whose answer was lost: queued now (again, if a
                # try did: a duplicate message is harmless), and on from there.
                self._queue(batch, start, found.expanded)
                batch, start = found, found.expanded
                continue
            self._queue(batch, start, end)
            slowest = max(slowest, time.monotonic() - began)
            start = end
        self.batches.mark_queued(batch.id, batch.total)
        logger.info("batch expanded", extra={"batch_id": batch.id, "items": batch.total})

    def _finalize(self, batch: BatchRecord, remaining_seconds: Callable[[], float]) -> None:
        """Every item has ended: the results file, then the batch's terminal write and webhook.
        A file no run has the time to write ends the batch without it, as a worker crashing on
        it every time does (`dead_lettered`): its results stay readable page by page."""
        try:
            written = self.compiler.compile(batch, remaining_seconds)
        except ResultsFileStalled as stalled:
            logger.error("a batch's results file ran out of time at every run", extra={"batch_id": batch.id})
            if stalled.batch.final_counts is None:
                return
            ended = self.batches.finish(
                stalled.batch, stalled.batch.final_counts, errors=stalled.batch.errors or _crashed()
            )
            if ended is not None and not _given_up(stalled.batch):
                # Its client has no results file: counted as a crash is (hunt 275: nothing
                # paged, and every large batch would meet the same worker timeout); once a
                # batch, whose earlier give-up counted already (review 272)
                emit_job_metric(MetricName.JOB_DEAD_LETTERED, 1, batch.lane)
            if ended is None:
                settle(self.batches, self.queues, batch.id)
            elif _webhook_unsent(ended):
                _send_webhook(self.batches, self.queues, ended)
            return
        if written is None or batch.final_counts is None:
            return
        ended = self.batches.finish(written, batch.final_counts, results_key=written.results_key)
        if ended is None:
            settle(self.batches, self.queues, batch.id)  # ended by another run: its webhook
            return
        logger.info("batch ended", extra={"batch_id": batch.id, "status": ended.status.value})
        if _webhook_unsent(ended):
            _send_webhook(self.batches, self.queues, ended)

    def _fail(self, batch: BatchRecord, errors: list[BatchLineError]) -> None:
        failed = self.batches.fail(batch, errors)
        if failed is None:
            current = self.batches.find(batch.id)
            if current is not None and current.cancel_requested and not current.status.is_terminal:
                self._stop(current)  # canceled meanwhile: it ends as asked, now
            else:
                settle(self.batches, self.queues, batch.id)  # ended meanwhile
            return
        logger.info("batch upload refused", extra={"batch_id": batch.id, "errors": len(errors)})
        if _webhook_unsent(failed):
            _send_webhook(self.batches, self.queues, failed)

    def _queue(self, batch: BatchRecord, start: int, end: int) -> None:
        ids = [item_job_id(batch.id, index) for index in range(start, end)]
        self.queues.enqueue_jobs(ids, batch.lane, batch.tenant_id)

    def _stop(self, batch: BatchRecord) -> None:
        stop(self.batches, self.queues, self.config, batch)


def ask_running_items_to_stop(batches: BatchRepository, jobs: JobStore, batch: BatchRecord) -> None:
    """A batch the client canceled: its items that hold a slot now are flagged, each as a job
    is, for its worker to stop. The cancel request does it; so does the reconciler's look at a
    canceling batch, should the request have been cut short after its flag (the items would
    otherwise run on, billed). Not a batch only llmq gave up on for crashing: its running items
    finish. An item that cannot be looked at does not keep the others from being asked; what
    AWS refused is raised once the others were."""
    if _given_up(batch) and not batch.client_canceled:
        return
    refused: StoreUnavailable | None = None
    for job_id in batches.running_items(batch):
        try:
            job = jobs.find(job_id)
            if (
                job is not None
                and job.status is JobStatus.RUNNING
                and not job.cancel_requested
                and batch_of(job_id)
            ):
                jobs.request_cancel(job)
        except StoreUnavailable as exc:
            refused = exc
        except Exception as exc:
            logger.warning("running item not asked to stop", extra={"job_id": job_id, **error_fields(exc)})
    if refused is not None:
        raise refused


def stop(batches: BatchRepository, queues: QueueStore, config: LlmqConfig, batch: BatchRecord) -> None:
    """A canceled batch writes no more items; those never written count as canceled. The last
    chunk written is queued again first (a crash may have come between its write and its
    sends), so its items end canceled at their claims rather than waiting."""
    if not batch.validated:
        # An upload canceled before its file was admitted: no item exists, none will.
        ended = batches.finish(batch, BatchRequestCounts(), "validated = :false")
        if ended is not None and _webhook_unsent(ended):
            _send_webhook(batches, queues, ended)
        else:
            settle(batches, queues, batch.id)
        return
    _write_no_more(batches, queues, config, batch)
    settle(batches, queues, batch.id)


def unqueued_from(batch: BatchRecord) -> int:
    """Where the items that may lack their lane messages begin: the last chunk written, by the
    checkpoint of what was queued (`queued_to`), never by the chunk size configured now (a
    deploy that lowered `batches.expand_chunk` meanwhile would leave items without a message,
    queued for good). Without a `queued_to` (a batch of an earlier version), as many as any
    chunk could have held, sent again (a duplicate message is harmless)."""
    return max(0, batch.queued_to or 0, batch.expanded - MAX_EXPAND_CHUNK)


def _write_no_more(
    batches: BatchRepository, queues: QueueStore, config: LlmqConfig, batch: BatchRecord
) -> None:
    """A canceling batch's last chunk written is queued again, and its items not written count
    as canceled (once)."""
    if batch.expanded:
        start = unqueued_from(batch)
        queues.enqueue_jobs(
            [item_job_id(batch.id, index) for index in range(start, batch.expanded)],
            batch.lane,
            batch.tenant_id,
        )
    if batch.unexpanded_canceled == 0 and not batch.expansion_over:
        batches.give_up_expansion(batch)


# Why a batch ended (or was canceled) by llmq: its expand message dead-lettered again after it
# was sent once more. Its `errors` say so, as a refused file's do.
BATCH_CRASHED = "batch_crashed"


def dead_lettered(
    batches: BatchRepository,
    queues: QueueStore,
    config: LlmqConfig,
    batch_id: str,
    message_id: str,
    redrive_round: int = 0,
) -> BatchRecord | None:
    """A batch's expand message exhausted its receives: a worker crashed on the batch, or
    timed out without an answer, every time. As a queued job's is, it is sent once more
    (`MAX_DEAD_LETTER_REDRIVES`); when that one dead-letters too, llmq gives up on what the
    message was for, and the batch's `errors` say so (`batch_crashed`):

    - an upload being validated fails (no item was written);
    - a batch whose every item has ended ends without its results file (its results stay
      readable page by page);
    - a batch still running is canceled: items not yet written never will be, queued ones end
      canceled at their claims, running ones finish.

    The count starts afresh at each step the batch gets past (a chunk, a part of its file or
    of its results file). A letter of a message sent in a round already answered
    (`redrive_round`, from its body: several expand messages of one batch can be in flight, a
    chunk's next, the reconciler's) is a copy and changes nothing. Past the give-up, a dead
    letter repeats it (a retry of one cut short
    finishes it); a few more, and the reconciler stops looking at the batch and the message
    stays in the DLQ for an operator (PoisonMessage). A batch is never retried for ever.
    """
    batch = batches.find(batch_id)
    if batch is None:
        raise PoisonMessage(f"no batch {batch_id}")
    if batch.status.is_terminal:
        if _webhook_unsent(batch):
            send_expand(queues, batch)  # a worker sends it
        return batch
    counted = batches.note_dead_letter(batch, message_id, redrive_round)
    if counted is None:
        logger.info(
            "batch dead letter not counted: the batch ended, or its round was answered already",
            extra={"batch_id": batch_id, "redrive_round": redrive_round},
        )
        return batches.find(batch_id)
    letters = len(counted.dead_letter_ids)
    if letters <= MAX_DEAD_LETTER_REDRIVES:
        send_expand(queues, counted)
        return counted
    crashed = _crashed()
    logger.error(
        "a batch crashed its workers at every try",
        extra={"batch_id": batch_id, "status": counted.status.value},
    )
    if not counted.validated:
        ended = batches.fail(counted, crashed)
    elif counted.status is BatchStatus.FINALIZING and counted.final_counts is not None:
        ended = batches.finish(counted, counted.final_counts, errors=counted.errors or crashed)
    elif letters > MAX_DEAD_LETTER_REDRIVES + _GIVE_UP_TRIES and _given_up(counted):
        # Canceled for this already, and its winding down crashes a worker too, again and again.
        batches.stop_sweeping(counted)
        raise PoisonMessage(f"batch {batch_id} keeps crashing its workers")
    else:
        # Every step again on a retry (each is idempotent): one cut short by a throttle or a
        # conflict is finished here, never left half done.
        flagged = batches.request_cancel(counted, counted.errors if _given_up(counted) else crashed)
        if flagged is not None:
            if not _given_up(counted):
                emit_job_metric(MetricName.JOB_DEAD_LETTERED, 1, counted.lane)  # (the first give-up)
            _write_no_more(batches, queues, config, flagged)
        # A worker ends it once its items have (this function reads no counts).
        send_expand(queues, counted)
        return batches.find(batch_id)
    if ended is not None:
        if not _given_up(counted):
            # Counted as a crash is, as the worker's own give-up counts it, once a batch (hunt
            # 305: the DeadLettered alarm the runbook names for `batch_crashed` stayed quiet)
            emit_job_metric(MetricName.JOB_DEAD_LETTERED, 1, counted.lane)
        if _webhook_unsent(ended):
            _send_webhook(batches, queues, ended)
    return ended or batches.find(batch_id)


def _crashed() -> list[BatchLineError]:
    """Why a batch ended (or was canceled) by llmq: its work crashed, or ran out of time, at
    every try."""
    return [
        BatchLineError(
            line=0,
            code=BATCH_CRASHED,
            message="the batch's worker crashed (or timed out) at every try; nothing more is tried",
        )
    ]


# Dead letters of a batch already canceled for crashing (a stale copy, a retry of the give-up
# cut short) that repeat the give-up before llmq stops looking at it.
_GIVE_UP_TRIES = 2
# How long an expansion whose chunk an item in the way refused waits before it looks again.
_BLOCKED_CHUNK_SECONDS = 60


def _blocked_chunk_wait(batch: BatchRecord, now_ms: int) -> int:
    """A minute, or less when the batch's deadline comes sooner (at least the few seconds a
    throttled expansion waits): its items run if the way clears before it."""
    if batch.deadline_ms is None or batch.deadline_ms <= now_ms:
        # (past it, the items expire at their claims: nothing is gained by looking every 2 s;
        # hunt 304)
        return _BLOCKED_CHUNK_SECONDS
    return max(2, min(_BLOCKED_CHUNK_SECONDS, (batch.deadline_ms - now_ms) // 2000))


def _given_up(batch: BatchRecord) -> bool:
    return any(error.code == BATCH_CRASHED for error in batch.errors or [])
