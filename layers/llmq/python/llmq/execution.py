"""Running one lane message: claim, call the provider, complete — or retry, fail, expire, cancel.

Every boto3 call runs in a thread so that the ten provider calls of a batch overlap on one
event loop: a Lambda waiting on ten slow generations costs one Lambda's time, not ten.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import math
import random
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from llmq.batch_runs import BatchExpander, dead_lettered, item_ended, settle
from llmq.batches import BatchRepository, batch_of
from llmq.config import LlmqConfig
from llmq.errors import CancelRequested, ItemTooLarge, LeaseLost, StoreContended, StoreUnavailable
from llmq.job_codec import write_token
from llmq.job_record import JobRecord, is_job_id
from llmq.lanes import retry_delay_seconds
from llmq.live_output import OutputRecorder, printable
from llmq.models import ErrorCode, JobError, JobResult, JobStatus, LaneMessage, WebhookEvent
from llmq.offload import Offload
from llmq.policy import (
    DUE_TOLERANCE_MS,
    MAX_DEAD_LETTER_REDRIVES,
    Claim,
    ClaimOutcome,
    deadline_error,
    refused_claim,
    retention_error,
)
from llmq.ports import BlobStore, GenerationProvider, JobStore, QueueStore
from llmq.providers import (
    TRAILER_WAIT_SECONDS,
    Answer,
    GenerationRequest,
    ProviderError,
    ProviderTimeout,
    TransientProviderError,
)
from llmq.queues import MAX_SEND_DELAY_SECONDS, announce_terminal
from llmq.shares import ShareState, deferral_seconds
from llmq.slot_handoff import HandoffKey, Sibling, SlotHandoff
from llmq.sqs_edge import PoisonMessage, RetryLater
from llmq.telemetry import MetricName, count_outcome, emit_count, emit_job_metric, error_fields, logger

# Time kept back from the provider call so the worker can still record the outcome, through
# a throttle or two: fifteen seconds, or a quarter of the invocation's whole time for very
# short functions (the sandbox). Of the whole time, not of what is left: a generation that
# starts late keeps as long to record what it paid for (`JobRunner._write_back_reserve`).
_WRITE_BACK_SECONDS = 15.0
_WRITE_BACK_SHARE = 0.25
# Retrying a write-back after AWS throttled or failed it: first pause, growth cap, and the
# time to keep in hand so the last try still ends before the Lambda does.
_WRITE_RETRY_FIRST_SECONDS = 0.2
_WRITE_RETRY_MAX_SECONDS = 4.0
# One botocore call can itself take a few seconds (its own retries and backoff).
_WRITE_RETRY_FLOOR_SECONDS = 4.0
# What a write-back try leaves of the Lambda's time, however long its call takes: enough to
# park a paid result (a PUT given the rest but a second).
_AFTER_LAST_TRY_SECONDS = 3.0
# What a copy's send leaves of the invocation (at most a quarter of what is left): the message's
# own settling after it (a visibility change, bounded to the last second) and that second.
_RESEND_RESERVE_SECONDS = 3.0
# A throttled claim: retried in process this long, then the message comes back after the delay.
_CLAIM_RETRY_BUDGET_SECONDS = 5.0
# After that, how long the worker keeps trying to give back a claim DynamoDB may have applied
# with its answer lost (`JobRunner._give_back_claim`).
_GIVE_BACK_SECONDS = 30.0
# Beyond the scout's retry budget, how long its batch's other claims of the tenant wait for it.
_SCOUT_PATIENCE_SECONDS = 5.0
# A claim that kept meeting other transactions on the tenant's share comes back this soon
# (with up to as much again of jitter).
_CONTENDED_DELAY_SECONDS = 2.0
# A message whose copy SQS refused stays away at least this long, doubling with its receives.
_UNSENT_FIRST_WAIT_SECONDS = 15.0
# A provider call needs at least this much of the Lambda's time, or the job is handed back.
_MIN_GENERATION_SECONDS = 2.0
# How long the courtesy job.started send may hold a generation back.
_STARTED_SEND_SECONDS = 1.0
# A finished streaming generation's last output writes: how many failures, and how long at
# most, before the result is written without them (the events endpoint serves the rest from it).
_FINAL_OUTPUT_TRIES = 3
_FINAL_OUTPUT_SECONDS = 5.0
# How long the job.output events of those writes may take to send, within the result's reserve,
# and the part of that the writes always leave them.
_FINAL_SEND_SECONDS = 2.0
_FINAL_SEND_SLICE_SECONDS = 0.5
# Threads for a batch's output writes and job.output sends (the default executor, six
# threads on two vCPUs, stays free for claims and results).
_OUTPUT_THREADS = 4
# Threads for the cancel flag's reads: a look every `cancel_check_seconds` per running job.
_CANCEL_THREADS = 2
# Threads for the blocking AWS calls of one invocation's jobs (`enough_threads`).
_INVOCATION_THREADS = 32
_WIDENED: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def enough_threads() -> None:
    """Give the running event loop's default pool a thread for each blocking call a batch of
    jobs may make at once (a claim or result write, an input read, a parked-result look for
    each of ten jobs). asyncio's own default is min(32, CPUs + 4): six on two vCPUs, which
    a batch's slow S3 reads fill while its other jobs' claims, results and cancels wait for
    them, their generations going on, billed. Idle threads cost nothing; they start as used."""
    loop = asyncio.get_running_loop()
    if loop not in _WIDENED:
        loop.set_default_executor(
            ThreadPoolExecutor(max_workers=_INVOCATION_THREADS, thread_name_prefix="llmq-worker")
        )
        _WIDENED.add(loop)


# A refused message waiting for its batch's job of the same tenant to end stops waiting this
# long before the Lambda's end (or a quarter of what is left), to re-send itself in time.
_HANDOFF_RESERVE_SECONDS = 10.0
# What a refused claim finds that ends the job without another run (`_settle_unclaimed`).
_ENDS_UNRUN = frozenset(
    {
        ClaimOutcome.DEADLINE_PASSED,
        ClaimOutcome.CANCEL_PENDING,
        ClaimOutcome.RETENTION_DUE,
        ClaimOutcome.BATCH_CANCELED,
        ClaimOutcome.CRASHES_EXHAUSTED,
    }
)
# What a look at a queued job finds that ends it (`_look_without_claiming`).
_ENDS_QUEUED = frozenset(
    {ClaimOutcome.DEADLINE_PASSED, ClaimOutcome.CANCEL_PENDING, ClaimOutcome.RETENTION_DUE}
)
# A waiting message is hidden until this long after the invocation can end, at least: the
# event source deletes it once the invocation answers.
_HANDOFF_HIDE_MARGIN_SECONDS = 30
# Reading an S3-held input before the call: how long to retry before handing the lease back.
_INPUT_LOAD_BUDGET_SECONDS = 30.0
# An input read that took this long (S3 throttled or slow, retried here or by the SDK) is
# followed by a look at the cancel flag before the provider is called.
_SLOW_INPUT_SECONDS = 1.0

T = TypeVar("T")


class _Stop(StrEnum):
    """Why a running generation stops before its end."""

    CANCELED = "canceled"
    LEASE_LOST = "lease_lost"


async def _first_stop(
    generation: asyncio.Task[JobResult],
    watcher: asyncio.Task[bool],
    writer: asyncio.Task[_Stop | None] | None,
) -> _Stop | None:
    """Wait for the generation to end, or for a reason to stop it first. A watcher or a writer
    that failed, or ended with nothing to say, is left out and the wait goes on."""
    pending: set[asyncio.Task[Any]] = {generation, watcher, *([writer] if writer else [])}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done and _result(watcher):
            return _Stop.CANCELED
        if writer is not None and writer in done:
            stop = _writer_stop(writer)
            if stop is not None:
                return stop
        if generation in done:
            return None
    return None


def _succeeded(generation: asyncio.Task[JobResult]) -> bool:
    return generation.done() and not generation.cancelled() and generation.exception() is None


def _task_value(task: asyncio.Task[Any], what: str, default: Any) -> Any:
    """A helper task's value, or `default` when it is unfinished, cut short or failed: the
    output and the watchers are courtesies, and nothing in them may cost the generation."""
    if not task.done() or task.cancelled():
        return default
    if task.exception() is not None:
        logger.warning(f"{what} failed", extra={"error_class": type(task.exception()).__name__})
        return default
    return task.result()


def _writer_stop(writer: asyncio.Task[_Stop | None]) -> _Stop | None:
    stop: _Stop | None = _task_value(writer, "output writer", None)
    return stop


def _result(task: asyncio.Task[bool]) -> bool:
    """A watcher's verdict; one that failed (or was cut short) says nothing."""
    verdict: bool = _task_value(task, "cancel watcher", False)
    return verdict


def lease_owner(request_id: str, message_id: str) -> str:
    """Who holds a job's lease: unique per handling, even for two copies of one message in a
    batch, and naming the SQS message that claimed it (`claimed_through`)."""
    return f"{request_id}/{message_id}/{uuid.uuid4().hex[:8]}"


def claimed_through(job: JobRecord) -> str | None:
    """The id of the SQS message whose handling holds (or held) the job's lease, as
    `lease_owner` names it; None when it does not say (a lease of another form)."""
    parts = (job.lease_owner or "").split("/")
    return parts[1] if len(parts) == 3 and parts[1] else None


@dataclass(frozen=True)
class Invocation:
    """Who is running the message, and how long the Lambda has left."""

    owner: str
    remaining_seconds: Callable[[], float]
    # Keeps this record's message hidden for that many seconds from now, and no longer (True
    # when SQS did): set by the worker's handler, None where nothing receives the message.
    hold_message: Callable[[float], bool] | None = None
    # How many times SQS has delivered this message (ApproximateReceiveCount), this one included.
    receive_count: int = 1
    # The invocation's whole time, as it started (the function's timeout, less its init): what
    # a late generation's write-back reserve is reckoned from. None: what is left as this is
    # made, which the worker does as its batch's records start, together.
    whole_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.whole_seconds is None:
            object.__setattr__(self, "whole_seconds", self.remaining_seconds())


# How often a cancel that waits out a whole answer's trailer looks whether it is still whole.
_TRAILER_LOOK_SECONDS = 0.05


