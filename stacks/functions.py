"""What every llmq Lambda function shares: runtime, architecture, layers, logs and base environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from llmq.config import CONFIG_ENV_VAR, FunctionEnvironment, FunctionSizing, LlmqConfig
from llmq.telemetry import METRICS_NAMESPACE
from stacks.bytecode import TASK_ROOT
from stacks.layers import ROOT, code_asset, lambda_architecture, lambda_runtime
from stacks.runtime import LIBRARY_ENVIRONMENT
from stacks.template import FUNCTION_TAG

FUNCTIONS_DIR: Path = ROOT / "functions"
# Every function's folder under functions/; FUNCTION_TAG names it in the template (the
# sandbox and the infra tests find functions by this tag, not by logical id).
FUNCTION_NAMES = ("api", "authorizer", "worker", "dead_letter", "webhook_dispatcher", "reconciler")


@dataclass(frozen=True)
class FunctionDefaults:
    config: LlmqConfig
    # The `service` of the functions' logs and metrics (`llmq.telemetry.stack_service_name`).
    service: str
    layers: Sequence[lambda_.ILayerVersion]
    log_level: str
    log_retention: logs.RetentionDays
    # A Python of the runtime's version: each function's folder ships with its bytecode.
    bytecode_python: str | None = None


def base_environment(defaults: FunctionDefaults) -> dict[str, str]:
    return {
        CONFIG_ENV_VAR: defaults.config.to_env(),
        "POWERTOOLS_SERVICE_NAME": defaults.service,
        "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
        "LOG_LEVEL": defaults.log_level,
        **LIBRARY_ENVIRONMENT,
    }


def env_var(model: type[FunctionEnvironment], field: str) -> str:
    """The variable name of `field` in a function's environment model."""
    alias = model.model_fields[field].alias
    if alias is None:
        raise KeyError(f"{model.__name__}.{field} has no variable name")
    return alias


def function_environment(model: type[FunctionEnvironment], **values: str) -> dict[str, str]:
    """A function's variables, named by the model its handler validates at cold start.

    A required field left out fails the synth, not the first invocation.
    """
    environment: dict[str, str] = {}
    for field, info in model.model_fields.items():
        if field == "config":
            continue  # base_environment adds LLMQ_CONFIG to every function
        if field in values:
            environment[env_var(model, field)] = values.pop(field)
        elif info.is_required():
            raise ValueError(f"{model.__name__} requires {field} ({env_var(model, field)})")
    if values:
        raise ValueError(f"{model.__name__} has no fields {sorted(values)}")
    return environment


def build_function(
    scope: Construct,
    construct_id: str,
    *,
    name: str,
    description: str,
    sizing: FunctionSizing,
    defaults: FunctionDefaults,
    environment: Mapping[str, str],
    snap_start: bool = False,
) -> lambda_.Function:
    """One function whose code asset is only its own folder, functions/<name>/.

    Its reserved concurrency is its line of the budget, `LlmqConfig.reserved_concurrency`
    (none when `concurrency.reserve` is off).
    """
    if name not in FUNCTION_NAMES:
        raise ValueError(f"unknown function {name!r}; expected one of {FUNCTION_NAMES}")
    log_group = logs.LogGroup(
        scope,
        f"{construct_id}Logs",
        # Named, so that an operator (docs/operations.md) finds a function's log without looking
        # up a generated name: unique in the region, as the stack's name is.
        log_group_name=function_log_group_name(cdk.Stack.of(scope).stack_name, name),
        retention=defaults.log_retention,
        removal_policy=cdk.RemovalPolicy.DESTROY,
    )
    # Deleted with the stack, but kept when an update replaces it (a change of its name, as
    # from the generated names before): its logs then age out by their retention, not at once.
    cfn_log_group = log_group.node.default_child
    assert isinstance(cfn_log_group, cdk.CfnResource)
    cfn_log_group.cfn_options.update_replace_policy = cdk.CfnDeletionPolicy.RETAIN
    function = lambda_.Function(
        scope,
        construct_id,
        description=description,
        runtime=lambda_runtime(),
        architecture=lambda_architecture(),
        handler="handler.handler",
        code=code_asset(FUNCTIONS_DIR / name, defaults.bytecode_python, TASK_ROOT),
        layers=list(defaults.layers),
        memory_size=sizing.memory_mb,
        timeout=cdk.Duration.seconds(sizing.timeout_seconds),
        environment={**base_environment(defaults), **environment},
        reserved_concurrent_executions=defaults.config.reserved_concurrency.get(name),
        tracing=lambda_.Tracing.ACTIVE,
        snap_start=lambda_.SnapStartConf.ON_PUBLISHED_VERSIONS if snap_start else None,
        log_group=log_group,
        role=_execution_role(scope, construct_id, log_group),
    )
    cdk.Tags.of(function).add(FUNCTION_TAG, name)
    return function


def function_log_group_name(stack_name: str, function: str) -> str:
    """Where `function` (its folder's name under functions/) of the stack logs."""
    return f"/llmq/{stack_name}/{function}"


def _execution_role(scope: Construct, construct_id: str, log_group: logs.ILogGroup) -> iam.Role:
    """A role that writes logs to the function's own log group only. Not the managed
    AWSLambdaBasicExecutionRole, which allows CreateLogGroup and PutLogEvents on every log
    group of the account. The group exists before the function, so no CreateLogGroup; its
    ARN (`...:log-group:<name>:*`) covers its streams."""
    role = iam.Role(
        scope, f"{construct_id}ServiceRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com")
    )
    role.add_to_policy(
        iam.PolicyStatement(
            actions=["logs:CreateLogStream", "logs:PutLogEvents"], resources=[log_group.log_group_arn]
        )
    )
    return role
