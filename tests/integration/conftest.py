from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmq.config import LlmqConfig
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from llmq_sandbox.doubles.receiver import WebhookReceiver
from tests.conftest import MotoStack
from tests.integration import aws_call_recorder
from tests.integration.harness import Harness
from tests.support.tables import default_app_template

aws_call_recorder.install()


@pytest.fixture(scope="session", autouse=True)
def _app_template() -> None:
    """Synthesize the app for the tables (tests.conftest.create_llmq_resources) before the first
    test, so that no test's own time or deadline pays for it."""
    default_app_template()


@pytest.fixture(autouse=True)
def _aws_calls_are_catalogued() -> Iterator[None]:
    """Every AWS call a handler makes here must be in tests/aws_calls.json, whose grants tests/infra checks."""
    aws_call_recorder.take_observed()
    yield
    problems = aws_call_recorder.check_catalogued(aws_call_recorder.take_observed())
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def provider() -> Iterator[FakeProviderServer]:
    server = FakeProviderServer().start()
    yield server
    server.stop()


def integration_config(server: FakeProviderServer, **overrides: object) -> LlmqConfig:
    base = {
        "provider": {
            "base_url": server.base_url,
            "default_model": "fake-model",
            "models": ["fake-model", "fake-large"],
            "timeout_seconds": 30,
            "stream": False,
        },
        # (a refusal before generating spends an attempt here, as any transient error does, so
        # a test's retries come back as it drives them: `RetryPolicy.max_refusals` has tests of
        # its own, test_worker and test_runner)
        "retry": {"base_seconds": 1, "max_seconds": 8, "max_refusals": 0},
        "cancel_check_seconds": 0.2,
        "webhooks": {"allow_loopback_http": True, "schedule_seconds": [1, 2, 4]},
        "limits": {"max_prompt_chars": 5000, "max_body_bytes": 65536, "wait_poll_seconds": 0.05},
    }
    base.update(overrides)
    return LlmqConfig.model_validate(base)


@pytest.fixture
def harness(moto_stack: MotoStack, provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(moto_stack, integration_config(provider), monkeypatch)
