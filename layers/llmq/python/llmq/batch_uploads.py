"""An uploaded batch file's validation: the worker streams it from S3 before any item is written.

The api answered 202 when the file existed and was small enough; what is in it is checked here,
line by line, by the same rules as an inline batch's items (`llmq.batch_items`):
- valid lines are stored in parts (`batches.part_key`), `upload_part_requests` lines each, so
  the expansion later reads one part at a time. After each part the batch records how far the
  file was read: a crash, a throttle or a Lambda running out of time resumes from there (the
  custom_ids already stored are read back from the parts, so a repeat is still found);
- the file is read as it was when the batch was made (S3 `If-Match` on its ETag): a file
  replaced since is refused, never half old and half new;
- a bad line ends the batch `failed` with the first `upload_errors_shown` bad lines, each
  naming its line and field, and no item is ever written;
- all valid: one transaction sets the count and admits the items as the tenant's active jobs
  (`BatchRepository.admit_upload`); over the quota, the batch fails `quota_exceeded`, and
  with more requests than the quota at all, `batch_exceeds_quota`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from llmq.batches import BatchRecord, BatchRepository, out_of_time, part_key, send_expand
from llmq.config import LlmqConfig
from llmq.errors import BatchExceedsQuota, DomainError, QuotaExceeded
from llmq.models import BatchItemRequest, BatchLineError, blank_line
from llmq.payloads import ObjectChanged
from llmq.ports import BlobStore, QueueStore
from llmq.request_rules import check_item
from llmq.telemetry import logger

# A raw line may be longer than the item it stores: `\uXXXX` escapes (Python's json.dumps
# writes every non-ASCII character so: six bytes for a two-byte character, twelve for a
# four-byte one) and whitespace. It is refused unparsed only past this multiple of
# `max_item_bytes`; the stored size is checked exactly after parsing, as an inline item's is.
_RAW_LINE_SLACK = 6


@dataclass(frozen=True)
class ScanOutcome:
    # Valid and admitted: its items are to be written.
    batch: BatchRecord | None = None
    # Refused: the batch fails with these.
    errors: list[BatchLineError] = field(default_factory=list)


_UTF8_BOM = b"\xef\xbb\xbf"


def split_lines(chunks: Iterable[bytes], limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, bytes consumed with its newline) for each line of a byte stream; the line is
    None when it runs past `limit` bytes, and is then skipped without being held in memory."""
    pending = bytearray()
    too_long = False
    skipped = 0
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if too_long:
                skipped += len(piece)
            else:
                pending += piece
                if len(pending) > limit:
                    too_long, skipped = True, len(pending)
                    pending.clear()
            if end < 0:
                break
            if too_long:
                yield None, skipped + 1
            else:
                yield bytes(pending), len(pending) + 1
                pending.clear()
            too_long, skipped = False, 0
            start = end + 1
    if too_long:
        yield None, skipped
    elif pending:
        yield bytes(pending), len(pending)


