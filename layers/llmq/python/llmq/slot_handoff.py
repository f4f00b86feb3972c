"""A capped tenant's slot, handed on inside one worker invocation.

A lane message refused at its tenant's cap is re-sent with a delay (`shares.deferral_seconds`):
spread at random over the tenant's drain time, so that nothing spins. A slot that frees, though,
stays idle until one of those copies happens to come back. When the refused message's batch
also runs jobs of the same tenant in the same lane, there is a better moment to re-send it:
the instant one of them ends, since that end frees a slot of the cap. So the refused message
waits in the invocation (it stays in flight, as its batch does until every record ends) for
one of its siblings to end, and is then re-sent at once. Any worker claims it, with a whole
invocation's time for the generation: nothing runs longer than its batch already did.

A sibling is a record of the batch whose claim took a slot. At most one message waits per
sibling, each sibling's end wakes one (with the slot it freed, if it did), and waiters that a
sibling's end leaves without one to wait for go on with the deferral they were given. Jobs
wait for jobs, and a batch's items for items (an item may be refused by the batch cap, which
a job's end does not free). A message refused before its batch's claims have answered finds
no sibling yet; it watches those claims, and waits for the first that takes a slot.

A tenant at its cap refuses every claim of the batch alike, and a refused claim is a write
DynamoDB charges for. So the batch's records of one key do not all claim at once: the first
one (the scout) claims, and the others wait for its answer. Refused at the cap, it speaks for
them: each is deferred from the share that refusal found, with no claim of its own, so a
flood's batch of ten costs one refused write instead of ten. Claimed, or answered any other
way, the others claim as before, all at once.

A claim looks at its own job, too: a deadline passed, a cancel, a retention due, a lapsed
lease to take over, a message with no job left. A record spoken for misses that look, so its
copy says so (`LaneMessage.spoken_for`), and its next receive claims for itself: every job is
looked at by a claim of its own at least every other receive (one whose copy SQS refused
is looked at at once, without a claim: `JobRunner._look_without_claiming`). What such a look
finds can therefore wait one deferral: a canceling batch's item, a lapsed lease to take over
(the reconciler's recovery bounds that one), a finished job's stray message. A batch's
queued item, which the reconciler does not sweep, thus meets its retention within two
deferrals (`reconciler.retention_margin_seconds` exceeds that: the config checks it).

Everything here runs on one event loop (a batch's records are coroutines of one loop); the
groups are kept per loop, so two invocations on two loops never wake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmq.policy import Claim

# (tenant id, lane, a batch's item?)
HandoffKey = tuple[str, str, bool]


@dataclass
class _Group:
    # Records of the batch whose claim has not answered yet, those holding one of the
    # tenant's slots, and messages waiting for these.
    claiming: int = 0
    siblings: int = 0
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)
    # Refused messages watching for a record still claiming to become a sibling (or leave).
    watchers: list[asyncio.Future[None]] = field(default_factory=list)
    # Slots siblings freed, and those of them no waiter took (a record refused after the
    # sibling ended, its claim having answered late, may take one: `Sibling.slot_freed_meanwhile`).
    frees: int = 0
    unspent: int = 0
    # The answer of the batch's first claim of the key: its refusal at the cap, or None (it
    # took a slot, or answered otherwise); unset until then (`Sibling.scout_refusal`).
    scout: asyncio.Future[Claim | None] | None = None

    def changed(self) -> None:
        """A record took a slot or left: watchers look again."""
        watchers, self.watchers = self.watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    def wake(self, *, slot: bool) -> None:
        """The first waiter takes a freed slot; the last one, with none to wait for, goes first.
        A freed slot no waiter takes is kept for a record still claiming."""
        if self.waiters:
            self.waiters.pop(0 if slot else -1).set_result(slot)
        elif slot:
            self.unspent += 1

    def release_extra_waiters(self) -> None:
        """Waiters beyond the siblings left have none to wait for: they go on at once."""
        while len(self.waiters) > self.siblings:
            self.wake(slot=False)


class Sibling:
    """A record of the batch: `answered` once its claim has, `freed` once its job gave back
    the slot the claim took."""

    def __init__(self, group: _Group | None) -> None:
        self._group = group
        self._claiming = group is not None
        self._holds = False
        self.freed = False
        self._frees_at_start = group.frees if group is not None else 0
        self._scouting = False
        if group is not None:
            group.claiming += 1

    async def scout_refusal(self, timeout: float, *, may_be_spoken_for: bool = True) -> Claim | None:
        """Before this record claims: the refusal at the cap of the batch's first claim of
        the key, which speaks for this record too (defer it from that share, unclaimed); None
        to claim. The first record of the key is the scout: None at once. The others wait for
        its answer, `timeout` seconds at most (then they claim), unless they may not be spoken
        for (a message spoken for last time: it claims at once). A slot a sibling freed since
        this record began voids the refusal."""
        group = self._group
        if group is None or not self._claiming:
            return None
        if group.scout is None:
            group.scout = asyncio.get_running_loop().create_future()
            self._scouting = True
            return None
        if not may_be_spoken_for:
            return None
        if not group.scout.done() and timeout > 0:
            await asyncio.wait({group.scout}, timeout=timeout)
        if not group.scout.done() or group.frees > self._frees_at_start:
            return None
        return group.scout.result()

    def slot_freed_meanwhile(self) -> bool:
        """True, once, when a sibling freed a slot that no waiter took since this record began
        its claim: refused, it would otherwise find that sibling gone and wait out a deferral
        while the slot stays free (its claim answered after the sibling's whole run)."""
        group = self._group
        if group is None or group.frees <= self._frees_at_start or group.unspent <= 0:
            return False
        group.unspent -= 1
        return True

    def answered(self, *, took_slot: bool, refused: Claim | None = None) -> None:
        """Its claim answered (`refused`: at the cap, with the share it found), or it was
        spoken for by the scout's refusal."""
        group = self._group
        if group is None or not self._claiming:
            return
        self._claiming = False
        group.claiming -= 1
        self._scouted(refused)
        if took_slot:
            self._holds = True
            group.siblings += 1
        group.changed()

    def _scouted(self, refused: Claim | None) -> None:
        group = self._group
        if self._scouting and group is not None and group.scout is not None and not group.scout.done():
            group.scout.set_result(refused)

    def _leave(self) -> None:
        group = self._group
        if group is None:
            return
        # (a scout whose claim raised speaks for no one: the others claim)
        self._scouted(None)
        if self._claiming:
            self._claiming = False
            group.claiming -= 1
        if self._holds:
            group.siblings -= 1
            if self.freed:
                group.frees += 1
                group.wake(slot=True)
        group.release_extra_waiters()
        group.changed()


@dataclass(frozen=True)
class Waiter:
    future: asyncio.Future[bool]

    async def freed(self, timeout: float) -> bool:
        """True when a sibling's end handed this waiter its slot within `timeout` seconds; False
        when the last sibling ended without one for it, or none ended in time."""
        if timeout > 0 and not self.future.done():
            await asyncio.wait({self.future}, timeout=timeout)
        return self.handed_a_slot()

    def handed_a_slot(self) -> bool:
        return self.future.done() and self.future.result()


class SlotHandoff:
    def __init__(self) -> None:
        self._groups: dict[tuple[asyncio.AbstractEventLoop, HandoffKey], _Group] = {}

    @contextlib.contextmanager
    def holding(self, key: HandoffKey | None) -> Iterator[Sibling]:
        """Around a record's claim and run (`key`: its tenant, lane and kind; None for none)."""
        if key is None:
            yield Sibling(None)
            return
        group_key = (asyncio.get_running_loop(), key)
        group = self._groups.setdefault(group_key, _Group())
        sibling = Sibling(group)
        try:
            yield sibling
        finally:
            sibling._leave()
            self._forget_if_idle(group_key, group)

    def siblings(self, key: HandoffKey) -> int:
        """This batch's records of `key` holding one of its tenant's slots now, or that may be:
        those whose claim has not answered yet count too (one applied may not have said so)."""
        group = self._groups.get((asyncio.get_running_loop(), key))
        return group.siblings + group.claiming if group is not None else 0

    @contextlib.asynccontextmanager
    async def waiting(self, key: HandoffKey, timeout: float = 0.0) -> AsyncIterator[Waiter | None]:
        """A place among `key`'s waiters (None: every sibling has one already, and no record
        of the batch is still claiming), given up on leaving, so that a slot freed later goes
        to a waiter still there. A record whose claim has not answered yet may become a
        sibling: its answer is awaited, `timeout` seconds at most."""
        loop = asyncio.get_running_loop()
        group_key = (loop, key)
        group = self._groups.get(group_key)
        deadline = loop.time() + timeout
        while group is not None and len(group.waiters) >= group.siblings and group.claiming:
            left = deadline - loop.time()
            if left <= 0:
                break
            watcher: asyncio.Future[None] = loop.create_future()
            group.watchers.append(watcher)
            await asyncio.wait({watcher}, timeout=left)
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
            # (a place freed: a record watching may take it)
            group.changed()
            self._forget_if_idle(group_key, group)

    async def wait(self, key: HandoffKey, timeout: float) -> bool:
        """Wait for a sibling's end: True when it freed a slot (re-send at once); False at once
        when there is no sibling left to wait for, or when none ended within `timeout` seconds."""
        start = asyncio.get_running_loop().time()
        async with self.waiting(key, timeout) as waiter:
            left = timeout - (asyncio.get_running_loop().time() - start)
            return waiter is not None and await waiter.freed(left)

    def _forget_if_idle(self, group_key: tuple[asyncio.AbstractEventLoop, HandoffKey], group: _Group) -> None:
        # (a record still claiming keeps the group: it may yet become a sibling; one whose
        # claim took no slot is nobody's concern any more)
        if not (group.claiming or group.siblings or group.waiters) and self._groups.get(group_key) is group:
            del self._groups[group_key]
