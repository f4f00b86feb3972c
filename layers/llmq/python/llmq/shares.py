"""A tenant's share of the lanes: its active jobs (the quota) and its running jobs (the cap).

One item per tenant in the jobs table, `share#<tenant id>`, written in the same transaction
as every job write that changes either count. Each job write is conditional on the job's own
state, so a transition happens once, and its share update with it: the counts stay exact
under crashes, duplicate messages and retried writes (DESIGN §3.11).

- accept: `active` + 1, refused at the tenant's max_active_jobs;
- claim: the job joins its lane's holders, a map of job id to claim time, refused at the cap.
  A job taken over after its worker crashed is a holder already and is never refused: the
  crashed worker's slot passes to the job's next attempt;
- a batch's item also joins the lane's batch holders, refused at the batch cap: the cap less
  a reserve (`batches.interactive_reserve`) that only the tenant's own jobs may take, so its
  batches never leave its interactive jobs waiting behind them;
- back to queued (a retry, a release): the job leaves the holders;
- terminal: the job leaves the holders (nothing for a queued job) and `active` - 1.

`batch_active` counts the batches' items among the active jobs (written with `active` by a
batch's accept, its release and each item's end), so that a refused interactive job's deferral
reckons with the interactive backlog alone, not with a batch's thousands of items that can
never take its reserved slots (`deferral_seconds`). On a share that had items in flight when
it was introduced, their ends take it below the true count (for good: ADD has no floor); it is
read at 0 or more and at most `active`, so an under-count only lengthens the tenant's own jobs'
deferrals, as before it existed, and batch items' deferrals never read it.

The tier defaults come from LlmqConfig and each accept writes them; an operator's per-tenant
overrides (`llmq tenants set-limits`) live on the same item and win. The item has no
`tenant_id`, TTL or sweep attributes, so no index and no expiry ever sees it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from llmq.config import MAX_TENANT_SLOTS, FairShareConfig, batch_cap
from llmq.long_polls import POLLS_PREFIX

SHARE_PREFIX = "share#"
# A lane where the tenant's batch items take its whole cap (not its own lane: `hold`).
_WHOLE_PREFIX = "wholeb_"
BATCH_ACTIVE = "batch_active"
_HOLDERS_PREFIX = "run_"
_CAP_PREFIX = "cap_"
# The batch items among a lane's holders, and their cap (neither prefix starts the other two).
_BATCH_HOLDERS_PREFIX = "runb_"
_BATCH_CAP_PREFIX = "capb_"
# Per lane, how long the attempt of the tenant's last job to succeed ran (ms): what a deferral
# takes a run to be (none of the prefixes starts another).
_LAST_RUN_PREFIX = "lrun_"
# Per lane, the tier's default cap as `llmq tenants refresh-caps` last reconciled it (a share's
# first accept writes it too): what tells a raise by a deploy apart once the new api's accept
# has written the raised cap before make deploy's refresh ran (hunt 330).
_REFRESHED_CAP_PREFIX = "capr_"
# Operator overrides; tier defaults apply where they are absent.
MAX_CONCURRENCY = "max_concurrency"
MAX_ACTIVE_JOBS = "max_active_jobs"
# Set with max_concurrency, from the same reserve as the tier default's batch cap.
MAX_BATCH_CONCURRENCY = "max_batch_concurrency"
# The lane whose raised default cap has jobs still to wake (`ShareState.wake_pending`).
WAKE_PENDING = "wake_pending"


def share_key(tenant_id: str) -> dict[str, Any]:
    return {"pk": {"S": SHARE_PREFIX + tenant_id}}


def is_share_key(pk: str) -> bool:
    """An item of the jobs table that is no job: a tenant's share or long-polls, or a batch."""
    # "batch#": llmq.batches.BATCH_PREFIX (which imports this module).
    return pk.startswith((SHARE_PREFIX, POLLS_PREFIX, "batch#"))


def holders_of(lane: str) -> str:
    """The share's attribute holding the tenant's running jobs in `lane` (job id -> claim ms)."""
    return _HOLDERS_PREFIX + lane


