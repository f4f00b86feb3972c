"""Decisions about a job's life that the use cases make; the store only reports what it found.

- why a claim was refused, from the item the failed condition returned;
- what a missed deadline says to the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from llmq.job_record import JobRecord
from llmq.models import ErrorCode, JobError, JobStatus
from llmq.shares import ShareState

# A lane message that dead-lettered before its work was done (crashes between the receive and
# the claim, or a batch's expansion each time) is sent again this many times before its job,
# or its batch, is given up on.
MAX_DEAD_LETTER_REDRIVES = 1
# How far ahead of a job's `not_before_ms` (by the claiming environment's clock) a claim
# refused as not yet due waits in process and claims again, rather than sending the message
# back: another environment's clock wrote that time, and two environments' clocks can differ
# a little. Its message comes back on SQS's time; sent back, it would spend a receive (toward
# the DLQ) and a second (hunt 237). Never claimed early: a provider's Retry-After is kept by
# the claimer's clock.
DUE_TOLERANCE_MS = 1000


def fresh_letter_condition(redrive_round: int) -> str:
    """When a dead letter counts: it is the first since the last claim (for a batch, since the
    last step it got past), or its message was sent in the round not yet answered.

    A job (or batch) counts its letters in `redrive_round`, which nothing resets, and each of
    its lane messages carries the value when it was sent (`LaneMessage.redrive_round`).
    Several copies can be in flight at once (a duplicate, the reconciler's, a chunk's next):
    when they dead-letter in one round, the first counts, which moves the round on and sends
    one message of the new round, and the others change nothing. No clock decides it
    (SentTimestamp against the Lambda clock drops a real letter when the two drift).

    The first letter after a claim counts whatever its round: the set that decides the give-up
    starts afresh there, and the message of the current round may be gone (a claim through a
    stale copy deletes it as "leased elsewhere"), so a stale copy may be all that is left. Past
    that first one, only a message sent after it was counted can count. The count is one
    conditional UpdateItem (`:round`), so two letters handled at once count once. An item
    written before rounds existed has none, and is of the first round.
    """
    either = "attribute_not_exists(dead_letter_ids) OR redrive_round = :round"
    fresh = f"({either} OR attribute_not_exists(redrive_round))" if redrive_round == 0 else f"({either})"
    # Never a letter already counted, even before the last claim cleared the set: a DLQ record
    # redelivered (its acknowledgement lost) after a claim would count a crash again (hunt 241).
    return f"{fresh} AND NOT contains({COUNTED_LETTERS}, :letter)"


# Every dead letter a job or batch ever counted (its DLQ message ids), which no claim clears.
COUNTED_LETTERS = "counted_letters"


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    NOT_FOUND = "not_found"
    TERMINAL = "terminal"
    LEASED_ELSEWHERE = "leased_elsewhere"
    DEADLINE_PASSED = "deadline_passed"
    # Queued, waiting out its retry backoff: a duplicate message must not run it early.
    NOT_YET_DUE = "not_yet_due"
    CANCEL_PENDING = "cancel_pending"
    CRASHES_EXHAUSTED = "crashes_exhausted"
    # Claimable, but its tenant already runs as many jobs in the lane as its cap allows.
    AT_CAP = "at_cap"
    # A batch's item whose batch is canceling: it ends canceled, never started.
    BATCH_CANCELED = "batch_canceled"
    # Unfinished within the reconciler's margin of the end of its retention, or past it with
    # its item not yet deleted: it ends expired now, giving back its tenant's slot and quota,
    # never started again (a batch's queued items have no sweep entry: this is their look).
    RETENTION_DUE = "retention_due"
    # The message names another tenant or lane than its job's (sent by hand, or miswired): not
    # its job's message, which is the one to run it; nothing is written (hunt 316).
    FOREIGN = "foreign"


def refused_claim(found: JobRecord | None, now_ms: int, retention_margin_s: int = 0) -> ClaimOutcome:
    """Why the claim's condition failed, judged from the job as the store found it."""
    if found is None:
        return ClaimOutcome.NOT_FOUND
    if found.status.is_terminal:
        return ClaimOutcome.NOT_FOUND if found.expires_at * 1000 <= now_ms else ClaimOutcome.TERMINAL
    retention_due = found.expires_at - retention_margin_s <= now_ms // 1000
    if found.status is JobStatus.QUEUED:
        if found.cancel_requested:
            return ClaimOutcome.CANCEL_PENDING
        if found.deadline_ms is not None and found.deadline_ms <= now_ms:
            return ClaimOutcome.DEADLINE_PASSED
        return ClaimOutcome.RETENTION_DUE if retention_due else ClaimOutcome.NOT_YET_DUE
    if found.lease_expires_ms is not None and found.lease_expires_ms >= now_ms:
        return ClaimOutcome.LEASED_ELSEWHERE
    if found.cancel_requested:
        return ClaimOutcome.CANCEL_PENDING
    if retention_due:
        return ClaimOutcome.RETENTION_DUE
    if found.deadline_ms is not None and found.deadline_ms <= now_ms:
        # Its worker crashed, and the deadline passed before another could restart it (in the
        # reconciler's order: `Reconciler._recover`).
        return ClaimOutcome.DEADLINE_PASSED
    return ClaimOutcome.CRASHES_EXHAUSTED


def deadline_error(job: JobRecord) -> JobError:
    """Say what happened: a job that never ran differs from one whose retry came too late."""
    if job.attempts == 0 and not job.refusals:
        return JobError(
            code=ErrorCode.DEADLINE_EXCEEDED,
            message="The job did not start before its deadline",
            retryable=False,
        )
    last = f"; its last attempt failed: {job.error.message}" if job.error else ""
    return JobError(
        code=ErrorCode.DEADLINE_EXCEEDED,
        message=f"The job ran {job.attempts + job.refusals} time(s) and its deadline passed before the next retry{last}",
        retryable=True,
    )


def retention_error(job: JobRecord) -> JobError:
    """A job still unfinished as its retention runs out: ended expired, as a deadline would."""
    # (a job the provider refused, its attempts refunded, ran too: review 285)
    calls = job.attempts + job.refusals
    ran = f" after {calls} attempt(s)" if calls else ""
    return JobError(
        code=ErrorCode.DEADLINE_EXCEEDED,
        message=f"The job did not finish{ran} within its retention, and is kept no longer",
        retryable=calls > 0,
    )


@dataclass(frozen=True)
class Claim:
    """What a claim found: the store reports, `outcome` judges."""

    claimed: bool
    job: JobRecord | None
    # When the store looked (its clock), for judging leases and deadlines.
    at_ms: int
    # Set when only the tenant's cap refused the claim: its share as the condition found it.
    share: ShareState | None = None
    # Set when only its batch's cancel refused the claim of a batch's item.
    batch_canceled: bool = False
    # The claim refuses a job this close to the end of its retention (`reconciler.retention_margin_seconds`).
    retention_margin_s: int = 0
    # Set when the message named another tenant or lane than the job's.
    foreign: bool = False

    @property
    def outcome(self) -> ClaimOutcome:
        if self.claimed:
            return ClaimOutcome.CLAIMED
        if self.foreign:
            return ClaimOutcome.FOREIGN
        if self.batch_canceled and self.job is not None:
            # A running item past its lease is left to the reconciler, which queues it again.
            queued = self.job.status is JobStatus.QUEUED
            return ClaimOutcome.BATCH_CANCELED if queued else ClaimOutcome.LEASED_ELSEWHERE
        if self.share is not None:
            return ClaimOutcome.AT_CAP
        return refused_claim(self.job, self.at_ms, self.retention_margin_s)
