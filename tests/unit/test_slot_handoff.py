"""A refused message waits for its batch's own job of the tenant to end (llmq.slot_handoff)."""

from __future__ import annotations

import asyncio
import contextlib

from llmq.slot_handoff import HandoffKey, SlotHandoff

JOBS: HandoffKey = ("ten_a", "high", False)
ITEMS: HandoffKey = ("ten_a", "high", True)


async def _sibling(handoff: SlotHandoff, key: HandoffKey, ends: asyncio.Event, *, frees: bool) -> None:
    with handoff.holding(key) as sibling:
        sibling.answered(took_slot=True)
        await ends.wait()
        sibling.freed = frees


def test_a_waiter_takes_the_slot_its_sibling_frees() -> None:
    async def scenario() -> tuple[bool, bool]:
        handoff, ends = SlotHandoff(), asyncio.Event()
        running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=True))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(handoff.wait(JOBS, timeout=30))
        await asyncio.sleep(0)
        before = waiting.done()
        ends.set()
        await running
        return before, await waiting

    before, freed = asyncio.run(scenario())
    assert (before, freed) == (False, True)


def test_with_no_sibling_or_one_already_spoken_for_a_refused_message_goes_on_at_once() -> None:
    async def scenario() -> list[bool]:
        handoff, ends = SlotHandoff(), asyncio.Event()
        alone = await handoff.wait(JOBS, timeout=30)
        running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=True))
        await asyncio.sleep(0)
        first = asyncio.create_task(handoff.wait(JOBS, timeout=30))
        await asyncio.sleep(0)
        # a second waiter has no sibling of its own to wait for
        second = await handoff.wait(JOBS, timeout=30)
        ends.set()
        await running
        return [alone, second, await first]

    assert asyncio.run(scenario()) == [False, False, True]


def test_a_sibling_that_frees_no_slot_sends_its_waiter_on_with_its_deferral() -> None:
    async def scenario() -> bool:
        handoff, ends = SlotHandoff(), asyncio.Event()
        running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=False))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(handoff.wait(JOBS, timeout=30))
        await asyncio.sleep(0)
        ends.set()
        await running
        return await waiting

    assert asyncio.run(scenario()) is False


def test_two_siblings_ending_hand_one_slot_each_and_the_last_waiter_without_one_goes_on() -> None:
    async def scenario() -> list[bool]:
        handoff = SlotHandoff()
        ends = [asyncio.Event(), asyncio.Event()]
        running = [
            asyncio.create_task(_sibling(handoff, JOBS, end, frees=free))
            for end, free in zip(ends, (True, False), strict=True)
        ]
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(handoff.wait(JOBS, timeout=30)) for _ in range(2)]
        await asyncio.sleep(0)
        ends[0].set()
        await running[0]
        first = await waiting[0]
        second_still_waits = not waiting[1].done()
        ends[1].set()
        await running[1]
        return [first, second_still_waits, await waiting[1]]

    # the first end hands its slot to the first waiter; the second (no slot freed, no sibling
    # left) sends the other on
    assert asyncio.run(scenario()) == [True, True, False]


def test_a_waiter_gives_up_after_its_timeout_and_leaves_nothing_behind() -> None:
    async def scenario() -> tuple[bool, bool]:
        handoff, ends = SlotHandoff(), asyncio.Event()
        running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=True))
        await asyncio.sleep(0)
        gave_up = await handoff.wait(JOBS, timeout=0.01)
        # the slot freed later goes to a waiter still there, if any: here none
        ends.set()
        await running
        return gave_up, bool(handoff._groups)

    assert asyncio.run(scenario()) == (False, False)


def test_a_batch_item_and_a_job_wait_only_for_their_own_kind() -> None:
    async def scenario() -> tuple[bool, bool]:
        handoff, ends = SlotHandoff(), asyncio.Event()
        item = asyncio.create_task(_sibling(handoff, ITEMS, ends, frees=True))
        await asyncio.sleep(0)
        # a job has no job sibling: it goes on at once
        job_waits = await handoff.wait(JOBS, timeout=30)
        item_waiter = asyncio.create_task(handoff.wait(ITEMS, timeout=30))
        await asyncio.sleep(0)
        ends.set()
        await item
        return job_waits, await item_waiter

    assert asyncio.run(scenario()) == (False, True)


def test_no_key_no_sibling() -> None:
    async def scenario() -> bool:
        handoff = SlotHandoff()
        with handoff.holding(None) as sibling:
            sibling.answered(took_slot=True)
            sibling.freed = True
        return bool(handoff._groups)

    assert asyncio.run(scenario()) is False


def test_a_cancelled_waiter_leaves_the_freed_slot_to_the_next() -> None:
    async def scenario() -> bool:
        handoff, ends = SlotHandoff(), asyncio.Event()
        running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=True))
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(handoff.wait(JOBS, timeout=30))
        await asyncio.sleep(0)
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        waiting = asyncio.create_task(handoff.wait(JOBS, timeout=30))
        await asyncio.sleep(0)
        ends.set()
        await running
        return await waiting

    assert asyncio.run(scenario()) is True


