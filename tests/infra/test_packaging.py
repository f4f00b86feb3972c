"""The operator CLI installs on its own: a fresh venv with only `pip install -e .[cli]`.

An operator of a deployed stack should not need moto, the CDK or node to list jobs, rotate a
secret or check a webhook. The venv gets the runtime dependencies and the `cli` extra, nothing
from the dev group, at the lock's versions, from uv's cache (filled by `make install`), so the
test needs no network. (`pip install -e .[cli]` from the registry gives the same set.)
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

ROOT = Path(__file__).resolve().parents[2]


def _uv() -> str:
    local = ROOT / ".tools" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    assert found, "uv is missing: `make install` creates .tools/bin/uv"
    return found


@pytest.fixture(scope="module")
def cli_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("cli") / "venv"
    uv = _uv()
    subprocess.run(
        [uv, "sync", "-q", "--frozen", "--offline", "--no-dev", "--extra", "cli", "--python", sys.executable],
        check=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)},
    )
    return venv


def _llmq(venv: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "llmq"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_the_cli_extra_installs_no_emulator(cli_venv: Path) -> None:
    for heavy in ("moto", "aws_cdk", "rich"):
        probe = subprocess.run(
            [str(cli_venv / "bin" / "python"), "-c", f"import {heavy}"], capture_output=True
        )
        assert probe.returncode != 0, f"{heavy} is installed by the cli extra alone"


def test_help_and_cost_work_with_only_the_cli_extra(cli_venv: Path) -> None:
    helped = _llmq(cli_venv, "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("submit", "get", "jobs", "tenants", "dlq", "webhooks", "cost"):
        assert command in helped.stdout
    cost = _llmq(cli_venv, "cost")
    assert cost.returncode == 0, cost.stderr
    assert "Lambda worker duration" in cost.stdout


def test_webhooks_verify_works_with_only_the_cli_extra(cli_venv: Path, tmp_path: Path) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}, separators=(",", ":"))
    signed_at = datetime.now(UTC)
    signature = Webhook(secret).sign("msg_1", signed_at, body)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(signed_at.timestamp())),
        "webhook-signature": signature,
    }
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"headers": headers, "body": body}))
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps({"headers": headers, "body": body.replace("job_1", "job_2")}))

    verified = _llmq(cli_venv, "webhooks", "verify", "--secret", secret, "--file", str(good))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("verified")
    refused = _llmq(cli_venv, "webhooks", "verify", "--secret", secret, "--file", str(tampered))
    assert refused.returncode == 1
    assert "NOT verified" in refused.stdout


def test_sandbox_commands_name_the_missing_extra(cli_venv: Path, tmp_path: Path) -> None:
    up = _llmq(cli_venv, "--state-file", str(tmp_path / "state.json"), "sandbox", "up", cwd=tmp_path)
    assert up.returncode == 1
    assert "sandbox` extra" in up.stderr and "moto" in up.stderr
    assert not (tmp_path / "state.json").exists()
