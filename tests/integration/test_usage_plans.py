"""Per-tenant request rates: API Gateway usage plans and keys, against moto's API Gateway.

The plans are the stack's own (name and throttle from the synthesized template), created in
moto as the sandbox's deploy creates them; API Gateway's throttling itself is played by the
sandbox's gateway (tests/e2e/test_rate_limits.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError

from llmq import aws
from llmq.config import LlmqConfig
from llmq.tenants import TenantRepository
from llmq.usage_plans import DEFAULT_PLAN, ApiGatewayUsagePlans, UsagePlanError, tenant_plan_name
from tests.conftest import MotoStack, load_event
from tests.integration.harness import LambdaContextStub, load_handler
from tests.support.tables import default_app_template

API_ID, STAGE = "abc123", "prod"


@dataclass
class Plans:
    ids: dict[str, str]  # tier -> plan id, as the stack's UsagePlanIds output
    usage_plans: ApiGatewayUsagePlans


def create_stack_usage_plans(apigateway: Any) -> dict[str, str]:
    """The stack's usage plans in moto, from the template: tier -> id, as its UsagePlanIds output."""
    template = default_app_template()
    parts = template.template["Outputs"]["UsagePlanIds"]["Value"]["Fn::Join"][1]
    # A JSON object built by Fn::Join: with each Ref as its logical id, tier -> plan resource.
    logical_ids = json.loads("".join(part if isinstance(part, str) else part["Ref"] for part in parts))
    ids: dict[str, str] = {}
    for tier, logical_id in logical_ids.items():
        properties = template.resources[logical_id]["Properties"]
        plan = apigateway.create_usage_plan(
            name=properties["UsagePlanName"],
            apiStages=[{"apiId": API_ID, "stage": STAGE}],
            throttle={
                "rateLimit": properties["Throttle"]["RateLimit"],
                "burstLimit": properties["Throttle"]["BurstLimit"],
            },
        )
        ids[tier] = plan["id"]
    return ids


@pytest.fixture
def plans(moto_stack: MotoStack) -> Iterator[Plans]:
    apigateway = aws.client("apigateway")
    ids = create_stack_usage_plans(apigateway)
    yield Plans(ids, ApiGatewayUsagePlans(apigateway, ids))


@pytest.fixture
def authorizer(moto_stack: MotoStack, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLMQ_CONFIG", "{}")
    monkeypatch.setenv("LLMQ_TENANTS_TABLE", moto_stack.tenants_table)
    return load_handler("authorizer")


def _event(authorization: str) -> dict[str, Any]:
    event = copy.deepcopy(load_event("authorizer_request"))
    event["headers"] = {"Authorization": authorization}
    return event


def test_the_stack_output_names_a_plan_per_tier_and_the_default_with_the_configs_throttle(plans: Plans):
    config = LlmqConfig()
    assert set(plans.ids) == {*config.fair_share.tiers, DEFAULT_PLAN}
    apigateway = aws.client("apigateway")
    for tier, plan_id in plans.ids.items():
        limits = config.fair_share.default if tier == DEFAULT_PLAN else config.tenant_limits(tier)
        throttle = apigateway.get_usage_plan(usagePlanId=plan_id)["throttle"]
        assert (throttle["rateLimit"], throttle["burstLimit"]) == (limits.rate_per_second, limits.burst)


def test_a_new_tenants_key_is_in_its_tiers_plan_and_the_authorizer_returns_it(
    plans: Plans, authorizer, moto_stack: MotoStack
):
    # Given a tenant created as `llmq tenants create` creates it
    tenants = TenantRepository(
        moto_stack.tenants_table, dynamodb=aws.client("dynamodb"), usage_keys=plans.usage_plans
    )
    created = tenants.create("Acme", "enterprise", tenant_id="ten_acme")
    apigateway = aws.client("apigateway")
    key = apigateway.get_api_key(apiKey=created.tenant.usage_key_id, includeValue=True)
    # Then it has an enabled API Gateway key, in its tier's plan only
    assert key["enabled"] is True
    assert [plan["id"] for plan in apigateway.get_usage_plans(keyId=key["id"])["items"]] == [
        plans.ids["enterprise"]
    ]
    # And the authorizer, with its one GetItem, returns that key's value as usageIdentifierKey
    policy = authorizer.handler(_event(f"Bearer {created.api_key}"), LambdaContextStub())
    assert policy["usageIdentifierKey"] == key["value"]
    # And a second API key of the same tenant meters on the same usage key
    second = tenants.issue_key(tenants.get("ten_acme"))
    policy = authorizer.handler(_event(f"Bearer {second}"), LambdaContextStub())
    assert policy["usageIdentifierKey"] == key["value"]
    # And the client's own key is never the usage key
    assert key["value"] not in (created.api_key, second)


def test_a_tier_without_a_plan_of_its_own_uses_the_default_plan(plans: Plans, moto_stack: MotoStack):
    tenants = TenantRepository(
        moto_stack.tenants_table, dynamodb=aws.client("dynamodb"), usage_keys=plans.usage_plans
    )
    created = tenants.create("Startup", "startup")
    in_plans = aws.client("apigateway").get_usage_plans(keyId=created.tenant.usage_key_id)["items"]
    assert [plan["id"] for plan in in_plans] == [plans.ids[DEFAULT_PLAN]]


def test_a_tenant_without_usage_plans_gets_no_usage_key(authorizer, moto_stack: MotoStack):
    """Without API Gateway (usage_keys=None) the authorizer returns no usageIdentifierKey."""
    created = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise"
    )
    policy = authorizer.handler(_event(f"Bearer {created.api_key}"), LambdaContextStub())
    assert "usageIdentifierKey" not in policy


