"""Which API Gateway routes no Lambda permission lets the gateway invoke.

AWS checks each request's execute-api ARN (`<api>/<stage>/<VERB>/<path>`) against the
SourceArn of the invoked function's (or alias's) permissions, and answers 500 "Invalid
permissions on Lambda function" where none matches. moto does not evaluate these resource
policies, so the sandbox would pass a route that AWS refuses: this reads the template instead.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from stacks.template import StackTemplate

_VERBS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _render(template: StackTemplate, node: Any) -> str:
    """A SourceArn as a string: the API as `API`, a stage as its name, pseudo parameters fixed."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict) and "Fn::Join" in node:
        separator, parts = node["Fn::Join"]
        return str(separator).join(_render(template, part) for part in parts)
    if isinstance(node, dict) and "Ref" in node:
        resource = template.resources.get(node["Ref"], {})
        if resource.get("Type") == "AWS::ApiGateway::RestApi":
            return "API"
        if resource.get("Type") == "AWS::ApiGateway::Stage":
            return str(resource["Properties"]["StageName"])
        return {"AWS::Partition": "aws", "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012"}.get(
            node["Ref"], "?"
        )
    return "?"


def _path(template: StackTemplate, resource_id: Any) -> str:
    """A method's resource path, as a request could fill it in ({proxy+} as two segments)."""
    parts: list[str] = []
    while isinstance(resource_id, dict) and "Ref" in resource_id:
        properties = template.resources[resource_id["Ref"]]["Properties"]
        part = str(properties["PathPart"])
        parts.append("a/b" if part.endswith("+}") else "a" if part.startswith("{") else part)
        resource_id = properties["ParentId"]
    return "/" + "/".join(reversed(parts))


def _invoked(template: StackTemplate, node: Any) -> str | None:
    """The alias or function logical id that `node` names."""
    return template.referenced(node, "AWS::Lambda::Alias") or template.referenced(
        node, "AWS::Lambda::Function"
    )


def unpermitted_routes(template: StackTemplate) -> list[str]:
    """Each `VERB /path` of a Lambda-backed method that no permission of its target allows."""
    allowed: dict[str, list[str]] = {}
    for permission in template.of_type("AWS::Lambda::Permission").values():
        properties = permission["Properties"]
        if properties.get("Principal") != "apigateway.amazonaws.com" or "SourceArn" not in properties:
            continue
        target = _invoked(template, properties["FunctionName"])
        if target is not None:
            allowed.setdefault(target, []).append(_render(template, properties["SourceArn"]))
    stages = [
        str(stage["Properties"]["StageName"]) for stage in template.of_type("AWS::ApiGateway::Stage").values()
    ]
    refused = []
    for method in template.of_type("AWS::ApiGateway::Method").values():
        properties = method["Properties"]
        target = _invoked(template, properties.get("Integration", {}).get("Uri"))
        if target is None:
            continue
        path = _path(template, properties["ResourceId"])
        verbs = _VERBS if properties["HttpMethod"] == "ANY" else (properties["HttpMethod"],)
        for stage in stages:
            for verb in verbs:
                arn = f"arn:aws:execute-api:us-east-1:123456789012:API/{stage}/{verb}{path}"
                if not any(fnmatchcase(arn, pattern) for pattern in allowed.get(target, [])):
                    refused.append(f"{verb} {path} ({stage})")
    return refused
