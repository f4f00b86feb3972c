"""`llmq sandbox up` with a CDK wiring fault: the worker's template loses LLMQ_JOBS_TABLE.

Run as a script by test_wiring.py. The variable is dropped after the stack code built it, as
a construct that forgot to pass it on would: the synth and the deploy succeed, and only the
function's cold start can notice.
"""

from __future__ import annotations

import sys
from typing import Any

from sandbox.launcher import prepare_process

prepare_process()  # node 22 from the venv for jsii, before the CDK is imported

import stacks.worker  # noqa: E402
from sandbox.cli import main  # noqa: E402

MISSING = "LLMQ_JOBS_TABLE"
_build_function = stacks.worker.build_function


def build_function_without_jobs_table(
    *args: Any, name: str, environment: dict[str, str], **kwargs: Any
) -> Any:
    if name == "worker":
        environment = {key: value for key, value in environment.items() if key != MISSING}
    return _build_function(*args, name=name, environment=environment, **kwargs)


stacks.worker.build_function = build_function_without_jobs_table  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(["--state-file", sys.argv[1], "sandbox", "up"]))
