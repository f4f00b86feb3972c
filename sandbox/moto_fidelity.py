"""Make moto's DynamoDB as atomic as the real one.

DynamoDB evaluates a ConditionExpression and applies the write atomically. moto's backend
checks and writes in plain Python, so two threads (a worker's concurrent batch, or the
sandbox's threaded server) can both pass the same condition. That would make our tests
report double claims that real DynamoDB never allows, so every write goes through one lock.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.RLock()
_WRITES = ("put_item", "update_item", "delete_item", "transact_write_items", "get_item")
_applied = False


def _serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return method(*args, **kwargs)

    return locked


def make_dynamodb_writes_atomic() -> None:
    """Idempotent: wraps moto's DynamoDB backend methods once per process."""
    global _applied
    with _LOCK:
        if _applied:
            return
        from moto.dynamodb.models import DynamoDBBackend

        for name in _WRITES:
            setattr(DynamoDBBackend, name, _serialized(getattr(DynamoDBBackend, name)))
        _applied = True