def test_a_rate_override_moves_the_key_to_its_own_plan_and_clearing_moves_it_back(
    plans: Plans, moto_stack: MotoStack
):
    tenants = TenantRepository(
        moto_stack.tenants_table, dynamodb=aws.client("dynamodb"), usage_keys=plans.usage_plans
    )
    tenant = tenants.create("Hobby", "free", tenant_id="ten_hobby").tenant
    assert tenant.usage_key_id
    apigateway = aws.client("apigateway")

    def plans_of_key() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = apigateway.get_usage_plans(keyId=tenant.usage_key_id)["items"]
        return items

    # When the operator overrides its rate
    limit = plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 2, 3)
    # Then its key is in its own plan only, with that throttle, on its tier plan's stages
    (own,) = plans_of_key()
    assert own["name"] == tenant_plan_name("ten_hobby") and own["id"] == limit.plan_id
    assert own["throttle"] == {"rateLimit": 2, "burstLimit": 3}
    assert own["apiStages"] == [{"apiId": API_ID, "stage": STAGE}]
    # And the tier's plan no longer holds it, so the tier's other tenants keep their own buckets
    free_keys = apigateway.get_usage_plan_keys(usagePlanId=plans.ids["free"])["items"]
    assert tenant.usage_key_id not in [key["id"] for key in free_keys]
    # When it is changed again, the same plan changes
    plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 4, 8)
    (again,) = plans_of_key()
    assert again["id"] == own["id"] and again["throttle"] == {"rateLimit": 4, "burstLimit": 8}
    # A rate that is not a positive number, or a burst under 1, is refused and changes nothing
    for rate, burst in ((float("nan"), 5), (float("inf"), 5), (0.0, 5), (-1.0, 5), (2.0, 0)):
        with pytest.raises(UsagePlanError):
            plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, rate, burst)
    assert [plan["throttle"] for plan in plans_of_key()] == [{"rateLimit": 4, "burstLimit": 8}]
    # When it is cleared, the key is back in the tier's plan and the tenant's plan is gone
    plans.usage_plans.clear_rate(tenant.id, tenant.tier, tenant.usage_key_id)
    assert [plan["id"] for plan in plans_of_key()] == [plans.ids["free"]]
    names = [plan["name"] for plan in apigateway.get_usage_plans()["items"]]
    assert tenant_plan_name("ten_hobby") not in names


