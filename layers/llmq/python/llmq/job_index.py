"""The job table's secondary indexes, and the one rule for the reconciler's sweep index.

- `by_tenant` lists a tenant's jobs, newest first (`tenant_created`), and after them its
  batches (`b#` then the same key).
- `by_sweep` is sparse: a job is in it while something may need the reconciler (queued,
  running, or a webhook delivery pending), keyed by when to look (`sweep_at`). It is sharded,
  `sweep#<n>` by a hash of the job id, so job writes spread over the index's partitions
  instead of landing on one hot key. Items written before sharding carry the bare prefix;
  the reconciler still reads that partition.

Every write that moves a job in or out of the sweep index says so through `sweep_clauses`.
"""

from __future__ import annotations

import hashlib
from typing import Any

TENANT_INDEX = "by_tenant"
SWEEP_INDEX = "by_sweep"
SWEEP_PREFIX = "sweep"
# Attributes only the indexes read; they are not part of a JobRecord.
INDEX_ATTRIBUTES = ("sweep_pk", "sweep_at", "tenant_created")


def sweep_partition(job_id: str, shards: int) -> str:
    digest = hashlib.sha256(job_id.encode()).digest()
    return f"{SWEEP_PREFIX}#{int.from_bytes(digest[:4], 'big') % shards}"


def sweep_partitions(shards: int) -> list[str]:
    return [SWEEP_PREFIX, *(f"{SWEEP_PREFIX}#{shard}" for shard in range(shards))]


def sweep_attributes(job_id: str, due_ms: int, shards: int) -> dict[str, Any]:
    """The attributes that put a job in the sweep index, due at `due_ms`."""
    return {"sweep_pk": sweep_partition(job_id, shards), "sweep_at": due_ms}


def sweep_clauses(
    job_id: str, due_ms: int | None, shards: int
) -> tuple[list[str], list[str], dict[str, Any]]:
    """An update's SET clauses, REMOVE names and values for the sweep index.

    `due_ms` None takes the job out of the index (nothing left for the reconciler to do).
    """
    if due_ms is None:
        return [], ["sweep_pk", "sweep_at"], {}
    attributes = sweep_attributes(job_id, due_ms, shards)
    return [f"{name} = :{name}" for name in attributes], [], attributes


def tenant_sort_key(created_ms: int, job_id: str) -> str:
    return f"{created_ms:013d}#{job_id}"


# A tenant's batches share its index partition, after every job: a job's sort key starts with a
# digit, a batch's with this prefix, so each list's key condition reads only its own kind.
BATCH_SORT_PREFIX = "b#"


def batch_sort_key(created_ms: int, batch_id: str) -> str:
    return BATCH_SORT_PREFIX + tenant_sort_key(created_ms, batch_id)
