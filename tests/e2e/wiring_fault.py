"""`llmq sandbox up` with a CDK wiring fault, run as a script by test_wiring.py:

    python wiring_fault.py missing-variable STATE_FILE   # the worker loses LLMQ_JOBS_TABLE
    python wiring_fault.py missing-grant STATE_FILE      # the worker loses dynamodb:UpdateItem

Each fault is made after the stack code chose what to give the worker, as a construct that
forgot it would: the synth and the deploy succeed. Only the function can notice: a missing
variable at its cold start, a missing grant at the first call that needs it (moto checks the
worker's calls against its own role). The sandbox runs in the foreground, as `make dev` runs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from llmq_sandbox.launcher import prepare_process
from stacks.synthesis import SYNTH_CACHE_ENV

prepare_process()  # node 22 from the venv for jsii, before the CDK is imported
# The app below is changed in memory, which the cache's key cannot see: always synthesize it.
os.environ.pop(SYNTH_CACHE_ENV, None)

import stacks.worker  # noqa: E402
from llmq_cli.main import main  # noqa: E402

MISSING_VARIABLE = "LLMQ_JOBS_TABLE"
MISSING_GRANT = "dynamodb:UpdateItem"  # the claim, the completion and the failure of a job


def drop_the_workers_variable() -> None:
    build_function = stacks.worker.build_function

    def build_function_without_jobs_table(
        *args: Any, name: str, environment: dict[str, str], **kwargs: Any
    ) -> Any:
        if name == "worker":
            environment = {key: value for key, value in environment.items() if key != MISSING_VARIABLE}
        return build_function(*args, name=name, environment=environment, **kwargs)

    stacks.worker.build_function = build_function_without_jobs_table  # type: ignore[assignment]


def drop_the_workers_grant() -> None:
    actions = stacks.worker.WORKER_TABLE_ACTIONS
    assert MISSING_GRANT in actions, f"the worker is no longer granted {MISSING_GRANT}: pick another"
    stacks.worker.WORKER_TABLE_ACTIONS = tuple(a for a in actions if a != MISSING_GRANT)  # type: ignore[assignment]


FAULTS: dict[str, Callable[[], None]] = {
    "missing-variable": drop_the_workers_variable,
    "missing-grant": drop_the_workers_grant,
}

if __name__ == "__main__":
    fault, state = sys.argv[1:3]
    FAULTS[fault]()
    # --serve: no banner, "sandbox ready" once it is up (test_wiring waits for the state file).
    sys.exit(main(["--state-file", state, "sandbox", "up", "--serve"]))