def test_another_stacks_plan_for_a_tenant_of_the_same_id_is_never_touched(
    plans: Plans, moto_stack: MotoStack
):
    """Plans are named per tenant across the account: a staging stack's `llmq-tenant-ten_hobby`
    on another API must survive this stack's set and clear of the same tenant id."""
    apigateway = aws.client("apigateway")
    theirs = apigateway.create_usage_plan(
        name=tenant_plan_name("ten_hobby"),
        apiStages=[{"apiId": "otherapi", "stage": STAGE}],
        throttle={"rateLimit": 200, "burstLimit": 400},
    )
    tenants = TenantRepository(
        moto_stack.tenants_table, dynamodb=aws.client("dynamodb"), usage_keys=plans.usage_plans
    )
    tenant = tenants.create("Hobby", "free", tenant_id="ten_hobby").tenant
    # When this stack's operator overrides and then clears the tenant's rate
    own = plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 1, 1)
    assert own.plan_id != theirs["id"]
    plans.usage_plans.clear_rate(tenant.id, tenant.tier, tenant.usage_key_id)
    # Then the other stack's plan is as it was, and this stack's own plan is gone
    kept = apigateway.get_usage_plan(usagePlanId=theirs["id"])
    assert kept["throttle"] == {"rateLimit": 200, "burstLimit": 400}
    assert kept["apiStages"] == [{"apiId": "otherapi", "stage": STAGE}]
    names = [plan["name"] for plan in apigateway.get_usage_plans()["items"]]
    assert names.count(tenant_plan_name("ten_hobby")) == 1


def test_a_key_left_unrecorded_is_found_again_but_never_another_stacks(plans: Plans) -> None:
    # Given a second stack in the account (a staging copy) with a tenant of the same id
    apigateway = aws.client("apigateway")
    staging = ApiGatewayUsagePlans(apigateway, create_stack_usage_plans(apigateway))
    prod_key = plans.usage_plans.create_key("ten_acme", "free", "p" * 40)
    # When each stack makes the tenant's key
    staging_key = staging.create_key("ten_acme", "free", "s" * 40)
    # Then each has its own: a key of another stack is never taken for this one's
    assert staging_key.id != prod_key.id and staging_key.value == "s" * 40
    # And a key a cut-short run made for this stack is found and used, not made again
    assert plans.usage_plans.create_key("ten_acme", "free", "x" * 40) == prod_key


def _free_tenant(plans: Plans, moto_stack: MotoStack, tenant_id: str) -> Any:
    """A free-tier tenant, its key in the free plan."""
    tenants = TenantRepository(
        moto_stack.tenants_table, dynamodb=aws.client("dynamodb"), usage_keys=plans.usage_plans
    )
    return tenants.create("Hobby", "free", tenant_id=tenant_id).tenant


def test_a_move_whose_way_back_fails_too_says_the_tenant_is_in_no_plan_and_a_rerun_repairs_it(
    plans: Plans, moto_stack: MotoStack
) -> None:
    from tests.aws_faults import AwsFaults, FaultKind

    tenant = _free_tenant(plans, moto_stack, "ten_nowhere")
    assert tenant.usage_key_id
    # Given API Gateway refusing both the move into the tenant's own plan and the way back
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "apigateway.CreateUsagePlanKey", times=2)
    with pytest.raises(UsagePlanError) as refused:
        plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 2, 3)
    assert len(faults.fired) == 2
    faults.disarm()
    # Then the operator is told the tenant is locked out, and what to do
    assert "NO usage plan" in str(refused.value) and "403" in str(refused.value)
    apigateway = aws.client("apigateway")
    assert apigateway.get_usage_plans(keyId=tenant.usage_key_id)["items"] == []
    # And running it again puts the key in its own plan
    plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 2, 3)
    (own,) = apigateway.get_usage_plans(keyId=tenant.usage_key_id)["items"]
    assert own["name"] == tenant_plan_name("ten_nowhere")


