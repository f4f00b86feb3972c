"""The REQUEST authorizer against a moto tenants table."""

from __future__ import annotations

import copy
import json

import pytest

from llmq import aws
from llmq.errors import StoreUnavailable
from llmq.telemetry import METRICS_NAMESPACE, SERVICE_NAME, MetricName
from llmq.tenants import TenantRepository, hash_api_key
from tests.aws_faults import AwsFaults, FaultKind
from tests.conftest import MotoStack, load_event
from tests.integration.harness import LambdaContextStub, load_handler


@pytest.fixture
def authorizer(moto_stack: MotoStack, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLMQ_CONFIG", "{}")
    monkeypatch.setenv("LLMQ_TENANTS_TABLE", moto_stack.tenants_table)
    return load_handler("authorizer")


def _event(authorization: str | None) -> dict:
    event = copy.deepcopy(load_event("authorizer_request"))
    event["headers"] = {"Authorization": authorization} if authorization is not None else {}
    return event


def test_a_valid_key_yields_the_tenant_and_tier_in_the_context(authorizer, moto_stack: MotoStack) -> None:
    created = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise", tenant_id="ten_acme"
    )
    policy = authorizer.handler(_event(f"Bearer {created.api_key}"), LambdaContextStub())
    assert policy["principalId"] == "ten_acme"
    assert policy["context"] == {"tenant_id": "ten_acme", "tier": "enterprise"}
    statement = policy["policyDocument"]["Statement"][0]
    assert statement["Effect"] == "Allow"
    assert statement["Resource"][0].endswith("abc123/prod/*/*")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Basic abc",
        "Bearer llmq_sk_unknown",
        "Bearer llmq_sk_\udc80abc",
        "Bearer llmq_sk_ключ",
    ],
)
def test_a_missing_malformed_or_unknown_key_is_unauthorized(authorizer, header: str | None) -> None:
    with pytest.raises(Exception, match=r"^Unauthorized$"):
        authorizer.handler(_event(header), LambdaContextStub())


def _counted(stdout: str, name: MetricName = MetricName.AUTHENTICATION_REFUSED) -> int:
    """`name`'s counts in the EMF lines printed (what CloudWatch would record)."""
    count = 0
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        for directive in record.get("_aws", {}).get("CloudWatchMetrics", []):
            if any(metric["Name"] == name for metric in directive["Metrics"]):
                assert directive["Namespace"] == METRICS_NAMESPACE
                assert record["service"] == SERVICE_NAME
                value = record[name]
                count += int(sum(value) if isinstance(value, list) else value)
    return count


def test_refused_keys_and_failures_are_counted_apart_for_the_error_alarm(
    authorizer, moto_stack: MotoStack, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    created = tenants.create("Acme", "enterprise")
    capsys.readouterr()
    # Given two refused requests and an accepted one
    for header in ("Bearer llmq_sk_wrong", None):
        with pytest.raises(Exception, match=r"^Unauthorized$"):
            authorizer.handler(_event(header), LambdaContextStub())
    authorizer.handler(_event(f"Bearer {created.api_key}"), LambdaContextStub())
    # Then two refusals were counted, and no failure
    printed = capsys.readouterr().out
    assert (_counted(printed), _counted(printed, MetricName.AUTHORIZER_FAILED)) == (2, 0)
    # And a failure that is not a refusal (the tenants table throttled) counts as a failure,
    # which the alarm watches, not as a refusal
    faults = AwsFaults()
    try:
        faults.arm(FaultKind.THROTTLE, "dynamodb.GetItem", times=10)
        with pytest.raises(StoreUnavailable):
            authorizer.handler(_event("Bearer llmq_sk_other"), LambdaContextStub())
        assert faults.fired
    finally:
        faults.disarm()
    printed = capsys.readouterr().out
    assert (_counted(printed), _counted(printed, MetricName.AUTHORIZER_FAILED)) == (0, 1)


def test_the_key_is_read_strongly_consistent(authorizer, moto_stack: MotoStack) -> None:
    # (moto is always consistent; DynamoDB's default read may miss a key issued a moment ago
    # and refuse the client's first request, or still see one just revoked)
    created = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "enterprise"
    )
    asked: list[dict] = []

    def record(params: dict, **_: object) -> None:
        asked.append(dict(params))

    events = aws.client("dynamodb").meta.events
    events.register("provide-client-params.dynamodb.GetItem", record)
    try:
        authorizer.handler(_event(f"Bearer {created.api_key}"), LambdaContextStub())
    finally:
        events.unregister("provide-client-params.dynamodb.GetItem", record)
    assert [params.get("ConsistentRead") for params in asked] == [True]


def test_a_revoked_key_is_unauthorized(authorizer, moto_stack: MotoStack) -> None:
    tenants = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb"))
    created = tenants.create("Acme", "enterprise")
    tenants.revoke_key(created.api_key)
    with pytest.raises(Exception, match=r"^Unauthorized$"):
        authorizer.handler(_event(f"Bearer {created.api_key}"), LambdaContextStub())


def test_keys_are_stored_only_as_hashes(moto_stack: MotoStack) -> None:
    from llmq import aws

    created = TenantRepository(moto_stack.tenants_table, dynamodb=aws.client("dynamodb")).create(
        "Acme", "free"
    )
    items = aws.client("dynamodb").scan(TableName=moto_stack.tenants_table)["Items"]
    dumped = str(items)
    assert created.api_key not in dumped
    assert hash_api_key(created.api_key) in dumped