def test_a_record_still_claiming_is_no_sibling_to_wait_for() -> None:
    """In a batch whose every record is refused, none waits for another (nor pays to hide
    its message while it does)."""

    async def scenario() -> list[bool]:
        handoff = SlotHandoff()
        claims_answer = asyncio.Event()

        async def refused() -> bool:
            with handoff.holding(JOBS):
                await claims_answer.wait()
            return await handoff.wait(JOBS, timeout=30)

        records = [asyncio.create_task(refused()) for _ in range(3)]
        await asyncio.sleep(0)
        claims_answer.set()
        return list(await asyncio.gather(*records))

    assert asyncio.run(scenario()) == [False, False, False]


def test_a_sibling_that_ends_while_its_waiter_hides_its_message_still_hands_it_the_slot() -> None:
    async def scenario() -> bool:
        handoff, ends = SlotHandoff(), asyncio.Event()
        running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=True))
        await asyncio.sleep(0)
        async with handoff.waiting(JOBS) as waiter:
            assert waiter is not None
            # (the hide call runs in a thread meanwhile, and SQS refuses it)
            ends.set()
            await running
            return waiter.handed_a_slot()

    assert asyncio.run(scenario()) is True


def test_a_refused_message_answered_before_its_batchs_claim_waits_for_that_claim() -> None:
    """On AWS a batch's claims answer in any order: a refusal may come before the claim that
    filled the cap, from the same batch."""

    async def scenario() -> tuple[bool, bool]:
        handoff = SlotHandoff()
        claim_answers, ends = asyncio.Event(), asyncio.Event()

        async def claiming() -> None:
            with handoff.holding(JOBS) as sibling:
                await claim_answers.wait()
                sibling.answered(took_slot=True)
                await ends.wait()
                sibling.freed = True

        running = asyncio.create_task(claiming())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(handoff.wait(JOBS, timeout=30))
        await asyncio.sleep(0)
        still_waiting = not waiting.done()
        claim_answers.set()
        await asyncio.sleep(0.01)  # (the watcher sees the claim, and takes its place)
        ends.set()
        await running
        return still_waiting, await waiting

    assert asyncio.run(scenario()) == (True, True)


def test_a_claim_that_answers_without_a_slot_sends_its_watchers_on() -> None:
    async def scenario() -> bool:
        handoff, answers = SlotHandoff(), asyncio.Event()

        async def refused_too() -> None:
            with handoff.holding(JOBS) as sibling:
                await answers.wait()
                sibling.answered(took_slot=False)

        other = asyncio.create_task(refused_too())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(handoff.wait(JOBS, timeout=30))
        await asyncio.sleep(0)
        answers.set()
        await other
        return await waiting

    assert asyncio.run(scenario()) is False


def test_a_waiter_that_gives_up_its_place_lets_a_watching_message_take_it() -> None:
    async def scenario() -> bool:
        handoff = SlotHandoff()
        ends, answers = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=True))

        async def still_claiming() -> None:
            with handoff.holding(JOBS) as sibling:
                await answers.wait()
                sibling.answered(took_slot=False)

        other = asyncio.create_task(still_claiming())
        await asyncio.sleep(0)
        # the only place is taken, then given up (its hide refused, say)...
        async with handoff.waiting(JOBS) as first:
            assert first is not None
            watching = asyncio.create_task(handoff.wait(JOBS, timeout=30))
            await asyncio.sleep(0.01)
        # ...so the message watching the claim still in flight takes it, and the freed slot
        await asyncio.sleep(0.01)
        ends.set()
        await running
        answers.set()
        await other
        return await watching

    assert asyncio.run(scenario()) is True


def test_a_record_refused_after_its_sibling_freed_a_slot_takes_that_slot_once() -> None:
    # Given a sibling holding the tenant's slot while two records of the batch claim
    async def scenario() -> tuple[bool, bool, bool]:
        handoff = SlotHandoff()
        with contextlib.ExitStack() as records:
            late = records.enter_context(handoff.holding(JOBS))
            later = records.enter_context(handoff.holding(JOBS))
            # When the sibling frees its slot and ends before their refusals answer
            with handoff.holding(JOBS) as running:
                running.answered(took_slot=True)
                running.freed = True
            after = records.enter_context(handoff.holding(JOBS))
            for record in (late, later, after):
                record.answered(took_slot=False)
            # Then the first refused takes that slot, once; the next finds it spent; a record
            # begun after the slot freed never counts it
            return late.slot_freed_meanwhile(), later.slot_freed_meanwhile(), after.slot_freed_meanwhile()

    assert asyncio.run(scenario()) == (True, False, False)


def test_a_freed_slot_a_waiter_took_is_not_taken_again() -> None:
    async def scenario() -> tuple[bool, bool]:
        handoff, ends = SlotHandoff(), asyncio.Event()
        with handoff.holding(JOBS) as claiming:
            running = asyncio.create_task(_sibling(handoff, JOBS, ends, frees=True))
            await asyncio.sleep(0)
            waiting = asyncio.create_task(handoff.wait(JOBS, timeout=30))
            await asyncio.sleep(0)
            ends.set()
            await running
            claiming.answered(took_slot=False)
            return await waiting, claiming.slot_freed_meanwhile()

    assert asyncio.run(scenario()) == (True, False)
