"""Tenants, their API keys (stored only as SHA-256 hashes) and their webhook secrets.

The tenants table holds two kinds of item:
- `key#<sha256 of the API key>`: the tenant id and tier, so the authorizer needs one GetItem;
- `tenant#<id>`: the tenant's name, tier and webhook secrets (newest first during rotation).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from llmq import aws

API_KEY_PREFIX = "llmq_sk_"
WEBHOOK_SECRET_PREFIX = "whsec_"


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class TenantIdentity:
    """What the authorizer puts in the request context."""

    tenant_id: str
    tier: str


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    tier: str
    # Newest first. Two entries while a rotation is in its grace period: both sign.
    webhook_secrets: list[str]


@dataclass(frozen=True)
class NewTenant:
    tenant: Tenant
    api_key: str


class UnknownTenant(LookupError):
    pass


class TenantRepository:
    def __init__(self, table_name: str, *, dynamodb: Any) -> None:
        self.table_name = table_name
        self._ddb = aws.TranslatedClient(dynamodb)

    def authenticate(self, api_key: str) -> TenantIdentity | None:
        """One GetItem by hash. None for an unknown or revoked key."""
        if not api_key:
            return None
        response = self._ddb.get_item(
            TableName=self.table_name, Key={"pk": {"S": f"key#{hash_api_key(api_key)}"}}
        )
        item = response.get("Item")
        if not item or item.get("revoked", {}).get("BOOL", False):
            return None
        return TenantIdentity(tenant_id=item["tenant_id"]["S"], tier=item["tier"]["S"])

    def create(self, name: str, tier: str, tenant_id: str | None = None) -> NewTenant:
        tenant = Tenant(
            id=tenant_id or "ten_" + secrets.token_hex(8),
            name=name,
            tier=tier,
            webhook_secrets=[new_webhook_secret()],
        )
        self._ddb.put_item(
            TableName=self.table_name,
            Item={
                "pk": {"S": f"tenant#{tenant.id}"},
                "name": {"S": name},
                "tier": {"S": tier},
                "webhook_secrets": {"L": [{"S": s} for s in tenant.webhook_secrets]},
                "created_at": {"N": str(int(time.time()))},
            },
            ConditionExpression="attribute_not_exists(pk)",
        )
        return NewTenant(tenant=tenant, api_key=self.issue_key(tenant))

    def issue_key(self, tenant: Tenant) -> str:
        api_key = new_api_key()
        self._ddb.put_item(
            TableName=self.table_name,
            Item={
                "pk": {"S": f"key#{hash_api_key(api_key)}"},
                "tenant_id": {"S": tenant.id},
                "tier": {"S": tenant.tier},
                "revoked": {"BOOL": False},
            },
        )
        return api_key

    def revoke_key(self, api_key: str) -> None:
        self._ddb.update_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"key#{hash_api_key(api_key)}"}},
            UpdateExpression="SET revoked = :true",
            ConditionExpression="attribute_exists(pk)",
            ExpressionAttributeValues={":true": {"BOOL": True}},
        )

    def get(self, tenant_id: str) -> Tenant:
        response = self._ddb.get_item(TableName=self.table_name, Key={"pk": {"S": f"tenant#{tenant_id}"}})
        item = response.get("Item")
        if not item:
            raise UnknownTenant(tenant_id)
        return Tenant(
            id=tenant_id,
            name=item["name"]["S"],
            tier=item["tier"]["S"],
            webhook_secrets=[entry["S"] for entry in item["webhook_secrets"]["L"]],
        )

    def rotate_webhook_secret(self, tenant_id: str, keep_previous: bool = True) -> Tenant:
        """A new secret signs first; the previous one keeps signing until the next rotation."""
        current = self.get(tenant_id)
        rotated = (
            [new_webhook_secret(), *current.webhook_secrets[:1]] if keep_previous else [new_webhook_secret()]
        )
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": f"tenant#{tenant_id}"}},
                UpdateExpression="SET webhook_secrets = :secrets",
                ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeValues={":secrets": {"L": [{"S": s} for s in rotated]}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise UnknownTenant(tenant_id) from exc
            raise
        return Tenant(id=tenant_id, name=current.name, tier=current.tier, webhook_secrets=rotated)