class JobRunner:
    def __init__(
        self,
        jobs: JobStore,
        queues: QueueStore,
        provider: GenerationProvider,
        config: LlmqConfig,
        rng: random.Random | None = None,
        payloads: BlobStore | None = None,
        batches: BatchRepository | None = None,
    ) -> None:
        self.jobs = jobs
        # None: no batches here (tests of single jobs); an expand message is then poison.
        self.batches = batches
        self.expander = BatchExpander(batches, queues, payloads, config) if batches and payloads else None
        self.offload = Offload(payloads, config)
        self.queues = queues
        self.provider = provider
        self.config = config
        self._rng = rng or random.Random()
        # The deployment's lanes: a message naming another is no job's (`_drop_foreign`).
        self._lanes = frozenset(lane.name for lane in config.lanes)
        # Refused messages waiting for a slot their batch's own jobs free.
        self._handoff = SlotHandoff()
        # Threads for output writes and job.output sends (`_on_output_thread`).
        self._output_threads = ThreadPoolExecutor(
            max_workers=_OUTPUT_THREADS, thread_name_prefix="llmq-output"
        )
        # Threads for the cancel flag's reads (`_read_cancel`).
        self._cancel_threads = ThreadPoolExecutor(
            max_workers=_CANCEL_THREADS, thread_name_prefix="llmq-cancel"
        )

    async def run(self, body: str, invocation: Invocation) -> None:
        """Process one lane message. Raises RetryLater or PoisonMessage to report it failed."""
        message = _parse(body)
        if message.kind == "expand":
            await self._expand(message, invocation)
            return
        if not is_job_id(message.job_id):
            # (a message sent by hand naming another item of the table: a share, a batch)
            raise PoisonMessage(f"lane message names no job: {message.job_id[:64]!r}")
        tenant = (message.tenant_id, message.lane) if message.tenant_id and message.lane else None
        if tenant is not None and message.lane not in self._lanes:
            # (no job of this deployment is in that lane: passed on, the copy found no queue)
            _drop_foreign(message, "names a lane this deployment has not")
            return
        if tenant is not None and message.not_before_ms is not None:
            wait_ms = message.not_before_ms - self.jobs.now_ms()
            if wait_ms > 1000 * (self.config.fair_share.max_deferral_seconds + MAX_SEND_DELAY_SECONDS):
                # Longer than any deferral llmq sends: not one of its own (a message sent by
                # hand, or corrupted). Passed on, it would hop for ever, never dead-lettered;
                # its claim looks instead (a job not yet due waits as the claim says).
                logger.warning(
                    "lane message due too far ahead; claimed now", extra={"job_id": message.job_id}
                )
            elif wait_ms > DUE_TOLERANCE_MS:
                # A deferral longer than SQS's 900 s delay, on its way: passed on, not claimed.
                await self._resend(
                    message,
                    tenant,
                    message.not_before_ms,
                    wait_ms / 1000,
                    "deferral continued",
                    invocation=invocation,
                    spoken_for=message.spoken_for,
                )
                return
        item = batch_of(message.job_id) is not None
        key: HandoffKey | None = (*tenant, item) if tenant is not None else None
        with self._handoff.holding(key) as sibling:
            # (the batch's first claim of the tenant, refused at its cap, speaks for this one)
            patience = min(
                _CLAIM_RETRY_BUDGET_SECONDS + _SCOUT_PATIENCE_SECONDS,
                invocation.remaining_seconds() * _WRITE_BACK_SHARE,
            )
            refused = await sibling.scout_refusal(patience, may_be_spoken_for=not message.spoken_for)
            spoken_for = refused is not None
            if refused is None:
                refused = await self._claim_and_run(message, invocation, tenant, sibling)
            else:
                sibling.answered(took_slot=False)
                logger.info(
                    "tenant at its cap, as its batch's first claim found", extra={"job_id": message.job_id}
                )
            freed_meanwhile = refused is not None and sibling.slot_freed_meanwhile()
        if refused is not None and refused.share is not None:
            if key is None:
                # A message that names no tenant, from an older sender: the claim found it.
                try:
                    found = await asyncio.to_thread(self.jobs.find, message.job_id)
                except StoreUnavailable:
                    found = None  # (no lane: the message waits, and comes back as it is)
                key = (refused.share.tenant_id, found.lane if found is not None else "", item)
            try:
                await self._defer(
                    message,
                    key,
                    refused.share,
                    refused.at_ms,
                    invocation,
                    freed_meanwhile,
                    spoken_for=spoken_for,
                )
            except RetryLater:
                # Its copy could not be sent, and this message, which says nothing of being
                # spoken for, would come back as it is (and could be spoken for again): its job
                # is looked at now instead, as its own claim would have.
                if not spoken_for or not await self._look_without_claiming(message, invocation):
                    raise

    async def _look_without_claiming(self, message: LaneMessage, invocation: Invocation) -> bool:
        """What a claim of its own would have looked at, for a message spoken for whose copy
        SQS refused: a queued job asked to cancel, past its deadline or at its retention ends
        here (True: the message is done). Nothing is claimed to run: this late in the
        invocation a generation would have less than a whole invocation's time, and a call cut
        off is billed and not retried; the message comes back for that."""
        try:
            found = await asyncio.to_thread(
                functools.partial(self.jobs.find, message.job_id, past_retention=True)
            )
        except StoreUnavailable:
            return False
        if found is None or found.status is not JobStatus.QUEUED:
            return False
        outcome = refused_claim(found, self.jobs.now_ms(), self.config.reconciler.retention_margin_seconds)
        if outcome not in _ENDS_QUEUED:
            return False
        logger.info("spoken-for message looked at", extra={"job_id": found.id, "claim": outcome.value})
        await self._settle_unclaimed(outcome, found, invocation)
        return True

    async def _claim(
        self,
        message: LaneMessage,
        invocation: Invocation,
        lease_seconds: float,
        tenant: tuple[str, str] | None,
    ) -> Claim:

        async def claim_once() -> Claim:
            return await self._write_back(
                lambda: self.jobs.claim(message.job_id, invocation.owner, lease_seconds, tenant),
                invocation,
                budget_seconds=_CLAIM_RETRY_BUDGET_SECONDS,
                recognises=True,
            )

        try:
            claim = await claim_once()
            wait_ms = self._due_soon(claim, invocation)
            if wait_ms is None:
                return claim
            # Due within a clock's difference from the one that wrote its due time: claimed
            # again once due by this clock, in process, with no receive spent (`DUE_TOLERANCE_MS`).
            await asyncio.sleep(wait_ms / 1000)
            return await claim_once()
        except StoreContended as exc:
            if not exc.after_unanswered:
                raise
            # Contended after a try that may have been applied: one look at the job says
            # whether that try leased it to us (then it is ours to run). A look that fails is
            # StoreUnavailable: the message waits out the lease it may hold.
            found = await asyncio.to_thread(self.jobs.find, message.job_id)
            if (
                found is not None
                and found.status is JobStatus.RUNNING
                and found.lease_owner == invocation.owner
            ):
                logger.info("claim recognised as ours after contention", extra={"job_id": message.job_id})
                return Claim(claimed=True, job=found, at_ms=self.jobs.now_ms())
            raise

    def _due_soon(self, claim: Claim, invocation: Invocation) -> int | None:
        """How long until a job refused as not yet due is due, when that is within
        `DUE_TOLERANCE_MS` and the invocation has time to spare; else None."""
        if claim.outcome is not ClaimOutcome.NOT_YET_DUE or claim.job is None:
            return None
        wait_ms = (claim.job.not_before_ms or 0) - self.jobs.now_ms() + 1
        spare = invocation.remaining_seconds() * (1 - _WRITE_BACK_SHARE)
        return wait_ms if 0 < wait_ms <= DUE_TOLERANCE_MS and spare > wait_ms / 1000 + 1 else None

    async def _give_back_claim(self, message: LaneMessage, invocation: Invocation) -> bool:
        """After a claim that AWS kept refusing, whose try may have been applied with its
        answer lost: the job, if it is leased to this invocation, handed back unrun (its attempt
        refunded, its tenant's slot freed: `JobStore.release`), within `_GIVE_BACK_SECONDS`.
        True once the job is known not to be held by this invocation; False when DynamoDB did
        not say (hunt 256: the lease, never run, counted as an attempt, and a job on its last
        one then failed `worker_crashed` with a try of the provider left). A job asked to cancel
        meanwhile, which refuses the release, ends canceled here: held by this invocation and
        never run (hunt 291: it held its tenant's slot until its lease lapsed, its cancel
        answered 202 and not done for a quarter of an hour)."""
        flagged: list[JobRecord] = []

        def give_back() -> bool:
            found = self.jobs.find(message.job_id)
            if (
                found is None
                or found.status is not JobStatus.RUNNING
                or found.lease_owner != invocation.owner
            ):
                return True
            try:
                self.jobs.release(found, invocation.owner, 0)
            except CancelRequested:
                flagged[:] = [found]
                return True
            logger.info("claim given back unrun", extra={"job_id": message.job_id})
            return True

        # (a retry after a release applied with its answer lost finds the job queued: done)
        budget = min(_GIVE_BACK_SECONDS, invocation.remaining_seconds() * _WRITE_BACK_SHARE)
        given_by = time.monotonic() + budget
        try:
            given_back = await self._write_back(give_back, invocation, budget)
        except LeaseLost:
            return True
        except StoreUnavailable:
            return False
        if flagged:
            # (an earlier attempt may have paid and parked its result, which comes first;
            # within the give-back's budget, else the message comes back after the lease as
            # before: review 267, a brown-out held it to the Lambda's end, then failed it)
            earlier = flagged[0].attempts > 1
            ending = self._cancel_held(flagged[0], invocation, paid_unknown=earlier, look_again=earlier)
            try:
                await asyncio.wait_for(ending, max(0.1, given_by - time.monotonic()))
            except (TimeoutError, StoreUnavailable):
                return False
        return given_back

    async def _claim_and_run(
        self, message: LaneMessage, invocation: Invocation, tenant: tuple[str, str] | None, sibling: Sibling
    ) -> Claim | None:
        """Claim the message's job and run it; the claim, when the tenant is at its cap.
        `sibling` is told when the job gave back a slot it held."""
        lease_seconds = invocation.remaining_seconds() + self.config.lease_margin_seconds
        try:
            # Retried in process with the same owner, so a claim that was applied before its
            # answer was lost is recognised as ours instead of stalling as someone else's lease.
            claim = await self._claim(message, invocation, lease_seconds, tenant)
            # (a job accepted before shares holds no slot, and frees none)
            took = claim.outcome is ClaimOutcome.CLAIMED and claim.job is not None and claim.job.shared
            at_cap = claim.outcome is ClaimOutcome.AT_CAP and claim.share is not None
            sibling.answered(took_slot=took, refused=claim if at_cap else None)
        except StoreContended as exc:
            # Other writes of the tenant's share won, try after try; nothing was applied. The
            # job comes back in a few seconds, as a new message: no receive is spent on it.
            # (a scout speaks for no one: the batch's others claim now, not after the send)
            sibling.answered(took_slot=False)
            delay = _CONTENDED_DELAY_SECONDS * (1 + self._rng.random())
            logger.warning("claim contended", extra={"job_id": message.job_id, "why": str(exc)})
            if tenant is None:
                raise RetryLater(message.job_id, delay) from exc
            # (nothing looked at the job: a copy spoken for still says so)
            await self._resend(
                message,
                tenant,
                None,
                delay,
                "claim contended",
                invocation=invocation,
                spoken_for=message.spoken_for,
            )
            return None
        except StoreUnavailable as exc:
            # Nothing was spent yet. The claim may have been applied, though, leased to us, and
            # counted as an attempt: it is given back, attempt refunded and slot freed, if
            # DynamoDB answers again soon (`_give_back_claim`). Either way the job is tried
            # again once a lease it may hold has lapsed (with jitter, so throttled messages do
            # not return in lock-step), when any worker can take the job over; known free, by
            # a copy of the message, so a throttled table never burns the receives of a job
            # that never ran (review 256: coming back in seconds, it reached the DLQ twice, and
            # failed worker_crashed, in a minute and a half of throttled writes).
            sibling.answered(took_slot=False)
            logger.warning("claim throttled", extra={"job_id": message.job_id, "why": str(exc)})
            delay = lease_seconds * (1 + self._rng.random() / 10)
            given_back = await self._give_back_claim(message, invocation)
            if given_back and tenant is not None:
                await self._resend(message, tenant, None, delay, "claim throttled", invocation=invocation)
                return None
            raise RetryLater(message.job_id, delay) from exc
        if claim.outcome is ClaimOutcome.AT_CAP and claim.share is not None:
            return claim
        job = claim.job
        log = {"job_id": message.job_id, "claim": claim.outcome.value}
        if claim.outcome is ClaimOutcome.NOT_FOUND or job is None:
            raise PoisonMessage(f"no job {message.job_id}")
        if claim.outcome is ClaimOutcome.FOREIGN:
            _drop_foreign(message, "names another tenant or lane than its job's")
            return None
        if claim.outcome is ClaimOutcome.NOT_YET_DUE:
            # A copy of the message arrived during the backoff: it comes back when it is due.
            wait_ms = (job.not_before_ms or 0) - self.jobs.now_ms()
            raise RetryLater(job.id, max(1.0, wait_ms / 1000))
        if claim.outcome is not ClaimOutcome.CLAIMED:
            logger.info("message not claimed", extra=log)
            await self._settle_unclaimed(claim.outcome, job, invocation)
            return None
        logger.info("job claimed", extra={**log, "attempt": job.attempts, "lane": job.lane})
        try:
            # (before the input, which a parked result does not need, and the time check:
            # recording it needs no provider time; and before a cancel, as wherever a job ends
            # unrun: what an earlier attempt paid for comes first)
            looked_at = time.monotonic()
            parked = await self._parked_result(job, invocation) if job.attempts > 1 else None
            slow = parked is False or time.monotonic() - looked_at >= _SLOW_INPUT_SECONDS
            if not isinstance(parked, JobResult | JobError) and (
                # (only our own claim, recognised after a lost answer, brings a cancel along)
                job.cancel_requested or (slow and await self._cancel_came(job.id))
            ):
                # A cancel that came before the claim, or while the look was slow or S3 could
                # not say: never sent.
                await self._cancel_held(job, invocation, paid_unknown=parked is False)
                sibling.freed = True
                return None
            if isinstance(parked, JobError):
                # An earlier attempt's failure that may have been billed could not be written:
                # written now, and the request never sent again.
                logger.info(
                    "a parked failure ends the job", extra={"job_id": job.id, "attempt": job.attempts}
                )
                await self._fail_billed(job, invocation, parked)
                sibling.freed = True
                return None
            if isinstance(parked, JobResult):
                # An earlier attempt was paid for and could not record it: recorded now, unpaid.
                logger.info(
                    "a parked result completes the job", extra={"job_id": job.id, "attempt": job.attempts}
                )
                await self._complete(job, invocation, parked, ran=False)
                sibling.freed = True
                return None
            loaded = await self._load_input(job, invocation, paid_unknown=parked is False)
            if loaded is None:
                # (canceled while its input could not be read: the cancel gave the slot back)
                sibling.freed = True
                return None
            job = loaded
            if job.attempts == 1 and not job.refusals and job.started_ms is not None:
                emit_job_metric(MetricName.QUEUE_WAIT_MS, job.started_ms - job.created_ms, job.lane)
            await self._execute(job, invocation, paid_unknown=parked is False)
        except RetryLater as exc:
            # Handed back for a retry, or for want of time: its slot is free for a waiter.
            sibling.freed = exc.gave_back_slot
            raise
        except LeaseLost as exc:
            # Another worker took the job over after our lease lapsed (its slot with it); its
            # result stands.
            logger.warning("lease lost; this attempt's result is discarded", extra={**log, "why": str(exc)})
            return None
        # Its last write gave the slot back: a result, a failure, a cancel. (A write that
        # failed raised instead: no waiter is woken for it.)
        sibling.freed = True
        return None

    async def _expand(self, message: LaneMessage, invocation: Invocation) -> None:
        """Write a batch's items (`llmq.batch_runs`). Cut short by AWS, it goes on from its
        checkpoint in a few seconds, as a new message: a throttled table never spends the
        message's receives, so a large batch's expansion never reaches the DLQ by waiting."""
        if self.expander is None:
            raise PoisonMessage("this worker runs no batches")
        try:
            await asyncio.to_thread(self.expander.expand, message.job_id, invocation.remaining_seconds)
        except StoreUnavailable as exc:
            delay = exc.retry_after or _CONTENDED_DELAY_SECONDS * (1 + self._rng.random())
            logger.warning("batch expansion paused", extra={"batch_id": message.job_id, "why": str(exc)})
            # (where this message itself comes back, a receive is spent: never a spin through
            # the lane's receives while AWS refuses, `_unsent_wait`)
            spent = max(delay, self._unsent_wait(invocation.receive_count))
            if not message.lane or not message.tenant_id:
                raise RetryLater(message.job_id, spent) from exc
            try:
                await asyncio.to_thread(
                    functools.partial(self.queues.enqueue_expand, redrive_round=message.redrive_round),
                    message.job_id,
                    message.lane,
                    message.tenant_id,
                    math.ceil(delay),
                )
            except StoreUnavailable:
                raise RetryLater(message.job_id, spent) from exc

    async def _defer(
        self,
        message: LaneMessage,
        key: HandoffKey,
        share: ShareState,
        at_ms: int,
        invocation: Invocation,
        freed_meanwhile: bool = False,
        *,
        spoken_for: bool = False,
    ) -> None:
        """The tenant runs as many jobs in the lane as its cap allows: the job waits, unspent.

        A new message, delayed until a slot is likely free, replaces this one (acknowledged).
        Re-sending rather than extending this message's visibility keeps deferrals out of its
        receive count, so however long a capped tenant's backlog, no job reaches the DLQ by
        waiting its turn, and maxReceiveCount keeps meaning crashes and poison. A deferral
        longer than SQS's 900 s delay travels as a chain of delayed copies that carry when the
        job is due (`not_before_ms`): only the last one tries a claim.

        When this batch runs jobs of the same tenant in the lane, the message first waits for
        one of them to end, and is re-sent at once if that end freed a slot
        (`llmq.slot_handoff`): a slot never waits for a copy to come back by chance. So is a
        message whose claim answered only after such a job had ended and freed a slot no other
        message took (`freed_meanwhile`). A copy of a message `spoken_for` by its batch's first
        claim says so (`LaneMessage.spoken_for`).
        """
        tenant = key[:2]
        live_for_ms = int(1000 * (self.config.worker.timeout_seconds + self.config.lease_margin_seconds))
        delay = deferral_seconds(
            share,
            key[1],
            at_ms,
            self.config.fair_share,
            self._rng,
            batch_item=key[2],
            live_for_ms=live_for_ms,
            recovered_within_s=60 * self.config.reconciler.schedule_minutes
            + self.config.reconciler.expired_lease_grace_seconds,
        )
        due_ms = at_ms + int(delay * 1000)
        running = share.running
        # Slots held outside this batch (by other invocations) may free first, which its
        # siblings do not see: then the wait for a sibling ends when the deferral is due.
        # (a batch's item is held to its batch slots only when those refused it, as its
        # deferral reckons: `deferral_seconds`)
        batch_full = len(share.batch_holders.get(key[1], {})) >= (share.batch_cap(key[1]) or 0) > 0
        held = share.batch_holders if key[2] and batch_full else share.holders
        freed = freed_meanwhile or await self._wait_for_a_sibling(
            key, invocation, due_ms, len(held.get(key[1], {}))
        )
        delay = max(0.0, (due_ms - self.jobs.now_ms()) / 1000)
        # (a copy that cannot be sent leaves this message to come back when it was due, never
        # at once: a throttled queue must not spin it through its receives)
        unsent = max(self.config.fair_share.min_deferral_seconds, delay)
        if freed:
            await self._resend(
                message,
                tenant,
                None,
                0.0,
                "tenant at its cap; a slot of its own freed"
                + ("; no claim of its own" if spoken_for else ""),
                unsent_delay=unsent,
                invocation=invocation,
                spoken_for=spoken_for,
            )
            return
        await self._resend(
            message,
            tenant,
            due_ms,
            delay,
            # (no claim of its own: told apart from the deferrals that made one)
            "tenant at its cap; deferred as its batch's first claim found"
            if spoken_for
            else "tenant at its cap; deferred",
            unsent_delay=unsent,
            invocation=invocation,
            spoken_for=spoken_for,
            running=running,
        )

    async def _wait_for_a_sibling(
        self, key: HandoffKey, invocation: Invocation, due_ms: int, held: int
    ) -> bool:
        """Wait for one of this batch's jobs of the same tenant to end (`llmq.slot_handoff`);
        True when its end freed a slot. The message waits in flight: it is first hidden only
        until just after this invocation can end, so that a crash meanwhile brings it back
        then (a receive spent, as for any record of a crashed batch), not after the lane's
        visibility timeout. Where SQS refuses that, the message does not wait. When the
        refusing share `held` more slots than this batch's records hold (or may: a claim not yet
        answered), one held in another invocation may free first, which the siblings do not
        see: the wait then ends when the deferral is due (`due_ms`). When the siblings hold
        every slot, only their ends can free one, and the message waits however long they run."""
        remaining = invocation.remaining_seconds()
        reserve = min(_HANDOFF_RESERVE_SECONDS, remaining * _WRITE_BACK_SHARE)
        if not self.config.fair_share.slot_handoff or remaining <= reserve:
            return False
        async with self._handoff.waiting(key, remaining - reserve) as waiter:
            # (a batch's claim it watched for may have taken a while to answer)
            remaining = invocation.remaining_seconds()
            if waiter is None or remaining <= reserve:
                return False
            hold = invocation.hold_message
            hidden = remaining + max(self.config.lease_margin_seconds, _HANDOFF_HIDE_MARGIN_SECONDS)
            if hold is not None and not await asyncio.to_thread(hold, hidden):
                # (a sibling may have ended meanwhile, and handed this message its slot)
                return waiter.handed_a_slot()
            wait = invocation.remaining_seconds() - reserve
            if held > self._handoff.siblings(key):
                wait = min(wait, max(0.0, (due_ms - self.jobs.now_ms()) / 1000))
            return await waiter.freed(wait)

    async def _resend(
        self,
        message: LaneMessage,
        tenant: tuple[str, str],
        due_ms: int | None,
        delay: float,
        why: str,
        unsent_delay: float | None = None,
        *,
        invocation: Invocation,
        spoken_for: bool = False,
        gave_back_slot: bool = False,
        **extra: object,
    ) -> None:
        """Acknowledge this message and send a copy delayed by `delay` (at most 900 s a hop).
        If the send fails, this message waits instead (`unsent_delay`, else as long), counting
        one receive, and never less than `_unsent_wait` of the receives it has spent: a job
        that only waits its turn must not reach the DLQ, and fail as crashed, in a brown-out
        of SQS sends. `spoken_for`: the copy was deferred without a claim of its own."""
        log = {"job_id": message.job_id, "delay_seconds": round(delay, 1), **extra}
        tenant_id, lane = tenant
        hop = math.ceil(min(delay, MAX_SEND_DELAY_SECONDS))
        # The send ends while the invocation can still settle the message: a stalled
        # connection takes botocore's tries seconds each, and a resend after a wait for a
        # sibling comes near the end (hunt 265: past it, the invocation timed out whole, and
        # every record of its batch came back). A send cut short may still go: its copy is one
        # more, which a claim absorbs.
        remaining = invocation.remaining_seconds()
        budget = remaining - min(_RESEND_RESERVE_SECONDS, remaining * _WRITE_BACK_SHARE)
        if lane and budget > 0:
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(
                        functools.partial(
                            self.queues.enqueue_job,
                            redrive_round=message.redrive_round,
                            spoken_for=spoken_for,
                        ),
                        message.job_id,
                        lane,
                        tenant_id,
                        hop,
                        due_ms if due_ms is not None and delay > MAX_SEND_DELAY_SECONDS else None,
                    ),
                    budget,
                )
                logger.info(why, extra=log)
                return
            except (StoreUnavailable, TimeoutError):
                logger.warning(f"{why}: the copy could not be sent; the message waits instead", extra=log)
        wait = delay if unsent_delay is None else unsent_delay
        raise RetryLater(
            message.job_id,
            max(wait, self._unsent_wait(invocation.receive_count)),
            gave_back_slot=gave_back_slot,
        )

    def _unsent_wait(self, receive_count: int) -> float:
        """How long a message whose copy SQS refused stays away at least, by the receives it has
        spent: doubling from `_UNSENT_FIRST_WAIT_SECONDS`, so that the lane's maxReceiveCount
        receives outlast an SQS outage of (2^maxReceiveCount - 1) times that (about 16 min at
        the default 6, then as long again in the dead-letter function's one more round) rather
        than a few seconds of deferrals' returns."""
        doubled = _UNSENT_FIRST_WAIT_SECONDS * 2 ** min(max(0, receive_count - 1), 16)
        return float(min(doubled, self.config.fair_share.max_deferral_seconds))

    async def _cancel_held(
        self, job: JobRecord, invocation: Invocation, *, paid_unknown: bool, look_again: bool = False
    ) -> None:
        """Cancel a job this worker holds before the provider was called. When S3 could not say
        whether an earlier attempt parked what it paid for (`paid_unknown`), nothing is written:
        the job ends once the lease lapses, as one asked to cancel that no worker holds ends,
        which looks again for a while (`Offload.record_parked`): a paid result comes first.
        `look_again`: S3 has answered since (the input's read), so it is asked once more first."""
        if paid_unknown and look_again:
            parked = await self._parked_result(job, invocation)
            if isinstance(parked, JobResult):
                await self._complete(job, invocation, parked, ran=False)
                return
            if isinstance(parked, JobError):
                await self._fail_billed(job, invocation, parked)
                return
            paid_unknown = parked is False
        if paid_unknown:
            lapses_in = ((job.lease_expires_ms or 0) - self.jobs.now_ms()) / 1000
            logger.warning(
                "cancel asked while S3 cannot say what was paid for; ended after the lease",
                extra={"job_id": job.id},
            )
            raise RetryLater(job.id, max(1.0, lapses_in + 1.0))
        await self._settle(self.jobs.cancel_leased, job, invocation)

    @staticmethod
    def _write_back_reserve(invocation: Invocation) -> float:
        """What a generation leaves of the Lambda's time to record its outcome: fifteen
        seconds, or a quarter of a very short invocation's whole time."""
        return min(_WRITE_BACK_SECONDS, (invocation.whole_seconds or 0.0) * _WRITE_BACK_SHARE)

    async def _too_late_to_start(self, job: JobRecord, invocation: Invocation, *, paid_unknown: bool) -> bool:
        """A claim that came with too little of the Lambda's time left for a generation (a
        slow cold start, a batch whose claims were slow) hands the job back, attempt refunded,
        before the provider is called: a call cut off by the Lambda's end would be billed and
        then fail as provider_timeout, which is not retried. Only where the function's timeout
        leaves room for one: with a shorter timeout every call would be this short."""
        remaining = invocation.remaining_seconds()
        budget = remaining - self._write_back_reserve(invocation)
        room = self.config.worker.timeout_seconds * (1 - _WRITE_BACK_SHARE)
        if budget >= _MIN_GENERATION_SECONDS or room < 2 * _MIN_GENERATION_SECONDS:
            return False
        delay = _CONTENDED_DELAY_SECONDS * (1 + self._rng.random())
        logger.warning(
            "too little time left to call the provider; the job is handed back",
            extra={"job_id": job.id, "remaining_seconds": round(remaining, 2)},
        )
        try:
            await self._write_back(lambda: self.jobs.release(job, invocation.owner, delay), invocation)
        except CancelRequested:
            await self._cancel_held(job, invocation, paid_unknown=paid_unknown)
            return True
        raise RetryLater(job.id, delay, gave_back_slot=True)

    async def _load_input(
        self, job: JobRecord, invocation: Invocation, *, paid_unknown: bool
    ) -> JobRecord | None:
        """The claimed job's input from S3, through throttles for a bounded time.

        If S3 stays unavailable the lease is handed back, attempt refunded (the provider was
        never called), so the next delivery of the message can claim the job; a cancel that
        arrived meanwhile ends it (`_cancel_held`). None when the job was settled here.
        """
        if job.input is not None or job.input_ref is None:
            return job
        budget = min(_INPUT_LOAD_BUDGET_SECONDS, invocation.remaining_seconds() * _WRITE_BACK_SHARE)
        began = time.monotonic()
        try:
            loaded = await self._write_back(lambda: self.offload.load_input(job), invocation, budget)
        except StoreUnavailable as exc:
            await self._hand_back(job, invocation, exc, paid_unknown=paid_unknown)
            return None
        if time.monotonic() - began >= _SLOW_INPUT_SECONDS and await self._cancel_came(job.id):
            # A cancel that came while the input was slow to read (S3 throttled or slow, retried
            # here or by the SDK): the provider is never called for it.
            await self._cancel_held(job, invocation, paid_unknown=paid_unknown, look_again=True)
            return None
        return loaded

    async def _hand_back(
        self, job: JobRecord, invocation: Invocation, why: StoreUnavailable, *, paid_unknown: bool
    ) -> None:
        """S3 stays unavailable before the provider was called: the lease is handed back,
        attempt refunded, so the next delivery of the message can claim the job (RetryLater);
        returns only when a cancel that arrived meanwhile ended it here. Later at each receive
        (`_unsent_wait`), as a refused claim's end comes back: an S3 outage of minutes spent
        a large input's receives into the lane's DLQ in seconds each, and paged, round after
        round (hunt 304)."""
        delay = max(
            retry_delay_seconds(self.config.retry, 1, None, self._rng),
            self._unsent_wait(invocation.receive_count),
        )
        try:
            await self._write_back(lambda: self.jobs.release(job, invocation.owner, delay), invocation)
        except CancelRequested:
            await self._cancel_held(job, invocation, paid_unknown=paid_unknown)
            return
        raise RetryLater(job.id, delay, gave_back_slot=True) from why

    async def _cancel_came(self, job_id: str) -> bool:
        """One look at the cancel flag; a read that fails is only a missed look (the watcher
        and the terminal write still see the flag)."""
        try:
            return await self._read_cancel(job_id)
        except Exception as exc:
            logger.warning("cancel check failed", extra={"job_id": job_id, "error_class": type(exc).__name__})
            return False

    async def _settle_unclaimed(self, outcome: ClaimOutcome, job: JobRecord, invocation: Invocation) -> None:
        """A job refused its claim for a reason that ends it unrun: ended so. A write AWS kept
        refusing brings the message back soon (each is conditional, and a look again finds the
        job as it stands), not after the lane's visibility timeout as an unexpected error would
        (hunt 265: a canceled batch's item, throttled, kept its batch canceling for a
        reconciler period, and paged as a fault); later at each receive (`_unsent_wait`), so
        that a throttle of minutes never spends its receives into the DLQ, where a canceled
        batch's item would fail as crashed (review 257: in 40 s, coming back in seconds)."""
        try:
            await self._end_unclaimed(outcome, job)
        except (StoreUnavailable, StoreContended) as exc:
            logger.warning("refused claim's end not written", extra={"job_id": job.id, "why": str(exc)})
            soon = _CONTENDED_DELAY_SECONDS * (1 + self._rng.random())
            raise RetryLater(job.id, max(soon, self._unsent_wait(invocation.receive_count))) from exc

    async def _end_unclaimed(self, outcome: ClaimOutcome, job: JobRecord) -> None:
        if outcome is ClaimOutcome.TERMINAL:
            await self._resend_lost_webhook(job)
        elif outcome in _ENDS_UNRUN and await self._record_parked(job):
            # It ends without another run: a result an earlier attempt paid for comes first.
            return
        elif outcome is ClaimOutcome.DEADLINE_PASSED and job.status is JobStatus.RUNNING:
            # Its worker crashed, and the deadline passed before a restart: it ran, so it fails
            # (`deadline_exceeded`, saying so) as a retry that would cross the deadline does.
            await self._announce(await asyncio.to_thread(self.jobs.fail_unleased, job, deadline_error(job)))
        elif outcome is ClaimOutcome.DEADLINE_PASSED:
            await self._announce(await asyncio.to_thread(self.jobs.expire, job, deadline_error(job)))
        elif outcome is ClaimOutcome.CANCEL_PENDING:
            await self._announce(await asyncio.to_thread(self.jobs.cancel_unleased, job))
        elif outcome is ClaimOutcome.RETENTION_DUE:
            # Too near the end of its retention to run: ended here, as the reconciler would.
            await self._announce(
                await asyncio.to_thread(self.jobs.expire_at_retention, job, retention_error(job))
            )
        elif outcome is ClaimOutcome.BATCH_CANCELED:
            canceled = await asyncio.to_thread(self.jobs.cancel_queued, job, write_token("cancel"))
            await self._announce(canceled)
        elif outcome is ClaimOutcome.CRASHES_EXHAUSTED:
            error = JobError(
                code=ErrorCode.WORKER_CRASHED,
                message=f"the worker stopped without an answer {job.attempts} times",
            )
            await self._announce(await asyncio.to_thread(self.jobs.fail_unleased, job, error))
        # LEASED_ELSEWHERE: a live worker owns the job; this copy is a duplicate.

    async def _record_parked(self, job: JobRecord) -> bool:
        """True when the job ended with a result an earlier attempt parked
        (`Offload.record_parked`). S3 failing for now raises StoreUnavailable: the message comes
        back later at each receive (`_settle_unclaimed`), not in seconds every time, which spent
        a canceled job's receives into the lane's DLQ within a minute of an S3 outage and paged
        (hunt 291)."""
        recorded = await asyncio.to_thread(self.offload.record_parked, self.jobs, job, ends=True)
        if recorded is None:
            return False
        await self._announce(recorded)
        return True

    async def _resend_lost_webhook(self, job: JobRecord) -> None:
        """A worker may have crashed between the terminal write and the webhook send.

        Only a job that finished a while ago is re-announced: a duplicate lane message that
        arrives right after completion must not double the webhook message. Nor is one whose
        delivery the dispatcher has attempted: its message, hidden for the backoff, carries the
        next attempt, and a second message would POST that attempt twice (a message lost after
        an attempt is the reconciler's to resend, when its next attempt is long overdue).
        The job's outcome was counted when it ended; a resend does not count it again.
        """
        if webhook_maybe_lost(job, self.jobs.now_ms(), self.config):
            await self._announce(job, counted=True)
        else:
            # A batch's end is looked at again at once: it writes and sends once, whoever asks.
            await self._announce_batch(job)

    async def _execute(self, job: JobRecord, invocation: Invocation, *, paid_unknown: bool = False) -> None:
        if await self._too_late_to_start(job, invocation, paid_unknown=paid_unknown):
            return
        # (once: a refused attempt, refunded, leaves the next one its first: review 285)
        if job.attempts == 1 and not job.refusals and job.wants(WebhookEvent.STARTED):
            # job.started is a courtesy; losing it must not cost the generation, nor may a slow
            # send (botocore's tries) leave the provider too little time: the time is looked
            # at again after it. A send given up on goes on in a thread of the output's own, so
            # that it never holds one the result's write (or its parking) will wait for.
            try:
                await asyncio.wait_for(
                    self._on_output_thread(
                        functools.partial(
                            self.queues.enqueue_webhook, job.id, WebhookEvent.STARTED, tenant_id=job.tenant_id
                        )
                    ),
                    _STARTED_SEND_SECONDS,
                )
            except (StoreUnavailable, TimeoutError):
                logger.warning("job.started not sent; the generation goes on", extra={"job_id": job.id})
            if await self._cancel_came(job.id):
                # The client saw the job running (or its job.started) and canceled while the
                # send went: the provider is never called for it.
                await self._cancel_held(job, invocation, paid_unknown=paid_unknown)
                return
            if await self._too_late_to_start(job, invocation, paid_unknown=paid_unknown):
                return
        remaining = invocation.remaining_seconds()
        # (a function too short to hand a late job back keeps a quarter of what is left)
        reserve = self._write_back_reserve(invocation)
        if remaining - reserve < _MIN_GENERATION_SECONDS:
            reserve = min(reserve, remaining * _WRITE_BACK_SHARE)
        timeout = remaining - reserve
        if self.config.provider.timeout_seconds is not None:
            timeout = min(self.config.provider.timeout_seconds, timeout)
        if job.input is None:  # the claim loads an S3-held input; this cannot be empty
            raise PoisonMessage(f"job {job.id} has no input")
        recorder = self._recorder(job) if job.stream else None
        answer = Answer()
        request = GenerationRequest(
            model=job.model,
            messages=job.input.messages,
            params=job.input.params,
            job_id=job.id,
            on_output=recorder,
            answer=answer,
        )
        generation = asyncio.create_task(self.provider.generate(request, max(timeout, 0.1)))
        watcher = asyncio.create_task(self._cancel_requested(job.id, recorder))
        writer = asyncio.create_task(self._record_output(job, invocation, recorder)) if recorder else None
        started = self.jobs.now_ms()
        stop = await _first_stop(generation, watcher, writer)
        watcher.cancel()
        # A whole answer taken as it stands, its trailer not awaited further.
        kept: JobResult | None = None
        if stop is _Stop.CANCELED and answer.whole and not generation.done():
            # The answer is whole, paid for: only its trailer is awaited, briefly. It stands;
            # unless more text comes after all (a gateway that marks chunks before the end),
            # and then the cancel stops it at once.
            waited_until = time.monotonic() + TRAILER_WAIT_SECONDS
            while answer.whole and not generation.done() and time.monotonic() < waited_until:
                await asyncio.wait({generation}, timeout=_TRAILER_LOOK_SECONDS)
            if answer.whole and answer.result is not None and not generation.done():
                # Still whole, its trailer still to come (the event loop was late, say): the
                # answer as it stands, never thrown away for the usage chunk or [DONE].
                kept = answer.result()
                generation.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await generation
        if stop is _Stop.LEASE_LOST or (
            stop is _Stop.CANCELED and not _succeeded(generation) and kept is None
        ):
            # At once: an output write still in flight must not keep a canceled generation
            # running (and paid for) while it ends.
            generation.cancel()
        if recorder is not None and writer is not None:
            # Let an output write (and its webhook) in flight finish, so it is counted once;
            # within the time the provider call had, so the result keeps its reserve.
            writer_stop = await self._close_writer(recorder, writer, invocation, reserve)
            stop = stop or writer_stop
        if stop is _Stop.CANCELED and (kept is not None or _succeeded(generation)):
            # The generation ended as the cancel came: it is paid for, and its result stands.
            stop = None
        if stop is not None:
            generation.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await generation
            if stop is _Stop.LEASE_LOST:
                # Another worker owns the job now (and its slot): our generation is stopped,
                # its result theirs.
                raise LeaseLost(f"job {job.id} was taken over while streaming; generation stopped")
            logger.info("job canceled while running", extra={"job_id": job.id})
            await self._settle(self.jobs.cancel_leased, job, invocation)
            return
        emit_job_metric(MetricName.RUN_TIME_MS, self.jobs.now_ms() - started, job.lane)
        try:
            result = kept if kept is not None else generation.result()
        except ProviderError as exc:
            await self._after_provider_error(job, invocation, exc)
            return
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            # An answer we could not read (a shape no provider was expected to send): the call
            # may have been billed, so it is not re-run; the client decides.
            logger.error(
                "provider answer unreadable", extra={"job_id": job.id, "error_class": type(exc).__name__}
            )
            error = JobError(
                code=ErrorCode.PROVIDER_ERROR,
                message="the provider's answer could not be read",
                retryable=True,
            )
            await self._fail_billed(job, invocation, error)
            return
        # A lone surrogate from the provider could be neither stored nor sent; and a streamed
        # job's tail, served from the result, must line up with the deltas kept the same way.
        result = result.model_copy(update={"output": printable(result.output)})
        if recorder is not None:
            await self._finish_output(job, invocation, recorder, result.output, reserve)
        await self._complete(job, invocation, result)

    async def _complete(
        self, job: JobRecord, invocation: Invocation, result: JobResult, *, ran: bool = True
    ) -> None:
        """Record a paid result, whatever AWS says for a while. A write that still fails
        parks the result in S3 first (`Offload.park_result`): the job is retried once its
        lease lapses, and that attempt records it instead of paying again (`ran` False: so
        this attempt's short time is no run time for its tenant's deferrals)."""
        done = await self._written_or_parked(
            lambda: self.offload.complete(self.jobs, job, invocation.owner, result, timed=ran),
            lambda: self.offload.park_result(job, result),
            job,
            invocation,
        )
        logger.info(
            "job succeeded",
            extra={
                "job_id": job.id,
                "output_tokens": result.usage.output_tokens,
                "finish_reason": result.finish_reason,
            },
        )
        await self._announce(done, invocation)

    async def _parked_result(
        self, job: JobRecord, invocation: Invocation
    ) -> JobResult | JobError | Literal[False] | None:
        """What an earlier attempt parked; None when nothing (or what is there cannot be read
        for good); False when S3 could not say through throttles for a bounded time (the job
        then runs)."""
        if self.offload.payloads is None:
            return None
        budget = min(_INPUT_LOAD_BUDGET_SECONDS, invocation.remaining_seconds() * _WRITE_BACK_SHARE)
        try:
            return await self._write_back(lambda: self.offload.parked_result(job), invocation, budget)
        except StoreUnavailable:
            # Handing the job back instead would leave it queued, where nothing that ends it
            # (a dead letter, its deadline, a cancel) looks for what was parked, and would fail
            # every retried job through an S3 outage: so it runs, as it would without parking.
            logger.warning(
                "parked result not looked for: S3 unavailable; the job runs", extra={"job_id": job.id}
            )
            return False
        except Exception as exc:
            logger.warning("parked result not read", extra={"job_id": job.id, **error_fields(exc)})
            return None

    async def _written_or_parked(
        self, write: Callable[[], T], park: Callable[[], None], job: JobRecord, invocation: Invocation
    ) -> T:
        """`write`, whatever AWS says for a while; a write that still fails `park`s what it
        wrote in S3 (`Offload.park_result`, `park_failure`) and raises: the job's next look
        records that instead of running the job again. Whatever it fails with, but a lease
        taken over or a cancel (the job is no longer this attempt's to end): an error no retry
        fixes (credentials expired, a grant or the table's key gone) left the paid result to
        the worker's memory alone, and the job ran again (hunt 333), while S3 answered."""
        try:
            return await self._write_back(write, invocation)
        except (LeaseLost, CancelRequested):
            raise
        except Exception:
            if self.offload.payloads is not None:
                # Within what is left of the Lambda (a second before its end): S3 failing with
                # DynamoDB must not time the invocation out, which would send every message of
                # its batch back instead of this one.
                budget = max(0.1, invocation.remaining_seconds() - 1.0)
                try:
                    await asyncio.wait_for(asyncio.to_thread(park), budget)
                    logger.warning("outcome write failed; the outcome is parked", extra={"job_id": job.id})
                except Exception as exc:
                    logger.error(
                        "outcome write failed, and parking it too",
                        extra={"job_id": job.id, **error_fields(exc)},
                    )
            raise

    async def _after_provider_error(self, job: JobRecord, invocation: Invocation, exc: ProviderError) -> None:
        if isinstance(exc, TransientProviderError):
            await self._after_transient(job, invocation, exc)
            return
        # Permanent errors fail at once. A timeout is not retried either: the provider may
        # still be generating, and billing; the client decides. Either may come after tokens
        # were generated (an in-band error mid-stream), so the failure is kept as a billed one.
        error = JobError(code=exc.code, message=exc.message, retryable=isinstance(exc, ProviderTimeout))
        logger.info("job failed", extra={"job_id": job.id, "code": exc.code.value})
        await self._fail_billed(job, invocation, error)

    async def _fail_billed(self, job: JobRecord, invocation: Invocation, error: JobError) -> None:
        """A failure after a call that may have been billed (a timeout, an answer that could not
        be read, an error after tokens, an attempt's last): its write must not be lost to a
        DynamoDB outage, or the job would run again, or end with another error than its own.

        A cancel the client asked meanwhile (answered 202), which the watcher had not seen,
        ends the job canceled instead, as the requeue's write would have found it: the write
        is refused while the flag is set (`fail_leased`), so a cancel that comes between
        any look and the write, or while the write is retried, is never written over."""
        try:
            done = await self._written_or_parked(
                lambda: self.jobs.fail_leased(job, invocation.owner, error),
                lambda: self.offload.park_failure(job, error),
                job,
                invocation,
            )
        except CancelRequested:
            logger.info("cancel requested; not failed", extra={"job_id": job.id, "attempt": job.attempts})
            await self._settle(self.jobs.cancel_leased, job, invocation)
            return
        await self._announce(done, invocation)

    async def _settle(
        self,
        write: Callable[..., JobRecord],
        job: JobRecord,
        invocation: Invocation,
        *args: object,
    ) -> None:
        """A terminal write on our lease, retried through throttles, then its webhook."""
        done = await self._write_back(lambda: write(job, invocation.owner, *args), invocation)
        await self._announce(done, invocation)

    async def _after_transient(
        self, job: JobRecord, invocation: Invocation, exc: TransientProviderError
    ) -> None:
        extra = {"job_id": job.id, "attempt": job.attempts, "status_code": exc.status_code}
        if exc.about_account:
            # (each refusal, at once: the retries are minutes apart, and the jobs fail only
            # once their attempts have run out)
            emit_count(MetricName.PROVIDER_ACCOUNT_REFUSED)
        # A refusal before generating (a rate limit, an overload: nothing paid for) is refunded,
        # a bounded number of times, so an outage of minutes does not fail the backlog
        refused = exc.refused and job.refusals < self.config.retry.max_refusals
        if refused:
            emit_count(MetricName.PROVIDER_REFUSED)
        if job.attempts >= self.config.max_attempts and not refused:
            error = JobError(
                code=ErrorCode.RETRIES_EXHAUSTED,
                message=f"gave up after {job.attempts} attempts; last error: {exc.message}",
                # (a refusal of llmq's own provider account is the operator's to fix, and a
                # refusal before generating paid for nothing: the same request may be sent
                # again later)
                retryable=exc.about_account or exc.refused,
            )
            logger.info("retries exhausted", extra=extra)
            await self._fail_billed(job, invocation, error)
            return
        wait = exc.retry_after
        if exc.about_account:
            # (an operator's to fix: minutes, doubling, rather than seconds between attempts)
            floor = self.config.retry.account_error_seconds * 2 ** max(0, job.attempts - 1)
            wait = max(wait or 0.0, floor)
        # (a refusal backs off by its own count, as attempts do: the provider's outage, not
        # the job's, sets the pace)
        backoff = job.refusals + 1 if refused else job.attempts
        delay = retry_delay_seconds(self.config.retry, backoff, wait, self._rng)
        if wait is not None and delay > wait and self._end_a_retry_would_cross(job, delay) is not None:
            # (the jitter above a stated wait never turns a retry that fits before the job's
            # deadline into a failure: review 286)
            delay = wait
        crossed = self._end_a_retry_would_cross(job, delay)
        if crossed is not None:
            end, ends = crossed
            error = JobError(
                code=ErrorCode.DEADLINE_EXCEEDED,
                message=f"attempt {job.attempts} failed ({exc.message}) and a retry would start after the job's {ends}",
                retryable=True,
            )
            logger.info(f"retry would cross the {end}", extra=extra)
            await self._fail_billed(job, invocation, error)
            return
        error = JobError(code=exc.code, message=exc.message, retryable=True)
        owner = invocation.owner
        try:
            await self._write_back(
                lambda: self.jobs.requeue(job, owner, error, delay, refused=refused), invocation
            )
        except CancelRequested:
            # The client canceled while the provider was failing: never send it again.
            logger.info("cancel requested; not retried", extra=extra)
            await self._settle(self.jobs.cancel_leased, job, invocation)
            return
        if refused:
            # A copy delayed by the backoff replaces this message, as a deferral's does: the
            # refusals of a provider outage never count the message's receives to the DLQ.
            message = LaneMessage(
                job_id=job.id, lane=job.lane, tenant_id=job.tenant_id, redrive_round=job.redrive_round
            )
            due_ms = self.jobs.now_ms() + int(delay * 1000)
            await self._resend(
                message,
                (job.tenant_id, job.lane),
                due_ms,
                delay,
                "the provider refused the request; the job waits, its attempt refunded",
                invocation=invocation,
                gave_back_slot=True,
                refusals=job.refusals + 1,
            )
            return
        logger.info("transient failure; job requeued", extra={**extra, "delay_seconds": round(delay, 1)})
        raise RetryLater(job.id, delay, gave_back_slot=True)

    def _end_a_retry_would_cross(self, job: JobRecord, delay: float) -> tuple[str, str] | None:
        """The end of the job a retry `delay` from now would start after, if any: its deadline,
        or its retention (within `reconciler.retention_margin_seconds` of it, after a Retry-After
        of hours, a retry would find it too late to run, or deleted)."""
        retry_at = self.jobs.now_ms() + delay * 1000
        if job.deadline_ms is not None and retry_at >= job.deadline_ms:
            return "deadline", "deadline"
        if retry_at >= (job.expires_at - self.config.reconciler.retention_margin_seconds) * 1000:
            return "retention", "retention ends"
        return None

    async def _write_back(
        self,
        write: Callable[[], T],
        invocation: Invocation,
        budget_seconds: float | None = None,
        *,
        recognises: bool = False,
    ) -> T:
        """Run a write, retrying throttles and 5xx with backoff while the Lambda has time
        (or for `budget_seconds`).

        Each repository write recognises its own earlier success, so a retry of a write that
        was applied but unanswered returns the job as written instead of failing. With
        `recognises` (the claim), the budget bounds the retries after the first only: the
        first try may have been applied, its answer lost (botocore's own tries take seconds to
        say so), and only a try after it recognises that write as ours, where giving up would
        leave it holding a lease. A StoreContended after such a try says so (`after_unanswered`).
        """
        pause = _WRITE_RETRY_FIRST_SECONDS
        started = invocation.remaining_seconds()
        tries = 0
        unanswered = False
        while True:
            try:
                # One try never outlasts the Lambda (botocore's own tries of a call that does
                # not answer take up to 40 s): what is left after it parks a paid result.
                async with asyncio.timeout(
                    max(0.5, invocation.remaining_seconds() - _AFTER_LAST_TRY_SECONDS)
                ):
                    return await asyncio.to_thread(write)
            except TimeoutError as timed_out:
                # (no time for another: the caller parks what it was writing, if it can)
                raise StoreUnavailable(
                    "the write did not answer in the time the Lambda has left"
                ) from timed_out
            except StoreUnavailable as exc:
                tries += 1
                if isinstance(exc, StoreContended):
                    exc.after_unanswered = exc.after_unanswered or unanswered
                else:
                    unanswered = True
                left = invocation.remaining_seconds()
                # The floor keeps the last try inside the Lambda's time (or the budget).
                if budget_seconds is not None and not (recognises and tries == 1):
                    left = min(left, budget_seconds - (started - left))
                if left < pause + _WRITE_RETRY_FLOOR_SECONDS:
                    raise
                logger.warning("write-back throttled; retrying", extra={"why": str(exc)})
                await asyncio.sleep(pause * (0.5 + self._rng.random() / 2))
                pause = min(pause * 2, _WRITE_RETRY_MAX_SECONDS)

    async def _cancel_requested(self, job_id: str, recorder: OutputRecorder | None = None) -> bool:
        """Re-read cancel_requested every few seconds; a quick job never pays for a read, nor
        does a streaming one while its output writes (which see a cancel) keep coming.

        A read that fails is only a missed look: the generation goes on, and the next look
        (or the terminal write) still sees the flag.
        """
        every = self.config.cancel_check_seconds
        looked = time.monotonic()
        while True:
            # The next look is one period after the last that saw the flag: this watcher's own
            # read, or an output write (which sees a cancel too), whichever came later, so a
            # cancel is never noticed more than one period late, however the writes fall.
            written = recorder.last_write_at if recorder is not None else None
            seen = max(looked, written) if written is not None else looked
            await asyncio.sleep(max(0.0, seen + every - time.monotonic()))
            written = recorder.last_write_at if recorder is not None else None
            if written is not None and written > seen:
                continue
            looked = time.monotonic()
            try:
                if await self._read_cancel(job_id):
                    return True
            except Exception as exc:
                logger.warning(
                    "cancel check failed; the generation goes on",
                    extra={"job_id": job_id, "error_class": type(exc).__name__},
                )

    # ---- live output (llmq.live_output) ------------------------------------------------------

    def _recorder(self, job: JobRecord) -> OutputRecorder:
        seq = job.stream_seq or 0
        return OutputRecorder(
            job_id=job.id,
            first_seq=seq,
            attempt=job.attempts,
            # Another attempt's output came before: clients drop it when this one's starts.
            reset=seq > 0 and job.stream_attempt != job.attempts,
            config=self.config.streaming,
        )

    async def _record_output(
        self, job: JobRecord, invocation: Invocation, recorder: OutputRecorder
    ) -> _Stop | None:
        """Write the output as it streams in, at most once per interval, until the generation
        ends (`recorder.close()`). A _Stop when a write found the job canceled or taken over:
        the generation stops there."""
        interval = self.config.streaming.partial_interval_ms / 1000
        while not recorder.closed.is_set():
            await recorder.arrived.wait()
            recorder.arrived.clear()
            if recorder.closed.is_set():
                return None
            stop = await self._write_output(job, invocation, recorder)
            if stop is not None:
                return stop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorder.closed.wait(), interval)
        return None

    async def _close_writer(
        self,
        recorder: OutputRecorder,
        writer: asyncio.Task[_Stop | None],
        invocation: Invocation,
        reserve: float,
    ) -> _Stop | None:
        """Stop the output writer, letting a write in flight end: within a bound, and never
        into the time kept back for the result."""
        recorder.close()
        budget = min(_FINAL_OUTPUT_SECONDS, max(0.0, invocation.remaining_seconds() - reserve))
        try:
            await asyncio.wait_for(asyncio.shield(writer), budget)
        except TimeoutError:
            writer.cancel()
            return None
        except Exception:
            pass  # reported by _writer_stop
        return _writer_stop(writer)

    async def _write_output(
        self, job: JobRecord, invocation: Invocation, recorder: OutputRecorder, *, final: bool = False
    ) -> _Stop | None:
        """One output write, then the job.output webhook if one is due. A write AWS does not
        take is only late: its chunk goes again, unchanged, with the next. Nothing here may
        fail the job: the output is kept on a best-effort basis, the result always."""
        chunk = recorder.next_chunk()
        if chunk is None:
            return None
        try:
            await self._on_output_thread(
                functools.partial(self.jobs.write_output, job, invocation.owner, chunk, final=final)
            )
        except CancelRequested:
            logger.info("output write found the job canceled", extra={"job_id": job.id})
            return _Stop.CANCELED
        except LeaseLost:
            return _Stop.LEASE_LOST
        except ItemTooLarge:
            # The job's item cannot hold the start of the output too: polls go without it.
            recorder.drop_partial()
            return None
        except Exception as exc:
            logger.warning(
                "output write failed; it goes with the next",
                extra={"job_id": job.id, "error_class": type(exc).__name__},
            )
            return None
        recorder.written(chunk)
        # (the last writes' chunks are sent together once they are all written, as many as
        # fit one message: `_finish_output`)
        if job.wants(WebhookEvent.OUTPUT) and not final:
            await self._send_output(job, recorder, final=False)
        return None

    async def _send_output(self, job: JobRecord, recorder: OutputRecorder, *, final: bool) -> None:
        """job.output webhooks: a courtesy, like job.started; one SQS refuses goes later.
        Each is taken from the recorder before it is sent, so a send cut short (its answer
        never awaited) is not sent again with the next."""
        while (event := recorder.take_webhook(final=final)) is not None:
            try:
                await self._on_output_thread(
                    functools.partial(
                        self.queues.enqueue_webhook,
                        job.id,
                        WebhookEvent.OUTPUT,
                        event,
                        tenant_id=job.tenant_id,
                    )
                )
            except Exception as exc:
                recorder.give_back_webhook()
                logger.warning(
                    "job.output webhook not sent yet",
                    extra={"job_id": job.id, "error_class": type(exc).__name__},
                )
                return
            if not final:
                return

    async def _read_cancel(self, job_id: str) -> bool:
        """The job's cancel flag, read on threads of its own: behind the invocation's other
        jobs' slow S3 or table calls in the default pool, a cancel would wait for them while
        the generation goes on, billed."""
        read = functools.partial(self.jobs.is_cancel_requested, job_id)
        return await _in_pool(self._cancel_threads, read)

    async def _on_output_thread(self, call: Callable[[], object]) -> None:
        """Output writes and their webhooks run on threads of their own: stalled by a slow
        table, they never hold up a result write waiting for a thread. A call given up on
        before its thread took it is dropped with it, never made late."""
        await _in_pool(self._output_threads, call)

    async def _finish_output(
        self, job: JobRecord, invocation: Invocation, recorder: OutputRecorder, output: str, reserve: float
    ) -> None:
        """The rest of a finished generation's output, before its result, so a client that
        read every delta has read the whole output; a provider that does not stream gives it
        all here. Bounded in time, tries and the Lambda's reserve: the events endpoint serves
        from the result whatever these writes leave out, and the result is written regardless.
        A cancel that came meanwhile does not refuse them: the generation is paid for."""
        if recorder.seq == (job.stream_seq or 0) and not recorder.has_output() and output:
            recorder(output)
            recorder.close()  # keeps what it held back
        # (the writes leave a slice of the time for their events' send: written but not sent,
        # the output they hold would come as no job.output at all)
        sends = _FINAL_SEND_SLICE_SECONDS if job.wants(WebhookEvent.OUTPUT) else 0.0
        deadline = time.monotonic() + min(
            _FINAL_OUTPUT_SECONDS, max(0.0, invocation.remaining_seconds() - reserve - sends)
        )
        stop = await self._write_final_output(job, invocation, recorder, deadline)
        # What the last writes wrote goes as job.output events, each as many chunks as fit one
        # message (one per chunk, a whole answer of 200,000 characters written at its end was
        # 13 events at once, more than the dispatcher takes in one batch): sent even when the
        # writes' own time ran out, within the time the result's reserve leaves.
        left = min(_FINAL_SEND_SECONDS, invocation.remaining_seconds() - reserve)
        if job.wants(WebhookEvent.OUTPUT) and stop is not _Stop.LEASE_LOST and left > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._send_output(job, recorder, final=True), left)

    async def _write_final_output(
        self, job: JobRecord, invocation: Invocation, recorder: OutputRecorder, deadline: float
    ) -> _Stop | None:
        """The recorder's rest written, until `deadline` or `_FINAL_OUTPUT_TRIES` failures."""
        tries = 0
        while recorder.has_output() and tries < _FINAL_OUTPUT_TRIES:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            before = recorder.seq
            try:
                stop = await asyncio.wait_for(
                    self._write_output(job, invocation, recorder, final=True), max(0.1, left)
                )
            except TimeoutError:
                return None
            if stop is not None:
                return stop
            if recorder.seq == before:
                tries += 1
                await asyncio.sleep(
                    min(_WRITE_RETRY_FIRST_SECONDS * tries, max(0.0, deadline - time.monotonic()))
                )
        return None

    async def _announce(
        self, job: JobRecord | None, invocation: Invocation | None = None, *, counted: bool = False
    ) -> None:
        """Send the terminal event. If SQS will not take it, the reconciler sends it later:
        the terminal write left the delivery pending in the reconciler's index."""
        if job is None:
            return
        if not counted:
            count_outcome(job.status, job.lane, job.error.code if job.error else None)
        carry = self.config.webhooks.trust_carried_job
        try:
            if invocation is None:
                await asyncio.to_thread(functools.partial(announce_terminal, self.queues, job, carry=carry))
            else:
                await self._write_back(lambda: announce_terminal(self.queues, job, carry=carry), invocation)
        except StoreUnavailable:
            logger.warning("webhook enqueue failed; the reconciler will send it", extra={"job_id": job.id})
        await self._announce_batch(job, invocation)

    async def _announce_batch(self, job: JobRecord, invocation: Invocation | None = None) -> None:
        """A batch's item ended: its batch may end with it (`llmq.batch_runs.settle`). If AWS
        will not answer, the item's message comes back to look again (a claim finds the job
        terminal and lands here), so a batch's end and its webhook are never left undone. With
        the `invocation`, the look ends in time for it: an item ended near the Lambda's end
        whose look met a stalled call ran past the function's timeout (hunt 295), and every
        record of the batch came back, a receive spent."""
        if job.batch_id is None or not job.status.is_terminal:
            return
        if self.batches is None:
            await asyncio.to_thread(item_ended, None, self.queues, job)
            return
        look = asyncio.to_thread(settle, self.batches, self.queues, job.batch_id)
        try:
            if invocation is None:
                await look
            else:
                left = invocation.remaining_seconds() - _RESEND_RESERVE_SECONDS
                try:
                    await asyncio.wait_for(look, max(0.1, left))
                except TimeoutError as timed_out:
                    raise StoreUnavailable(
                        "the batch's end check did not answer in the time left"
                    ) from timed_out
        except StoreUnavailable as exc:
            logger.warning(
                "batch end check failed; the item's message comes back", extra={"batch_id": job.batch_id}
            )
            # A webhook another caller is sending says when to look again (its grace period):
            # sooner would spend the message's receives towards the DLQ.
            delay = exc.retry_after or _CONTENDED_DELAY_SECONDS * (1 + self._rng.random())
            raise RetryLater(job.id, delay) from exc


