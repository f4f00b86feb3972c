"""Synthesize the llmq app once per test module and keep what it produced."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmq.config import (
    ApiEnvironment,
    AuthorizerEnvironment,
    DeadLetterEnvironment,
    DispatcherEnvironment,
    FunctionEnvironment,
    LlmqConfig,
    ReconcilerEnvironment,
    WorkerEnvironment,
)
from stacks.template import StackTemplate

# The environment model each function's handler loads at cold start.
ENV_MODELS: dict[str, type[FunctionEnvironment]] = {
    "api": ApiEnvironment,
    "authorizer": AuthorizerEnvironment,
    "worker": WorkerEnvironment,
    "dead_letter": DeadLetterEnvironment,
    "webhook_dispatcher": DispatcherEnvironment,
    "reconciler": ReconcilerEnvironment,
}


@dataclass(frozen=True)
class SynthesizedApp:
    config: LlmqConfig
    template: StackTemplate
    assembly_dir: Path
    template_path: Path

    def validation_report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads((self.assembly_dir / "validation-report.json").read_text())
        return report


def synthesize(
    config: LlmqConfig, context: Mapping[str, Any] | None = None, outdir: Path | None = None
) -> SynthesizedApp:
    """Synthesize the app as `cdk synth` would; raises if cdk-nag reports an unacknowledged error."""
    from stacks.synthesis import synthesize as synthesize_stack

    synthesized = synthesize_stack(config, context, outdir)
    return SynthesizedApp(
        config=config,
        template=StackTemplate(synthesized.template()),
        assembly_dir=synthesized.directory,
        template_path=synthesized.template_path,
    )
