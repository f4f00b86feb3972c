"""What every llmq Lambda function shares: runtime, architecture, layers, logs and base environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from llmq.config import CONFIG_ENV_VAR, FunctionSizing, LlmqConfig
from stacks.layers import ASSET_EXCLUDES, ROOT, lambda_runtime

FUNCTIONS_DIR: Path = ROOT / "functions"
# Every function's folder under functions/, and the tag that names it in the template
# (the sandbox and the infra tests find functions by this tag, not by logical id).
FUNCTION_NAMES = ("api", "authorizer", "worker", "dead_letter", "webhook_dispatcher", "reconciler")
FUNCTION_TAG = "llmq:function"
SERVICE_NAME = "llmq"
METRICS_NAMESPACE = "llmq"


@dataclass(frozen=True)
class FunctionDefaults:
    config: LlmqConfig
    layers: Sequence[lambda_.ILayerVersion]
    log_level: str
    log_retention: logs.RetentionDays


def base_environment(defaults: FunctionDefaults) -> dict[str, str]:
    return {
        CONFIG_ENV_VAR: defaults.config.to_env(),
        "POWERTOOLS_SERVICE_NAME": SERVICE_NAME,
        "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
        "LOG_LEVEL": defaults.log_level,
    }


def build_function(
    scope: Construct,
    construct_id: str,
    *,
    name: str,
    description: str,
    sizing: FunctionSizing,
    defaults: FunctionDefaults,
    environment: Mapping[str, str],
    reserved_concurrency: int | None = None,
) -> lambda_.Function:
    """One function whose code asset is only its own folder, functions/<name>/."""
    if name not in FUNCTION_NAMES:
        raise ValueError(f"unknown function {name!r}; expected one of {FUNCTION_NAMES}")
    log_group = logs.LogGroup(
        scope,
        f"{construct_id}Logs",
        retention=defaults.log_retention,
        removal_policy=cdk.RemovalPolicy.DESTROY,
    )
    function = lambda_.Function(
        scope,
        construct_id,
        description=description,
        runtime=lambda_runtime(),
        architecture=lambda_.Architecture.ARM_64,
        handler="handler.handler",
        code=lambda_.Code.from_asset(str(FUNCTIONS_DIR / name), exclude=ASSET_EXCLUDES),
        layers=list(defaults.layers),
        memory_size=sizing.memory_mb,
        timeout=cdk.Duration.seconds(sizing.timeout_seconds),
        environment={**base_environment(defaults), **environment},
        reserved_concurrent_executions=reserved_concurrency,
        tracing=lambda_.Tracing.ACTIVE,
        log_group=log_group,
    )
    cdk.Tags.of(function).add(FUNCTION_TAG, name)
    return function
