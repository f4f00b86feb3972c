"""`llmq tenants create | show | set-limits` against moto, as an operator runs them.

The stack is a CloudFormation stack in moto whose outputs name the tables and the usage plans
(the real plans' names and throttles, from the synthesized template).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from llmq import aws
from llmq.config import CONFIG_ENV_VAR, LlmqConfig
from llmq.errors import StoreUnavailable
from llmq.long_polls import LongPolls
from llmq.tenants import TenantRepository, key_id_of
from llmq.usage_plans import tenant_plan_name
from llmq_cli.main import main
from tests.conftest import MotoStack
from tests.integration.test_usage_plans import create_stack_usage_plans

STACK = "LlmqCliTest"


@pytest.fixture
def stack(moto_stack: MotoStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    plan_ids = create_stack_usage_plans(aws.client("apigateway"))
    outputs = {
        "TenantsTableName": moto_stack.tenants_table,
        "JobsTableName": moto_stack.jobs_table,
        "UsagePlanIds": json.dumps(plan_ids),
        "LaneQueueUrls": json.dumps(moto_stack.lane_queue_urls),
        "WebhookQueueUrl": moto_stack.webhook_queue_url,
    }
    template = {
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "placeholder"}}},
        "Outputs": {name: {"Value": value} for name, value in outputs.items()},
    }
    aws.client("cloudformation").create_stack(StackName=STACK, TemplateBody=json.dumps(template))
    # No cdk.json here: the tier defaults are LlmqConfig's own.
    monkeypatch.chdir(tmp_path)
    return plan_ids


def llmq_captured(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """`llmq tenants ARGS` against the stack, as an operator runs it: what it printed (it succeeded)."""
    code = main(
        [
            "--state-file",
            "no-sandbox.json",
            "tenants",
            *args,
            "--aws",
            "--region",
            "us-east-1",
            "--stack",
            STACK,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def llmq(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    return json.loads(llmq_captured(capsys, *args).out)


def test_set_limits_and_show_round_trip(stack: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    config = LlmqConfig()
    tier = config.tenant_limits("free")
    created = llmq(capsys, "create", "--name", "Hobby", "--tier", "free", "--id", "ten_hobby")
    assert created["id"] == "ten_hobby" and created["api_key"].startswith("llmq_sk_")

    # A new tenant has its tier's limits, each saying so
    shown = llmq(capsys, "show", "ten_hobby")
    assert shown["tier"] == "free" and shown["active"] == 0 and shown["running"] == 0
    limits = shown["limits"]
    assert limits["max_concurrency"] == {"value": config.concurrency_cap("free"), "source": "tier"}
    assert limits["max_batch_concurrency"] == {"value": config.concurrency_caps("free")[1], "source": "tier"}
    assert limits["max_active_jobs"] == {"value": tier.max_active_jobs, "source": "tier"}
    assert limits["max_long_polls"] == {"value": tier.max_long_polls, "source": "tier"}
    assert limits["rate_per_second"] == {"value": tier.rate_per_second, "source": "tier"}
    assert limits["burst"] == {"value": tier.burst, "source": "tier"}
    assert limits["usage_plan"]["id"] == stack["free"]

    # A cap of eight keeps a quarter of it for the tenant's jobs outside batches
    eight = llmq(capsys, "set-limits", "ten_hobby", "--max-concurrency", "8")["limits"]
    assert eight["max_batch_concurrency"] == {"value": 6, "source": "override"}

    # The operator overrides all five
    changed = llmq(
        capsys,
        "set-limits",
        "ten_hobby",
        "--max-concurrency",
        "1",
        "--max-active",
        "7",
        "--max-long-polls",
        "1",
        "--rate",
        "2",
        "--burst",
        "3",
    )
    assert changed == llmq(capsys, "show", "ten_hobby")
    limits = changed["limits"]
    assert limits["max_concurrency"] == {"value": 1, "source": "override"}
    # (a cap of one keeps no reserve: batches would never run)
    assert limits["max_batch_concurrency"] == {"value": 1, "source": "override"}
    assert limits["max_active_jobs"] == {"value": 7, "source": "override"}
    assert limits["max_long_polls"] == {"value": 1, "source": "override"}
    assert limits["rate_per_second"] == {"value": 2, "source": "override"}
    assert limits["burst"] == {"value": 3, "source": "override"}
    assert limits["usage_plan"]["name"] == tenant_plan_name("ten_hobby")
    # ...stored where the api and the worker read them: the tenant's share item
    share = aws.client("dynamodb").get_item(TableName="llmq-jobs", Key={"pk": {"S": "share#ten_hobby"}})[
        "Item"
    ]
    assert (share["max_concurrency"]["N"], share["max_active_jobs"]["N"]) == ("1", "7")
    # ...and the api's long-poll places (llmq.long_polls)
    assert LongPolls("llmq-jobs", dynamodb=aws.client("dynamodb")).limit("ten_hobby") == 1

    # Clearing three of them brings the tier's back; the other two stay (one named twice is
    # cleared once: hunt 274 saw DynamoDB refuse it after the rate was cleared)
    cleared = llmq(
        capsys,
        "set-limits",
        "ten_hobby",
        "--clear",
        "rate",
        "--clear",
        "max_active_jobs",
        "--clear",
        "max_active_jobs",
        "--clear",
        "max_long_polls",
    )
    limits = cleared["limits"]
    assert limits["max_concurrency"] == {"value": 1, "source": "override"}
    assert limits["max_batch_concurrency"] == {"value": 1, "source": "override"}
    assert limits["max_active_jobs"] == {"value": tier.max_active_jobs, "source": "tier"}
    assert limits["max_long_polls"] == {"value": tier.max_long_polls, "source": "tier"}
    assert limits["rate_per_second"] == {"value": tier.rate_per_second, "source": "tier"}
    assert limits["usage_plan"]["id"] == stack["free"]

    # Clearing the cap clears its batch cap with it
    limits = llmq(capsys, "set-limits", "ten_hobby", "--clear", "max_concurrency")["limits"]
    assert limits["max_batch_concurrency"] == {"value": config.concurrency_caps("free")[1], "source": "tier"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "2"], "--rate and --burst together"),
        (["--rate", "2", "--burst", "2", "--clear", "rate"], "contradict"),
        (["--max-active", "0"], "from 1 to 1,000,000"),
        (["--max-concurrency", "1" + "0" * 400], "from 1 to 2,000"),
        # (held by id on the tenant's one share item, 400 KB at most: hunt 287)
        (["--max-concurrency", "2001"], "max_concurrency must be from 1 to 2,000"),
    ],
)
def test_set_limits_refuses_what_cannot_be_done(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    llmq(capsys, "create", "--name", "Hobby", "--tier", "free", "--id", "ten_hobby")
    code = main(
        ["--state-file", "x.json", "tenants", "set-limits", "ten_hobby", *args, "--aws", "--stack", STACK]
    )
    assert code == 1
    assert message in capsys.readouterr().err


def test_show_names_an_unknown_tenant(stack: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--state-file", "x.json", "tenants", "show", "ten_nobody", "--aws", "--stack", STACK])
    assert code == 1
    assert "no tenant ten_nobody" in capsys.readouterr().err


def test_a_tenant_created_before_usage_plans_gets_its_key_on_every_api_key(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], moto_stack: MotoStack
) -> None:
    """After upgrading, tenants without an API Gateway key would be refused with 403: the
    operator attaches one, and the authorizer's items carry it."""
    from llmq.tenants import TenantRepository

    # Given a tenant with two API keys, created without usage plans
    old = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    created = old.create("Legacy", "free", tenant_id="ten_legacy")
    second = old.issue_key(created.tenant)
    before = old.authenticate(created.api_key)
    assert before is not None and before.usage_key is None
    # When the operator attaches usage keys (twice: it is safe to run again)
    attached = llmq(capsys, "attach-usage-keys")
    assert [entry["id"] for entry in attached] == ["ten_legacy"]
    assert llmq(capsys, "attach-usage-keys") == []
    # Then both API keys authenticate with the tenant's usage key, which is in the free plan
    usage_key = old.get("ten_legacy").usage_key
    identities = [old.authenticate(key) for key in (created.api_key, second)]
    assert usage_key and [identity and identity.usage_key for identity in identities] == [usage_key] * 2
    in_plans = aws.client("apigateway").get_usage_plans(keyId=attached[0]["usage_key_id"])["items"]
    assert [plan["id"] for plan in in_plans] == [stack["free"]]