def lane_job_id(body: str) -> str | None:
    """The job a lane message names, or None: for logs about a message that failed."""
    try:
        return _parse(body).job_id
    except PoisonMessage:
        return None


def _drop_foreign(message: LaneMessage, why: str) -> None:
    """A lane message no job of its names is run by (sent by hand, miswired, another version's):
    acknowledged, and nothing written; its job's own message runs it, or the reconciler looks
    at the job (hunt 316)."""
    logger.warning(
        f"lane message {why}; dropped",
        extra={"job_id": message.job_id, "tenant_id": message.tenant_id, "lane": message.lane},
    )


def _parse(body: str) -> LaneMessage:
    try:
        return LaneMessage.model_validate_json(body)
    except ValidationError as exc:
        raise PoisonMessage("the message is not a lane message") from exc


def mark_dead_letter(
    jobs: JobStore,
    queues: QueueStore,
    body: str,
    message_id: str,
    batches: tuple[BatchRepository, LlmqConfig] | None = None,
    crashed: Callable[[JobRecord], None] | None = None,
    offload: Offload | None = None,
    config: LlmqConfig | None = None,
) -> JobRecord | None:
    """A lane message that exhausted its receives (see `_mark_dead_letter`); a batch's item
    that ended here may end its batch, which a worker is asked to look at. A batch's expand
    message goes to `batch_runs.dead_lettered` (None: no job). `crashed` is told of the job
    this call's own write failed as `worker_crashed` (two copies at once: one of them).
    `offload` finds a result an earlier attempt parked, which ends the job instead."""
    message = _parse(body)
    if message.kind == "expand":
        if batches is None:
            raise PoisonMessage(f"an expand message of batch {message.job_id}, and no batches here")
        batch = dead_lettered(
            batches[0], queues, batches[1], message.job_id, message_id, message.redrive_round
        )
        if batch is not None:
            logger.info(
                "batch dead letter settled", extra={"batch_id": batch.id, "status": batch.status.value}
            )
        return None
    ended = _mark_dead_letter(
        jobs,
        queues,
        message,
        message_id,
        crashed or (lambda job: None),
        offload,
        config,
        batches[0] if batches is not None else None,
    )
    item_ended(None, queues, ended)
    return ended