def batch_holders_of(lane: str) -> str:
    """The share's attribute holding the tenant's running batch items in `lane`."""
    return _BATCH_HOLDERS_PREFIX + lane


# An accept makes sure both holders maps of its lane exist (a claim and a departure write
# inside them; `ensure_holders` repairs a share written before the batch map existed), and
# refreshes the tier's default caps for the lane.
_ACCEPT_SETS = (
    "#h = if_not_exists(#h, :empty), #bh = if_not_exists(#bh, :empty), #cap = :cap, #bcap = :bcap, "
    "#rcap = if_not_exists(#rcap, :cap)"
)


def _accept_names(lane: str) -> dict[str, str]:
    return {
        "#h": holders_of(lane),
        "#bh": batch_holders_of(lane),
        "#cap": _CAP_PREFIX + lane,
        "#bcap": _BATCH_CAP_PREFIX + lane,
        "#rcap": _REFRESHED_CAP_PREFIX + lane,
        "#max": MAX_ACTIVE_JOBS,
    }


def admit(
    table: str, tenant_id: str, lane: str, cap: int, batch_cap: int, max_active_jobs: int
) -> dict[str, Any]:
    """Accept: one more active job, unless the tenant is at its quota. `cap` and `batch_cap`:
    the tier's defaults for the lane. A job of the tenant's own runs in its own lane, so the lane
    is no longer one its batch items may take whole (`admit_many`), whatever a config before
    said: the mark goes."""
    return {
        "Update": {
            "TableName": table,
            "Key": share_key(tenant_id),
            "UpdateExpression": f"SET {_ACCEPT_SETS} ADD active :one REMOVE #whole",
            "ConditionExpression": "attribute_not_exists(active) OR active < #max OR "
            "(attribute_not_exists(#max) AND active < :max)",
            "ExpressionAttributeNames": {**_accept_names(lane), "#whole": _WHOLE_PREFIX + lane},
            "ExpressionAttributeValues": {
                ":empty": {"M": {}},
                ":cap": {"N": str(cap)},
                ":bcap": {"N": str(batch_cap)},
                ":one": {"N": "1"},
                ":max": {"N": str(max_active_jobs)},
            },
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
    }


def admit_many(
    table: str,
    tenant_id: str,
    lane: str,
    caps: tuple[int, int],
    count: int,
    state: ShareState,
    default_max_active: int,
    *,
    whole_lane: bool = False,
) -> dict[str, Any]:
    """A batch's accept: `count` more active jobs at once, unless that passes the tenant's quota.

    DynamoDB's conditions have no arithmetic, so the quota in force is read first (`state`)
    and the condition holds it still: the active count at most the quota less `count`, and the
    operator's override as read. A refusal is the quota's (or a race with its override).
    `whole_lane`: `lane` is not the tenant's own (`batches.lane`), so its items there take the
    whole cap (`hold`).
    """
    limit = state.max_active_jobs or default_max_active
    override = "attribute_not_exists(#max)" if state.max_active_jobs is None else "#max = :limit"
    values = {
        ":empty": {"M": {}},
        ":cap": {"N": str(caps[0])},
        ":bcap": {"N": str(caps[1])},
        ":count": {"N": str(count)},
        ":threshold": {"N": str(limit - count)},
    }
    if state.max_active_jobs is not None:
        values[":limit"] = {"N": str(limit)}
    names = _accept_names(lane)
    sets = _ACCEPT_SETS
    if whole_lane:
        names["#whole"] = _WHOLE_PREFIX + lane
        sets += ", #whole = :true"
        values[":true"] = {"BOOL": True}
    return {
        "Update": {
            "TableName": table,
            "Key": share_key(tenant_id),
            "UpdateExpression": f"SET {sets} ADD active :count, {BATCH_ACTIVE} :count",
            "ConditionExpression": f"(attribute_not_exists(active) OR active <= :threshold) AND {override}",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
    }


def release_many(table: str, tenant_id: str, count: int) -> dict[str, Any]:
    """`count` active jobs that will never be: a canceled batch's items never written."""
    return {
        "Update": {
            "TableName": table,
            "Key": share_key(tenant_id),
            "UpdateExpression": f"ADD active :minus, {BATCH_ACTIVE} :minus",
            "ExpressionAttributeValues": {":minus": {"N": str(-count)}},
        }
    }


def _below(holders: str, override: str, default: str) -> str:
    """A condition: the job holds a slot of `holders` already, or one is free below the
    operator's override, else below the tier's default (none written: no cap). A missing map
    passes, so that the update inside it is refused (a ValidationException, which
    `ensure_holders` repairs) rather than the claim deferred for ever: `size` of a missing
    attribute is no number, and every comparison with it is false."""
    return (
        f"(attribute_not_exists({holders}) OR attribute_exists({holders}.#job) OR size({holders}) < {override} OR "
        f"(attribute_not_exists({override}) AND (attribute_not_exists({default}) OR size({holders}) < {default})))"
    )


def hold(
    table: str, tenant_id: str, lane: str, job_id: str, now_ms: int, *, batch_item: bool = False
) -> dict[str, Any]:
    """Claim: the job takes one of the tenant's slots in the lane, unless they are all held;
    a batch's item also one of its batch slots, unless they are all held. In a lane that is
    not the tenant's own (`batches.lane`), where none of its own jobs runs, a batch's accept
    marked the lane whole (`admit_many`): no slot is kept there for the tenant's own jobs, and
    an item takes any of its slots, under an operator's cap as under the tier's.

    A job already holding one (a takeover of its own expired lease) keeps it.
    """
    names = {"#h": holders_of(lane), "#job": job_id, "#max": MAX_CONCURRENCY, "#cap": _CAP_PREFIX + lane}
    # (and never past what the share item can name, whatever cap an operator stored before
    # that bound: review 266)
    expression = "SET #h.#job = :now"
    condition = (
        f"{_below('#h', '#max', '#cap')} AND "
        "(attribute_not_exists(#h) OR attribute_exists(#h.#job) OR size(#h) < :slots)"
    )
    if batch_item:
        names |= {
            "#bh": batch_holders_of(lane),
            "#bmax": MAX_BATCH_CONCURRENCY,
            "#bcap": _BATCH_CAP_PREFIX + lane,
            "#whole": _WHOLE_PREFIX + lane,
        }
        expression += ", #bh.#job = :now"
        # (an operator's cap set before batch caps existed has none: refused until
        # `repair_batch_slots` writes it, rather than held to the tier's default)
        condition += (
            " AND (attribute_exists(#whole) OR ("
            + _below("#bh", "#bmax", "#bcap")
            + " AND (attribute_not_exists(#max) OR attribute_exists(#bmax))))"
        )
    return {
        "Update": {
            "TableName": table,
            "Key": share_key(tenant_id),
            "UpdateExpression": expression,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": {":now": {"N": str(now_ms)}, ":slots": {"N": str(MAX_TENANT_SLOTS)}},
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
    }


def leave(
    table: str,
    tenant_id: str,
    lane: str,
    job_id: str,
    *,
    ends: bool,
    batch_item: bool = False,
    ran_ms: int | None = None,
) -> dict[str, Any]:
    """The job gives its slot back (if it held one); `ends`: it is no longer active either.
    `ran_ms`: how long it ran, kept as the lane's last run (`deferral_seconds`)."""
    update: dict[str, Any] = {
        "TableName": table,
        "Key": share_key(tenant_id),
        "UpdateExpression": "REMOVE #h.#job" + (", #bh.#job" if batch_item else ""),
        "ExpressionAttributeNames": {
            "#h": holders_of(lane),
            "#job": job_id,
            **({"#bh": batch_holders_of(lane)} if batch_item else {}),
        },
    }
    values: dict[str, Any] = {}
    if ran_ms is not None:
        update["UpdateExpression"] = "SET #lrun = :ran " + update["UpdateExpression"]
        update["ExpressionAttributeNames"]["#lrun"] = _LAST_RUN_PREFIX + lane
        values[":ran"] = {"N": str(max(0, ran_ms))}
    if ends:
        update["UpdateExpression"] += " ADD active :minus" + (
            f", {BATCH_ACTIVE} :minus" if batch_item else ""
        )
        values[":minus"] = {"N": "-1"}
    if values:
        update["ExpressionAttributeValues"] = values
    return {"Update": update}


# Stale batch slots given back by one repair, at most (an UpdateItem's expression stays small).
_REPAIR_MAX = 50


def repair_batch_slots(table: str, share: ShareState, lane: str, reserve: float) -> dict[str, Any] | None:
    """UpdateItem arguments repairing what refused a batch's item, as `share` (the refused
    condition's) shows it, or None when nothing needs it:

    - batch slots of jobs that hold no slot: their end was written by a version that knew no
      batch slots (a rollback, a deploy's mixed versions), since every claim writes both maps
      and every end removes both at once. Given back, each only if still holding no slot;
    - an operator's cap set before batch caps existed: its batch cap, from the same reserve.
    """
    held = share.holders.get(lane, {})
    stale = [job for job in share.batch_holders.get(lane, {}) if job not in held][:_REPAIR_MAX]
    uncapped = share.max_concurrency is not None and share.max_batch_concurrency is None
    if not stale and not uncapped:
        return None
    # (DynamoDB refuses a name the expressions do not use)
    names = {"#h": holders_of(lane), "#bh": batch_holders_of(lane)} if stale else {}
    names |= {f"#s{n}": job for n, job in enumerate(stale)}
    conditions = [f"attribute_not_exists(#h.#s{n})" for n in range(len(stale))]
    expression = "REMOVE " + ", ".join(f"#bh.#s{n}" for n in range(len(stale))) if stale else ""
    values: dict[str, Any] = {}
    if uncapped and share.max_concurrency is not None:
        names |= {"#max": MAX_CONCURRENCY, "#bmax": MAX_BATCH_CONCURRENCY}
        values = {
            ":max": {"N": str(share.max_concurrency)},
            ":bmax": {"N": str(batch_cap(share.max_concurrency, reserve))},
        }
        expression = f"SET #bmax = :bmax {expression}"
        conditions.append("#max = :max AND attribute_not_exists(#bmax)")
    return {
        "TableName": table,
        "Key": share_key(share.tenant_id),
        "UpdateExpression": expression.strip(),
        "ConditionExpression": " AND ".join(conditions),
        "ExpressionAttributeNames": names,
        **({"ExpressionAttributeValues": values} if values else {}),
    }


def ensure_holders(table: str, tenant_id: str, lane: str) -> dict[str, Any]:
    """UpdateItem arguments creating the lane's holders maps where missing: a share written
    before batch holders existed, whose batch items could not otherwise claim or leave."""
    return {
        "TableName": table,
        "Key": share_key(tenant_id),
        "UpdateExpression": "SET #h = if_not_exists(#h, :empty), #bh = if_not_exists(#bh, :empty)",
        "ConditionExpression": "attribute_exists(pk)",
        "ExpressionAttributeNames": {"#h": holders_of(lane), "#bh": batch_holders_of(lane)},
        "ExpressionAttributeValues": {":empty": {"M": {}}},
    }


@dataclass(frozen=True)
class ShareState:
    """A tenant's share item as read (or as a refused condition returned it)."""

    tenant_id: str
    active: int = 0
    # Of `active`, the batches' items (none below 0: a share older than the count).
    batch_active: int = 0
    # Per lane: job id -> when its current attempt was claimed (epoch ms).
    holders: dict[str, dict[str, int]] = field(default_factory=dict)
    # Per lane: the tier's default cap, as the last accept wrote it.
    default_caps: dict[str, int] = field(default_factory=dict)
    max_concurrency: int | None = None
    max_active_jobs: int | None = None
    # Per lane: the batch items among the holders, and the default cap of batch items.
    batch_holders: dict[str, dict[str, int]] = field(default_factory=dict)
    default_batch_caps: dict[str, int] = field(default_factory=dict)
    max_batch_concurrency: int | None = None
    # Per lane: how long the attempt of the tenant's last job to succeed ran (ms).
    last_runs: dict[str, int] = field(default_factory=dict)
    # Per lane: the default cap as refresh-caps last reconciled it (`_REFRESHED_CAP_PREFIX`).
    refreshed_caps: dict[str, int] = field(default_factory=dict)
    # The lane whose default cap `refresh_default_caps` raised, until the jobs deferred at the
    # old cap are woken (`clear_wake_pending`): a wake cut short is done by the next refresh.
    wake_pending: str | None = None

    @classmethod
    def from_item(cls, tenant_id: str, item: dict[str, Any] | None) -> ShareState:
        if not item:
            return cls(tenant_id=tenant_id)
        maps: dict[str, dict[str, dict[str, int]]] = {_HOLDERS_PREFIX: {}, _BATCH_HOLDERS_PREFIX: {}}
        caps: dict[str, dict[str, int]] = {
            _CAP_PREFIX: {},
            _BATCH_CAP_PREFIX: {},
            _LAST_RUN_PREFIX: {},
            _REFRESHED_CAP_PREFIX: {},
        }
        for name, value in item.items():
            prefix, _, lane = name.partition("_")
            prefix += "_"
            if prefix in maps and "M" in value:
                maps[prefix][lane] = {job: int(started["N"]) for job, started in value["M"].items()}
            elif prefix in caps and "N" in value:
                caps[prefix][lane] = int(value["N"])

        def override(name: str) -> int | None:
            return int(item[name]["N"]) if name in item else None

        return cls(
            tenant_id=tenant_id,
            active=int(item.get("active", {}).get("N", 0)),
            batch_active=max(0, int(item.get(BATCH_ACTIVE, {}).get("N", 0))),
            holders=maps[_HOLDERS_PREFIX],
            default_caps=caps[_CAP_PREFIX],
            max_concurrency=override(MAX_CONCURRENCY),
            max_active_jobs=override(MAX_ACTIVE_JOBS),
            batch_holders=maps[_BATCH_HOLDERS_PREFIX],
            default_batch_caps=caps[_BATCH_CAP_PREFIX],
            max_batch_concurrency=override(MAX_BATCH_CONCURRENCY),
            last_runs=caps[_LAST_RUN_PREFIX],
            refreshed_caps=caps[_REFRESHED_CAP_PREFIX],
            wake_pending=item[WAKE_PENDING]["S"] if "S" in item.get(WAKE_PENDING, {}) else None,
        )

    @property
    def running(self) -> int:
        return sum(len(jobs) for jobs in self.holders.values())

    @property
    def queued(self) -> int:
        """Active jobs not holding a slot: the tenant's backlog, all lanes together."""
        return max(0, self.active - self.running)

    @property
    def batch_running(self) -> int:
        return sum(len(jobs) for jobs in self.batch_holders.values())

    @property
    def batch_queued(self) -> int:
        """The batches' items not holding a slot, all lanes together."""
        return max(0, min(self.batch_active, self.active) - self.batch_running)

    @property
    def interactive_queued(self) -> int:
        """The tenant's own jobs (not a batch's items) not holding a slot."""
        return max(0, self.queued - self.batch_queued)

    def cap(self, lane: str) -> int | None:
        """The cap in force in `lane`: the operator's override, else the tier's default; never
        more than MAX_TENANT_SLOTS (an override stored before that bound: review 266)."""
        if self.max_concurrency is not None:
            return min(self.max_concurrency, MAX_TENANT_SLOTS)
        return self.default_caps.get(lane)

    def batch_cap(self, lane: str) -> int | None:
        """The cap of batch items in force in `lane`, as `hold` reads it."""
        if self.max_batch_concurrency is not None:
            return self.max_batch_concurrency
        return self.default_batch_caps.get(lane)

    def of_batches(self) -> ShareState:
        """The share as a batch item's deferral sees it: its batch slots and their cap."""
        return ShareState(
            tenant_id=self.tenant_id,
            # (all the tenant's active jobs: an over-estimate of the batches' backlog, which only
            # lengthens their deferrals; `batch_active` may under-count on a share older than it)
            active=self.active,
            holders=self.batch_holders,
            default_caps=self.default_batch_caps,
            max_concurrency=self.max_batch_concurrency,
            max_active_jobs=self.max_active_jobs,
            last_runs=self.last_runs,
        )


def deferral_seconds(
    state: ShareState,
    lane: str,
    now_ms: int,
    policy: FairShareConfig,
    rng: random.Random,
    *,
    batch_item: bool = False,
    live_for_ms: int | None = None,
    recovered_within_s: float | None = None,
) -> float:
    """How long a message whose tenant is at its cap waits before its next claim.

    The tenant's backlog drains at about cap / run time jobs a second. The run time is how long
    the tenant's last job in the lane ran, or the age of the oldest attempt now holding a slot
    if that is longer; for a tenant with no last run yet, twice the mean age of those attempts
    (in a steady state their ages spread evenly over one run). An attempt older than
    `live_for_ms` (a worker's whole time and the lease margin) has no live worker: its slot
    waits for the reconciler, and its age says nothing of how long runs take.

    Each deferred message comes back at a uniformly random point of a window as long as that
    drain time divided by `deferral_pressure`: the backlog then returns `deferral_pressure`
    times as fast as slots free up, from the first second on, so a freed slot is taken soon,
    while each return that finds the cap still full is deferred again over what is left. A
    larger backlog or longer runs spread further; nothing spins. A batch's item refused by its
    batch cap waits for one of its batch slots instead. The tenant's own job counts only the
    tenant's own jobs as its backlog, and only the slots they hold as draining it: a batch's
    items can never take the slots kept for them (`batches.interactive_reserve`), however many
    wait.
    """
    interactive = not batch_item
    if batch_item and len(state.batch_holders.get(lane, {})) >= (state.batch_cap(lane) or 0) > 0:
        state = state.of_batches()
    held = state.holders.get(lane, {})
    cap = max(1, len(held), state.cap(lane) or 1)
    if interactive:
        # (the slots a batch's items hold free for them, not for this job)
        cap = max(1, cap - len(state.batch_holders.get(lane, {})))
    ages = [max(0, now_ms - started) for started in held.values()]
    ages = [age for age in ages if live_for_ms is None or age <= live_for_ms]
    recovery = 0.0
    if held and not ages and live_for_ms is not None:
        # Every slot held by a worker long gone (its lease lapsed): none frees before the
        # reconciler recovers them, all together, within one of its periods
        # (`recovered_within_s`); the backlog comes back over that time, and then drains as
        # usual, rather than spinning against a full cap until then.
        recovery = recovered_within_s if recovered_within_s is not None else live_for_ms / 1000
    if lane in state.last_runs:
        # (the holders' mean age misleads when they started together: about to end, they
        # look like half a run; just started, like nothing)
        run_seconds = max(state.last_runs[lane], max(ages, default=0)) / 1000
    elif ages:
        run_seconds = 2 * sum(ages) / len(ages) / 1000
    else:
        run_seconds = 1.0
    run_seconds = max(policy.min_deferral_seconds, run_seconds)
    backlog = max(1, state.interactive_queued if interactive else state.queued)
    window = backlog * run_seconds / cap / policy.deferral_pressure
    delay = window * rng.random() + (recovery * rng.random() if recovery else 0.0)
    return min(max(delay, policy.min_deferral_seconds), policy.max_deferral_seconds)


class ShareRepository:
    """Reads a tenant's share and sets its overrides (the operator's CLI, the API's position)."""

    def __init__(self, table_name: str, *, dynamodb: Any) -> None:
        from llmq import aws

        self.table_name = table_name
        self._ddb = aws.TranslatedClient(dynamodb)

    def get(self, tenant_id: str) -> ShareState:
        response = self._ddb.get_item(
            TableName=self.table_name, Key=share_key(tenant_id), ConsistentRead=True
        )
        return ShareState.from_item(tenant_id, response.get("Item"))

    def refresh_default_caps(
        self,
        tenant_id: str,
        caps: dict[str, tuple[int, int]],
        wake: str | None = None,
        refreshed: dict[str, int] | None = None,
    ) -> ShareState | None:
        """The tier's default caps (all its jobs, its batch items) written for each lane in
        `caps`, as an accept writes them: what a claim holds the tenant to until its next
        accept; `wake`: the lane whose jobs deferred at the old cap are to be woken, noted in
        the same write (`ShareState.wake_pending`); `refreshed`: the caps reconciled, per lane
        (`ShareState.refreshed_caps`). None when the tenant has no share yet (its first accept
        writes them)."""
        if not caps and not refreshed and wake is None:
            return self.get(tenant_id)
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        sets = []
        for index, (lane, (cap, lane_batch_cap)) in enumerate(sorted(caps.items())):
            names |= {f"#c{index}": _CAP_PREFIX + lane, f"#b{index}": _BATCH_CAP_PREFIX + lane}
            values |= {f":c{index}": {"N": str(cap)}, f":b{index}": {"N": str(lane_batch_cap)}}
            sets.append(f"#c{index} = :c{index}, #b{index} = :b{index}")
        for index, (lane, cap) in enumerate(sorted((refreshed or {}).items())):
            names[f"#r{index}"] = _REFRESHED_CAP_PREFIX + lane
            values[f":r{index}"] = {"N": str(cap)}
            sets.append(f"#r{index} = :r{index}")
        if wake is not None:
            sets.append(f"{WAKE_PENDING} = :wake")
            values[":wake"] = {"S": wake}
        try:
            response = self._ddb.update_item(
                TableName=self.table_name,
                Key=share_key(tenant_id),
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return None
            raise
        return ShareState.from_item(tenant_id, response.get("Attributes"))

    def clear_wake_pending(self, tenant_id: str, lane: str) -> None:
        """The jobs deferred at the cap `lane` had before its raise are woken."""
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key=share_key(tenant_id),
                UpdateExpression=f"REMOVE {WAKE_PENDING}",
                ConditionExpression=f"{WAKE_PENDING} = :lane",
                ExpressionAttributeValues={":lane": {"S": lane}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise

    def set_limits(
        self,
        tenant_id: str,
        *,
        max_concurrency: int | None = None,
        max_active_jobs: int | None = None,
        clear: tuple[str, ...] = (),
        reserve: float = 0.0,
    ) -> ShareState:
        """Override the tier's defaults for one tenant; `clear` names overrides to drop.
        A cap comes with its batch cap, less `reserve` (`batches.interactive_reserve`).

        A lower cap than the jobs now running stops new claims until enough finish; running
        jobs are never stopped.
        """
        sets: list[str] = []
        values: dict[str, Any] = {}
        limits = [(MAX_CONCURRENCY, max_concurrency), (MAX_ACTIVE_JOBS, max_active_jobs)]
        if max_concurrency is not None and max_concurrency >= 1:
            limits.append((MAX_BATCH_CONCURRENCY, batch_cap(max_concurrency, reserve)))
        for name, value in limits:
            if value is not None:
                if value < 1:
                    raise ValueError(f"{name} must be at least 1")
                sets.append(f"{name} = :{name}")
                values[f":{name}"] = {"N": str(value)}
        unknown = set(clear) - {MAX_CONCURRENCY, MAX_ACTIVE_JOBS}
        if unknown:
            raise ValueError(f"unknown limits: {sorted(unknown)}")
        if MAX_CONCURRENCY in clear:
            clear = (*clear, MAX_BATCH_CONCURRENCY)
        clear = tuple(dict.fromkeys(clear))  # (DynamoDB refuses a path removed twice)
        expression = ("SET " + ", ".join(sets) if sets else "") + (
            " REMOVE " + ", ".join(clear) if clear else ""
        )
        if not expression.strip():
            return self.get(tenant_id)
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "Key": share_key(tenant_id),
            "UpdateExpression": expression.strip(),
            "ReturnValues": "ALL_NEW",
        }
        if values:
            kwargs["ExpressionAttributeValues"] = values
        response = self._ddb.update_item(**kwargs)
        return ShareState.from_item(tenant_id, response.get("Attributes"))
