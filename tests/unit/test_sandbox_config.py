"""The sandbox's LlmqConfig: its own provisioned front door, and overrides that exclude it."""

from __future__ import annotations

import pytest

from llmq_sandbox.config import SANDBOX_PROVISIONED_ENVIRONMENTS, sandbox_config


def test_the_sandbox_provisions_its_front_door_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMQ_SANDBOX_CONFIG", raising=False)
    assert sandbox_config().api.provisioned_environments == SANDBOX_PROVISIONED_ENVIRONMENTS > 0


@pytest.mark.parametrize(
    ("overrides", "provisioned"),
    [
        # SnapStart, which Lambda does not combine with provisioned concurrency
        ({"api": {"snap_start": True}}, 0),
        # no reservation to hold them
        ({"concurrency": {"reserve": False}}, 0),
        # a reservation below the sandbox's own number
        ({"concurrency": {"authorizer": 1}}, 1),
        ({"concurrency": {"api": 1, "authorizer": 5}}, 1),
        # asked for explicitly
        ({"api": {"provisioned_environments": 0}}, 0),
        ({"api": {"provisioned_environments": 3}}, 3),
    ],
)
def test_an_override_that_excludes_the_sandbox_s_provisioned_environments_starts_without_them(
    overrides: dict[str, object], provisioned: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMQ_SANDBOX_CONFIG", raising=False)
    config = sandbox_config(overrides=overrides)
    assert config.api.provisioned_environments == provisioned


def test_an_explicit_number_that_lambda_would_refuse_is_still_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLMQ_SANDBOX_CONFIG", raising=False)
    with pytest.raises(ValueError, match="exclude each other"):
        sandbox_config(overrides={"api": {"snap_start": True, "provisioned_environments": 2}})