def _redeployed_with_plans(plan_ids: dict[str, str]) -> None:
    """A deploy that changed the stack's tiers: its UsagePlanIds output names these plans."""
    cloudformation = aws.client("cloudformation")
    (described,) = cloudformation.describe_stacks(StackName=STACK)["Stacks"]
    outputs = {output["OutputKey"]: output["OutputValue"] for output in described["Outputs"]}
    outputs["UsagePlanIds"] = json.dumps(plan_ids)
    template = {
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "placeholder"}}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    cloudformation.update_stack(StackName=STACK, TemplateBody=json.dumps(template))


def _plans_holding(key_id: str) -> list[str]:
    return [plan["id"] for plan in aws.client("apigateway").get_usage_plans(keyId=key_id)["items"]]


def test_a_deploy_that_removes_a_tier_moves_its_tenants_keys_to_the_default_plan(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], moto_stack: MotoStack
) -> None:
    # Given a free tenant, its key in the free tier's plan
    created = llmq(capsys, "create", "--name", "Hobby", "--tier", "free", "--id", "ten_hobby")
    key_id = (
        TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
        .get("ten_hobby")
        .usage_key_id
    )
    assert created["id"] == "ten_hobby" and key_id and _plans_holding(key_id) == [stack["free"]]
    # When a deploy drops the tier from fair_share.tiers: CloudFormation deletes its plan
    apigateway = aws.client("apigateway")
    (stage,) = apigateway.get_usage_plan(usagePlanId=stack["free"])["apiStages"]
    apigateway.update_usage_plan(
        usagePlanId=stack["free"],
        patchOperations=[
            {"op": "remove", "path": "/apiStages", "value": f"{stage['apiId']}:{stage['stage']}"}
        ],
    )
    apigateway.delete_usage_plan(usagePlanId=stack["free"])
    _redeployed_with_plans({tier: plan for tier, plan in stack.items() if tier != "free"})
    assert _plans_holding(key_id) == []  # (API Gateway would refuse every request: 403)
    # And make deploy runs attach-usage-keys (hunt 238: it only looked for tenants without keys)
    moved = llmq(capsys, "attach-usage-keys")
    # Then the key is in the plan its tier has now, the default one, and a second run moves nothing
    assert moved == [{"id": "ten_hobby", "tier": "free", "usage_key_id": key_id, "moved_to_plan": stack["*"]}]
    assert _plans_holding(key_id) == [stack["*"]]
    assert llmq(capsys, "attach-usage-keys") == []


