"""Does a function's role, in the synthesized template, grant every AWS call the function makes?

The calls come from the catalogue the integration suite keeps complete (tests/aws_calls.py).
Each call's resource is followed into the template: `env:VAR` through the function's own
environment variable to the resources it references, `event_source` through the function's
event source mappings. The role's statements are read with their intrinsics resolved to
logical ids, so the comparison is "this statement's Resource names the ARN of that table,
index, queue, bucket or secret": `{"Fn::GetAtt": ["Jobs", "Arn"]}` reads `<Jobs>`, and
`{"Fn::Join": ["", [{"Fn::GetAtt": ["Jobs", "Arn"]}, "/index/*"]]}` reads `<Jobs>/index/*`,
which covers the required `<Jobs>/index/by_sweep`.

An Allow grants when an action pattern and a resource pattern match (IAM wildcards, actions
case-insensitive); a matching Deny takes it away. Conditions are not evaluated: a conditioned
Allow counts as a grant. Every SQS event source mapping also needs receive, delete and
queue-attribute reads on its queue, through the same role, whatever the handler calls itself.

The other way round (`excess_grants`): every action a role allows, on every resource, must be
one of those requirements or one the Lambda service itself needs for the function (writing to
its own log group, active tracing, sending to its on-failure destination), so a grant no code
uses fails the check too. A role may hold no managed policy, no NotAction and no NotResource.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from stacks.template import PSEUDO_PARAMETERS, StackTemplate, Statement, action_matches, as_list
from tests.aws_calls import (
    ANY_RESOURCE,
    ENV_PREFIX,
    EVENT_SOURCE,
    EVENT_SOURCE_MAPPING_ACTIONS,
    AwsCall,
    iam_actions,
)

# Resource types whose Ref is their ARN; the Ref of any other (a table's name, a queue's URL)
# is no ARN, so a statement naming it grants nothing.
_REF_IS_ARN = {
    "AWS::SecretsManager::Secret",
    "AWS::SNS::Topic",
    "AWS::IAM::ManagedPolicy",
    "AWS::StepFunctions::StateMachine",
}
_SUB_VARIABLE = re.compile(r"\$\{([^}!]+)\}")


@dataclass(frozen=True)
class Requirement:
    action: str
    resource: str  # canonical: "<LogicalId>", "<LogicalId>/index/name", "<LogicalId>/*" or "*"
    because: str

    def __str__(self) -> str:
        return f"{self.action} on {self.resource} (for {self.because})"


class UnresolvableResource(Exception):
    """A catalogued resource that the template does not let us follow to a logical id."""


def canonical(template: StackTemplate, value: Any) -> str:
    """An ARN-valued CloudFormation expression, with every resource replaced by `<LogicalId>`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((function, argument),) = value.items()
        if function == "Ref":
            return _ref(template, argument)
        if function == "Fn::GetAtt":
            logical_id, attribute = argument.split(".", 1) if isinstance(argument, str) else argument
            return f"<{logical_id}>" if attribute == "Arn" else f"<{logical_id}.{attribute}>"
        if function == "Fn::Join":
            separator, parts = argument
            return str(separator).join(canonical(template, part) for part in parts)
        if function == "Fn::Sub":
            text, variables = (argument, {}) if isinstance(argument, str) else argument
            return _SUB_VARIABLE.sub(lambda m: _sub(template, m.group(1), variables), text)
    raise ValueError(f"cannot read {value!r} as an ARN")


def _ref(template: StackTemplate, name: str) -> str:
    if name in PSEUDO_PARAMETERS:
        return PSEUDO_PARAMETERS[name]
    resource = template.resources.get(name)
    if resource is not None and resource["Type"] in _REF_IS_ARN:
        return f"<{name}>"
    return f"<{name}.Ref>"


def _sub(template: StackTemplate, name: str, variables: dict[str, Any]) -> str:
    if name in variables:
        return canonical(template, variables[name])
    if name.endswith(".Arn"):
        return f"<{name.removesuffix('.Arn')}>"
    return _ref(template, name)


def referenced_ids(template: StackTemplate, value: Any) -> list[str]:
    """The template resources a value refers to (Ref or GetAtt), in order; pseudo parameters aside."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "Ref" and item in template.resources:
                found.append(item)
            elif key == "Fn::GetAtt":
                found.append(item.split(".", 1)[0] if isinstance(item, str) else item[0])
            else:
                found += referenced_ids(template, item)
    elif isinstance(value, list):
        for item in value:
            found += referenced_ids(template, item)
    return list(dict.fromkeys(found))


def requirements(template: StackTemplate, function: str, calls: Iterable[AwsCall]) -> Iterator[Requirement]:
    """What the function's role must allow: its catalogued calls, and its queue event sources."""
    for call in sorted(c for c in calls if c.function == function):
        for resource in _resolve(template, function, call.resource):
            for action in iam_actions(call.operation):
                yield Requirement(action, resource, str(call))
    for mapping in template.event_source_mappings(function):
        queue = canonical(template, mapping["EventSourceArn"])
        if ":sqs:" in queue or _is_queue(template, queue):
            for action in EVENT_SOURCE_MAPPING_ACTIONS:
                yield Requirement(action, queue, f"{function}: the event source mapping on {queue}")


def _is_queue(template: StackTemplate, canonical_arn: str) -> bool:
    logical_id = canonical_arn.strip("<>")
    return template.resources.get(logical_id, {}).get("Type") == "AWS::SQS::Queue"


