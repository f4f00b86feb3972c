"""A wiring mistake in the CDK app breaks the sandbox at start, naming the function."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_a_variable_missing_from_the_template_fails_the_sandbox_at_start_naming_the_function(
    tmp_path: Path,
) -> None:
    # Given a CDK app whose worker function lost LLMQ_JOBS_TABLE from its environment
    state = tmp_path / ".llmq" / "sandbox.json"
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # When the sandbox starts (in the foreground, as `make dev` runs it)
    started = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "e2e" / "wiring_fault.py"), str(state)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # Then it fails loudly, saying which function and which variable
    assert started.returncode == 1, started.stdout + started.stderr
    message = next(line for line in started.stderr.splitlines() if line.startswith("llmq:"))
    assert "function worker (" in message
    assert "failed its cold start" in message
    assert "LLMQ_JOBS_TABLE" in message
    # And the other functions are not blamed, and no state file claims a running sandbox
    assert "function api (" not in message
    assert not state.exists()
