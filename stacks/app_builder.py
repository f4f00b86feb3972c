"""Builds the llmq CDK app from an LlmqConfig: used by app.py, the infra tests and the sandbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from llmq.config import LlmqConfig
from stacks.api import ApiLogging
from stacks.context import (
    CONTEXT_ALARM_EMAIL,
    CONTEXT_ALLOW_PLACEHOLDER_DEPS_LAYER,
    CONTEXT_APIGW_CLOUDWATCH_ROLE,
    CONTEXT_APIGW_LOGGING,
    CONTEXT_BYTECODE,
    CONTEXT_CONFIG,
    CONTEXT_LOG_LEVEL,
    CONTEXT_SANDBOX,
    CONTEXT_STACK_NAME,
    alarm_emails,
    cdk_json_context,
    context_flag,
    refuse_sandbox_only,
)
from stacks.llmq_stack import DeploymentSettings, LlmqStack


def settings_from_context(app: cdk.App) -> DeploymentSettings:
    node = app.node
    email = node.try_get_context(CONTEXT_ALARM_EMAIL)
    bytecode = node.try_get_context(CONTEXT_BYTECODE)
    return DeploymentSettings(
        stack_name=str(node.try_get_context(CONTEXT_STACK_NAME) or DeploymentSettings.stack_name),
        alarm_emails=alarm_emails(email),
        sandbox=context_flag(node.try_get_context(CONTEXT_SANDBOX)),
        log_level=str(node.try_get_context(CONTEXT_LOG_LEVEL) or DeploymentSettings.log_level).upper(),
        allow_placeholder_deps_layer=context_flag(node.try_get_context(CONTEXT_ALLOW_PLACEHOLDER_DEPS_LAYER)),
        bytecode=True if bytecode is None else context_flag(bytecode),
        api_logging=ApiLogging(
            enabled=context_flag(node.try_get_context(CONTEXT_APIGW_LOGGING)),
            create_account_role=context_flag(node.try_get_context(CONTEXT_APIGW_CLOUDWATCH_ROLE)),
        ),
    )


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
    refuse_sandbox_only(config, settings.sandbox)
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
