"""Tenants, their API keys (stored only as SHA-256 hashes) and their webhook secrets.

The tenants table holds two kinds of item:
- `key#<sha256 of the API key>`: the tenant id, tier and usage key, so the authorizer needs
  one GetItem;
- `tenant#<id>`: the tenant's name, tier, webhook secrets (newest first during rotation) and
  its API Gateway API key (`usage_key_id`, `usage_key`).

An API key is named by its key id, `key_` and the first 16 hex digits of its hash: what an
operator lists and revokes it by (`list_keys`, `revoke_key_id`), and no help in guessing it.

The usage key is the value of the tenant's API Gateway API key (llmq.usage_plans): the
authorizer returns it as usageIdentifierKey and API Gateway throttles the tenant on its usage
plan. It is no secret the client holds; without one (a repository made without
`usage_keys`, as in tests without API Gateway) the authorizer returns none.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from llmq import aws
from llmq.config import TIER_NAME
from llmq.errors import StoreUnavailable
from llmq.usage_plans import UsageKeys, new_usage_key_value

API_KEY_PREFIX = "llmq_sk_"
WEBHOOK_SECRET_PREFIX = "whsec_"


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id_of(api_key: str) -> str:
    """The key's public name: it says which key without saying the key."""
    return _key_id_of_hash(hash_api_key(api_key))


def _key_id_of_hash(key_hash: str) -> str:
    return _KEY_ID_PREFIX + key_hash[:_KEY_ID_DIGITS]


_KEY_ID_PREFIX = "key_"
_KEY_ID_DIGITS = 16
_KEY_ID = re.compile(rf"{_KEY_ID_PREFIX}[0-9a-f]{{{_KEY_ID_DIGITS}}}")


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class TenantIdentity:
    """What the authorizer puts in the request context."""

    tenant_id: str
    tier: str
    # The API Gateway API key value the authorizer returns as usageIdentifierKey.
    usage_key: str | None = None


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    tier: str
    # Newest first. Two entries while a rotation is in its grace period: both sign.
    webhook_secrets: list[str]
    # Its API Gateway API key: id (for usage plans) and value (for the authorizer).
    usage_key_id: str | None = None
    usage_key: str | None = None


@dataclass(frozen=True)
class ApiKeyInfo:
    """One of a tenant's API keys, as an operator sees it: never the key itself."""

    key_id: str
    revoked: bool
    # Seconds since the epoch; None for a key issued before it was recorded.
    created_at: int | None = None


@dataclass(frozen=True)
class NewTenant:
    tenant: Tenant
    api_key: str


# Rotations of one tenant at once, each retried on top of the others
_ROTATION_TRIES = 5


class TenantExists(ValueError):
    """`create` with an id another tenant has."""


class InvalidTenantId(ValueError):
    """`create` with an id that cannot name a tenant everywhere it goes (or a tier that cannot
    name its limits: an empty one's tenants were refused every request)."""


# A tenant id is every lane message's MessageGroupId (SQS: 1 to 128 alphanumeric or punctuation
# characters, so no space and nothing outside ASCII), part of S3 keys and DynamoDB keys: an id
# SQS refused would have every job of the tenant accepted and never run.
# (Its first character a letter or digit: an id of dots would be a dot segment of an upload's
# S3 key, which HTTP clients resolve before sending a presigned URL, so its signature fails.)
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class UnknownTenant(LookupError):
    pass


class UnknownKey(LookupError):
    """No key of the tenant has that id (or the id is not one)."""


def new_tenant_id() -> str:
    return "ten_" + secrets.token_hex(8)