def test_a_deploy_that_adds_a_tier_moves_its_tenants_keys_to_its_plan_and_leaves_an_override(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], moto_stack: MotoStack
) -> None:
    # Given two tenants of a tier the config did not list (in the default plan), one of them
    # with a rate of its own
    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    for tenant_id in ("ten_pro", "ten_own"):
        llmq(capsys, "create", "--name", tenant_id, "--tier", "pro", "--id", tenant_id)
    llmq(capsys, "set-limits", "ten_own", "--rate", "3", "--burst", "6")
    pro_key, own_key = (tenants.get(tenant_id).usage_key_id or "" for tenant_id in ("ten_pro", "ten_own"))
    assert _plans_holding(pro_key) == [stack["*"]]
    (own_plan,) = _plans_holding(own_key)
    # When a deploy adds the tier, with a plan of its own
    apigateway = aws.client("apigateway")
    stages = apigateway.get_usage_plan(usagePlanId=stack["*"])["apiStages"]
    pro = apigateway.create_usage_plan(
        name=f"{STACK}-pro", apiStages=stages, throttle={"rateLimit": 40.0, "burstLimit": 80}
    )
    _redeployed_with_plans({**stack, "pro": pro["id"]})
    moved = llmq(capsys, "attach-usage-keys")
    # Then the tier's tenant is in its plan, and the one with its own rate keeps it
    assert [(entry["id"], entry["moved_to_plan"]) for entry in moved] == [("ten_pro", pro["id"])]
    assert _plans_holding(pro_key) == [pro["id"]]
    assert _plans_holding(own_key) == [own_plan] and own_plan != pro["id"]


def _fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(
        ["--state-file", "x.json", "tenants", *args, "--aws", "--region", "us-east-1", "--stack", STACK]
    )
    assert code == 1
    return capsys.readouterr().err


def test_a_leaked_key_is_revoked_by_its_key_id_without_its_plaintext(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], moto_stack: MotoStack
) -> None:
    from llmq.tenants import TenantRepository, key_id_of

    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    # Given a tenant with its first key, and another tenant
    created = llmq(capsys, "create", "--name", "Acme", "--tier", "free", "--id", "ten_acme")
    other = llmq(capsys, "create", "--name", "Other", "--tier", "free", "--id", "ten_other")
    # When the operator issues a second key (a rotation's first step)
    issued = llmq(capsys, "issue-key", "ten_acme")
    assert issued["key_id"] == key_id_of(issued["api_key"]) and issued["api_key"] != created["api_key"]
    # Then both keys work, and the list names them by id, never by their value
    listed = llmq(capsys, "keys", "ten_acme")
    assert {key["key_id"] for key in listed} == {key_id_of(created["api_key"]), issued["key_id"]}
    assert not any(key["revoked"] for key in listed)
    assert created["api_key"] not in json.dumps(listed) and issued["api_key"] not in json.dumps(listed)
    assert all(tenants.authenticate(key) for key in (created["api_key"], issued["api_key"]))
    # When the first key leaks and is revoked by its id (the operator never had it)
    leaked = key_id_of(created["api_key"])
    revoked = llmq(capsys, "revoke-key", "ten_acme", leaked)
    assert (revoked["key_id"], revoked["revoked"]) == (leaked, True)
    # Then it no longer authenticates; the second key and the other tenant's still do
    assert tenants.authenticate(created["api_key"]) is None
    assert tenants.authenticate(issued["api_key"]) is not None
    assert tenants.authenticate(other["api_key"]) is not None
    assert {(key["key_id"], key["revoked"]) for key in llmq(capsys, "keys", "ten_acme")} == {
        (leaked, True),
        (issued["key_id"], False),
    }
    # And revoking it again is harmless
    assert llmq(capsys, "revoke-key", "ten_acme", leaked)["revoked"] is True


@pytest.mark.parametrize("which", ["another-tenants", "unknown", "not-an-id", "a-prefix"])
def test_revoke_key_refuses_an_id_that_is_not_the_tenants_and_changes_nothing(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], moto_stack: MotoStack, which: str
) -> None:
    from llmq.tenants import TenantRepository, key_id_of

    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    mine = llmq(capsys, "create", "--name", "Acme", "--tier", "free", "--id", "ten_acme")
    theirs = llmq(capsys, "create", "--name", "Other", "--tier", "free", "--id", "ten_other")
    key_id = {
        "another-tenants": key_id_of(theirs["api_key"]),
        "unknown": "key_" + "0" * 16,
        "not-an-id": "llmq_sk_whatever",
        "a-prefix": key_id_of(mine["api_key"])[:8],
    }[which]
    err = _fails(capsys, "revoke-key", "ten_acme", key_id)
    assert key_id in err
    assert tenants.authenticate(mine["api_key"]) is not None
    assert tenants.authenticate(theirs["api_key"]) is not None


