#!/usr/bin/env python3
"""CDK entry point: `cdk synth` / `cdk deploy` (cdk.json), or `python app.py` with CDK_OUTDIR set.

Context comes from cdk.json; `cdk -c key=value` overrides it. Keys: `llmq` (the LlmqConfig
dict), `alarm_email`, `llmq:sandbox`, `llmq:log_level`, `llmq:stack_name`,
`llmq:apigw_logging`, `llmq:apigw_cloudwatch_role`, and for tests only
`llmq:allow_placeholder_deps_layer` (stacks/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# The domain package lives in the llmq layer; the CDK app imports its config model from there.
sys.path.insert(0, str(ROOT / "layers" / "llmq" / "python"))
sys.path.insert(0, str(ROOT))

from stacks.app_builder import build_app  # noqa: E402

if __name__ == "__main__":
    build_app().synth()
