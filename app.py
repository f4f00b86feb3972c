#!/usr/bin/env python3
"""CDK entry point: `cdk synth` / `cdk deploy` (cdk.json), or `python app.py` with CDK_OUTDIR.

Context comes from cdk.json; `cdk -c key=value` overrides it. Keys: `llmq` (the LlmqConfig
dict), `alarm_email`, `llmq:sandbox`, `llmq:log_level`, `llmq:stack_name`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
# The domain package lives in the llmq layer; the CDK app imports its config model from there.
sys.path.insert(0, str(ROOT / "layers" / "llmq" / "python"))
sys.path.insert(0, str(ROOT))

from stacks.app_builder import build_app  # noqa: E402


def cdk_json_context() -> dict[str, Any]:
    """cdk.json's context, so that `python app.py` synthesizes what `cdk synth` would.

    Under the CDK CLI the same values arrive again through CDK_CONTEXT_JSON, which wins.
    """
    cdk_json = ROOT / "cdk.json"
    context: dict[str, Any] = json.loads(cdk_json.read_text()).get("context", {})
    return context


if __name__ == "__main__":
    build_app(context=cdk_json_context()).synth()