def _resolve(template: StackTemplate, function: str, resource: str) -> list[str]:
    if resource == ANY_RESOURCE:
        return [ANY_RESOURCE]
    if resource == EVENT_SOURCE:
        sources = [canonical(template, m["EventSourceArn"]) for m in template.event_source_mappings(function)]
        if not sources:
            raise UnresolvableResource(f"{function} calls its event source, but has no event source mapping")
        return sources
    if not resource.startswith(ENV_PREFIX):
        raise UnresolvableResource(f"{function}: no rule to follow {resource!r} into the template")
    variable, slash, suffix = resource.removeprefix(ENV_PREFIX).partition("/")
    _, function_resource = template.function(function)
    variables = function_resource["Properties"].get("Environment", {}).get("Variables", {})
    if variable not in variables:
        raise UnresolvableResource(f"the template gives {function} no {variable}, which its calls use")
    ids = referenced_ids(template, variables[variable])
    if not ids:
        raise UnresolvableResource(
            f"{function}'s {variable} names no resource of this stack: its grant cannot be checked"
        )
    return [f"<{logical_id}>{slash}{suffix}" for logical_id in ids]


def is_granted(template: StackTemplate, statements: list[Statement], requirement: Requirement) -> bool:
    def matches(statement: Statement) -> bool:
        return _action_in(statement.raw, requirement.action) and _resource_in(
            template, statement.raw, requirement.resource
        )

    allowed = any(s.effect == "Allow" and matches(s) for s in statements)
    denied = any(s.effect == "Deny" and matches(s) for s in statements)
    return allowed and not denied


def _action_in(raw: dict[str, Any], action: str) -> bool:
    if "NotAction" in raw:
        return not any(action_matches(pattern, action) for pattern in as_list(raw["NotAction"]))
    return any(action_matches(pattern, action) for pattern in as_list(raw.get("Action", [])))


def _resource_in(template: StackTemplate, raw: dict[str, Any], resource: str) -> bool:
    def covered(patterns: Any) -> bool:
        return any(fnmatch.fnmatchcase(resource, canonical(template, p)) for p in as_list(patterns))

    if "NotResource" in raw:
        return not covered(raw["NotResource"])
    return covered(raw.get("Resource", []))


def missing_grants(template: StackTemplate, function: str, calls: Iterable[AwsCall]) -> list[str]:
    """Each requirement the function's role does not grant, or a resource that cannot be
    followed: its calls', and the Lambda service's (without `xray:PutTraceSegments` Lambda
    refuses a function with active tracing; without `logs:PutLogEvents` it runs unlogged)."""
    statements = template.statements(function)
    try:
        needed = list(
            dict.fromkeys(
                [*requirements(template, function, calls), *service_requirements(template, function)]
            )
        )
    except UnresolvableResource as exc:
        return [str(exc)]
    return [str(r) for r in needed if not is_granted(template, statements, r)]


# What the Lambda service does with a function's role, whatever its handler calls
# (Lambda developer guide: "Lambda execution role", "Using AWS Lambda with AWS X-Ray" and
# "Capturing records of Lambda asynchronous invocations").
LOG_ACTIONS = ("logs:CreateLogStream", "logs:PutLogEvents")
TRACING_ACTIONS = ("xray:PutTraceSegments", "xray:PutTelemetryRecords")
DESTINATION_ACTIONS = {"AWS::SQS::Queue": ("sqs:SendMessage",), "AWS::SNS::Topic": ("sns:Publish",)}


def service_requirements(template: StackTemplate, function: str) -> Iterator[Requirement]:
    """What the Lambda service needs the function's role to allow, from the function's own
    properties: its log group, its tracing mode, its asynchronous on-failure destination."""
    logical_id, resource = template.function(function)
    properties = resource["Properties"]
    log_group = properties.get("LoggingConfig", {}).get("LogGroup")
    if log_group is not None:
        (group_id,) = referenced_ids(template, log_group)
        for action in LOG_ACTIONS:
            yield Requirement(action, f"<{group_id}>", f"{function}: its own log group")
    if properties.get("TracingConfig", {}).get("Mode") == "Active":
        for action in TRACING_ACTIONS:
            yield Requirement(action, ANY_RESOURCE, f"{function}: active tracing")
    for config in template.of_type("AWS::Lambda::EventInvokeConfig").values():
        if logical_id not in referenced_ids(template, config["Properties"].get("FunctionName")):
            continue
        destinations = config["Properties"].get("DestinationConfig", {})
        for outcome in ("OnFailure", "OnSuccess"):
            target = destinations.get(outcome, {}).get("Destination")
            if target is None:
                continue
            target_id = canonical(template, target).strip("<>")
            kind = template.resources.get(target_id, {}).get("Type", "")
            for action in DESTINATION_ACTIONS.get(kind, ()):
                yield Requirement(action, f"<{target_id}>", f"{function}: its {outcome} destination")


def excess_grants(template: StackTemplate, function: str, calls: Iterable[AwsCall]) -> list[str]:
    """Every (action, resource) the function's role allows that neither a catalogued call nor
    the Lambda service needs: a grant no code uses. Exact: `<Jobs>/index/*` is excess when
    only `<Jobs>/index/by_tenant` is queried, and `s3:*` when only s3:GetObject is called."""
    try:
        needed = {
            (r.action.lower(), r.resource)
            for r in [*requirements(template, function, calls), *service_requirements(template, function)]
        }
    except UnresolvableResource as exc:
        return [str(exc)]
    problems = [f"managed policy {arn}" for arn in template.managed_policies(function)]
    for statement in template.statements(function):
        raw = statement.raw
        if "NotAction" in raw or "NotResource" in raw:
            problems.append(f"a NotAction/NotResource statement: {raw}")
            continue
        if statement.effect != "Allow":
            continue
        for action in statement.actions:
            for resource in statement.resources:
                granted = canonical(template, resource)
                if (action.lower(), granted) not in needed:
                    problems.append(f"{action} on {granted}")
    return problems