def _mark_dead_letter(
    jobs: JobStore,
    queues: QueueStore,
    message: LaneMessage,
    message_id: str,
    crashed: Callable[[JobRecord], None],
    offload: Offload | None,
    config: LlmqConfig | None,
    batches: BatchRepository | None = None,
) -> JobRecord | None:
    """A lane message that exhausted its receives.

    - a job that ended already: its event is sent again only if it may have been lost
      (`webhook_maybe_lost`);

    - a job whose earlier attempt paid for a result and parked it ends with it
      (`Offload.record_parked`), whatever else below would end it;
    - a job at the end of its retention (or past it, not yet deleted) ends `expired`, unless
      asked to cancel;
    - a job asked to cancel ends `canceled`, as does a queued item of a canceling batch (whose
      claim is refused: a throttle that kept each claim's end from being written spent its
      receives); one past its deadline `expired`;
    - a running job whose worker vanished fails as `worker_crashed` (past its deadline, as
      `deadline_exceeded`), unless the letter was counted already or is of a round already
      answered: its newer message is alive, and its lapsed lease the reconciler's;
    - a queued job that never got claimed is sent once more, then fails as `worker_crashed`
      (a letter of a message sent in a round already answered changes nothing:
      `JobStore.note_dead_letter`).

    Raises PoisonMessage for a body that names no job, so it stays in the DLQ for a human.
    """
    # Past its retention too, not yet deleted (hunt 270: such a job was "no job", set aside as
    # poison, which paged; left running, its slot and quota stayed counted if the reconciler
    # had fallen behind, for good once DynamoDB's TTL deleted it)
    job = jobs.find(message.job_id, past_retention=True)
    if job is None:
        raise PoisonMessage(f"no job {message.job_id}")
    now_ms = jobs.now_ms()
    if job.status.is_terminal:
        if job.expires_at * 1000 > now_ms and webhook_maybe_lost(job, now_ms, config):
            announce_terminal(queues, job)
        return job
    recorded = offload.record_parked(jobs, job, ends=True) if offload is not None else None
    if recorded is not None:
        return _announced(queues, recorded)
    if job.cancel_requested:
        return _announced(queues, jobs.cancel_unleased(job))
    # In the order a claim judges the job by (`Claim.outcome`): a canceling batch, then the
    # deadline of a queued one, then its retention (review 258: a canceled batch's item near
    # its retention ended expired here, and canceled at its claim).
    if job.status is JobStatus.QUEUED and _batch_canceling(batches, job):
        return _announced(queues, jobs.cancel_queued(job, write_token("cancel")))
    if job.status is JobStatus.QUEUED and job.deadline_ms is not None and job.deadline_ms <= now_ms:
        return _announced(queues, jobs.expire(job, deadline_error(job)))
    margin = config.reconciler.retention_margin_seconds if config is not None else 0
    if job.expires_at - margin <= now_ms // 1000:
        # At the end of its retention: it ends expired, as its claim or the reconciler would
        # end it, giving back its slot and quota (None: a live worker holds it).
        return _announced(queues, jobs.expire_at_retention(job, retention_error(job)))
    if job.status is JobStatus.QUEUED:
        return _dead_letter_queued(jobs, queues, job, message_id, message.redrive_round, crashed)
    if job.deadline_ms is not None and job.deadline_ms <= now_ms:
        # Running, its worker gone, past its deadline: it fails as its claim or the
        # reconciler's recovery fails it (hunt 286: `worker_crashed`, not retryable).
        return _announced(queues, jobs.fail_unleased(job, deadline_error(job)))
    through = claimed_through(job)
    if through is not None and through != message_id:
        # Claimed through another message of the same round (the reconciler's, for a job it
        # took for one whose message was lost, or a lapsed lease's), whose worker crashed: this
        # letter, which never claimed the job, is late (the dead-letter function failing or
        # throttled meanwhile); the lapsed lease is the reconciler's, which runs the job again
        # while it has attempts left (hunt 324: one crash failed it for good). (SQS keeps a
        # message's id as it moves it to the DLQ.)
        logger.info(
            "dead letter of a message that did not claim the job: its lapsed lease is the reconciler's",
            extra={"job_id": job.id},
        )
        return None
    if message_id in job.dead_letter_ids or message.redrive_round < job.redrive_round:
        # A letter already counted (its record back, its acknowledgement lost), or of a round
        # already answered, for a job claimed since through its newer message: that message
        # is alive, and the reconciler recovers the lapsed lease, to run the job again while it
        # has attempts left (hunt 286: one crash since its claim failed it for good).
        logger.info(
            "dead letter of a round already answered: the job's lapsed lease is the reconciler's",
            extra={"job_id": job.id, "redrive_round": message.redrive_round},
        )
        return None
    error = JobError(
        code=ErrorCode.WORKER_CRASHED,
        message="the job's message exhausted its deliveries without an answer",
        retryable=False,
    )
    # (told before the announcement, whose send may fail: the count is the write's)
    return _announced(queues, _told(crashed, jobs.fail_unleased(job, error)))


