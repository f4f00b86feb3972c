"""A tenant's long-polls: at most its `max_long_polls` requests wait at once.

A request that waits (`GET /v1/jobs/{id}?wait=N`, `POST /v1/jobs` with `Prefer: wait=N`)
holds one api environment for up to 25 s, out of the api's reserved concurrency (README
"Concurrency budget"). Uncapped, one tenant's pollers could hold all of it, and every other
tenant's requests would be throttled by Lambda.

One item per tenant in the jobs table, `polls#<tenant id>`: a map of the places now held,
each place's id to the time it lapses (epoch ms: its wait, plus a margin for the answer).
A request takes a place with one conditional UpdateItem, refused when the map is full, and
gives it back with one more. A place whose request died before giving it back (a timeout, a
crash, a lost answer) is not lost: a refused request reads the map from the refused
condition, removes the places that have lapsed and tries again. So the cap counts the live
waiting requests exactly, and a dead one holds its place no longer than its own wait.

A request refused a place does not wait: a `GET ?wait` is answered 429 `too_many_long_polls`
with Retry-After, as rate limits are, so every client's backoff handles it; a submit that
preferred to wait is still accepted, with a 202 at once (docs/limits.md). The item has no `tenant_id`,
TTL or sweep attributes, so no index and no expiry ever sees it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from llmq import aws
from llmq.errors import StoreUnavailable
from llmq.job_codec import condition_failed

POLLS_PREFIX = "polls#"
# The operator's override of the tier's default (`llmq tenants set-limits --max-long-polls`).
MAX_LONG_POLLS = "max_long_polls"
_PLACES = "waiting"
# A place outlives its wait by this much: the answer after it (a last read, a result of up to
# 4 MB from S3) still counts as the request holding its environment.
ANSWER_MARGIN_SECONDS = 10
# Places that lapsed, removed in one write (each is an expression attribute name; a few
# hundred keep the expression far below its 4 KB limit).
_MAX_SWEPT = 100
# Tries to take a place: the first, after making the map, after removing lapsed places.
_TRIES = 3


def polls_key(tenant_id: str) -> dict[str, Any]:
    return {"pk": {"S": POLLS_PREFIX + tenant_id}}


class LongPolls:
    """The places of each tenant's waiting requests (`JobIntake.long_poll`)."""

    def __init__(self, table_name: str, *, dynamodb: Any, clock: Callable[[], float] = time.time) -> None:
        self.table_name = table_name
        self._ddb = aws.TranslatedClient(dynamodb)
        self._clock = clock

    def enter(self, tenant_id: str, cap: int, seconds: float, deadline: float | None = None) -> str | None:
        """A place for a request that waits up to `seconds`: its id, or None at the cap, or
        once `deadline` (`time.monotonic()`) has passed, when no write more is tried: each
        may take seconds throttled, and the request's answer is due (hunt 289: a first wait
        made three, and answered an accepted submit after API Gateway gave up).

        `cap` is the tier's default; the tenant's override on the item wins. Raises
        StoreUnavailable when DynamoDB is busy (the caller then does not wait).
        """
        place = secrets.token_hex(8)

        def out_of_time() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        for _ in range(_TRIES):
            if out_of_time():
                return None
            now_ms = int(self._clock() * 1000)
            try:
                self._ddb.update_item(
                    TableName=self.table_name,
                    Key=polls_key(tenant_id),
                    UpdateExpression="SET #places.#place = :until",
                    # Guarded by attribute_exists: size() of a missing map is no number.
                    ConditionExpression="attribute_exists(#places) AND (size(#places) < #max OR "
                    "(attribute_not_exists(#max) AND size(#places) < :cap))",
                    ExpressionAttributeNames={"#places": _PLACES, "#place": place, "#max": MAX_LONG_POLLS},
                    ExpressionAttributeValues={
                        ":until": {"N": str(now_ms + int((seconds + ANSWER_MARGIN_SECONDS) * 1000))},
                        ":cap": {"N": str(cap)},
                    },
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
                return place
            except StoreUnavailable:
                # Perhaps applied, its answer lost: take it back rather than hold a place
                # nobody waits in until it lapses; not once the answer is due (it lapses by
                # itself: review 265, a second throttled write took a submit past 29 s).
                if not out_of_time():
                    self._forget(tenant_id, place)
                raise
            except ClientError as exc:
                if not condition_failed(exc):
                    raise
                item: Any = exc.response.get("Item") or {}
            places = item.get(_PLACES, {}).get("M")
            if places is not None and place in places:
                # Our own write, applied before its answer was lost and retried by botocore.
                return place
            if out_of_time():
                return None
            if places is None:
                self._make_map(tenant_id)
                continue
            lapsed = [held for held, until in places.items() if int(until["N"]) <= now_ms]
            if not lapsed:
                return None
            self._remove(tenant_id, lapsed[:_MAX_SWEPT])
        return None

    def leave(self, tenant_id: str, place: str) -> None:
        """Give the place back (it lapses by itself if this write is lost)."""
        self._remove(tenant_id, [place])

    def limit(self, tenant_id: str) -> int | None:
        """The tenant's override, if it has one."""
        item = self._ddb.get_item(
            TableName=self.table_name, Key=polls_key(tenant_id), ConsistentRead=True
        ).get("Item", {})
        return int(item[MAX_LONG_POLLS]["N"]) if MAX_LONG_POLLS in item else None

    def set_limit(self, tenant_id: str, value: int | None) -> None:
        """Override the tier's default for one tenant; None drops the override."""
        if value is not None and value < 1:
            raise ValueError(f"{MAX_LONG_POLLS} must be at least 1")
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "Key": polls_key(tenant_id),
            "UpdateExpression": f"SET {MAX_LONG_POLLS} = :max"
            if value is not None
            else f"REMOVE {MAX_LONG_POLLS}",
        }
        if value is not None:
            kwargs["ExpressionAttributeValues"] = {":max": {"N": str(value)}}
        self._ddb.update_item(**kwargs)

    def _forget(self, tenant_id: str, place: str) -> None:
        try:
            self.leave(tenant_id, place)
        except (StoreUnavailable, ClientError):
            # Busy still, or no map to remove it from: the place, if taken, lapses by itself.
            return

    def _make_map(self, tenant_id: str) -> None:
        self._ddb.update_item(
            TableName=self.table_name,
            Key=polls_key(tenant_id),
            UpdateExpression="SET #places = if_not_exists(#places, :empty)",
            ExpressionAttributeNames={"#places": _PLACES},
            ExpressionAttributeValues={":empty": {"M": {}}},
        )

    def _remove(self, tenant_id: str, places: list[str]) -> None:
        names = {f"#p{index}": place for index, place in enumerate(places)}
        self._ddb.update_item(
            TableName=self.table_name,
            Key=polls_key(tenant_id),
            UpdateExpression="REMOVE " + ", ".join(f"#places.{name}" for name in names),
            ExpressionAttributeNames={"#places": _PLACES, **names},
        )
