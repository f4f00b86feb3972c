"""The REQUEST authorizer against a moto tenants table."""

from __future__ import annotations

import copy

import pytest

from llmq import aws
from llmq.tenants import TenantRepository, hash_api_key
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
