"""Which provider the sandbox's workers call, and with which key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmq_sandbox.config import ProviderChoice
from llmq_sandbox.launcher import Sandbox


def _stored_key(tmp_path: Path, choice: ProviderChoice) -> list[str]:
    """What the sandbox puts in its stack's provider secret."""
    sandbox = Sandbox(tmp_path, provider=choice)
    sandbox.outputs = {"ProviderSecretArn": "arn:aws:secretsmanager:us-east-1:1:secret:p"}
    stored: list[str] = []

    class Secrets:
        def put_secret_value(self, **kwargs: Any) -> None:
            stored.append(kwargs["SecretString"])

    sandbox.client = lambda service: Secrets()  # type: ignore[method-assign]
    sandbox._put_provider_key()
    return stored


def test_the_fake_provider_sandbox_never_takes_the_real_provider_key(tmp_path: Path) -> None:
    # Given the shell of an operator who followed the README's deploy steps: the real key
    # exported, no provider URL
    choice = ProviderChoice.from_environment({"LLMQ_PROVIDER_API_KEY": "sk-proj-REALKEY"})
    # Then the sandbox runs its fake provider, and the key goes neither to its secret nor to
    # the fake (which every worker call would send it to)
    assert choice.is_fake and choice.api_key is None
    assert _stored_key(tmp_path, choice) == []


def test_a_real_provider_sandbox_takes_its_key(tmp_path: Path) -> None:
    choice = ProviderChoice.from_environment(
        {"LLMQ_PROVIDER_BASE_URL": "http://127.0.0.1:8000/v1", "LLMQ_PROVIDER_API_KEY": "sk-local"}
    )
    assert not choice.is_fake
    assert _stored_key(tmp_path, choice) == ["sk-local"]
