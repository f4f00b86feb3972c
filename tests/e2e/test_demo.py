"""The newcomer's path: `make demo` runs the whole tour and exits 0."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_exits_0_with_every_job_terminal_and_every_webhook_verified() -> None:
    # When a newcomer runs `make demo`
    demo = subprocess.run(
        ["make", "--no-print-directory", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=480
    )
    # Then it exits 0 and says why
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    assert "Every job is terminal, every webhook verified" in demo.stdout
    assert "Summary per lane" in demo.stdout
    # And one job's output was read live, its deltas joined equal to its result
    assert "deltas read live; joined, they are its result: True" in demo.stdout
