"""Live output of `stream: true` jobs (docs/streaming.md).

The worker keeps a running job's output as it arrives, in *chunks*: one DynamoDB item per
write, numbered 1, 2, ... across the job's attempts (`seq`), each holding the text since the
one before. A chunk is written at most once per `streaming.partial_interval_ms`, in one
transaction with the job's progress (`stream_seq`, the token count, the start of the output),
conditional on the worker's lease and on no cancel: the write that keeps the output is also
the one that tells the worker its client canceled, at no extra read.

The API reads them back as server-sent events (`GET /v1/jobs/{id}/events`). A Python Lambda
answers with a buffered response, so each response is a long poll: it answers as soon as it
has something new (or at the end of its wait) and ends with a `retry:` hint; the client
reconnects with `Last-Event-ID`, the `seq` of the last delta it saw, and reads on from there.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from llmq.config import MAX_RESPONSE_BODY_BYTES, StreamingConfig, response_body_bytes
from llmq.job_record import JobRecord
from llmq.models import Job, JobOutputEvent, JobStatus, OutputDelta

CHUNK_PREFIX = "out#"
# A chunk holds at most this many characters, so that its item (4 bytes a character at most
# in UTF-8) stays small and one chunk always fits a job.output webhook's message; a longer
# stretch of output (a provider that does not stream answers all at once) is several chunks.
CHUNK_MAX_CHARS = 16_000
# A job.output webhook carries at most this much text, measured as ASCII-escaped JSON (12
# bytes for a character outside the BMP at worst), so its SQS message stays under 256 KB;
# the rest goes in the next one.
WEBHOOK_MAX_BYTES = 200_000
# Chunks read at once: a BatchGetItem's most keys.
OUTPUT_PAGE = 100


# The id of the `done` event. A client that reconnects with it has read the whole stream and
# is answered 204, which is how the SSE standard tells EventSource to stop reconnecting.
DONE_ID = "done"
_SEQ = re.compile(r"^[0-9]{1,18}$")


def chunk_pk(job: JobRecord, seq: int) -> str:
    """A chunk's key names the job's creation too: a job id derived from an Idempotency-Key
    comes back after the job's retention, and must not meet its predecessor's chunks."""
    return f"{CHUNK_PREFIX}{job.id}#{job.created_ms}#{seq}"


def printable(text: str) -> str:
    """The text as UTF-8 can hold it: a surrogate pair (a provider's `\\ud83d\\ude00` escapes,
    decoded apart) made one character, and a lone surrogate replaced by U+FFFD, since no
    store or queue takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


@dataclass(frozen=True)
class OutputChunk:
    """One output write: the chunk item and what the job's progress becomes with it."""

    seq: int
    delta: str
    attempt: int
    # The first chunk of an attempt after another attempt's: clients drop the earlier text.
    reset: bool
    # Streamed deltas of this attempt so far, its characters written so far (this chunk's
    # included), and the start of its output (for polls).
    tokens: int
    partial: str
    truncated: bool
    chars: int = 0
    # The first chunk its attempt writes (the job keeps its seq: `JobRecord.stream_from`).
    opens: bool = False

    def as_delta(self) -> OutputDelta:
        return OutputDelta(seq=self.seq, delta=self.delta, attempt=self.attempt, reset=self.reset)


@dataclass(frozen=True)
class OutputHead:
    """What a poll of a streaming job reads: whose it is, where it stands, how far its output is."""

    tenant_id: str
    status: JobStatus
    stream_seq: int
    expires_at: int


def _escaped_bytes(text: str) -> int:
    return len(json.dumps(text))