def _batch_canceling(batches: BatchRepository | None, job: JobRecord) -> bool:
    """Whether the job is an item of a batch canceling, by its client or by llmq, which no
    claim of the item gets past (`JobRepository.claim`): one GetItem, for a batch's item."""
    item_of = batch_of(job.id)
    if batches is None or item_of is None:
        return False
    batch = batches.find(item_of[0])
    return batch is not None and batch.cancel_requested


def _told(crashed: Callable[[JobRecord], None], failed: JobRecord | None) -> JobRecord | None:
    """`failed`, which this call's write failed (None: it did not, or a cancel asked meanwhile
    ended it canceled instead), told to `crashed`."""
    if failed is not None and failed.status is JobStatus.FAILED:
        crashed(failed)
    return failed


def _dead_letter_queued(
    jobs: JobStore,
    queues: QueueStore,
    job: JobRecord,
    message_id: str,
    redrive_round: int,
    crashed: Callable[[JobRecord], None],
) -> JobRecord | None:
    counted = jobs.note_dead_letter(job, message_id, redrive_round)
    if counted is None:
        # It left queued meanwhile (whoever moved it owns it now), or the letter is a copy from
        # the round already answered.
        logger.info(
            "dead letter not counted: the job left queued, or its round was answered already",
            extra={"job_id": job.id, "redrive_round": redrive_round},
        )
        return None
    if len(counted.dead_letter_ids) <= MAX_DEAD_LETTER_REDRIVES:
        queues.enqueue_job(counted.id, counted.lane, counted.tenant_id, redrive_round=counted.redrive_round)
        logger.warning("queued job's message dead-lettered; sent again", extra={"job_id": counted.id})
        return counted
    error = JobError(
        code=ErrorCode.WORKER_CRASHED,
        message="no worker could claim the job: its messages dead-lettered "
        f"{len(counted.dead_letter_ids)} times",
        retryable=True,
    )
    return _announced(queues, _told(crashed, jobs.fail_queued_dead_letter(counted, error)))


