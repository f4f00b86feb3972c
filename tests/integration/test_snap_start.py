"""The api function under Lambda SnapStart (LlmqConfig.api.snap_start): its hooks, run as the
Lambda runtime runs them, through the `snapshot_restore_py` registry the runtime ships."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import botocore.handlers
import pytest
import snapshot_restore_py

from llmq import aws
from llmq.models import JobStatus
from tests.integration.harness import ENTERPRISE, Harness

SERVICES = ("dynamodb", "sqs", "s3")


def _registered(
    registry: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]], module: Any
) -> list[Any]:
    """The hooks the handler module registered at import (the registry outlives each re-import)."""
    return [entry for entry in registry if getattr(entry[0], "__module__", None) == module.__name__][-1:]


def _run(entries: list[Any]) -> None:
    for func, args, kwargs in entries:
        func(*args, **kwargs)


@pytest.fixture
def aws_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every AWS call any client makes from now on, those created later included (a hook
    among botocore's built-in handlers, which each new client carries)."""
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    monkeypatch.setattr(
        botocore.handlers, "BUILTIN_HANDLERS", [*botocore.handlers.BUILTIN_HANDLERS, ("before-call", record)]
    )
    aws.reset_clients()
    return calls


def test_the_snapshot_is_taken_warm_without_a_call_to_aws_and_a_restored_environment_serves_at_once(
    harness: Harness, aws_calls: list[str]
) -> None:
    module = harness.api_module
    [before] = _registered(snapshot_restore_py.get_before_snapshot(), module)
    [after] = _registered(snapshot_restore_py.get_after_restore(), module)
    # The runtime imports the handler, then runs the before-snapshot hook
    _run([before])
    # It built what a first request would (every client the api uses, the request models) and
    # asked AWS nothing
    assert aws_calls == []
    assert {service for service, _, _ in aws._clients} >= set(SERVICES)
    assert module.SubmitRequest.__pydantic_complete__
    warmed = module.intake()
    # Restored: the composition roots are built anew (around fresh random generators)
    _run([after])
    assert module.intake() is not warmed
    # And the first request is answered, and its job queued
    reply = harness.submit(prompt="after a restore")
    assert reply.status == 202, reply.body
    assert reply.body["status"] == JobStatus.QUEUED
    assert "PutItem" in aws_calls or "TransactWriteItems" in aws_calls
    assert "SendMessage" in aws_calls
    got = harness.api("GET", f"/v1/jobs/{reply.body['id']}", tenant=ENTERPRISE)
    assert got.status == 200


def test_environments_restored_from_one_snapshot_draw_different_random_numbers(harness: Harness) -> None:
    module = harness.api_module
    [after] = _registered(snapshot_restore_py.get_after_restore(), module)
    snapshot = random.getstate()
    draws = []
    for _ in range(2):
        random.setstate(snapshot)  # each environment resumes with the snapshot's memory
        _run([after])
        draws.append([random.random() for _ in range(4)])
    assert draws[0] != draws[1]


# ---- provisioned concurrency (LlmqConfig.api.provisioned_environments) --------------------


@pytest.mark.parametrize("initialization", ["provisioned-concurrency", "on-demand"])
def test_a_provisioned_environment_warms_up_in_its_init_and_one_started_on_demand_does_not(
    harness: Harness, aws_calls: list[str], monkeypatch: pytest.MonkeyPatch, initialization: str
) -> None:
    from tests.integration.harness import load_handler

    monkeypatch.setenv("AWS_LAMBDA_INITIALIZATION_TYPE", initialization)
    aws.reset_clients()
    # Lambda initialises the environment: the handler's import, as the runtime runs it
    api = load_handler("api")
    authorizer = load_handler("authorizer")
    provisioned = initialization == "provisioned-concurrency"
    # A provisioned one built what its first request would (the api's clients and models, the
    # authorizer's repository and its client), and asked AWS nothing; one on demand built none
    assert aws_calls == []
    assert ({service for service, _, _ in aws._clients} >= set(SERVICES)) is provisioned
    assert (api.intake.cache_info().currsize == 1) is provisioned
    assert (authorizer.tenants.cache_info().currsize == 1) is provisioned
    # Either way the first request is answered, and its job queued
    harness.api_module = api
    reply = harness.submit(prompt="first request")
    assert reply.status == 202, reply.body
    assert "SendMessage" in aws_calls