class UploadScanner:
    def __init__(
        self, batches: BatchRepository, queues: QueueStore, payloads: BlobStore, config: LlmqConfig
    ) -> None:
        self.batches = batches
        self.queues = queues
        self.payloads = payloads
        self.config = config

    def scan(self, batch: BatchRecord, remaining_seconds: Callable[[], float]) -> ScanOutcome:
        """Validate the file from the batch's checkpoint on. An empty outcome: handed on to a
        new message (time ran short), or another run of this validation moved on first."""
        if batch.upload_ref is None or batch.upload_etag is None:
            return ScanOutcome(errors=[BatchLineError(line=0, code="invalid_request", message="no upload")])
        settings = self.config.batches
        parts = list(batch.parts or [])
        seen = self._seen(batch)
        count = parts[-1] if parts else 0
        line, consumed = batch.scan_lines, batch.scan_bytes
        errors: list[BatchLineError] = []
        held: list[bytes] = []
        held_bytes = 0
        slowest = 0.0

        def refuse(code: str, message: str) -> None:
            errors.append(BatchLineError(line=line, code=code, message=message))

        chunks = self.payloads.stream(batch.upload_ref, consumed, batch.upload_etag)
        raw_limit = settings.max_item_bytes * _RAW_LINE_SLACK
        try:
            # (read with room for what a line's limit does not count: a CRLF ending's `\r`, and
            # the first line's byte order mark; hunt 336 saw a line at the limit refused only
            # when the file was saved with CRLF endings)
            for raw, size in split_lines(chunks, raw_limit + len(b"\r") + len(_UTF8_BOM)):
                line += 1
                consumed += size
                if line == 1 and raw is not None and raw.startswith(_UTF8_BOM):
                    raw = raw[len(_UTF8_BOM) :]  # (as Windows tools save UTF-8: not JSON, not data)
                if raw is not None and len(raw.removesuffix(b"\r")) > raw_limit:
                    raw = None
                if consumed > settings.max_upload_bytes:
                    refuse("payload_too_large", f"the file runs past {settings.max_upload_bytes} bytes")
                    break
                if raw is None:
                    refuse(
                        "payload_too_large",
                        f"line {line}: over a batch item's {settings.max_item_bytes} bytes",
                    )
                elif not blank_line(raw):
                    count += 1
                    if count > settings.max_upload_requests:
                        refuse("invalid_request", f"more than {settings.max_upload_requests} requests")
                        break
                    stored = self._check(raw, line, seen, refuse)
                    if stored is not None and not errors:
                        held.append(stored)
                        held_bytes += len(stored) + 1
                if len(errors) >= settings.upload_errors_shown:
                    break
                if errors or (
                    len(held) < settings.upload_part_requests and held_bytes < settings.upload_part_bytes
                ):
                    continue
                began = time.monotonic()
                moved = self._store_part(batch, parts, held, count, consumed, line)
                if moved is None:
                    return ScanOutcome()
                batch, held, held_bytes = moved, [], 0
                slowest = max(slowest, time.monotonic() - began)
                if out_of_time(remaining_seconds(), slowest):
                    send_expand(self.queues, batch)
                    logger.info(
                        "batch upload validation continues", extra={"batch_id": batch.id, "lines": line}
                    )
                    return ScanOutcome()
        except ObjectChanged:
            return ScanOutcome(
                errors=[
                    BatchLineError(
                        line=0,
                        code="upload_changed",
                        message="the upload was replaced or deleted after the batch was created",
                    )
                ]
            )
        if errors:
            return ScanOutcome(errors=errors)
        if count == 0:
            return ScanOutcome(
                errors=[BatchLineError(line=0, code="invalid_request", message="the file holds no requests")]
            )
        if held:
            moved = self._store_part(batch, parts, held, count, consumed, line)
            if moved is None:
                return ScanOutcome()
            batch = moved
        tier = batch.tier or ""
        try:
            admitted = self.batches.admit_upload(
                batch,
                count,
                parts,
                self.config.concurrency_caps(tier, batch.lane),
                self.config.tenant_limits(tier).max_active_jobs,
            )
        except (QuotaExceeded, BatchExceedsQuota) as exc:
            return ScanOutcome(errors=[BatchLineError(line=0, code=exc.code, message=exc.detail)])
        if admitted is not None:
            logger.info("batch upload validated", extra={"batch_id": batch.id, "items": count})
        return ScanOutcome(batch=admitted)

    def _check(
        self, raw: bytes, line: int, seen: dict[str, str], refuse: Callable[[str, str], None]
    ) -> bytes | None:
        where = f"line {line}"
        try:
            # The domain's model, then the deployment's rules: a line's error carries the code
            # a job's submit would get (unknown_model, prompt_too_large, ...).
            item = BatchItemRequest.model_validate_json(raw)
            return check_item(self.config, where, item, seen)
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            place = ".".join(str(part) for part in first["loc"])
            refuse("invalid_request", f"{where}: {place + ': ' if place else ''}{first['msg']}")
        except DomainError as exc:
            refuse(exc.code, exc.detail)
        return None

    def _store_part(
        self, batch: BatchRecord, parts: list[int], held: list[bytes], count: int, consumed: int, line: int
    ) -> BatchRecord | None:
        """Store the held lines as the next part, then move the checkpoint past them (the part
        is named by its number: a second run writing it writes the same lines)."""
        self.payloads.put(part_key(batch.requests_ref, len(parts)), b"\n".join(held) + b"\n")
        parts.append(count)
        return self.batches.checkpoint_scan(batch, parts, consumed, line)

    def _seen(self, batch: BatchRecord) -> dict[str, str]:
        """The custom_ids the stored parts hold (a resumed validation still finds a repeat)."""
        seen: dict[str, str] = {}
        for part in range(len(batch.parts or [])):
            for stored in self.payloads.get(part_key(batch.requests_ref, part)).splitlines():
                if stored.strip():
                    seen.setdefault(json.loads(stored)["custom_id"], "an earlier line")
        return seen