def test_keys_and_issue_key_name_an_unknown_tenant(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert "no tenant ten_nobody" in _fails(capsys, "keys", "ten_nobody")
    assert "no tenant ten_nobody" in _fails(capsys, "issue-key", "ten_nobody")


def test_create_recognises_its_own_put_answered_late_and_refuses_an_id_taken(
    stack: dict[str, str], moto_stack: MotoStack, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a tenant put that DynamoDB applies, but whose answer is lost: botocore sends it again
    from tests.aws_faults import AwsFaults, FaultKind

    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    faults = AwsFaults()
    faults.arm(FaultKind.APPLIED_RETRIED, "dynamodb.PutItem", times=1)
    try:
        created = tenants.create("Acme", "free", tenant_id="ten_acme")
    finally:
        faults.disarm()
    assert [fired.fault.operation for fired in faults.fired] == ["dynamodb.PutItem"]
    # Then the create is the one it made: the tenant, and its first API key
    assert tenants.authenticate(created.api_key) is not None
    made = tenants.get("ten_acme")
    # And run again under the same id, it says the id is taken, in a line, and changes nothing;
    # a tenant whose create stopped before its usage-plan key is told how to give it one
    err = _fails(capsys, "create", "--name", "Acme", "--tier", "free", "--id", "ten_acme")
    assert "a tenant ten_acme exists already, without its usage-plan key" in err
    assert "attach-usage-keys ten_acme" in err and "Traceback" not in err
    assert tenants.get("ten_acme") == made


def test_a_stack_not_in_the_region_is_an_aws_error_in_a_line(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given no such stack in the region the operator named
    code = main(
        ["--state-file", "x.json", "dlq", "list", "--aws", "--region", "us-east-1", "--stack", "NoSuchStack"]
    )
    # Then the command fails with AWS's answer, not a traceback
    err = capsys.readouterr().err
    assert code == 1
    assert "AWS refused DescribeStacks" in err and "does not exist" in err


def _with_usage_plans(moto_stack: MotoStack, stack: dict[str, str]) -> TenantRepository:
    """The tenants as the CLI's commands hold them: with the stack's usage plans."""
    from llmq.usage_plans import ApiGatewayUsagePlans

    return TenantRepository(
        moto_stack.tenants_table,
        dynamodb=aws.client("dynamodb"),
        usage_keys=ApiGatewayUsagePlans(aws.client("apigateway"), stack),
    )


def test_attach_usage_keys_cut_short_after_the_key_is_made_makes_no_second_key_when_run_again(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], moto_stack: MotoStack
) -> None:
    # Given a tenant created without usage plans, and a run of attach-usage-keys that made the
    # tenant's API Gateway key and then failed to put it in the plan (a throttle, a Ctrl-C)
    from botocore.exceptions import ClientError

    from tests.aws_faults import AwsFaults, FaultKind

    TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Legacy", "free", tenant_id="ten_old"
    )
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "apigateway.CreateUsagePlanKey", times=5)
    cut_short = _with_usage_plans(moto_stack, stack)
    with pytest.raises(ClientError):
        cut_short.attach_usage_key("ten_old")
    faults.disarm()
    # When the operator runs it again
    attached = llmq(capsys, "attach-usage-keys")
    # Then the tenant has one key, the one made first, now in its tier's plan
    keys = [
        key
        for key in aws.client("apigateway").get_api_keys(customerId="ten_old")["items"]
        if key.get("customerId") == "ten_old"
    ]
    assert [key["id"] for key in keys] == [attached[0]["usage_key_id"]]
    in_plans = aws.client("apigateway").get_usage_plans(keyId=keys[0]["id"])["items"]
    assert [plan["id"] for plan in in_plans] == [stack["free"]]


def test_attach_usage_keys_cut_short_after_the_tenant_got_its_key_finishes_when_run_again(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], moto_stack: MotoStack
) -> None:
    # Given a tenant with two API keys, created without usage plans, and a run of
    # attach-usage-keys that recorded the tenant's usage key and then stopped before its API
    # keys carried it (a throttle, a Ctrl-C): API Gateway refuses those keys with 403
    from tests.aws_faults import AwsFaults, FaultKind

    old = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    created = old.create("Legacy", "free", tenant_id="ten_half")
    second = old.issue_key(created.tenant)
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "dynamodb.UpdateItem", nth=2, times=10)
    cut_short = _with_usage_plans(moto_stack, stack)
    with pytest.raises(StoreUnavailable):
        cut_short.attach_usage_key("ten_half")
    assert faults.fired
    faults.disarm()
    assert old.get("ten_half").usage_key_id
    # When the operator runs it again with no argument (as make deploy does)
    attached = llmq(capsys, "attach-usage-keys")
    # Then the tenant is finished: both its API keys carry its usage key
    assert [entry["id"] for entry in attached] == ["ten_half"]
    usage_key = old.get("ten_half").usage_key
    identities = [old.authenticate(key) for key in (created.api_key, second)]
    assert usage_key and [identity and identity.usage_key for identity in identities] == [usage_key] * 2
    assert llmq(capsys, "attach-usage-keys") == []


@contextmanager
def _usage_keys_refused(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """API Gateway throttling CreateApiKey past botocore's retries, on the CLI's own clients
    (through llmq's, which the faults reach); it fired by the end."""
    import llmq_cli.main as cli_main
    from tests.aws_faults import AwsFaults, FaultKind

    monkeypatch.setattr(cli_main.AwsTarget, "client", lambda self, service, config=None: aws.client(service))
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "apigateway.CreateApiKey", times=10)
    try:
        yield
    finally:
        faults.disarm()
    assert faults.fired


