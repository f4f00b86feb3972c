"""The reads that follow a worker batch's claims, gathered into one BatchGetItem.

A claim is a transaction, which returns no item, so each claimed job is read once after it
(DESIGN §3.11): ten claims of one lane batch made ten GetItems. The claims of a batch run at
once, on the worker's threads. So a claimed job's read waits while other claims' calls are in
flight (never more than `max_wait_seconds`), and the reads waiting when the last of those calls
answers go as one request. A read asked for when no claim's call is in flight goes at once,
alone or with whatever else is waiting.

Correctness does not depend on the gathering: every read is a consistent read made after its
own claim answered, as before; only the number of requests changes. A failed request fails
each read it carried, each with an exception of its own.

Everything here is for threads: the repository's calls run on the worker's executor threads.
A read that waits holds its thread, and waits only for calls already running on other threads
(a claim pausing between its own retries is not in flight), so it never waits for work that
needs its thread. A claim's read is queued in the same step as its call is counted out, so
the last claim's answer never lets the others go without it.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from llmq.aws import BATCH_GET_KEYS

# BatchGetItem's limit of keys per request.
MAX_KEYS = BATCH_GET_KEYS


class _Read:
    __slots__ = ("done", "error", "item", "key", "taken")

    def __init__(self, key: str) -> None:
        self.key = key
        self.taken = False
        self.done = False
        self.item: dict[str, Any] | None = None
        self.error: BaseException | None = None


class GatheredClaim:
    """One claim's calls and then its read (`GatheredReads.claim`)."""

    def __init__(self, reads: GatheredReads, key: str) -> None:
        self._reads = reads
        self._key = key
        self._read: _Read | None = None

    @contextmanager
    def calling(self) -> Iterator[None]:
        """Around one call of the claim's write: reads asked for meanwhile wait for its answer.
        A call that returns applied the claim, and queues its read at once."""
        reads = self._reads
        with reads._changed:
            reads._in_flight += 1
        applied = False
        try:
            yield
            applied = True
        finally:
            with reads._changed:
                reads._in_flight -= 1
                if applied and self._read is None:
                    self._read = _Read(self._key)
                    reads._waiting.append(self._read)
                reads._changed.notify_all()

    def read(self) -> dict[str, Any] | None:
        """The claimed item, as a consistent read after the claim finds it (None: none)."""
        return self._reads._answer(self._read or self._reads._queue(self._key))


class GatheredReads:
    """Reads after claims, gathered with the other reads of claims in flight.

    `fetch(keys)` reads the items of up to MAX_KEYS distinct keys in one request, answering
    those it found (a missing key is absent from its answer), or raises for all of them.
    """

    def __init__(
        self,
        fetch: Callable[[list[str]], dict[str, dict[str, Any]]],
        *,
        max_wait_seconds: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        gather: bool = True,
    ) -> None:
        """`gather` False: each read alone, as before (the benchmark's baseline)."""
        self._fetch = fetch
        self._max_wait = max_wait_seconds
        self._clock = clock
        self._gather = gather
        self._changed = threading.Condition()
        self._in_flight = 0
        self._waiting: list[_Read] = []
        # Counts, for tests and the benchmark: requests made, reads they served.
        self.requests = 0
        self.reads = 0

    def claim(self, key: str) -> GatheredClaim:
        return GatheredClaim(self, key)

    def read(self, key: str) -> dict[str, Any] | None:
        """The item of `key` as a consistent read finds it now (None: no such item)."""
        return self._answer(self._queue(key))

    def _queue(self, key: str) -> _Read:
        read = _Read(key)
        with self._changed:
            self._waiting.append(read)
            self._changed.notify_all()
        return read

    def _answer(self, mine: _Read) -> dict[str, Any] | None:
        deadline = self._clock() + self._max_wait
        batch: list[_Read] = []
        with self._changed:
            if not self._gather and not mine.taken:
                self._waiting.remove(mine)
                mine.taken = True
                batch = [mine]
            while not mine.taken:
                left = deadline - self._clock()
                if self._in_flight == 0 or len(self._waiting) >= MAX_KEYS or left <= 0:
                    batch = self._take()
                    break
                self._changed.wait(timeout=left)
        if batch:
            self._run(batch)
        with self._changed:
            while not mine.done:
                self._changed.wait()
        if mine.error is not None:
            raise _own_copy(mine.error) from mine.error
        return mine.item

    def _take(self) -> list[_Read]:
        """The waiting reads, up to a request's worth (the caller holds the lock)."""
        batch, self._waiting = self._waiting[:MAX_KEYS], self._waiting[MAX_KEYS:]
        for read in batch:
            read.taken = True
        return batch

    def _run(self, batch: list[_Read]) -> None:
        keys = list(dict.fromkeys(read.key for read in batch))
        found: dict[str, dict[str, Any]] = {}
        # (interrupted by anything not an Exception: never "no such item" for reads not made)
        error: BaseException | None = RuntimeError("the gathered read was interrupted")
        try:
            found = self._fetch(keys)
            error = None
        except Exception as exc:  # handed to every read it carried, and raised there
            error = exc
        finally:
            with self._changed:
                self.requests += 1
                self.reads += len(batch)
                for read in batch:
                    read.item, read.error, read.done = found.get(read.key), error, True
                self._changed.notify_all()


def _own_copy(error: BaseException) -> BaseException:
    """An exception like `error` for one of the reads it failed: raising one object on several
    threads at once would weave their tracebacks into it."""
    try:
        response, operation = getattr(error, "response", None), getattr(error, "operation_name", None)
        if isinstance(response, dict) and isinstance(operation, str):
            # botocore's ClientError: its modeled class (ResourceNotFoundException...) kept,
            # which a copy would lose (its __reduce__ rebuilds the base class)
            clone = type(error)(response, operation)
        else:
            clone = copy.copy(error)
    except Exception:
        return RuntimeError(f"the gathered read failed: {type(error).__name__}: {error}")
    clone.__traceback__ = None
    return clone