class OutputRecorder:
    """The worker's side of one attempt: the provider's deltas in, chunks out.

    Called with each delta as the provider streams it (`recorder(text)`); `next_chunk()` forms
    the next write from what arrived since the last, and a chunk whose write failed is sent
    again unchanged (same seq, same text) until it is known written: a write applied but
    unanswered is then recognised, never doubled.
    """

    def __init__(
        self,
        *,
        job_id: str,
        first_seq: int,
        attempt: int,
        reset: bool,
        config: StreamingConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self._config = config
        self._clock = clock
        self._seq = first_seq
        self._attempt = attempt
        self._reset = reset
        self._opens = True
        self._parts: list[str] = []
        self._start: list[str] = []
        self._start_chars = 0
        self._truncated = False
        self._tokens = 0
        self._chars = 0
        self._held = ""
        self.unwritten: OutputChunk | None = None
        self.arrived = asyncio.Event()
        # Set when the generation has ended: the writer stops after the write in flight.
        self.closed = asyncio.Event()
        self.last_write_at: float | None = None
        # Written chunks no job.output webhook has carried yet; the last event taken, and the
        # one given back to be sent again as it was.
        self._unsent: list[OutputChunk] = []
        self._taken: JobOutputEvent | None = None
        self._again: JobOutputEvent | None = None
        self._hook_sent_at: float | None = None

    def __call__(self, delta: str) -> None:
        if not delta:
            return
        self._tokens += 1
        # A surrogate pair split between two deltas is put back together before it is kept.
        delta, self._held = self._held + delta, ""
        if "\ud800" <= delta[-1] <= "\udbff":
            delta, self._held = delta[:-1], delta[-1]
        if not delta:
            return
        delta = printable(delta)
        self._parts.append(delta)
        room = self._config.partial_max_chars - self._start_chars
        if room > 0:
            self._start.append(delta[:room])
            self._start_chars += min(room, len(delta))
        if len(delta) > room:
            self._truncated = True
        self.arrived.set()

    def close(self) -> None:
        """The generation has ended: what is held back is kept, and the writer stops."""
        if self._held:
            held, self._held = self._held, ""
            self._parts.append(printable(held))
        self.closed.set()
        self.arrived.set()

    @property
    def seq(self) -> int:
        """The last chunk known written."""
        return self._seq

    def has_output(self) -> bool:
        return self.unwritten is not None or bool(self._parts)

    def next_chunk(self) -> OutputChunk | None:
        """The write to make now: the one that failed, or what arrived since the last."""
        if self.unwritten is not None:
            return self.unwritten
        if not self._parts:
            return None
        text = "".join(self._parts)
        delta, rest = text[:CHUNK_MAX_CHARS], text[CHUNK_MAX_CHARS:]
        self._parts = [rest] if rest else []
        self._chars += len(delta)
        self.unwritten = OutputChunk(
            seq=self._seq + 1,
            delta=delta,
            attempt=self._attempt,
            reset=self._reset,
            tokens=self._tokens,
            partial="".join(self._start),
            truncated=self._truncated,
            chars=self._chars,
            opens=self._opens,
        )
        return self.unwritten

    def drop_partial(self) -> None:
        """The job's item has no room for the start of the output: polls show none of it."""
        self._config = self._config.model_copy(update={"partial_max_chars": 0})
        self._start, self._start_chars, self._truncated = [], 0, True
        if self.unwritten is not None:
            self.unwritten = replace(self.unwritten, partial="", truncated=True)

    def written(self, chunk: OutputChunk) -> None:
        self.unwritten = None
        self._seq = chunk.seq
        self._reset = False
        self._opens = False
        self.last_write_at = self._clock()
        self._unsent.append(chunk)

    def take_webhook(self, *, final: bool = False) -> JobOutputEvent | None:
        """The job.output event to send now, if any, taken from what is unsent: at most one
        per interval (the rest of the output at once with `final`), holding the written chunks
        since the previous one, as many as fit one message. One given back goes first, as it
        was: SQS may have taken it, and a receiver can only tell it again by its id."""
        chunks = self._unsent
        if not chunks and self._again is None:
            return None
        interval = self._config.output_webhook_interval_ms / 1000
        if not final and self._hook_sent_at is not None and self._clock() - self._hook_sent_at < interval:
            return None
        self._hook_sent_at = self._clock()
        if self._again is not None:
            self._taken, self._again = self._again, None
            return self._taken
        taken, size = [chunks[0]], _escaped_bytes(chunks[0].delta)
        for chunk in chunks[1:]:
            size += _escaped_bytes(chunk.delta)
            if size > WEBHOOK_MAX_BYTES or chunk.reset:
                break
            taken.append(chunk)
        self._unsent = chunks[len(taken) :]
        self._taken = JobOutputEvent(
            id=self.job_id,
            seq_from=taken[0].seq,
            seq_to=taken[-1].seq,
            attempt=taken[0].attempt,
            reset=taken[0].reset,
            delta="".join(chunk.delta for chunk in taken),
        )
        return self._taken

    def give_back_webhook(self) -> None:
        """The last event taken may not have been sent: it is the next one taken, unchanged
        (same range, so the same webhook-id if SQS had it after all)."""
        self._again, self._taken = self._taken, None


# ---- server-sent events -------------------------------------------------------------------


# Characters a JSON string may hold raw that Python's `str.splitlines` (and readers built on
# it, httpx-sse before 0.4.2 among them) takes for a line end: escaped in an event's JSON, an
# output holding one stays one `data:` line for every reader.
_LINE_BREAKERS_ESCAPED = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse_event(event: str, data: str, event_id: str | None = None) -> str:
    """One event in the text/event-stream format (data is one line of JSON here)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.translate(_LINE_BREAKERS_ESCAPED).split("\n"))
    return "\n".join(lines) + "\n\n"


def status_event(status: JobStatus) -> str:
    return sse_event("status", json.dumps({"status": status.value}))


def delta_events(deltas: Iterable[OutputDelta]) -> str:
    return "".join(sse_event("output.delta", delta.model_dump_json(), str(delta.seq)) for delta in deltas)


def done_event(job: Job) -> str:
    # (every field, nulls too, as GET and the webhook show it: docs/streaming.md; hunt 290)
    return sse_event("done", job.model_dump_json(), DONE_ID)


def retry_hint(retry_ms: int) -> str:
    return f"retry: {retry_ms}\n\n"


def resume_point(last_event_id: str | None, after: int | None) -> int:
    """The seq the client has read: the later of `?after=` and `Last-Event-ID` (EventSource
    reconnects to the same URL, `?after=` included, with the id it read last). An id that is
    not a delta's reads as nothing read."""
    seen = max(0, after or 0)
    text = (last_event_id or "").strip()
    if _SEQ.match(text):
        seen = max(seen, int(text))
    return seen


def finished_reading(last_event_id: str | None) -> bool:
    """The client read `done`: nothing more will come."""
    return (last_event_id or "").strip() == DONE_ID


def _pieces(text: str) -> list[str]:
    return [text[start : start + CHUNK_MAX_CHARS] for start in range(0, len(text), CHUNK_MAX_CHARS)] or [""]


def tail_deltas(job: JobRecord, output: str) -> list[OutputDelta]:
    """The end of a succeeded job's output that no chunk holds (its last writes failed, or
    were cut short): served from its result, as the deltas after the last chunk, each at most
    a chunk's length (`CHUNK_MAX_CHARS`), so that a page of them fits a response as chunks do."""
    same_attempt = job.stream_attempt == job.attempts
    written = (job.stream_chars or 0) if same_attempt else 0
    # The chunks hold an earlier attempt's text: even an empty output (a retry that produced
    # nothing, say `content_filter`) comes as a reset, or the joined deltas would be that text.
    earlier = not same_attempt and (job.stream_seq or 0) > 0
    if written >= len(output) and not earlier:
        return []
    return [
        OutputDelta(
            seq=(job.stream_seq or 0) + 1 + n, delta=piece, attempt=job.attempts, reset=earlier and n == 0
        )
        for n, piece in enumerate(_pieces(output[written:]))
    ]


def result_deltas(job: JobRecord, output: str, seen: int, *, whole: bool) -> list[OutputDelta]:
    """What a succeeded job's result gives a client that has read up to `seen`, after the last
    chunk: the end no chunk holds (`tail_deltas`), or, when chunks it had not read are past
    their TTL (`whole`), the whole output as a reset. The whole output is numbered after the
    tail's pieces, a range of its own, so that a client resuming within either (a page too
    large for one response) reads on in the same one."""
    tail = tail_deltas(job, output)
    whole_from = (job.stream_seq or 0) + 1 + len(tail)
    if not whole and seen < whole_from:
        return [delta for delta in tail if delta.seq > seen]
    return [
        OutputDelta(seq=whole_from + n, delta=piece, attempt=job.attempts, reset=n == 0)
        for n, piece in enumerate(_pieces(output))
        if whole_from + n > seen
    ]


def paged_events(opening: str, deltas: Sequence[OutputDelta], end: str, hint: str) -> str:
    """`opening`, the deltas and `end`, when they fit a Lambda's response
    (`MAX_RESPONSE_BODY_BYTES`, as the runtime escapes it: a delta of emoji takes twelve bytes
    a character); else `opening`, as many deltas as fit (at least one) and `hint`: the client
    reads on after the last, as after any page."""
    room = MAX_RESPONSE_BODY_BYTES - response_body_bytes(opening + end)
    shown: list[str] = []
    for delta in deltas:
        event = delta_events([delta])
        size = response_body_bytes(event) - 2  # (the quotes around a JSON string)
        if size > room:
            return opening + "".join(shown or [event]) + hint
        shown.append(event)
        room -= size
    return opening + "".join(shown) + end
