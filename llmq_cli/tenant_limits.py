"""`llmq tenants set-limits` and `llmq tenants show`: a tenant's limits, where each comes from.

- max_concurrency, max_active_jobs: the operator's overrides on the tenant's share item in the
  jobs table (llmq.shares), else its tier's defaults in LlmqConfig; max_batch_concurrency
  follows max_concurrency, less `batches.interactive_reserve`;
- max_long_polls: the override on the tenant's long-poll item (llmq.long_polls), else its tier's;
- rate and burst: the usage plan its API Gateway key is in (llmq.usage_plans), its own
  `llmq-tenant-<id>` plan when overridden, else its tier's plan from the stack.

A cap set (raised, or set again) reaches the tenant's waiting jobs at once (`DeferredBacklog`):
a job deferred at the cap before comes back when its deferral ends, up to
`fair_share.max_deferral_seconds` later, so `set-limits` sends a fresh lane message for as
many of its queued jobs as the cap has free slots. Each is a duplicate of the deferred copy,
which a claim already answers (the job is running or ended by then, and that copy is
acknowledged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from llmq.config import MAX_TENANT_SLOTS, LlmqConfig
from llmq.errors import StoreUnavailable
from llmq.long_polls import MAX_LONG_POLLS, LongPolls
from llmq.models import JobStatus
from llmq.ports import JobStore, QueueStore
from llmq.shares import MAX_ACTIVE_JOBS, MAX_BATCH_CONCURRENCY, MAX_CONCURRENCY, ShareRepository, ShareState
from llmq.tenants import Tenant, TenantRepository
from llmq.usage_plans import ApiGatewayUsagePlans, RateLimit
from llmq_cli.sandbox_state import EffectiveLimits

RATE = "rate"
CLEARABLE = (MAX_CONCURRENCY, MAX_ACTIVE_JOBS, MAX_LONG_POLLS, RATE)
OVERRIDE = "override"
TIER = "tier"


# The most any override may be: far above what a lane or a tenant runs, and a number the caps'
# arithmetic (a float times the batch reserve) still takes.
MAX_OVERRIDE = 1_000_000


# How many of the tenant index's entries a cap set reads, at most, looking for queued jobs
# (newest first, a page at a time); the oldest queued ones read are woken.
BACKLOG_READ_LIMIT = 10_000
_BACKLOG_PAGE = 500
WOKEN = "woken"
# Why waking stopped short (an AWS error after the cap was set), when it did.
WAKE_STOPPED = "wake_stopped"


class LimitsError(RuntimeError):
    """The operator asked for something that cannot be done; the message says why."""


class WakeCut(RuntimeError):
    """Waking the backlog stopped at an AWS error, after `woken` messages were sent."""

    def __init__(self, woken: int, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.woken = woken


@dataclass
class DeferredBacklog:
    """Wakes a tenant's queued jobs when its cap is set: their deferrals were reckoned against
    the cap before, and nothing else brings them back before those end."""

    jobs: JobStore
    queues: QueueStore

    def wake(self, tenant_id: str, lane: str, room: int) -> int:
        """Sends a lane message for up to `room` of the tenant's queued jobs in `lane` that can
        start now, the oldest of the newest `BACKLOG_READ_LIMIT` the tenant index holds; how
        many it sent. Each is read first (the index lags, and does not say when a job is due):
        one waiting out a retry's backoff would refuse its claim until then, holding the slot
        idle. `WakeCut` when AWS fails part way."""
        if room <= 0:
            return 0
        woken = 0
        try:
            queued: list[str] = []  # newest first
            cursor: str | None = None
            for _ in range(BACKLOG_READ_LIMIT // _BACKLOG_PAGE):
                page, cursor = self.jobs.list_for_tenant(tenant_id, JobStatus.QUEUED, _BACKLOG_PAGE, cursor)
                queued.extend(job.id for job in page if job.lane == lane)
                if cursor is None:
                    break
            now_ms = self.jobs.now_ms()
            for job_id in reversed(queued):
                if woken >= room:
                    break
                job = self.jobs.find(job_id)
                if job is None or job.status is not JobStatus.QUEUED or (job.not_before_ms or 0) > now_ms:
                    continue
                self.queues.enqueue_job(job_id, lane, tenant_id, redrive_round=job.redrive_round)
                woken += 1
        except (StoreUnavailable, ClientError, BotoCoreError) as exc:
            raise WakeCut(woken, exc) from exc
        return woken


@dataclass
class TenantLimits:
    """What `llmq tenants` needs: the tenants table, the shares, the usage plans, the config."""

    tenants: TenantRepository
    shares: ShareRepository
    polls: LongPolls
    usage_plans: ApiGatewayUsagePlans | None
    config: LlmqConfig
    # Where a raised cap wakes the tenant's deferred jobs; None: they wait out their deferrals.
    backlog: DeferredBacklog | None = None

    def show(self, tenant_id: str) -> dict[str, Any]:
        tenant = self.tenants.get(tenant_id)
        share = self.shares.get(tenant_id)
        return describe(self.config, tenant, share, self._rate(tenant), self.polls.limit(tenant_id))

    def set_limits(
        self,
        tenant_id: str,
        *,
        max_concurrency: int | None = None,
        max_active_jobs: int | None = None,
        max_long_polls: int | None = None,
        rate: float | None = None,
        burst: int | None = None,
        clear: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        # (a limit named twice is cleared once: DynamoDB refuses a REMOVE of one path twice,
        # after the rate and long-poll changes were made, hunt 274)
        clear = tuple(dict.fromkeys(clear))
        unknown = set(clear) - set(CLEARABLE)
        if unknown:
            raise LimitsError(f"--clear takes {', '.join(CLEARABLE)}, not {', '.join(sorted(unknown))}")
        if (rate is None) != (burst is None):
            raise LimitsError("give --rate and --burst together: a usage plan throttles with both")
        if rate is not None and RATE in clear:
            raise LimitsError("--rate and --clear rate contradict each other")
        overrides = (
            (MAX_CONCURRENCY, max_concurrency),
            (MAX_ACTIVE_JOBS, max_active_jobs),
            (MAX_LONG_POLLS, max_long_polls),
        )
        for name, value in overrides:
            # (a tenant's running jobs are held on its one share item: MAX_TENANT_SLOTS)
            most = MAX_TENANT_SLOTS if name == MAX_CONCURRENCY else MAX_OVERRIDE
            if value is not None and not 1 <= value <= most:
                raise LimitsError(f"{name} must be from 1 to {most:,}")
            if value is not None and name in clear:
                raise LimitsError(f"--{name.replace('_', '-')} and --clear {name} contradict each other")
        tenant = self.tenants.get(tenant_id)
        if rate is not None or RATE in clear:
            from llmq.usage_plans import UsagePlanError

            plans, key_id = self._plans_of(tenant)
            try:
                if rate is not None and burst is not None:
                    plans.set_rate(tenant.id, tenant.tier, key_id, rate, burst)
                else:
                    plans.clear_rate(tenant.id, tenant.tier, key_id)
            except UsagePlanError as exc:
                raise LimitsError(str(exc)) from exc
        if max_long_polls is not None or MAX_LONG_POLLS in clear:
            self.polls.set_limit(tenant_id, max_long_polls)
        share_clear = tuple(name for name in clear if name not in (RATE, MAX_LONG_POLLS))
        lane = self.config.lane_for_tier(tenant.tier).name
        cap_changes = max_concurrency is not None or MAX_CONCURRENCY in share_clear
        try:
            after = self.shares.set_limits(
                tenant_id,
                max_concurrency=max_concurrency,
                max_active_jobs=max_active_jobs,
                clear=share_clear,
                reserve=self.config.batches.interactive_reserve,
            )
        except ValueError as exc:
            raise LimitsError(str(exc)) from exc
        shown = self.show(tenant_id)
        if cap_changes:
            # (whether it rose or not: a run cut short before it woke every job is run again)
            self._wake(shown, tenant_id, lane, self._cap(after, tenant, lane), after)
        return shown

    def refresh_caps(self, tenant_id: str, tier: str) -> dict[str, Any] | None:
        """The tier's default caps as this deployment has them, on the tenant's share, for
        each deployed lane it has caps in (an accept writes its lane's; a claim holds the
        tenant to what is written): a deploy that changed them reaches the tenant's queued
        jobs and running batches now, not at its next submit. A cap raised wakes jobs deferred
        at the old one, as `set_limits` does. What changed, or None."""
        share = self.shares.get(tenant_id)
        caps = {
            lane: self.config.concurrency_caps(tier, lane)
            for lane in share.default_caps
            if lane in self.config.lanes_by_name
        }
        changed = {
            lane: caps[lane]
            for lane in caps
            if (share.default_caps.get(lane), share.default_batch_caps.get(lane)) != caps[lane]
        }
        own = self.config.lane_for_tier(tier).name
        # A raise is told from the cap this command last reconciled, not the one on the share:
        # the new api's accept of the tenant's next submit writes the raised cap, and a busy
        # tenant submits before make deploy's refresh runs (hunt 330: nothing read as changed,
        # its jobs deferred at the old cap waited out their deferrals with the raised slots idle).
        reconciled = share.refreshed_caps.get(own, share.default_caps.get(own))
        raised = own in caps and caps[own][0] > (reconciled or 0)
        refreshed = (
            {own: caps[own][0]} if own in caps and share.refreshed_caps.get(own) != caps[own][0] else {}
        )
        # (a raise whose wake an earlier run did not finish: a throttle, its answer lost)
        pending = share.wake_pending
        if not changed and pending is None and not refreshed:
            return None
        after = self.shares.refresh_default_caps(
            tenant_id, changed, wake=own if raised else None, refreshed=refreshed
        )
        if after is None or not (changed or raised or pending):
            return None
        shown: dict[str, Any] = {
            "id": tenant_id,
            "tier": tier,
            "caps": {
                lane: {"from": share.default_caps.get(lane), "to": cap, "batch_to": lane_batch_cap}
                for lane, (cap, lane_batch_cap) in changed.items()
            },
        }
        wake = own if raised else after.wake_pending
        if wake is not None and wake in caps and after.max_concurrency is None:
            self._wake(shown, tenant_id, wake, caps[wake][0], after)
        if wake is not None and WAKE_STOPPED not in shown:
            self.shares.clear_wake_pending(tenant_id, wake)
        return shown

    def _wake(self, shown: dict[str, Any], tenant_id: str, lane: str, cap: int, share: ShareState) -> None:
        """Wakes as many of the tenant's queued jobs as `cap` has free slots in `lane`, saying
        in `shown` how many (and why it stopped short, if it did)."""
        if self.backlog is None:
            return
        room = cap - len(share.holders.get(lane, {}))
        try:
            woken = self.backlog.wake(tenant_id, lane, min(room, share.interactive_queued))
            if woken:
                shown[WOKEN] = woken
        except WakeCut as cut:
            shown[WOKEN] = cut.woken
            shown[WAKE_STOPPED] = str(cut)

    def _cap(self, share: ShareState, tenant: Tenant, lane: str) -> int:
        cap = share.cap(lane)
        return cap if cap is not None else self.config.concurrency_cap(tenant.tier)

    def effective(self, tenant_id: str) -> EffectiveLimits:
        return flat(self.show(tenant_id))

    def _plans_of(self, tenant: Tenant) -> tuple[ApiGatewayUsagePlans, str]:
        if self.usage_plans is None:
            raise LimitsError("the stack has no usage plans (no UsagePlanIds output): deploy this version")
        if not tenant.usage_key_id:
            raise LimitsError(
                f"tenant {tenant.id} has no API Gateway key (created before usage plans existed)"
            )
        return self.usage_plans, tenant.usage_key_id

    def _rate(self, tenant: Tenant) -> RateLimit | None:
        if self.usage_plans is None or not tenant.usage_key_id:
            return None
        return self.usage_plans.rate_limit(tenant.id, tenant.tier, tenant.usage_key_id)


def describe(
    config: LlmqConfig,
    tenant: Tenant,
    share: ShareState,
    rate: RateLimit | None,
    max_long_polls: int | None = None,
) -> dict[str, Any]:
    """`llmq tenants show`: each effective limit with its source (override or tier)."""
    defaults = config.tenant_limits(tenant.tier)

    def limit(override: float | int | None, default: float | int) -> dict[str, Any]:
        return {
            "value": override if override is not None else default,
            "source": OVERRIDE if override is not None else TIER,
        }

    limits: dict[str, Any] = {
        "lane": config.lane_for_tier(tenant.tier).name,
        MAX_CONCURRENCY: limit(share.max_concurrency, config.concurrency_cap(tenant.tier)),
        # Of which batch items may take (the rest is kept for the tenant's other jobs).
        MAX_BATCH_CONCURRENCY: limit(share.max_batch_concurrency, config.concurrency_caps(tenant.tier)[1]),
        MAX_ACTIVE_JOBS: limit(share.max_active_jobs, defaults.max_active_jobs),
        # (the tier's, within half the api's reserved concurrency: what the api enforces)
        MAX_LONG_POLLS: limit(max_long_polls, config.long_poll_cap(tenant.tier)),
    }
    if rate is not None:
        source = OVERRIDE if rate.override else TIER
        limits["rate_per_second"] = {"value": rate.rate_per_second, "source": source}
        limits["burst"] = {"value": rate.burst, "source": source}
        limits["usage_plan"] = {"id": rate.plan_id, "name": rate.plan_name}
    else:
        # No key in a plan: what the tier's plan would apply, marked as not in force.
        limits["rate_per_second"] = {"value": defaults.rate_per_second, "source": "tier (no usage plan key)"}
        limits["burst"] = {"value": defaults.burst, "source": "tier (no usage plan key)"}
    return {
        "id": tenant.id,
        "name": tenant.name,
        "tier": tenant.tier,
        "limits": limits,
        "active": share.active,
        "running": share.running,
        "queued": share.queued,
    }


def flat(shown: dict[str, Any]) -> EffectiveLimits:
    """The limits as `.llmq/sandbox.json` lists them."""
    limits = shown["limits"]
    return EffectiveLimits(
        max_concurrency=int(limits[MAX_CONCURRENCY]["value"]),
        max_batch_concurrency=int(limits[MAX_BATCH_CONCURRENCY]["value"]),
        max_active_jobs=int(limits[MAX_ACTIVE_JOBS]["value"]),
        max_long_polls=int(limits[MAX_LONG_POLLS]["value"]),
        rate_per_second=float(limits["rate_per_second"]["value"]),
        burst=int(limits["burst"]["value"]),
    )
