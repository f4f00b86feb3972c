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
    stack_name: str

    @property
    def service(self) -> str:
        """The `service` dimension of the stack's metrics (`llmq.telemetry.stack_service_name`)."""
        from llmq.telemetry import stack_service_name

        return stack_service_name(self.stack_name)

    def validation_report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads((self.assembly_dir / "validation-report.json").read_text())
        return report


# Tests synthesize without building layers/deps: they read the template, never run the layer.
# Never a deploy's context: its functions would all fail with ImportModuleError.
# (and no bytecode: a machine with the runtime's Python would otherwise ship it, and the
# assets the tests check would differ from machine to machine; tests/infra/test_bytecode.py
# checks the bytecode itself)
TEST_CONTEXT = {"llmq:allow_placeholder_deps_layer": True, "llmq:bytecode": False}


def synthesize(
    config: LlmqConfig, context: Mapping[str, Any] | None = None, outdir: Path | None = None
) -> SynthesizedApp:
    """Synthesize the app as `cdk synth` would; raises if cdk-nag reports an unacknowledged error.

    The placeholder dependencies layer is allowed unless `context` says otherwise."""
    from stacks.synthesis import synthesize as synthesize_stack

    synthesized = synthesize_stack(config, {**TEST_CONTEXT, **(context or {})}, outdir)
    return SynthesizedApp(
        config=config,
        template=StackTemplate(synthesized.template()),
        assembly_dir=synthesized.directory,
        template_path=synthesized.template_path,
        stack_name=synthesized.stack_name,
    )


def function_concurrency_bounds(template: StackTemplate) -> dict[str, int | None]:
    """Each function's most concurrent executions: its reservation, else the sum of its event
    source mappings' MaximumConcurrency when mappings are its only invokers, else None."""
    from stacks.functions import FUNCTION_NAMES  # imports the CDK: only when a test asks

    permissions = template.of_type("AWS::Lambda::Permission").values()
    invoked_otherwise = {json.dumps(p["Properties"]["FunctionName"]) for p in permissions}
    mappings = list(template.of_type("AWS::Lambda::EventSourceMapping").values())
    bounds: dict[str, int | None] = {}
    for name in FUNCTION_NAMES:
        function_id, function = template.function(name)
        reserved = function["Properties"].get("ReservedConcurrentExecutions")
        own = [m["Properties"] for m in mappings if m["Properties"]["FunctionName"] == {"Ref": function_id}]
        by_mappings = (
            sum(m["ScalingConfig"]["MaximumConcurrency"] for m in own)
            if own
            and all("MaximumConcurrency" in m.get("ScalingConfig", {}) for m in own)
            and not any(function_id in ref for ref in invoked_otherwise)
            else None
        )
        bounds[name] = reserved if reserved is not None else by_mappings
    return bounds