async def _in_pool(pool: ThreadPoolExecutor, call: Callable[[], T]) -> T:
    """`call` on one of `pool`'s threads, in this task's context, as `asyncio.to_thread` runs
    calls in the default pool's (the invocation's logging, tracing and telemetry keys)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(pool, context.run, call)


def webhook_maybe_lost(job: JobRecord, now_ms: int, config: LlmqConfig | None) -> bool:
    """Whether a terminal job's event may have been lost, and is sent again when a stale lane
    message of it turns up (`JobRunner._resend_lost_webhook`, `mark_dead_letter`): only when no
    delivery was attempted (an attempted one's message, hidden for its backoff, carries the
    next attempt, which a second message would POST twice; the reconciler resends one lost
    after an attempt once that attempt is long overdue), and, with `config`, only for a job
    that ended a while ago (a copy of the lane message right after the end must not double
    the event's message)."""
    if job.delivery_attempts:
        return False
    if config is None:
        return True
    return now_ms - (job.finished_ms or 0) >= config.webhooks.timeout_seconds * 4 * 1000


def _announced(queues: QueueStore, job: JobRecord | None) -> JobRecord | None:
    if job is not None and job.status.is_terminal:
        count_outcome(job.status, job.lane, job.error.code if job.error else None)
        announce_terminal(queues, job)
    return job