def test_a_key_joins_one_plan_per_api_stage_as_api_gateway_allows(plans: Plans) -> None:
    # Given a key in the free tier's plan, and another plan on the same stage
    apigateway = aws.client("apigateway")
    key = apigateway.create_api_key(name="k", enabled=True, value="v" * 40)
    other = apigateway.create_usage_plan(name="other", apiStages=[{"apiId": API_ID, "stage": STAGE}])
    apigateway.create_usage_plan_key(usagePlanId=plans.ids["free"], keyId=key["id"], keyType="API_KEY")
    # When the key is added to the other plan too
    with pytest.raises(ClientError) as refused:
        apigateway.create_usage_plan_key(usagePlanId=other["id"], keyId=key["id"], keyType="API_KEY")
    # Then the sandbox's API Gateway refuses it, as AWS does (hunt 263: moto took it, and the
    # gateway throttled the key by whichever plan it read last)
    assert refused.value.response["Error"]["Code"] == "ConflictException"
    assert [plan["id"] for plan in apigateway.get_usage_plans(keyId=key["id"])["items"]] == [
        plans.ids["free"]
    ]


def test_a_rate_plan_whose_create_was_applied_and_retried_leaves_one_plan_and_later_rates_apply(
    plans: Plans, moto_stack: MotoStack
) -> None:
    from tests.aws_faults import AwsFaults, FaultKind

    tenant = _free_tenant(plans, moto_stack, "ten_dup")
    apigateway = aws.client("apigateway")
    # Given a rate override whose CreateUsagePlan API Gateway applied with its answer lost, and
    # botocore's retry made again (plans' names are not unique)
    faults = AwsFaults()
    faults.arm(FaultKind.APPLIED_RETRIED, "apigateway.CreateUsagePlan")
    try:
        plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 2, 3)
    finally:
        faults.disarm()
    assert len(faults.fired) == 1
    # When the operator sets another rate
    plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 50, 100)
    # Then the tenant has one plan of its own, holding its key at the new rate (hunt 263: two,
    # the empty one updated, and on AWS the key refused by it while the CLI said 50/s)
    own = [
        plan for plan in apigateway.get_usage_plans()["items"] if plan["name"] == tenant_plan_name(tenant.id)
    ]
    assert len(own) == 1
    holding = apigateway.get_usage_plans(keyId=tenant.usage_key_id)["items"]
    assert [(plan["id"], plan["throttle"]) for plan in holding] == [
        (own[0]["id"], {"rateLimit": 50.0, "burstLimit": 100})
    ]


@pytest.mark.parametrize("meanwhile", [False, True], ids=["alone", "another-runs-key-made-meanwhile"])
def test_a_key_whose_create_was_applied_and_retried_is_the_tenants_key(
    plans: Plans, moto_stack: MotoStack, meanwhile: bool
) -> None:
    from tests.aws_faults import AwsFaults, FaultKind

    tenants = TenantRepository(
        moto_stack.tenants_table, dynamodb=aws.client("dynamodb"), usage_keys=plans.usage_plans
    )
    apigateway = aws.client("apigateway")
    made: list[str] = []

    def another_run(**kwargs: Any) -> None:
        # (another run's create for the tenant, between this one's look and its create)
        if meanwhile and not made:
            made.append("another")
            params = {**kwargs["params"], "value": "another-runs-value-0123456789abcdef"}
            made.append(apigateway.create_api_key(**params)["id"])

    apigateway.meta.events.register(
        "provide-client-params.apigateway.CreateApiKey", another_run, unique_id="h"
    )
    # Given a tenant's CreateApiKey that API Gateway applied with its answer lost, and
    # botocore's retry of the same value (refused: a key's value is unique)
    faults = AwsFaults()
    faults.arm(FaultKind.APPLIED_RETRIED, "apigateway.CreateApiKey", nth=2 if meanwhile else 1)
    try:
        created = tenants.create("Acme", "enterprise", tenant_id="ten_retried")
    finally:
        faults.disarm()
        apigateway.meta.events.unregister("provide-client-params.apigateway.CreateApiKey", unique_id="h")
    assert len(faults.fired) == 1
    # Then the tenant is made, with the key its create made (not another run's), in its tier's
    # plan (hunt 285: the command stopped with the ConflictException, to be run again)
    keys = {key["id"]: key["value"] for key in apigateway.get_api_keys(includeValues=True)["items"]}
    assert created.tenant.usage_key_id in keys and created.tenant.usage_key_id not in made
    assert keys[created.tenant.usage_key_id] != "another-runs-value-0123456789abcdef"
    holding = apigateway.get_usage_plans(keyId=created.tenant.usage_key_id)["items"]
    assert [plan["id"] for plan in holding] == [plans.ids["enterprise"]]


