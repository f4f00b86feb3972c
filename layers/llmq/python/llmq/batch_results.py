"""A batch's results: one line per item (GET /v1/batches/{id}/results reads them page by page),
and, once every item has ended, the whole file, written by the worker before the batch's
terminal status (`Batch.results_file_url`).

The file is an S3 multipart upload, `results_part_bytes` a part. Its progress (the next item,
the parts' ETags) is checkpointed on the batch after each part, so a crash or a Lambda running
out of time resumes there: a part sent again replaces itself, and two runs at once race on the
checkpoint (only one moves it past). The batch stays `finalizing`, in the reconciler's sweep
index, until the file is complete and the batch has ended.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from llmq.batch_requests import StoredRequests
from llmq.batches import BatchRecord, BatchRepository, item_job_id, out_of_time, send_expand
from llmq.config import LlmqConfig
from llmq.job_record import JobRecord
from llmq.models import BatchResultLine, ErrorCode, JobError, JobStatus
from llmq.payloads import UploadDone
from llmq.ports import BlobStore, QueueStore
from llmq.telemetry import logger

# Where a batch's results file is written (the worker's results/ prefix; the api presigns it).
RESULTS_FILE_PREFIX = "results/batches/"
# A result larger than this is linked from its line, never inlined.
RESULT_INLINE_BYTES = 256_000
# Items read per BatchGetItem while the file is written.
_READ_PAGE = 100
# Runs in a row that handed on with no part of the file written: after this many, no run has
# the time a part takes to read (`ResultsFileStalled`).
MAX_COMPILE_STALLS = 3


class ResultsFileStalled(Exception):
    """The results file cannot be written: `MAX_COMPILE_STALLS` runs in a row ran out of time
    before a part was whole. Handed on again, each run would read the same items again, for
    ever (hunt 264), with the batch `finalizing` and its webhook unsent."""

    def __init__(self, batch: BatchRecord) -> None:
        super().__init__(f"batch {batch.id}: its results file stalled {batch.compile_stalls} times")
        self.batch = batch


def results_file_key(batch: BatchRecord) -> str:
    """Where the batch's file is written: under its creation time too, since a batch id made
    from an Idempotency-Key is made again once its retention is over, while S3 keeps the
    earlier batch's file a while longer (hunt 264: a new batch whose upload was aborted took
    the file found there for its own, and ended with the earlier batch's lines)."""
    return f"{RESULTS_FILE_PREFIX}{batch.id}/{batch.created_ms}/results.jsonl"


def result_line(
    batch: BatchRecord, index: int, job: JobRecord | None, names: dict[int, str], api_base: str
) -> BatchResultLine:
    """Item `index`'s line. A result too large to inline, or held in S3, is its job's URL to GET
    (relative, `/v1/jobs/{id}`, where no API base is known: in the results file)."""
    if job is None and index < batch.expanded:
        # Written, and gone since: DynamoDB's TTL deleted an item that ended well before its
        # batch, which came late to its end (hunt 282: its line read `queued`, and a client
        # would have submitted it again). Its outcome is in the batch's counts only.
        return BatchResultLine(
            custom_id=names.get(index, ""),
            job_id=item_job_id(batch.id, index),
            status=JobStatus.EXPIRED,
            error=JobError(
                code=ErrorCode.DEADLINE_EXCEEDED,
                message="The item ended, and its record passed its retention and was deleted "
                "before this line was written: its outcome is counted in the batch's counts only",
                retryable=False,
            ),
        )
    if job is None:
        # Not written yet: queued, or never to be if its batch was canceled first.
        never = batch.unexpanded_canceled > 0
        return BatchResultLine(
            custom_id=names.get(index, ""),
            job_id=item_job_id(batch.id, index),
            status=JobStatus.CANCELED if never else JobStatus.QUEUED,
        )
    shown = job.to_job(api_base=api_base)
    line = BatchResultLine(
        custom_id=job.custom_id or "",
        job_id=job.id,
        status=job.status,
        result=shown.result,
        result_url=shown.result_url,
        error=shown.error,
    )
    if shown.result is not None and len(shown.result.model_dump_json().encode()) > RESULT_INLINE_BYTES:
        # Too large for a page: its job's own URL, to GET.
        return line.model_copy(
            update={"result": None, "result_url": f"{api_base.rstrip('/')}/v1/jobs/{job.id}"}
        )
    return line


