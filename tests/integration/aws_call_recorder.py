"""Record which AWS calls each handler makes, for the IAM catalogue (see tests/aws_calls.py).

The hook is a botocore `provide-client-params` handler added to botocore's built-in handlers,
so every client of every session created afterwards carries it: the llmq.aws clients, and
the ones Powertools creates for itself (Secrets Manager). That event fires once per API call
and once per presigned URL, before retries. A call counts only while a handler loaded by
`harness.load_handler` runs; the context variable follows it into asyncio tasks and
`asyncio.to_thread`, and the test's own setup and assertions are never attributed.
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from llmq.batch_results import RESULTS_FILE_PREFIX
from stacks.jobs_table import BATCH_REQUESTS_PREFIX, PARKED_PREFIX, UPLOADS_PREFIX
from tests.aws_calls import (
    ANY_RESOURCE,
    CATALOGUE_PATH,
    ENV_PREFIX,
    EVENT_SOURCE,
    RECORD_ENV_VAR,
    AwsCall,
    load_catalogue,
    render_catalogue,
)

UNNAMED_PREFIX = "unnamed:"


@dataclass(frozen=True)
class _Target:
    kind: str  # table | queue | bucket | secret | any
    name: str = ""
    suffix: str = ""


@dataclass
class _Invocation:
    function: str
    # (variable, value) for every resource name or URL the function's environment holds.
    variables: list[tuple[str, str]]
    event_queues: set[str] = field(default_factory=set)

    def label(self, target: _Target) -> str:
        if target.kind == "any":
            return ANY_RESOURCE
        for variable, value in self.variables:
            if target.kind == "queue":
                same = value.startswith(("http://", "https://")) and _queue_name(value) == target.name
            else:
                same = value == target.name
            if same:
                return f"{ENV_PREFIX}{variable}{target.suffix}"
        if target.kind == "queue" and target.name in self.event_queues:
            return EVENT_SOURCE
        return f"{UNNAMED_PREFIX}{target.name}{target.suffix}"


_current: ContextVar[_Invocation | None] = ContextVar("llmq_handler_invocation", default=None)
_observed: set[AwsCall] = set()
_observed_lock = threading.Lock()
_installed = False


def install() -> None:
    """Idempotent: add the hook to the handlers every new botocore session registers."""
    global _installed
    if _installed:
        return
    from botocore.handlers import BUILTIN_HANDLERS

    BUILTIN_HANDLERS.append(("provide-client-params", _on_api_params))
    _installed = True


def attribute_calls(function: str, module: ModuleType) -> None:
    """Wrap the handler module's entry point so the calls it makes are `function`'s."""
    original = module.handler

    @functools.wraps(original)
    def handler(event: Any, context: Any) -> Any:
        invocation = _Invocation(function, _variables(module), _event_queues(event))
        token = _current.set(invocation)
        try:
            return original(event, context)
        finally:
            _current.reset(token)

    module.handler = handler  # type: ignore[attr-defined]


def take_observed() -> set[AwsCall]:
    with _observed_lock:
        calls = set(_observed)
        _observed.clear()
    return calls


def check_catalogued(observed: set[AwsCall]) -> list[str]:
    """Problems to fail the test with; in record mode, new calls are added to the catalogue instead."""
    problems = [
        f"{call} — a resource neither named by the function's environment nor the source of its "
        "event, so the infra test cannot find its grant in the template"
        for call in sorted(observed)
        if call.resource.startswith(UNNAMED_PREFIX)
    ]
    missing = {call for call in observed if not call.resource.startswith(UNNAMED_PREFIX)}
    missing -= load_catalogue()
    if missing and os.environ.get(RECORD_ENV_VAR):
        _add_to_catalogue(missing)
        missing = set()
    if missing:
        listed = "\n  ".join(str(call) for call in sorted(missing))
        problems.append(
            f"AWS calls missing from tests/{CATALOGUE_PATH.name}:\n  {listed}\n"
            f"Add them (or run `make aws-calls`), then `make test-infra` checks each function's role grants them."
        )
    return problems


def _add_to_catalogue(calls: set[AwsCall]) -> None:
    # pytest-xdist workers may add at once: one at a time, under an exclusive lock.
    CATALOGUE_PATH.touch()
    with CATALOGUE_PATH.open("r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        merged = load_catalogue() | calls
        handle.seek(0)
        handle.truncate()
        handle.write(render_catalogue(merged))


def _on_api_params(params: dict[str, Any], model: Any, **_: Any) -> None:
    invocation = _current.get()
    if invocation is None:
        return
    service = model.service_model.signing_name
    calls = {
        AwsCall(invocation.function, f"{service}:{operation}", invocation.label(target))
        for operation, target in _targets(service, model.name, params)
    }
    with _observed_lock:
        _observed.update(calls)


def _targets(service: str, operation: str, params: dict[str, Any]) -> Iterator[tuple[str, _Target]]:
    """(operation, resource) pairs of one call: a transaction is one pair per item."""
    if service == "dynamodb":
        yield from _dynamodb_targets(operation, params)
    elif service == "sqs" and ("QueueUrl" in params or "QueueName" in params):
        yield operation, _Target("queue", _queue_name(params.get("QueueUrl") or params["QueueName"]))
    elif service == "s3" and "Bucket" in params:
        yield operation, _Target("bucket", params["Bucket"], _object_prefix(params.get("Key")))
    elif service == "secretsmanager" and "SecretId" in params:
        yield operation, _Target("secret", params["SecretId"])
    else:
        yield operation, _Target("any")


def _object_prefix(key: str | None) -> str:
    """`/inputs/*` for the key `inputs/job_1/x.json`: the roles are granted by key prefix (a
    batch's requests, under `inputs/batches/`, and parked results, under `results/parked/`, by
    their own)."""
    if key is None:
        return ""
    for prefix in (BATCH_REQUESTS_PREFIX, UPLOADS_PREFIX, RESULTS_FILE_PREFIX, PARKED_PREFIX):
        if key.startswith(prefix):
            return f"/{prefix}*"
    folder, slash, _ = key.partition("/")
    return f"/{folder}/*" if slash else "/*"


def _dynamodb_targets(operation: str, params: dict[str, Any]) -> Iterator[tuple[str, _Target]]:
    if operation in ("TransactWriteItems", "TransactGetItems"):
        for item in params.get("TransactItems", []):
            ((kind, body),) = item.items()
            yield f"{operation}/{kind}", _Target("table", body["TableName"])
    elif operation in ("BatchGetItem", "BatchWriteItem"):
        for table in params.get("RequestItems", {}):
            yield operation, _Target("table", table)
    elif "TableName" in params:
        index = params.get("IndexName")
        yield operation, _Target("table", params["TableName"], f"/index/{index}" if index else "")
    else:
        yield operation, _Target("any")


def _variables(module: ModuleType) -> list[tuple[str, str]]:
    """The handler's environment model, as (variable, value) pairs; maps give one pair per value."""
    environment = module.ENV
    pairs: list[tuple[str, str]] = []
    for name, info in type(environment).model_fields.items():
        value = getattr(environment, name)
        variable = info.alias or name
        if isinstance(value, str) and value:
            pairs.append((variable, value))
        elif isinstance(value, dict):
            pairs.extend((variable, item) for item in value.values() if isinstance(item, str))
    return pairs


def _event_queues(event: Any) -> set[str]:
    records = event.get("Records", []) if isinstance(event, dict) else []
    return {
        _queue_name(record["eventSourceARN"])
        for record in records
        if isinstance(record, dict) and str(record.get("eventSourceARN", "")).startswith("arn:aws:sqs:")
    }


def _queue_name(url_or_arn: str) -> str:
    """The queue name from a queue URL, an ARN or a bare name."""
    return url_or_arn.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