@pytest.mark.parametrize("operation", ["UpdateUsagePlan", "DeleteUsagePlan"])
def test_clearing_a_rate_whose_plan_call_was_applied_and_retried_deletes_the_plan(
    plans: Plans, moto_stack: MotoStack, operation: str
) -> None:
    from tests.aws_faults import AwsFaults, FaultKind

    # Given a tenant with a rate plan of its own
    tenant = _free_tenant(plans, moto_stack, f"ten_clear_{operation.lower()}")
    plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 2, 3)
    apigateway = aws.client("apigateway")
    own = tenant_plan_name(tenant.id)
    assert own in [plan["name"] for plan in apigateway.get_usage_plans()["items"]]
    # When its rate is cleared, and API Gateway applies the plan's detach (or delete) with its
    # answer lost, botocore's retry refused (the stage is not the plan's; the plan is gone)
    faults = AwsFaults()
    faults.arm(FaultKind.APPLIED_RETRIED, f"apigateway.{operation}")
    try:
        plans.usage_plans.clear_rate(tenant.id, tenant.tier, tenant.usage_key_id)
    finally:
        faults.disarm()
    assert len(faults.fired) == 1
    # Then the command is done: the plan deleted (hunt 288: the command failed, and after a
    # detach its rerun no longer found the plan, an orphan for good), the key in its tier's
    assert own not in [plan["name"] for plan in apigateway.get_usage_plans()["items"]]
    holding = apigateway.get_usage_plans(keyId=tenant.usage_key_id)["items"]
    assert [plan["id"] for plan in holding] == [plans.ids["free"]]


def _clear_that_failed_after_the_detach(plans: Plans, moto_stack: MotoStack) -> Any:
    """A tenant whose rate plan's clearing detached the plan from the stage, then had its
    deletion throttled for good (the command failed)."""
    from tests.aws_faults import AwsFaults, FaultKind

    tenant = _free_tenant(plans, moto_stack, "ten_orphan")
    plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 2, 3)
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "apigateway.DeleteUsagePlan", times=100)
    try:
        with pytest.raises(ClientError):
            plans.usage_plans.clear_rate(tenant.id, tenant.tier, tenant.usage_key_id)
    finally:
        faults.disarm()
    return tenant


@pytest.mark.parametrize("then", ["cleared again", "a rate set"])
def test_a_rate_whose_plan_was_detached_but_not_deleted_leaves_no_orphan_and_the_key_on_the_stage(
    plans: Plans, moto_stack: MotoStack, then: str
) -> None:
    tenant = _clear_that_failed_after_the_detach(plans, moto_stack)
    apigateway = aws.client("apigateway")
    # The key is in its tier's plan meanwhile, as `tenants show` says (review 267)
    limit = plans.usage_plans.rate_limit(tenant.id, tenant.tier, tenant.usage_key_id)
    assert limit is not None and limit.plan_id == plans.ids["free"]
    # When the operator runs the clear again, or sets a rate instead
    if then == "cleared again":
        plans.usage_plans.clear_rate(tenant.id, tenant.tier, tenant.usage_key_id)
    else:
        plans.usage_plans.set_rate(tenant.id, tenant.tier, tenant.usage_key_id, 5, 10)
    # Then no detached plan is left (review 266: the rerun found none of this stack's, an
    # orphan for good), and the key is in a plan on the stage (review 267: moved into the
    # detached plan, the tenant was refused with 403)
    named = [
        plan for plan in apigateway.get_usage_plans()["items"] if plan["name"] == tenant_plan_name(tenant.id)
    ]
    assert all(plan.get("apiStages") for plan in named), named
    assert len(named) == (0 if then == "cleared again" else 1)
    holding = apigateway.get_usage_plans(keyId=tenant.usage_key_id)["items"]
    assert len(holding) == 1 and holding[0].get("apiStages")
    if then == "cleared again":
        assert holding[0]["id"] == plans.ids["free"]
