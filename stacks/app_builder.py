"""Builds the llmq CDK app from an LlmqConfig: used by app.py, the infra tests and the sandbox."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from llmq.config import LlmqConfig
from stacks.llmq_stack import DeploymentSettings, LlmqStack

CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"
# CDK context keys (cdk.json or `cdk -c key=value`).
CONTEXT_CONFIG = "llmq"
CONTEXT_ALARM_EMAIL = "alarm_email"
CONTEXT_SANDBOX = "llmq:sandbox"
CONTEXT_LOG_LEVEL = "llmq:log_level"
CONTEXT_STACK_NAME = "llmq:stack_name"
CONTEXT_REQUIRE_DEPS_LAYER = "llmq:require_deps_layer"


def _as_bool(value: Any) -> bool:
    # `cdk -c llmq:sandbox=true` passes the string "true".
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def settings_from_context(app: cdk.App) -> DeploymentSettings:
    node = app.node
    email = node.try_get_context(CONTEXT_ALARM_EMAIL)
    return DeploymentSettings(
        stack_name=str(node.try_get_context(CONTEXT_STACK_NAME) or DeploymentSettings.stack_name),
        alarm_email=str(email) if email else None,
        sandbox=_as_bool(node.try_get_context(CONTEXT_SANDBOX)),
        log_level=str(node.try_get_context(CONTEXT_LOG_LEVEL) or DeploymentSettings.log_level).upper(),
        require_deps_layer=_as_bool(node.try_get_context(CONTEXT_REQUIRE_DEPS_LAYER)),
    )


def cdk_json_context() -> dict[str, Any]:
    """cdk.json's context: the feature flags and defaults every synth starts from.

    Read here rather than left to the CDK CLI so that `python app.py`, the tests and the
    sandbox synthesize exactly what `cdk synth` does. Under the CLI the same values arrive
    again through CDK_CONTEXT_JSON, together with any `-c` overrides, and win.
    """
    context: dict[str, Any] = json.loads(CDK_JSON.read_text()).get("context", {})
    return context


def build_app(
    config: LlmqConfig | None = None,
    outdir: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> cdk.App:
    """The llmq app with cdk-nag AwsSolutions attached.

    `context` overrides cdk.json's context; `config` wins over the `llmq` context key.
    """
    app = cdk.App(outdir=outdir, context={**cdk_json_context(), **(context or {})})
    if config is None:
        config = LlmqConfig.from_context(app.node.try_get_context(CONTEXT_CONFIG))
    settings = settings_from_context(app)
    LlmqStack(
        app,
        settings.stack_name,
        config=config,
        settings=settings,
        # The bootstrap-version rule makes moto refuse stack updates; real deploys keep it.
        synthesizer=cdk.DefaultStackSynthesizer(generate_bootstrap_version_rule=not settings.sandbox),
    )
    cdk.Tags.of(app).add("project", "llmq")
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app


def llmq_stack(app: cdk.App) -> LlmqStack:
    stacks = [child for child in app.node.children if isinstance(child, LlmqStack)]
    if len(stacks) != 1:
        raise LookupError(f"expected one LlmqStack in the app, found {len(stacks)}")
    return stacks[0]


def synth_template(
    config: LlmqConfig | None = None,
    context: Mapping[str, Any] | None = None,
    outdir: str | None = None,
) -> dict[str, Any]:
    """Synthesize and return the stack's CloudFormation template as a dict.

    Raises when cdk-nag reports an unacknowledged error. The cloud assembly (template and
    asset directories) stays in `outdir`, a fresh temporary directory unless given.
    """
    outdir = outdir or tempfile.mkdtemp(prefix="llmq-cdk-")
    app = build_app(config, outdir=outdir, context=context)
    stack = llmq_stack(app)
    assembly = app.synth()
    artifact = assembly.get_stack_artifact(stack.artifact_id)
    template: dict[str, Any] = json.loads(Path(assembly.directory, artifact.template_file).read_text())
    return template