class TenantRepository:
    """`usage_keys`: API Gateway, to give each new tenant its usage plan key (the CLI and the
    sandbox pass llmq.usage_plans.ApiGatewayUsagePlans); None creates tenants without one."""

    def __init__(self, table_name: str, *, dynamodb: Any, usage_keys: UsageKeys | None = None) -> None:
        self.table_name = table_name
        self._ddb = aws.TranslatedClient(dynamodb)
        self._usage_keys = usage_keys

    def authenticate(self, api_key: str) -> TenantIdentity | None:
        """One GetItem by hash. None for an unknown or revoked key.

        A strongly consistent read: an eventually consistent one can miss a key issued a moment
        ago (a client's first request after `tenants create` refused 401) or still see one just
        revoked; API Gateway caches the answer for the authorizer's TTL either way, so it is one
        read per key per TTL, at twice a weak read's units."""
        if not api_key or not api_key.isascii():
            # (no key llmq makes has anything else; a lone surrogate could not even be hashed)
            return None
        response = self._ddb.get_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"key#{hash_api_key(api_key)}"}},
            ConsistentRead=True,
        )
        item = response.get("Item")
        if not item or item.get("revoked", {}).get("BOOL", False):
            return None
        usage_key = item.get("usage_key", {}).get("S")
        return TenantIdentity(tenant_id=item["tenant_id"]["S"], tier=item["tier"]["S"], usage_key=usage_key)

    def create(self, name: str, tier: str, tenant_id: str | None = None) -> NewTenant:
        """The tenant, its API Gateway key in its tier's usage plan (with `usage_keys`), and
        its first API key. The tenant item is written first, so an id already taken fails
        before anything is created in API Gateway."""
        if tenant_id is not None and not TENANT_ID.fullmatch(tenant_id):
            raise InvalidTenantId(
                f"a tenant id is 1 to 64 of A-Z, a-z, 0-9 and _ . : -, starting with a letter or digit "
                f"(it names every message of the tenant's jobs in SQS, and its S3 keys): {tenant_id!r} is not"
            )
        if not TIER_NAME.fullmatch(tier):
            raise InvalidTenantId(
                f"a tier is 1 to 64 of A-Z, a-z, 0-9 and _ . : -, starting with a letter or digit "
                f"(the authorizer hands it to every request of the tenant): {tier!r} is not"
            )
        tenant = Tenant(
            id=tenant_id or new_tenant_id(),
            name=name,
            tier=tier,
            webhook_secrets=[new_webhook_secret()],
        )
        # A token of this call: a put applied whose answer was lost, and sent again by botocore,
        # finds its own item, which is this create's, not another's.
        token = secrets.token_hex(8)
        try:
            self._ddb.put_item(
                TableName=self.table_name,
                Item={
                    "pk": {"S": f"tenant#{tenant.id}"},
                    "name": {"S": name},
                    "tier": {"S": tier},
                    "webhook_secrets": {"L": [{"S": s} for s in tenant.webhook_secrets]},
                    "created_at": {"N": str(int(time.time()))},
                    "created_by": {"S": token},
                },
                ConditionExpression="attribute_not_exists(pk)",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            old: dict[str, Any] = dict(exc.response.get("Item") or {})  # type: ignore[call-overload]
            if old.get("created_by", {}).get("S") != token:
                raise TenantExists(f"a tenant {tenant.id} exists already") from exc
        if self._usage_keys is not None:
            tenant = self._give_usage_key(tenant)
        return NewTenant(tenant=tenant, api_key=self.issue_key(tenant))

    def _give_usage_key(self, tenant: Tenant) -> Tenant:
        """A new API Gateway key in the tenant's tier's usage plan, recorded on the tenant."""
        assert self._usage_keys is not None
        key = self._usage_keys.create_key(tenant.id, tenant.tier, new_usage_key_value())
        self._ddb.update_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"tenant#{tenant.id}"}},
            UpdateExpression="SET usage_key_id = :id, usage_key = :value",
            ExpressionAttributeValues={":id": {"S": key.id}, ":value": {"S": key.value}},
        )
        return dataclasses.replace(tenant, usage_key_id=key.id, usage_key=key.value)

    def issue_key(self, tenant: Tenant) -> str:
        api_key = new_api_key()
        item: dict[str, Any] = {
            "pk": {"S": f"key#{hash_api_key(api_key)}"},
            "tenant_id": {"S": tenant.id},
            "tier": {"S": tenant.tier},
            "revoked": {"BOOL": False},
            "created_at": {"N": str(int(time.time()))},
        }
        if tenant.usage_key:
            item["usage_key"] = {"S": tenant.usage_key}
        try:
            self._ddb.put_item(TableName=self.table_name, Item=item)
        except StoreUnavailable:
            # Perhaps applied with its answer lost: a live key nobody was shown. Read back, it
            # is this key (its hash is of a fresh random key), and it is handed out.
            if self._stored(item["pk"]["S"]) is None:
                raise
        return api_key

    def _stored(self, pk: str) -> dict[str, Any] | None:
        """The item under `pk`, read consistently after a write whose outcome is unknown; None
        when it is not there, or when the read fails too."""
        try:
            response = self._ddb.get_item(
                TableName=self.table_name, Key={"pk": {"S": pk}}, ConsistentRead=True
            )
        except Exception:
            return None
        item: dict[str, Any] | None = response.get("Item")
        return item

    def attach_usage_key(self, tenant_id: str) -> Tenant:
        """Give a tenant created before usage plans its API Gateway key, in its tier's plan,
        and put the key's value on each of its `key#` items (found with a Scan: an operator's
        one-off, `llmq tenants attach-usage-keys`). Idempotent: a run cut short can run again.
        Until it has run, API Gateway refuses the tenant's requests with 403."""
        if self._usage_keys is None:
            raise RuntimeError("attach_usage_key needs usage_keys (API Gateway)")
        tenant = self.get(tenant_id)
        if not tenant.usage_key_id:
            tenant = self._give_usage_key(tenant)
        for pk in self._key_items_without_usage_key(tenant.id):
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": pk}},
                UpdateExpression="SET usage_key = :value",
                ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeValues={":value": {"S": tenant.usage_key or ""}},
            )
        return tenant

    def tenants_without_usage_key(self) -> list[str]:
        """Ids of the tenants that have no API Gateway key yet, or an API key whose item does
        not carry it (a run of `attach_usage_key` cut short after the tenant got its key, whose
        API keys API Gateway still refuses with 403): two Scans."""
        bare = [
            item["pk"]["S"].removeprefix("tenant#")
            for item in self._scan(
                "begins_with(pk, :prefix) AND attribute_not_exists(usage_key_id)",
                {":prefix": {"S": "tenant#"}},
            )
        ]
        unfinished = {
            item["tenant_id"]["S"]
            for item in self._scan(
                "begins_with(pk, :prefix) AND attribute_not_exists(usage_key)",
                {":prefix": {"S": "key#"}},
                projection=("pk", "tenant_id"),
            )
            if "tenant_id" in item
        }
        return bare + sorted(unfinished - set(bare))

    def usage_keys_by_tenant(self) -> list[tuple[str, str, str]]:
        """(tenant id, tier, API Gateway key id) of every tenant that has its key: a Scan."""
        return [
            (item["pk"]["S"].removeprefix("tenant#"), item["tier"]["S"], item["usage_key_id"]["S"])
            for item in self._scan(
                "begins_with(pk, :prefix) AND attribute_exists(usage_key_id)",
                {":prefix": {"S": "tenant#"}},
                projection=("pk", "tier", "usage_key_id"),
            )
        ]

    def tiers_by_tenant(self) -> list[tuple[str, str]]:
        """(tenant id, tier) of every tenant: a Scan."""
        return [
            (item["pk"]["S"].removeprefix("tenant#"), item["tier"]["S"])
            for item in self._scan(
                "begins_with(pk, :prefix)", {":prefix": {"S": "tenant#"}}, projection=("pk", "tier")
            )
        ]

    def _key_items_without_usage_key(self, tenant_id: str) -> list[str]:
        return [
            item["pk"]["S"]
            for item in self._scan(
                "begins_with(pk, :prefix) AND tenant_id = :tenant AND attribute_not_exists(usage_key)",
                {":prefix": {"S": "key#"}, ":tenant": {"S": tenant_id}},
            )
        ]

    def _scan(
        self, condition: str, values: dict[str, Any], projection: tuple[str, ...] = ("pk",)
    ) -> list[dict[str, Any]]:
        """The items `condition` keeps, with the `projection` attributes: a consistent Scan, so
        a key issued a moment ago is found."""
        items: list[dict[str, Any]] = []
        start: dict[str, Any] | None = None
        names = {f"#p{index}": name for index, name in enumerate(projection)}
        while True:
            page = self._ddb.scan(
                TableName=self.table_name,
                FilterExpression=condition,
                ExpressionAttributeValues=values,
                ProjectionExpression=", ".join(names),
                ExpressionAttributeNames=names,
                ConsistentRead=True,
                **({"ExclusiveStartKey": start} if start else {}),
            )
            items.extend(page.get("Items", []))
            start = page.get("LastEvaluatedKey")
            if not start:
                return items

    def list_keys(self, tenant_id: str) -> list[ApiKeyInfo]:
        """The tenant's API keys, oldest first (a Scan: an operator's look, not a request's)."""
        self.get(tenant_id)
        found = self._scan(
            "begins_with(pk, :prefix) AND tenant_id = :tenant",
            {":prefix": {"S": "key#"}, ":tenant": {"S": tenant_id}},
            projection=("pk", "revoked", "created_at"),
        )
        keys = [
            ApiKeyInfo(
                key_id=_key_id_of_hash(item["pk"]["S"].removeprefix("key#")),
                revoked=item.get("revoked", {}).get("BOOL", False),
                created_at=int(item["created_at"]["N"]) if "created_at" in item else None,
            )
            for item in found
        ]
        return sorted(keys, key=lambda key: (key.created_at or 0, key.key_id))

    def revoke_key_id(self, tenant_id: str, key_id: str) -> ApiKeyInfo:
        """Revoke the tenant's key named `key_id` (`key_id_of`), without its plaintext: what an
        operator does when a customer's key leaks. Idempotent. Another tenant's key is as
        unknown as one that never was, and is left as it is."""
        if not _KEY_ID.fullmatch(key_id):
            raise UnknownKey(f"{key_id!r} is not a key id (key_ and {_KEY_ID_DIGITS} hex digits)")
        matches = self._scan(
            "begins_with(pk, :prefix) AND tenant_id = :tenant",
            {":prefix": {"S": "key#" + key_id.removeprefix(_KEY_ID_PREFIX)}, ":tenant": {"S": tenant_id}},
            projection=("pk", "created_at"),
        )
        if len(matches) != 1:
            raise UnknownKey(f"tenant {tenant_id} has no key {key_id}")
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": matches[0]["pk"]},
                UpdateExpression="SET revoked = :true",
                ConditionExpression="attribute_exists(pk) AND tenant_id = :tenant",
                ExpressionAttributeValues={":true": {"BOOL": True}, ":tenant": {"S": tenant_id}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise UnknownKey(f"tenant {tenant_id} has no key {key_id}") from exc
            raise
        created = matches[0].get("created_at")
        return ApiKeyInfo(key_id=key_id, revoked=True, created_at=int(created["N"]) if created else None)

    def revoke_key(self, api_key: str) -> None:
        self._ddb.update_item(
            TableName=self.table_name,
            Key={"pk": {"S": f"key#{hash_api_key(api_key)}"}},
            UpdateExpression="SET revoked = :true",
            ConditionExpression="attribute_exists(pk)",
            ExpressionAttributeValues={":true": {"BOOL": True}},
        )

    def get(self, tenant_id: str) -> Tenant:
        """The tenant as last written: a dispatcher that read it a moment after a rotation would
        otherwise keep signing with the secrets before it for its cache's whole time."""
        response = self._ddb.get_item(
            TableName=self.table_name, Key={"pk": {"S": f"tenant#{tenant_id}"}}, ConsistentRead=True
        )
        item = response.get("Item")
        if not item:
            raise UnknownTenant(tenant_id)
        return Tenant(
            id=tenant_id,
            name=item["name"]["S"],
            tier=item["tier"]["S"],
            webhook_secrets=[entry["S"] for entry in item["webhook_secrets"]["L"]],
            usage_key_id=item.get("usage_key_id", {}).get("S"),
            usage_key=item.get("usage_key", {}).get("S"),
        )

    def rotate_webhook_secret(self, tenant_id: str, keep_previous: bool = True) -> Tenant:
        """A new secret signs first; the previous one keeps signing until the next rotation.

        The write holds only if the secrets are still those it read: of two rotations at once,
        the later one rotates again on top of the other's, so the secret the other handed out
        keeps signing (as the previous one), never silently dropped, `keep_previous` or not. A retry of a write that was
        applied (its answer lost) finds its own fresh secret stored, and stops there."""
        current = self.get(tenant_id)
        read = current.webhook_secrets
        for _ in range(_ROTATION_TRIES):
            rotated = [new_webhook_secret(), *read[:1]] if keep_previous else [new_webhook_secret()]
            try:
                self._write_secrets(tenant_id, rotated, read)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                    raise
                item: dict[str, Any] = exc.response.get("Item") or {}  # type: ignore[assignment]
                if not item:
                    raise UnknownTenant(tenant_id) from exc
                stored = [entry["S"] for entry in item.get("webhook_secrets", {}).get("L", [])]
                if stored == rotated:
                    break  # this write, applied, then retried by the SDK
                # Another rotation came first: rotate on top of what it stored, keeping the
                # secret it handed out even when this one drops the previous (what it drops is
                # then the secret both replaced: hunt 263, the other's was dropped unseen).
                read, keep_previous = stored, True
                continue
            break
        else:
            raise RuntimeError(f"tenant {tenant_id}: its webhook secrets kept changing; rotate again")
        return dataclasses.replace(current, webhook_secrets=rotated)

    def _write_secrets(self, tenant_id: str, rotated: list[str], read: list[str]) -> None:
        """The rotation's one conditional write. One whose outcome is unknown (applied, its
        answer lost) is read back: applied, it stands, and its new secret is handed out (else
        it would sign unseen, and a rotation run again would push the integrator's own secret
        out); not applied, or the read failing too, the error stands."""
        pk = f"tenant#{tenant_id}"
        try:
            self._ddb.update_item(
                TableName=self.table_name,
                Key={"pk": {"S": pk}},
                UpdateExpression="SET webhook_secrets = :secrets",
                ConditionExpression="attribute_exists(pk) AND webhook_secrets = :read",
                ExpressionAttributeValues={
                    ":secrets": {"L": [{"S": s} for s in rotated]},
                    ":read": {"L": [{"S": s} for s in read]},
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except StoreUnavailable:
            stored = self._stored(pk) or {}
            # (applied, perhaps rotated over since by another rotation, which keeps ours as its
            # previous secret and handed out its own)
            if rotated[0] not in [entry["S"] for entry in stored.get("webhook_secrets", {}).get("L", [])]:
                raise