class ResultsCompiler:
    def __init__(
        self, batches: BatchRepository, queues: QueueStore, payloads: BlobStore, config: LlmqConfig
    ) -> None:
        self.batches = batches
        self.queues = queues
        self.payloads = payloads
        self.config = config

    def compile(self, batch: BatchRecord, remaining_seconds: Callable[[], float]) -> BatchRecord | None:
        """Write the file from the batch's checkpoint on. The batch with its file complete, or
        None: handed on to a new message (time ran short), or another run moved on first."""
        key = results_file_key(batch)
        if batch.compile_upload_id is None:
            upload_id = self.payloads.start_multipart(key)
            started = self.batches.start_compile(batch, upload_id)
            # Another run recorded its upload first: go on with the one it recorded.
            batch = started or self.batches.find(batch.id) or batch
            if batch.compile_upload_id is None:
                return None
        try:
            return self._write(batch, batch.compile_upload_id, remaining_seconds)
        except UploadDone:
            if self.payloads.stat(key) is not None:
                # Completed by a run that stopped before the batch's terminal write.
                return batch.model_copy(update={"results_key": key})
            # Aborted (S3's lifecycle rule ends an upload left incomplete for a day): begun again.
            logger.warning("batch results file begun again", extra={"batch_id": batch.id})
            if self.batches.restart_compile(batch) is not None:
                send_expand(self.queues, batch)
            return None

    def _write(
        self, batch: BatchRecord, upload_id: str, remaining_seconds: Callable[[], float]
    ) -> BatchRecord | None:
        key = results_file_key(batch)
        etags = list(batch.compile_parts)
        held: list[bytes] = []
        held_bytes = 0
        page_start = batch.compile_next
        # The slowest part so far, its reads included: the time the next one may take.
        slowest = 0.0
        part_began = time.monotonic()
        requests = StoredRequests(self.payloads, batch)
        progressed = False
        # (this run's name on the stall it may count: `note_compile_stall`)
        run = secrets.token_hex(6)
        while page_start < batch.total:
            if page_start > batch.compile_next and out_of_time(remaining_seconds(), slowest):
                # Out of time inside a part: the next run reads it again from the checkpoint.
                if not progressed:
                    stalled = self.batches.note_compile_stall(batch, run)
                    if stalled is not None and stalled.compile_stalls >= MAX_COMPILE_STALLS:
                        raise ResultsFileStalled(stalled)
                send_expand(self.queues, batch)
                return None
            page = self.batches.items(batch, page_start, _READ_PAGE)
            # Items never written (their batch canceled first) are named from its requests.
            names = {at: requests.item(at).custom_id for at, job in page if job is None}
            for at, job in page:
                line = self.line_bytes(batch, at, job, names)
                held.append(line)
                held_bytes += len(line) + 1
                following = at + 1
                if held_bytes < self.config.batches.results_part_bytes or following >= batch.total:
                    continue
                # A full part (never the last: S3 lets only the last be small).
                etags.append(
                    self.payloads.upload_part(key, upload_id, len(etags) + 1, b"\n".join(held) + b"\n")
                )
                moved = self.batches.checkpoint_compile(batch, following, etags)
                if moved is None:
                    return None
                batch, held, held_bytes, progressed = moved, [], 0, True
                slowest = max(slowest, time.monotonic() - part_began)
                part_began = time.monotonic()
                if out_of_time(remaining_seconds(), slowest):
                    send_expand(self.queues, batch)
                    logger.info(
                        "batch results file continues", extra={"batch_id": batch.id, "items": following}
                    )
                    return None
            page_start += _READ_PAGE
        if held:
            # The last part, which S3 lets be smaller than the minimum.
            etags.append(self.payloads.upload_part(key, upload_id, len(etags) + 1, b"\n".join(held) + b"\n"))
        self.payloads.complete_multipart(key, upload_id, etags)
        logger.info("batch results file written", extra={"batch_id": batch.id, "parts": len(etags)})
        return batch.model_copy(update={"results_key": key})

    @staticmethod
    def line_bytes(batch: BatchRecord, index: int, job: JobRecord | None, names: dict[int, str]) -> bytes:
        """Item `index`'s line in the file, as GET .../results answers it (without an API base)."""
        return result_line(batch, index, job, names, "").model_dump_json(exclude_none=True).encode()
