"""Running one lane message: claim, call the provider, complete — or retry, fail, expire, cancel.

Every boto3 call runs in a thread so that the ten provider calls of a batch overlap on one
event loop: a Lambda waiting on ten slow generations costs one Lambda's time, not ten.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from llmq.config import LlmqConfig
from llmq.errors import LeaseLost, PoisonMessage
from llmq.jobs import ClaimOutcome, JobRecord, JobRepository
from llmq.lanes import retry_delay_seconds
from llmq.models import ErrorCode, JobError, JobStatus, LaneMessage, WebhookEvent
from llmq.providers import (
    ChatCompletionsProvider,
    GenerationRequest,
    PermanentProviderError,
    TransientProviderError,
)
from llmq.queues import QueueRepository
from llmq.telemetry import emit_job_metric, logger

# Time kept back from the provider call so the worker can still record the outcome:
# five seconds, or a quarter of what is left for very short functions (the sandbox).
_WRITE_BACK_SECONDS = 5.0
_WRITE_BACK_SHARE = 0.25


class RetryLater(Exception):
    """The job went back to queued; its message should reappear after `delay_seconds`."""

    def __init__(self, job_id: str, delay_seconds: float) -> None:
        super().__init__(f"{job_id} retries in {delay_seconds:.1f}s")
        self.job_id = job_id
        self.delay_seconds = delay_seconds


@dataclass(frozen=True)
class Invocation:
    """Who is running the message, and how long the Lambda has left."""

    owner: str
    remaining_seconds: Callable[[], float]


class JobRunner:
    def __init__(
        self,
        jobs: JobRepository,
        queues: QueueRepository,
        provider: ChatCompletionsProvider,
        config: LlmqConfig,
        rng: random.Random | None = None,
    ) -> None:
        self.jobs = jobs
        self.queues = queues
        self.provider = provider
        self.config = config
        self._rng = rng or random.Random()

    async def run(self, body: str, invocation: Invocation) -> None:
        """Process one lane message. Raises RetryLater or PoisonMessage to report it failed."""
        message = _parse(body)
        lease_seconds = invocation.remaining_seconds() + self.config.lease_margin_seconds
        claim = await asyncio.to_thread(self.jobs.claim, message.job_id, invocation.owner, lease_seconds)
        job = claim.job
        log = {"job_id": message.job_id, "claim": claim.outcome.value}
        if claim.outcome is ClaimOutcome.NOT_FOUND or job is None:
            raise PoisonMessage(f"no job {message.job_id}")
        if claim.outcome is ClaimOutcome.NOT_YET_DUE:
            # A copy of the message arrived during the backoff: it comes back when it is due.
            wait_ms = (job.not_before_ms or 0) - self.jobs.now_ms()
            raise RetryLater(job.id, max(1.0, wait_ms / 1000))
        if claim.outcome is not ClaimOutcome.CLAIMED:
            logger.info("message not claimed", extra=log)
            await self._settle_unclaimed(claim.outcome, job)
            return
        logger.info("job claimed", extra={**log, "attempt": job.attempts, "lane": job.lane})
        if job.attempts == 1 and job.started_ms is not None:
            emit_job_metric("QueueWaitMs", job.started_ms - job.created_ms, job.lane)
        try:
            await self._execute(job, invocation)
        except LeaseLost:
            # Another worker took the job over after our lease lapsed; its result stands.
            logger.warning("lease lost; result discarded", extra=log)

    async def _settle_unclaimed(self, outcome: ClaimOutcome, job: JobRecord) -> None:
        if outcome is ClaimOutcome.TERMINAL:
            await self._resend_lost_webhook(job)
        elif outcome is ClaimOutcome.DEADLINE_PASSED:
            await self._announce(await asyncio.to_thread(self.jobs.expire, job))
        elif outcome is ClaimOutcome.CANCEL_PENDING:
            await self._announce(await asyncio.to_thread(self.jobs.cancel_unleased, job))
        elif outcome is ClaimOutcome.CRASHES_EXHAUSTED:
            error = JobError(
                code=ErrorCode.WORKER_CRASHED,
                message=f"the worker stopped without an answer {job.attempts} times",
            )
            await self._announce(await asyncio.to_thread(self.jobs.fail_unleased, job, error))
        # LEASED_ELSEWHERE: a live worker owns the job; this copy is a duplicate.

    async def _resend_lost_webhook(self, job: JobRecord) -> None:
        """A worker may have crashed between the terminal write and the webhook send.

        Only a job that finished a while ago is re-announced: a duplicate lane message that
        arrives right after completion must not double the webhook message.
        """
        finished = job.finished_ms or 0
        if self.jobs.now_ms() - finished >= self.config.webhooks.timeout_seconds * 4 * 1000:
            await self._announce(job)

    async def _execute(self, job: JobRecord, invocation: Invocation) -> None:
        if job.attempts == 1 and job.wants(WebhookEvent.STARTED):
            await asyncio.to_thread(self.queues.enqueue_webhook, job.id, WebhookEvent.STARTED)
        remaining = invocation.remaining_seconds()
        reserve = min(_WRITE_BACK_SECONDS, remaining * _WRITE_BACK_SHARE)
        timeout = min(self.config.provider.timeout_seconds, remaining - reserve)
        if job.input is None:  # the claim loads an S3-held input; this cannot be empty
            raise PoisonMessage(f"job {job.id} has no input")
        request = GenerationRequest(
            model=job.model, messages=job.input.messages, params=job.input.params, job_id=job.id
        )
        generation = asyncio.create_task(self.provider.generate(request, max(timeout, 0.1)))
        watcher = asyncio.create_task(self._cancel_requested(job.id))
        started = self.jobs.now_ms()
        await asyncio.wait({generation, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and watcher.result():
            generation.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await generation
            logger.info("job canceled while running", extra={"job_id": job.id})
            await self._announce(await asyncio.to_thread(self.jobs.cancel_leased, job, invocation.owner))
            return
        watcher.cancel()
        emit_job_metric("RunTimeMs", self.jobs.now_ms() - started, job.lane)
        try:
            result = generation.result()
        except TransientProviderError as exc:
            await self._after_transient(job, invocation.owner, exc)
            return
        except PermanentProviderError as exc:
            error = JobError(code=exc.code, message=exc.message, retryable=False)
            logger.info("job failed", extra={"job_id": job.id, "code": exc.code.value})
            await self._announce(await asyncio.to_thread(self.jobs.fail_leased, job, invocation.owner, error))
            return
        done = await asyncio.to_thread(self.jobs.complete, job, invocation.owner, result)
        logger.info("job succeeded", extra={"job_id": job.id, "output_tokens": result.usage.output_tokens})
        await self._announce(done)

    async def _after_transient(self, job: JobRecord, owner: str, exc: TransientProviderError) -> None:
        extra = {"job_id": job.id, "attempt": job.attempts, "status_code": exc.status_code}
        if job.attempts >= self.config.max_attempts:
            error = JobError(
                code=ErrorCode.RETRIES_EXHAUSTED,
                message=f"gave up after {job.attempts} attempts; last error: {exc.message}",
                retryable=False,
            )
            logger.info("retries exhausted", extra=extra)
            await self._announce(await asyncio.to_thread(self.jobs.fail_leased, job, owner, error))
            return
        delay = retry_delay_seconds(self.config.retry, job.attempts, exc.retry_after, self._rng)
        error = JobError(code=exc.code, message=exc.message, retryable=True)
        await asyncio.to_thread(self.jobs.requeue, job, owner, error, delay)
        logger.info("transient failure; job requeued", extra={**extra, "delay_seconds": round(delay, 1)})
        raise RetryLater(job.id, delay)

    async def _cancel_requested(self, job_id: str) -> bool:
        """Re-read cancel_requested every few seconds; a quick job never pays for a read."""
        while True:
            await asyncio.sleep(self.config.cancel_check_seconds)
            if await asyncio.to_thread(self.jobs.is_cancel_requested, job_id):
                return True

    async def _announce(self, job: JobRecord | None) -> None:
        if job is None:
            return
        if job.status.is_terminal:
            emit_job_metric(_OUTCOME_METRICS[job.status], 1, job.lane)
        await asyncio.to_thread(self.queues.announce_terminal, job)


_OUTCOME_METRICS = {
    JobStatus.SUCCEEDED: "JobSucceeded",
    JobStatus.FAILED: "JobFailed",
    JobStatus.CANCELED: "JobCanceled",
    JobStatus.EXPIRED: "JobExpired",
}


def _parse(body: str) -> LaneMessage:
    try:
        return LaneMessage.model_validate_json(body)
    except ValidationError as exc:
        raise PoisonMessage("the message is not a lane message") from exc


def mark_dead_letter(jobs: JobRepository, queues: QueueRepository, body: str) -> JobRecord | None:
    """A lane message that exhausted its receives: the job fails as `worker_crashed`.

    Raises PoisonMessage for a body that names no job, so it stays in the DLQ for a human.
    """
    message = _parse(body)
    job = jobs.find(message.job_id)
    if job is None:
        raise PoisonMessage(f"no job {message.job_id}")
    if job.status.is_terminal:
        queues.announce_terminal(job)
        return job
    error = JobError(
        code=ErrorCode.WORKER_CRASHED,
        message="the job's message exhausted its deliveries without an answer",
        retryable=False,
    )
    failed = jobs.fail_unleased(job, error)
    if failed is not None:
        emit_job_metric("JobFailed", 1, failed.lane)
        queues.announce_terminal(failed)
    return failed