def test_a_create_cut_short_names_the_tenant_it_left_and_how_to_finish_it(
    stack: dict[str, str],
    moto_stack: MotoStack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given API Gateway refusing the tenant's usage-plan key, after its item is written
    with _usage_keys_refused(monkeypatch):
        err = _fails(capsys, "create", "--name", "Acme", "--tier", "free")
    # Then the error names the tenant it left behind, and the command that finishes it
    (tenant_id,) = [word for word in err.replace("`", " ").split() if word.startswith("ten_")][:1]
    assert f"--id={tenant_id}" in err and "Traceback" not in err
    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    assert tenants.get(tenant_id).usage_key_id is None
    # And a create of another tenant under that id (not the command it printed, which finishes
    # it: below) is refused, saying how to give the one there its usage-plan key
    again = _fails(capsys, "create", "--name", "Other", "--tier", "free", "--id", tenant_id)
    assert f"attach-usage-keys {tenant_id}" in again
    assert tenants.get(tenant_id).name == "Acme" and tenants.list_keys(tenant_id) == []


@pytest.mark.parametrize(("name", "aws_flag"), [("O'Brien & Sons $HOME", ["--aws"]), ("-Acme", [])])
def test_the_command_a_create_cut_short_prints_runs_as_printed_and_finishes_it(
    stack: dict[str, str],
    moto_stack: MotoStack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    aws_flag: list[str],
) -> None:
    import re
    import shlex

    # Given a create, aimed by every target option, cut short by API Gateway throttling the
    # tenant's usage-plan key (past botocore's retries) after the tenant's item is written
    # (a name a shell would expand or split, or one an option parser would take for an option)
    with _usage_keys_refused(monkeypatch):
        code = main(
            [
                "--state-file",
                "no sandbox.json",
                "tenants",
                "create",
                f"--name={name}",
                "--tier",
                "free",
                "--table",
                moto_stack.tenants_table,
                *aws_flag,  # (without it, AWS too: no sandbox runs)
                "--region",
                "us-east-1",
                "--stack",
                STACK,
            ]
        )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    # When the operator runs the command it printed, exactly as printed (a shell's words)
    match = re.search(r"Run `([^`]+)` again to finish it", err)
    assert match, err
    llmq_word, *argv = shlex.split(match.group(1))
    assert llmq_word == "llmq"
    # (quoted for a shell: no `$HOME` expanded, no quote or `&` breaking the words)
    assert f"{shlex.quote('--name=' + name)} " in match.group(1)
    # (its stack named, whether --aws chose AWS or no sandbox did: review 224)
    options = {word.split("=", 1)[0] for word in argv}
    assert {"--stack", *aws_flag, "--table", "--region", "--state-file"} <= options
    assert f"--stack={STACK}" in argv
    code = main(argv)
    captured = capsys.readouterr()
    # Then it finishes the tenant it left: named as given, its usage-plan key in its tier's plan,
    # and an API key that carries it
    assert code == 0, captured.err
    created = json.loads(captured.out)
    tenant_id = created["id"]
    assert f"--id={tenant_id}" in match.group(1)
    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    tenant = tenants.get(tenant_id)
    assert (tenant.name, tenant.tier, created["name"]) == (name, "free", name)
    assert tenant.usage_key_id and tenant.usage_key
    identity = tenants.authenticate(created["api_key"])
    assert identity is not None and identity.usage_key == tenant.usage_key
    in_plans = aws.client("apigateway").get_usage_plans(keyId=tenant.usage_key_id)["items"]
    assert [plan["id"] for plan in in_plans] == [stack["free"]]
    assert [key.revoked for key in tenants.list_keys(tenant_id)] == [False]


@pytest.mark.parametrize("tenant_id", ["acme corp", "müller-gmbh", "t" * 65, "..", "."])
def test_a_tenant_id_sqs_would_refuse_as_a_message_group_is_refused_and_nothing_is_made(
    stack: dict[str, str], moto_stack: MotoStack, capsys: pytest.CaptureFixture[str], tenant_id: str
) -> None:
    # (every lane message of the tenant's jobs names it as its MessageGroupId: SQS refused the
    # send, and every job of the tenant was accepted and never ran)
    err = _fails(capsys, "create", "--name", "Acme", "--tier", "free", "--id", tenant_id)
    assert "a tenant id is 1 to 64 of" in err and "Traceback" not in err
    items = aws.client("dynamodb").scan(TableName=moto_stack.tenants_table)["Items"]
    assert items == []
    assert aws.client("apigateway").get_api_keys()["items"] == []


@pytest.mark.parametrize("tier", ["", " ", "free tier", "gold/eu"])
def test_a_tier_that_cannot_name_limits_is_refused_and_nothing_is_made(
    stack: dict[str, str], moto_stack: MotoStack, capsys: pytest.CaptureFixture[str], tier: str
) -> None:
    # (hunt 247: `--tier "$TIER"` with TIER unset made a tenant and printed a key the api then
    # refused on every request: 401, no tier in the authorizer's context)
    err = _fails(capsys, "create", "--name", "Acme", "--tier", tier, "--id", "ten_acme")
    assert "a tier is 1 to 64 of" in err and "Traceback" not in err
    assert aws.client("dynamodb").scan(TableName=moto_stack.tenants_table)["Items"] == []
    assert aws.client("apigateway").get_api_keys()["items"] == []


def test_a_tier_the_config_does_not_name_is_created_with_a_warning(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    captured = llmq_captured(capsys, "create", "--name", "Acme", "--tier", "entreprise", "--id", "ten_acme")
    assert "tier 'entreprise' is in neither fair_share.tiers nor any lane's tiers" in captured.err
    assert json.loads(captured.out)["tier"] == "entreprise"
    assert "is in neither" not in llmq_captured(capsys, "create", "--name", "B", "--tier", "free").err


@pytest.mark.parametrize("command", ["rotate-secret", "issue-key"])
def test_a_secret_or_key_write_applied_with_its_answer_lost_hands_out_what_it_stored(
    stack: dict[str, str],
    moto_stack: MotoStack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    import llmq_cli.main as cli_main
    from tests.aws_faults import AwsFaults, FaultKind

    # Given a tenant, and the command's one write applied by DynamoDB with its answer lost
    monkeypatch.setattr(cli_main.AwsTarget, "client", lambda self, service, config=None: aws.client(service))
    llmq(capsys, "create", "--name", "Acme", "--tier", "free", "--id", "ten_acme")
    faults = AwsFaults()
    faults.arm(
        FaultKind.APPLIED_LOST, "dynamodb.UpdateItem" if command == "rotate-secret" else "dynamodb.PutItem"
    )
    try:
        # When the operator rotates the webhook secret (dropping the previous), or issues a key
        args = ["ten_acme", "--drop-previous"] if command == "rotate-secret" else ["ten_acme"]
        answer = llmq(capsys, command, *args)
    finally:
        faults.disarm()
    assert faults.fired
    # Then the write is read back and what it stored is handed out: never a secret that signs
    # unseen, or a live key nobody was shown
    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    if command == "rotate-secret":
        assert tenants.get("ten_acme").webhook_secrets == answer["webhook_secrets"]
    else:
        live = [key for key in llmq(capsys, "keys", "ten_acme") if not key["revoked"]]
        assert len(live) == 2 and tenants.authenticate(answer["api_key"]) is not None


def test_revoke_key_says_the_authorizer_cache_time_the_stack_was_deployed_with(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Hunt 203: the CLI read the config from cdk.json in the directory it ran in, so run
    elsewhere (or beside another stack's cdk.json) it told the operator a revoked key stops
    working sooner than it does. It reads the deployed api function's LLMQ_CONFIG."""
    # Given a stack whose api function was deployed with a 7 s authorizer cache
    deployed = LlmqConfig.model_validate({"limits": {"authorizer_cache_seconds": 7}})
    _api_function_deployed_with(deployed.to_env())
    # And, in the directory the operator runs from, a cdk.json that says 120 s
    _cdk_json_says_120_s(tmp_path)
    created = llmq(capsys, "create", "--name", "Acme", "--tier", "free", "--id", "ten_acme")

    # When a key is revoked
    captured = llmq_captured(capsys, "revoke-key", "ten_acme", key_id_of(created["api_key"]))
    # Then the CLI says the deployed stack's time
    assert "refuses it within 7 s" in captured.err


def _api_function_deployed_with(config: str) -> None:
    """The stack's api function, its LLMQ_CONFIG `config`."""
    role = aws.client("iam").create_role(
        RoleName="llmq-cli-test-api",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "lambda.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ]
            }
        ),
    )["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("handler.py", "def handler(event, context):\n    return None\n")
    aws.client("lambda").create_function(
        FunctionName="llmq-cli-test-api",
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": code.getvalue()},
        Environment={"Variables": {CONFIG_ENV_VAR: config}},
    )
    _stack_names_api_function("llmq-cli-test-api")


def test_a_key_is_revoked_and_said_so_in_a_line_where_another_version_deployed_the_stack(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a tenant, and a stack whose api function another llmq version deployed: its config
    # holds a setting this version does not know
    created = llmq(capsys, "create", "--name", "Acme", "--tier", "free", "--id", "ten_acme")
    config = json.loads(LlmqConfig().to_env())
    config.setdefault("reconciler", {})["sweep_batch_size"] = 25
    _api_function_deployed_with(json.dumps(config))
    # When the operator revokes a leaked key
    captured = llmq_captured(capsys, "revoke-key", "ten_acme", key_id_of(created["api_key"]))
    # Then it is revoked and the CLI says so, and why it cannot say the cache's time (hunt 314:
    # a traceback after the key was revoked, mid-incident)
    assert json.loads(captured.out)["revoked"] is True
    assert "reconciler.sweep_batch_size" in captured.err and "another llmq version" in captured.err
    # and a command that needs the deployed config says why it cannot, in one line, doing nothing
    code = main(_show_argv(STACK))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "llmq: the stack's api function runs a config this CLI cannot read"
    )


def test_a_stack_without_llmqs_outputs_is_refused_in_one_line(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a stack that is not llmq's (another team's, named by a typo)
    template = {"Resources": {"Q": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "other-team"}}}}
    aws.client("cloudformation").create_stack(StackName="OtherTeam", TemplateBody=json.dumps(template))
    # When a tenants command is run against it
    code = main(_show_argv("OtherTeam"))
    # Then it says so in one line (hunt 314: a KeyError's traceback)
    err = capsys.readouterr().err
    assert code == 1
    assert "llmq: stack OtherTeam has no JobsTableName output: is it an llmq stack?" in err
    assert "Traceback" not in err


def _show_argv(stack: str) -> list[str]:
    """`llmq tenants show ten_acme` against `stack`."""
    options = ["--aws", "--region", "us-east-1", "--stack", stack]
    return ["--state-file", "no-sandbox.json", "tenants", "show", "ten_acme", *options]


def _stack_names_api_function(name: str) -> None:
    """The stack's outputs name `name` as its api function (the CLI reads its configuration)."""
    cloudformation = aws.client("cloudformation")
    (described,) = cloudformation.describe_stacks(StackName=STACK)["Stacks"]
    outputs = {output["OutputKey"]: output["OutputValue"] for output in described["Outputs"]}
    outputs["FunctionNames"] = json.dumps({"api": name})
    template = {
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "placeholder"}}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    cloudformation.update_stack(StackName=STACK, TemplateBody=json.dumps(template))


def _cdk_json_says_120_s(directory: Path) -> None:
    (directory / "cdk.json").write_text(
        json.dumps({"context": {"llmq": {"limits": {"authorizer_cache_seconds": 120}}}})
    )


def test_revoke_key_falls_back_to_cdk_json_where_the_deployed_config_cannot_be_read(
    stack: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The api function the stack names is gone (or the operator may not read its
    configuration: the same ClientError): the CLI says cdk.json's time, and still revokes."""
    from llmq.tenants import key_id_of

    _stack_names_api_function("llmq-cli-test-no-such-function")
    _cdk_json_says_120_s(tmp_path)
    created = llmq(capsys, "create", "--name", "Acme", "--tier", "free", "--id", "ten_acme")
    captured = llmq_captured(capsys, "revoke-key", "ten_acme", key_id_of(created["api_key"]))
    assert "refuses it within 120 s" in captured.err
    assert json.loads(captured.out)["revoked"] is True


def test_set_limits_raising_a_cap_starts_the_deferred_jobs_and_says_so(
    stack: dict[str, str], harness: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI wakes a tenant's deferred backlog through the stack's lane queues (hunt 216)."""
    from tests.integration.harness import ENTERPRISE
    from tests.integration.test_fair_share import deferred_at_a_cap_of_one

    llmq(capsys, "create", "--name", "Acme", "--tier", "enterprise", "--id", ENTERPRISE["tenant_id"])
    ids = deferred_at_a_cap_of_one(harness, 3)
    captured = llmq_captured(capsys, "set-limits", ENTERPRISE["tenant_id"], "--max-concurrency", "8")
    assert json.loads(captured.out)["woken"] == 3
    assert "The cap starts 3 of the tenant's queued jobs now" in captured.err
    url = harness.stack.lane_queue_urls["high"]
    assert sorted(json.loads(message["Body"])["job_id"] for message in harness.receive(url)) == sorted(ids)


def _deployed_tier_cap(directory: Path, cap: int) -> None:
    """A deploy whose config gives the enterprise tier a default cap of `cap` (cdk.json: the
    CLI reads it where the stack names no api function)."""
    (directory / "cdk.json").write_text(
        json.dumps({"context": {"llmq": {"fair_share": {"tiers": {"enterprise": {"max_concurrency": cap}}}}}})
    )


def test_refresh_caps_holds_the_tenants_queued_jobs_to_a_cap_a_deploy_lowered(
    stack: dict[str, str],
    moto_stack: MotoStack,
    provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """A claim holds a tenant to the caps its accepts wrote on its share (hunt 246: after a
    deploy lowered the tier's cap from 3 to 1, its three queued jobs all ran at once, until its
    next submit). `make deploy` runs refresh-caps after every deploy."""
    from llmq.jobs import JobRepository
    from llmq.shares import ShareRepository
    from tests.integration.conftest import integration_config
    from tests.integration.harness import ENTERPRISE, Harness

    tenant = ENTERPRISE["tenant_id"]
    llmq(capsys, "create", "--name", "Acme", "--tier", "enterprise", "--id", tenant)
    # Given three jobs accepted under a tier cap of 3
    tiers = {"tiers": {"enterprise": {"max_concurrency": 3}}}
    before = Harness(moto_stack, integration_config(provider, fair_share=tiers), monkeypatch)
    ids = [before.submit(prompt=f"job {n}").body["id"] for n in range(3)]
    # When a deploy lowers it to 1, and make deploy refreshes the tenants' caps
    _deployed_tier_cap(tmp_path, 1)
    refreshed = llmq(capsys, "refresh-caps")
    assert refreshed == [
        {"id": tenant, "tier": "enterprise", "caps": {"high": {"from": 3, "to": 1, "batch_to": 1}}}
    ]
    # Then the new workers claim one of them, and the others wait for its slot
    after = integration_config(provider, fair_share={"tiers": {"enterprise": {"max_concurrency": 1}}})
    jobs = JobRepository(moto_stack.jobs_table, after, dynamodb=aws.client("dynamodb"))
    claimed = [
        jobs.claim(job_id, f"worker-{n}", 600, (tenant, "high")).claimed for n, job_id in enumerate(ids)
    ]
    assert claimed == [True, False, False]
    assert ShareRepository(moto_stack.jobs_table, dynamodb=aws.client("dynamodb")).get(tenant).running == 1
    # And a second run finds nothing to change
    assert llmq(capsys, "refresh-caps") == []


def _deferred_at_a_tier_cap_a_deploy_raised(
    harness: Any, capsys: pytest.CaptureFixture[str], directory: Path
) -> list[str]:
    """Three jobs of the enterprise tenant deferred at its tier's cap of one (as its accepts
    wrote it on its share), and a deploy that raises the tier's cap to 8: the jobs' ids."""
    from llmq.shares import ShareRepository
    from tests.integration.harness import ENTERPRISE
    from tests.integration.test_fair_share import deferred_at_a_cap_of_one

    tenant = ENTERPRISE["tenant_id"]
    llmq(capsys, "create", "--name", "Acme", "--tier", "enterprise", "--id", tenant)
    ids = deferred_at_a_cap_of_one(harness, 3)
    # (the cap of one was the operator's: the tier's, written at each accept, is the one here)
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    shares.set_limits(tenant, clear=("max_concurrency",))
    aws.client("dynamodb").update_item(
        TableName=harness.stack.jobs_table,
        Key={"pk": {"S": f"share#{tenant}"}},
        # (and as the share's first accept recorded it, for refresh-caps to tell a raise by)
        UpdateExpression="SET cap_high = :one, capb_high = :one, capr_high = :one",
        ExpressionAttributeValues={":one": {"N": "1"}},
    )
    _deployed_tier_cap(directory, 8)
    capsys.readouterr()  # (the worker's own log lines, which a slow run may print, are no CLI output)
    return ids


def test_refresh_caps_starts_the_deferred_jobs_of_a_cap_a_deploy_raised(
    stack: dict[str, str], harness: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A tier cap raised by a deploy starts the jobs deferred at the old one at once, as a cap
    raised by set-limits does, not when their deferrals end."""
    ids = _deferred_at_a_tier_cap_a_deploy_raised(harness, capsys, tmp_path)
    refreshed = llmq(capsys, "refresh-caps")
    assert [(shown["caps"]["high"]["from"], shown["caps"]["high"]["to"]) for shown in refreshed] == [(1, 8)]
    assert refreshed[0]["woken"] == 3
    url = harness.stack.lane_queue_urls["high"]
    # (each of the three woken; a deferred copy of one may be back too on a slow machine)
    assert {json.loads(message["Body"])["job_id"] for message in harness.receive(url)} == set(ids)
    # And a second run finds nothing to change, nor to wake
    assert llmq(capsys, "refresh-caps") == []


def test_refresh_caps_run_again_starts_the_jobs_a_cut_wake_left_deferred(
    stack: dict[str, str],
    harness: Any,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A raise's wake SQS cut short (a throttle) is done by the next run, as the command says
    (hunt 259: the caps were written, so a second run found nothing changed and woke nothing;
    the jobs waited out their deferrals, up to an hour, with the raised slots idle)."""
    import llmq_cli.main as cli_main
    from tests.aws_faults import AwsFaults, FaultKind

    monkeypatch.setattr(cli_main.AwsTarget, "client", lambda self, service, config=None: aws.client(service))
    # Given three jobs deferred at the tier's cap of one, which a deploy raises to 8
    ids = _deferred_at_a_tier_cap_a_deploy_raised(harness, capsys, tmp_path)
    # When make deploy's refresh-caps writes the caps and SQS throttles its wake's first send
    faults = AwsFaults()
    faults.arm(FaultKind.THROTTLE, "sqs.SendMessage")
    try:
        captured = llmq_captured(capsys, "refresh-caps")
    finally:
        faults.disarm()
    first = json.loads(captured.out)
    assert (first[0]["woken"], "wake_stopped" in first[0]) == (0, True), first
    assert "Run the command again" in captured.err
    url = harness.stack.lane_queue_urls["high"]
    assert harness.receive(url) == []
    # And the operator runs it again, as it says
    second = llmq(capsys, "refresh-caps")
    # Then the deferred jobs start now, and a third run has nothing left to do
    assert [(shown["caps"], shown["woken"]) for shown in second] == [({}, 3)]
    assert {json.loads(message["Body"])["job_id"] for message in harness.receive(url)} == set(ids)
    assert llmq(capsys, "refresh-caps") == []


def test_refresh_caps_wakes_the_deferred_jobs_after_a_submit_wrote_the_raised_cap_first(
    stack: dict[str, str],
    harness: Any,
    moto_stack: MotoStack,
    provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from llmq.shares import ShareRepository
    from tests.integration.conftest import integration_config
    from tests.integration.harness import ENTERPRISE, Harness

    # Given three jobs deferred at the tier's cap of one, and a deploy that raises it to 8
    ids = _deferred_at_a_tier_cap_a_deploy_raised(harness, capsys, tmp_path)
    # When the tenant submits to the new api before make deploy's refresh-caps runs: its
    # accept writes the raised cap on its share
    deployed = integration_config(provider, fair_share={"tiers": {"enterprise": {"max_concurrency": 8}}})
    new_id = Harness(moto_stack, deployed, monkeypatch).submit(prompt="after the deploy").body["id"]
    shares = ShareRepository(harness.stack.jobs_table, dynamodb=aws.client("dynamodb"))
    assert shares.get(ENTERPRISE["tenant_id"]).default_caps["high"] == 8
    capsys.readouterr()
    refreshed = llmq(capsys, "refresh-caps")
    # Then refresh-caps still wakes the jobs deferred at the old cap (hunt 330: it found nothing
    # changed, and they waited out their deferrals with the raised slots idle)
    # (and the new job, due as they are: its first message then finds it claimed)
    assert [(shown["caps"], shown["woken"]) for shown in refreshed] == [({}, 4)], refreshed
    url = harness.stack.lane_queue_urls["high"]
    assert set(ids) | {new_id} == {json.loads(message["Body"])["job_id"] for message in harness.receive(url)}
    # And a second run finds nothing to change, nor to wake
    assert llmq(capsys, "refresh-caps") == []


@pytest.mark.parametrize("operation", ["DeleteUsagePlanKey", "CreateUsagePlanKey"])
def test_a_rate_move_whose_plan_key_call_was_applied_with_its_answer_lost_completes(
    stack: dict[str, str],
    moto_stack: MotoStack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
) -> None:
    """botocore's retry of a plan-key call API Gateway applied meets NotFoundException (the key
    left the tier's plan already) or ConflictException (it is in the new one already): the move
    goes on, or is done (hunt 247: the CLI stopped with the key in NO plan, every request of the
    tenant a 403, and said only that AWS refused the delete)."""
    import llmq_cli.main as cli_main
    from tests.aws_faults import AwsFaults, FaultKind

    monkeypatch.setattr(cli_main.AwsTarget, "client", lambda self, service, config=None: aws.client(service))
    llmq(capsys, "create", "--name", "Hobby", "--tier", "free", "--id", "ten_hobby")
    key_id = (
        TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
        .get("ten_hobby")
        .usage_key_id
    )
    faults = AwsFaults()
    faults.arm(FaultKind.APPLIED_RETRIED, f"apigateway.{operation}")
    try:
        shown = llmq(capsys, "set-limits", "ten_hobby", "--rate", "2", "--burst", "3")
    finally:
        faults.disarm()
    assert len(faults.fired) == 1
    # Then the key is in the tenant's own plan, and only there
    own = [plan["name"] for plan in aws.client("apigateway").get_usage_plans(keyId=key_id)["items"]]
    assert own == [tenant_plan_name("ten_hobby")]
    assert shown["limits"]["rate_per_second"] == {"value": 2, "source": "override"}
