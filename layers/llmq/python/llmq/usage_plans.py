"""Each tenant's request rate: an API Gateway API key in a usage plan (docs/limits.md).

The stack has one usage plan per tier (its `UsagePlanIds` output: tier -> plan id, "*" for
tiers without one). A tenant gets one API key, in its tier's plan; its value is stored on
the tenant's `key#` items, and the authorizer returns it as `usageIdentifierKey`, so API
Gateway throttles the tenant on that plan's token bucket. Clients never see the key.

`llmq tenants set-limits --rate R --burst B` gives a tenant a plan of its own,
`llmq-tenant-<id>`, on the same API stages, and moves its key there; `--clear rate` moves it
back and deletes that plan. An API key may be in only one usage plan per API stage, so a
move takes the key out of one plan before adding it to the other: for that moment (one call)
the tenant's requests are refused with 403.
https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-api-usage-plans.html
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError

# The key of the plan for tiers the config does not list, in the UsagePlanIds output.
DEFAULT_PLAN = "*"
TENANT_PLAN_PREFIX = "llmq-tenant-"


def tenant_plan_name(tenant_id: str) -> str:
    return TENANT_PLAN_PREFIX + tenant_id


def new_usage_key_value() -> str:
    # API Gateway takes 20 to 128 characters; hex keeps it to letters and digits.
    return secrets.token_hex(20)


@dataclass(frozen=True)
class UsageKey:
    """A tenant's API Gateway API key: `id` names it in API Gateway's API, `value` is what the
    authorizer returns as usageIdentifierKey."""

    id: str
    value: str


@dataclass(frozen=True)
class RateLimit:
    """A usage plan's throttle, as API Gateway applies it to each key in the plan."""

    plan_id: str
    plan_name: str
    rate_per_second: float
    burst: int
    # True when it is the tenant's own plan (an operator's override), not its tier's.
    override: bool


class UsageKeys(Protocol):
    """What llmq.tenants needs from API Gateway to create a tenant: its key in its tier's plan."""

    def create_key(self, tenant_id: str, tier: str, value: str) -> UsageKey: ...


class UsagePlanError(RuntimeError):
    pass


# How a key's description names the plan it was made for (`ApiGatewayUsagePlans.create_key`).
_MADE_FOR = "; made for usage plan "


# How a tenant's plan's description names the APIs it was made for (`set_rate`).
_FOR_APIS = "; for APIs "


def _made_for(plan: dict[str, Any]) -> set[str]:
    """The API ids a tenant's plan's description names (none for one made before)."""
    _, found, apis = str(plan.get("description", "")).rpartition(_FOR_APIS)
    return set(apis.split(",")) - {""} if found else set()


def _conflict(exc: ClientError) -> bool:
    return bool(exc.response.get("Error", {}).get("Code") == "ConflictException")


