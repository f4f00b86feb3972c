"""A capped tenant's slot, handed on inside one worker invocation.

A lane message refused at its tenant's cap is re-sent with a delay (`shares.deferral_seconds`):
spread at random over the tenant's drain time, so that nothing spins. A slot that frees, though,
stays idle until one of those copies happens to come back. When the refused message's batch
also runs jobs of the same tenant in the same lane, there is a better moment to re-send it:
the instant one of them ends, since that end frees a slot of the cap. So the refused message
waits in the invocation (it stays in flight, as its batch does until every record ends) for
one of its siblings to end, and is then re-sent at once. Any worker claims it, with a whole
invocation's time for the generation: nothing runs longer than its batch already did.

At most one waits per sibling, each sibling's end wakes one (the slot it freed), and the
waiters a sibling's end leaves without one to wait for go on with the deferral they were
given. Jobs wait for jobs, and a batch's items for items (an item may be refused by the batch
cap, which a job's end does not free).

Everything here runs on one event loop (a batch's records are coroutines of one loop); the
groups are kept per loop, so two invocations on two loops never wake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

# (tenant id, lane, a batch's item?)
HandoffKey = tuple[str, str, bool]


@dataclass
class Sibling:
    """A record of the batch holding (or claiming) one of the tenant's slots."""

    freed: bool = False


@dataclass
class _Group:
    siblings: int = 0
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)


class SlotHandoff:
    def __init__(self) -> None:
        self._groups: dict[tuple[asyncio.AbstractEventLoop, HandoffKey], _Group] = {}

    @contextlib.contextmanager
    def holding(self, key: HandoffKey | None) -> Iterator[Sibling]:
        """Around a record's claim and run. Set `freed` when its job held a slot and gave it
        back: its end then wakes a waiter to take it."""
        sibling = Sibling()
        if key is None:
            yield sibling
            return
        group_key = (asyncio.get_running_loop(), key)
        group = self._groups.setdefault(group_key, _Group())
        group.siblings += 1
        try:
            yield sibling
        finally:
            group.siblings -= 1
            if sibling.freed:
                _wake(group, slot=True)
            # Waiters beyond the siblings left have none to wait for: they go on at once.
            while len(group.waiters) > group.siblings:
                _wake(group, slot=False)
            if not group.siblings and not group.waiters:
                self._groups.pop(group_key, None)

    @contextlib.contextmanager
    def waiting(self, key: HandoffKey) -> Iterator[Waiter | None]:
        """A place among `key`'s waiters, taken at once (None: every sibling has one already);
        given up on leaving, so that a slot freed later goes to a waiter still there."""
        loop = asyncio.get_running_loop()
        group = self._groups.get((loop, key))
        if group is None or len(group.waiters) >= group.siblings:
            yield None
            return
        waiter = Waiter(loop.create_future())
        group.waiters.append(waiter.future)
        try:
            yield waiter
        finally:
            with contextlib.suppress(ValueError):
                group.waiters.remove(waiter.future)
            if not group.siblings and not group.waiters:
                self._groups.pop((loop, key), None)

    async def wait(self, key: HandoffKey, timeout: float) -> bool:
        """Wait for a sibling's end: True when it freed a slot (re-send at once); False at once
        when there is no sibling left to wait for, or when none ended within `timeout` seconds."""
        with self.waiting(key) as waiter:
            return waiter is not None and await waiter.freed(timeout)


@dataclass(frozen=True)
class Waiter:
    future: asyncio.Future[bool]

    async def freed(self, timeout: float) -> bool:
        """True when a sibling's end handed this waiter its slot within `timeout` seconds; False
        when the last sibling ended without one for it, or none ended in time."""
        if timeout > 0 and not self.future.done():
            await asyncio.wait({self.future}, timeout=timeout)
        return self.future.done() and self.future.result()


def _wake(group: _Group, *, slot: bool) -> None:
    """The first waiter takes a freed slot; the last one, with none to wait for, goes first."""
    if group.waiters:
        group.waiters.pop(0 if slot else -1).set_result(slot)
