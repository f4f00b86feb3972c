"""A batch's stored requests, read back by item index: an inline batch's one JSON Lines object,
or an uploaded batch's validated parts (`batches.part_key`), one part held at a time."""

from __future__ import annotations

import bisect

from llmq.batches import BatchRecord, part_key
from llmq.models import BatchItemRequest, StoredBatchItem
from llmq.ports import BlobStore


def request_lines(data: bytes) -> list[bytes]:
    """The stored requests' lines, unparsed: each is parsed when its item is written, so a
    batch of 100,000 never holds 100,000 models at once."""
    return [line for line in data.splitlines() if line.strip()]


class StoredRequests:
    """A batch's stored requests by item index: an inline batch's one object, or an upload's
    parts, one part held at a time (a 100,000-line file is never read whole)."""

    def __init__(self, payloads: BlobStore, batch: BatchRecord) -> None:
        self._payloads = payloads
        self._batch = batch
        self._part = -1
        self._first = 0
        self._lines: list[bytes] = []

    def line(self, index: int) -> bytes:
        parts = self._batch.parts
        if parts is None:
            if self._part != 0:
                self._lines, self._part = request_lines(self._payloads.get(self._batch.requests_ref)), 0
            return self._lines[index]
        part = bisect.bisect_right(parts, index)
        if part != self._part:
            key = part_key(self._batch.requests_ref, part)
            self._lines, self._part = request_lines(self._payloads.get(key)), part
            self._first = parts[part - 1] if part else 0
        return self._lines[index - self._first]

    def item(self, index: int) -> BatchItemRequest:
        return StoredBatchItem.model_validate_json(self.line(index))