class ApiGatewayUsagePlans:
    """Tenants' API keys and usage plans, through API Gateway's own API.

    `plan_ids`: the stack's UsagePlanIds output, tier -> usage plan id.
    """

    def __init__(self, apigateway: Any, plan_ids: Mapping[str, str]) -> None:
        self._apigw = apigateway
        self.plan_ids = dict(plan_ids)

    def tier_plan(self, tier: str) -> str:
        plan = self.plan_ids.get(tier) or self.plan_ids.get(DEFAULT_PLAN)
        if not plan:
            raise UsagePlanError(f"the stack has no usage plan for tier {tier!r} and no default plan")
        return plan

    def create_key(self, tenant_id: str, tier: str, value: str) -> UsageKey:
        """The tenant's key in its tier's plan. A run cut short between the key and its plan
        left a key nothing records: it is found (by its name and customer id) and used, not
        made a second time."""
        plan = self.tier_plan(tier)
        key = self._unrecorded_key(tenant_id, plan)
        if key is None:
            try:
                created = self._apigw.create_api_key(
                    name=tenant_plan_name(tenant_id),
                    description=f"llmq: request rate of tenant {tenant_id} (returned by the authorizer){_MADE_FOR}{plan}",
                    enabled=True,
                    value=value,
                    customerId=tenant_id,
                )
                key = UsageKey(id=created["id"], value=value)
            except ClientError as exc:
                # A key's value is unique: botocore's retry of a create applied with its answer
                # lost is refused, and the key it made is this call's (hunt 285).
                # (this call's value: not another run's key, made meanwhile; review 264)
                key = self._unrecorded_key(tenant_id, plan, value) if _conflict(exc) else None
                if key is None:
                    raise
        try:
            self._apigw.create_usage_plan_key(usagePlanId=plan, keyId=key.id, keyType="API_KEY")
        except ClientError as exc:
            if not _conflict(exc):
                raise  # (ConflictException: the key is in the plan already)
        return key

    def _unrecorded_key(self, tenant_id: str, plan: str, value: str | None = None) -> UsageKey | None:
        """A key made for this tenant for `plan` (this stack's: another stack in the account
        may have a tenant of the same id), enabled; of `value`, if given."""
        name = tenant_plan_name(tenant_id)
        found = self._apigw.get_api_keys(nameQuery=name, customerId=tenant_id, includeValues=True, limit=500)
        for item in found.get("items", []):
            if (
                item.get("name") == name
                and item.get("customerId") == tenant_id
                and item.get("enabled")
                and str(item.get("description", "")).endswith(f"{_MADE_FOR}{plan}")
                and value in (None, item.get("value"))
            ):
                return UsageKey(id=item["id"], value=item["value"])
        return None

    # ---- an operator's override ----
    # A tenant has at most two plans that matter: its own (found by name) and its tier's; a
    # key's membership is checked plan by plan (GetUsagePlanKey).

    def rate_limit(self, tenant_id: str, tier: str, key_id: str) -> RateLimit | None:
        """The plan the tenant's key is in: its own if it has one, else its tier's; None if
        the key is in neither."""
        own = self._own_plan(tenant_id)
        for plan in (own, None if own else self._apigw.get_usage_plan(usagePlanId=self.tier_plan(tier))):
            if plan is None or not self._holds(plan["id"], key_id):
                continue
            throttle = plan.get("throttle") or {}
            return RateLimit(
                plan_id=plan["id"],
                plan_name=str(plan.get("name", "")),
                rate_per_second=float(throttle.get("rateLimit", 0)),
                burst=int(throttle.get("burstLimit", 0)),
                override=plan is own,
            )
        return None

    def set_rate(self, tenant_id: str, tier: str, key_id: str, rate: float, burst: int) -> RateLimit:
        """The tenant's own plan with this throttle, on its tier plan's stages; its key moves there."""
        if not math.isfinite(rate) or rate <= 0 or burst < 1:
            raise UsagePlanError("rate must be a number above 0 and burst at least 1")
        name = tenant_plan_name(tenant_id)
        own = self._own_plan(tenant_id)
        if own is not None:
            self._apigw.update_usage_plan(
                usagePlanId=own["id"],
                patchOperations=[
                    {"op": "replace", "path": "/throttle/rateLimit", "value": _number(rate)},
                    {"op": "replace", "path": "/throttle/burstLimit", "value": str(burst)},
                ],
            )
            self._move(key_id, from_plan=self.tier_plan(tier), to_plan=own["id"])
            return RateLimit(own["id"], name, rate, burst, override=True)
        tier_plan = self._apigw.get_usage_plan(usagePlanId=self.tier_plan(tier))
        stages = [
            {"apiId": stage["apiId"], "stage": stage["stage"]} for stage in tier_plan.get("apiStages") or []
        ]
        apis = ",".join(sorted({stage["apiId"] for stage in stages}))
        created = self._apigw.create_usage_plan(
            name=name,
            description=f"llmq: request rate of tenant {tenant_id} (llmq tenants set-limits){_FOR_APIS}{apis}",
            apiStages=stages,
            throttle={"rateLimit": rate, "burstLimit": burst},
        )
        self._move(key_id, from_plan=tier_plan["id"], to_plan=created["id"])
        # (a create applied with its answer lost made one more, which holds no key; or an
        # earlier clear detached one and failed to delete it)
        self._delete_empty(self._own_plans(tenant_id, detached=True), created["id"])
        return RateLimit(created["id"], name, rate, burst, override=True)

    def clear_rate(self, tenant_id: str, tier: str, key_id: str) -> None:
        """Back to the tier's plan; the tenant's own plan is deleted (API Gateway refuses to
        delete a plan that still has API stages, so they are detached first), or one an earlier
        clear detached and failed to delete."""
        own = self._own_plan(tenant_id, detached=True)
        if own is None:
            return
        self._move(key_id, from_plan=own["id"], to_plan=self.tier_plan(tier))
        self._delete_plan(own)

    def _delete_plan(self, plan: dict[str, Any]) -> None:
        """API Gateway refuses to delete a plan that still has API stages: detached first.

        Either call applied with its answer lost is refused on botocore's retry (the stage is
        no longer the plan's; the plan is gone): read as done, not a failed command whose rerun
        no longer finds the detached plan, an orphan counted against the account's usage plans
        for good (hunt 288)."""
        detach = [
            {"op": "remove", "path": "/apiStages", "value": f"{stage['apiId']}:{stage['stage']}"}
            for stage in plan.get("apiStages") or []
        ]
        if detach:
            try:
                self._apigw.update_usage_plan(usagePlanId=plan["id"], patchOperations=detach)
            except ClientError:
                if self._stages_left(plan["id"]):
                    raise
        try:
            self._apigw.delete_usage_plan(usagePlanId=plan["id"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NotFoundException":
                raise

    def _stages_left(self, plan_id: str) -> bool:
        """Whether the plan still has API stages (False once it is gone)."""
        try:
            return bool(self._apigw.get_usage_plan(usagePlanId=plan_id).get("apiStages"))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NotFoundException":
                return False
            raise

    def rehome(self, tenants: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """Each (tenant id, tier, key id)'s key in the plan it belongs in, as the stack's
        plans are now: the tenant's own (`set-limits --rate`) if it has one, else its tier's.
        A deploy that adds a tier leaves that tier's tenants in the default plan, and one that
        removes a tier deletes the plan their keys were in (API Gateway then refuses every
        request of theirs with 403). (Tenant id, plan id) of each key moved. Each of the
        stack's plans' keys are listed once, not looked up per tenant."""
        apis = self._stack_apis()
        plans = [
            plan
            for plan in self._pages()
            if {stage.get("apiId") for stage in plan.get("apiStages") or []} & apis
        ]
        holders: dict[str, set[str]] = {}
        for plan in plans:
            for key_id in self._plan_key_ids(plan["id"]):
                holders.setdefault(key_id, set()).add(plan["id"])
        own = {
            str(plan["name"]).removeprefix(TENANT_PLAN_PREFIX): plan["id"]
            for plan in plans
            if str(plan.get("name", "")).startswith(TENANT_PLAN_PREFIX)
        }
        moved = []
        for tenant_id, tier, key_id in tenants:
            wanted = own.get(tenant_id) or self.tier_plan(tier)
            holding = holders.get(key_id, set())
            if holding == {wanted}:
                continue
            held = sorted(holding - {wanted})
            for extra in held[1:]:
                # (one plan per API stage: never more than one, unless made by hand)
                self._apigw.delete_usage_plan_key(usagePlanId=extra, keyId=key_id)
            if held:
                self._move(key_id, from_plan=held[0], to_plan=wanted)
            else:
                self._apigw.create_usage_plan_key(usagePlanId=wanted, keyId=key_id, keyType="API_KEY")
            moved.append((tenant_id, wanted))
        return moved

    def _plan_key_ids(self, plan_id: str) -> Iterator[str]:
        position: str | None = None
        while True:
            page = self._apigw.get_usage_plan_keys(
                usagePlanId=plan_id, limit=500, **({"position": position} if position else {})
            )
            yield from (key["id"] for key in page.get("items", []))
            position = page.get("position")
            if not position:
                return

    def _own_plan(self, tenant_id: str, detached: bool = False) -> dict[str, Any] | None:
        """The tenant's own plan on this stack's API: plans are named per tenant across the
        account, and another stack (a staging copy) may have a tenant of the same id. Of two
        (a CreateUsagePlan API Gateway applied with its answer lost, then botocore's retry; two
        operators at once: hunt 263), the one that holds a key, and the other, holding none,
        is deleted."""
        plans = self._own_plans(tenant_id, detached)
        if len(plans) < 2:
            return plans[0] if plans else None
        holding = [plan for plan in plans if next(self._plan_key_ids(plan["id"]), None) is not None]
        kept = (holding or plans)[0]
        self._delete_empty(plans, kept["id"])
        return kept

    def _own_plans(self, tenant_id: str, detached: bool = False) -> list[dict[str, Any]]:
        """The tenant's plans on this stack's API; `detached`, and one detached from it whose
        deletion failed (review 266: no stage named it this stack's, so a rerun never found it,
        an orphan for good), told this stack's by the APIs its description names: for the
        clean-up only, never a plan a key may be moved into (review 267: a key there has no
        stage, and API Gateway refused every request of the tenant)."""
        name = tenant_plan_name(tenant_id)
        ours = self._stack_apis()
        return [
            plan
            for plan in self._pages()
            if plan.get("name") == name
            and (
                {stage.get("apiId") for stage in plan.get("apiStages") or []} & ours
                or (detached and not plan.get("apiStages") and _made_for(plan) & ours)
            )
        ]

    def _delete_empty(self, plans: list[dict[str, Any]], kept: str) -> None:
        """The tenant's plans other than `kept` that hold no key, deleted (each an orphan that
        counts against the account's usage plans)."""
        for plan in plans:
            if plan["id"] == kept or next(self._plan_key_ids(plan["id"]), None) is not None:
                continue
            self._delete_plan(plan)

    def _stack_apis(self) -> set[str]:
        """The REST API ids this stack's tier plans are attached to."""
        plan = self._apigw.get_usage_plan(usagePlanId=next(iter(self.plan_ids.values())))
        return {stage["apiId"] for stage in plan.get("apiStages") or []}

    def _joined(self, plan_id: str, key_id: str) -> bool:
        """After an add that failed: whether it was applied all the same (False when that
        cannot be read either)."""
        try:
            return self._holds(plan_id, key_id)
        except Exception:
            return False

    def _holds(self, plan_id: str, key_id: str) -> bool:
        try:
            self._apigw.get_usage_plan_key(usagePlanId=plan_id, keyId=key_id)
        except self._apigw.exceptions.NotFoundException:
            return False
        return True

    def _move(self, key_id: str, from_plan: str, to_plan: str) -> None:
        # A key may be in one plan per API stage: out of the old plan before into the new. If
        # the new plan will not take it, it goes back, so the tenant is never left in none.
        # A call applied with its answer lost is told by a look at the plan: botocore's retry
        # of it meets NotFoundException (a delete) or ConflictException (an add), which must
        # neither stop the move half way (the key in no plan) nor undo one that was made.
        moved_out = self._holds(from_plan, key_id)
        if moved_out:
            try:
                self._apigw.delete_usage_plan_key(usagePlanId=from_plan, keyId=key_id)
            except Exception:
                if self._holds(from_plan, key_id):
                    raise  # (still in it: nothing was moved)
        if self._holds(to_plan, key_id):
            return
        try:
            self._apigw.create_usage_plan_key(usagePlanId=to_plan, keyId=key_id, keyType="API_KEY")
        except Exception as exc:
            if self._joined(to_plan, key_id):
                return
            if moved_out:
                try:
                    self._apigw.create_usage_plan_key(usagePlanId=from_plan, keyId=key_id, keyType="API_KEY")
                except Exception as back:
                    raise UsagePlanError(
                        f"the key could not join usage plan {to_plan} ({type(exc).__name__}) nor go back "
                        f"to {from_plan} ({type(back).__name__}): it is in NO usage plan, so API Gateway "
                        "refuses every request of the tenant with 403. Run the command again now"
                    ) from back
            raise UsagePlanError(
                f"the key could not join usage plan {to_plan} ({type(exc).__name__}); it stays in "
                f"{from_plan}: run the command again"
            ) from exc

    def _pages(self) -> Iterator[dict[str, Any]]:
        position: str | None = None
        while True:
            page = self._apigw.get_usage_plans(**({"position": position} if position else {}))
            yield from page.get("items", [])
            position = page.get("position")
            if not position:
                return


def _number(value: float) -> str:
    # "2", not "2.0", for a whole rate (moto reads an integer there; AWS takes either).
    return str(int(value)) if float(value).is_integer() else str(value)
