"""The one reader of a synthesized llmq template: by function, lane, role, table and reference.

The infra tests ask it about properties and grants; the sandbox reads its topology through it
(llmq_sandbox/topology.py, which resolves the references with moto's physical ids), and the
integration tests create their tables from it. Kept free of CDK imports.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# The tags the CDK app puts on functions and on lane queues and DLQs (stacks/functions.py,
# stacks/lanes.py).
FUNCTION_TAG = "llmq:function"
LANE_TAG = "llmq:lane"

# What an unresolved intrinsic becomes when an environment is read outside AWS.
PSEUDO_PARAMETERS = {
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "Llmq",
}


def resolve(value: Any) -> Any:
    """Replace Ref / Fn::GetAtt with dummy strings and evaluate Fn::Join, as CloudFormation would."""
    if isinstance(value, dict):
        if "Ref" in value:
            return PSEUDO_PARAMETERS.get(value["Ref"], f"dummy-{value['Ref']}")
        if "Fn::GetAtt" in value:
            logical_id, attribute = value["Fn::GetAtt"]
            return f"dummy-{logical_id}-{attribute}"
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(str(resolve(part)) for part in parts)
        return {key: resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item) for item in value]
    return value


def references(node: Any) -> Iterator[str]:
    """Every logical id that `node` refers to through Ref or Fn::GetAtt, depth first."""
    if isinstance(node, dict):
        if "Ref" in node and isinstance(node["Ref"], str):
            yield node["Ref"]
        if "Fn::GetAtt" in node:
            target = node["Fn::GetAtt"]
            yield target[0] if isinstance(target, list) else str(target).split(".", 1)[0]
        for value in node.values():
            yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def action_matches(pattern: str, action: str) -> bool:
    """IAM action matching: case-insensitive, `*` and `?` wildcards."""
    return fnmatch.fnmatchcase(action.lower(), pattern.lower())


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: list[str]
    resources: list[Any]
    raw: dict[str, Any]

    def allows(self, action: str) -> bool:
        return self.effect == "Allow" and any(action_matches(pattern, action) for pattern in self.actions)


class StackTemplate:
    def __init__(self, template: dict[str, Any]) -> None:
        self.template = template
        self.resources: dict[str, dict[str, Any]] = template["Resources"]

    def of_type(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {key: value for key, value in self.resources.items() if value["Type"] == resource_type}

    @staticmethod
    def tag(resource: dict[str, Any], key: str) -> str | None:
        for tag in resource.get("Properties", {}).get("Tags") or []:
            if tag.get("Key") == key:
                return str(tag.get("Value"))
        return None

    def referenced(self, node: Any, resource_type: str) -> str | None:
        """The first logical id of `resource_type` that `node` refers to."""
        for logical_id in references(node):
            if self.resources.get(logical_id, {}).get("Type") == resource_type:
                return logical_id
        return None

    def invoked_function(self, node: Any) -> str | None:
        """The logical id of the function `node` invokes: named itself, or through one of its
        aliases (the api's under SnapStart, the front door's when provisioned)."""
        found = self.referenced(node, "AWS::Lambda::Function")
        alias = None if found else self.referenced(node, "AWS::Lambda::Alias")
        if alias is not None:
            found = self.referenced(
                self.resources[alias]["Properties"]["FunctionName"], "AWS::Lambda::Function"
            )
        return found

    def output_resource(self, output: str) -> tuple[str, dict[str, Any]]:
        """(logical id, resource) that the stack output `output` names, as `{"Ref": id}`."""
        logical_id = str(self.template["Outputs"][output]["Value"]["Ref"])
        return logical_id, self.resources[logical_id]

    # ---- functions -------------------------------------------------------------------

    def functions(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """{function name: (logical id, resource)} by the llmq:function tag."""
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for logical_id, resource in self.of_type("AWS::Lambda::Function").items():
            name = self.tag(resource, FUNCTION_TAG)
            if name is not None:
                assert name not in found, f"two functions tagged {name}"
                found[name] = (logical_id, resource)
        return found

    def function(self, name: str) -> tuple[str, dict[str, Any]]:
        return self.functions()[name]

    def environment(self, name: str) -> dict[str, str]:
        _, resource = self.function(name)
        variables = resource["Properties"]["Environment"]["Variables"]
        return {key: str(resolve(value)) for key, value in variables.items()}

    def event_source_mappings(self, function_name: str) -> list[dict[str, Any]]:
        logical_id, _ = self.function(function_name)
        return [
            resource["Properties"]
            for resource in self.of_type("AWS::Lambda::EventSourceMapping").values()
            if resource["Properties"]["FunctionName"] == {"Ref": logical_id}
        ]

    def queue_event_source_mappings(self) -> dict[str, dict[str, Any]]:
        """{logical id: properties} of every event source mapping that reads an SQS queue."""
        return {
            logical_id: resource["Properties"]
            for logical_id, resource in self.of_type("AWS::Lambda::EventSourceMapping").items()
            if self._is_queue_arn(resource["Properties"].get("EventSourceArn"))
        }

    def _is_queue_arn(self, arn: Any) -> bool:
        if isinstance(arn, dict) and "Fn::GetAtt" in arn:
            return bool(self.resources[arn["Fn::GetAtt"][0]]["Type"] == "AWS::SQS::Queue")
        # An imported queue: its ARN is spelled out, or joined from pseudo parameters.
        return ":sqs:" in str(resolve(arn))

    # ---- IAM -------------------------------------------------------------------------

    def role_of(self, function_name: str) -> str:
        _, resource = self.function(function_name)
        role = resource["Properties"]["Role"]
        return str(role["Fn::GetAtt"][0])

    def statements(self, function_name: str) -> list[Statement]:
        """Every statement that applies to the function's role: attached policies and inline ones."""
        role_id = self.role_of(function_name)
        documents = [
            policy["Properties"]["PolicyDocument"]
            for policy in self.of_type("AWS::IAM::Policy").values()
            if {"Ref": role_id} in policy["Properties"].get("Roles", [])
        ]
        role = self.resources[role_id]["Properties"]
        documents += [inline["PolicyDocument"] for inline in role.get("Policies", [])]
        return [
            Statement(
                effect=statement["Effect"],
                actions=as_list(statement.get("Action", [])),
                resources=as_list(statement.get("Resource", [])),
                raw=statement,
            )
            for document in documents
            for statement in document["Statement"]
        ]

    def managed_policies(self, function_name: str) -> list[str]:
        role = self.resources[self.role_of(function_name)]["Properties"]
        return [json.dumps(arn) for arn in role.get("ManagedPolicyArns", [])]

    # ---- queues ----------------------------------------------------------------------

    def lane_queues(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """{lane: (logical id, queue)} for the lanes' main queues (those with a redrive policy)."""
        return {
            lane: (logical_id, resource)
            for logical_id, resource in self.of_type("AWS::SQS::Queue").items()
            if (lane := self.tag(resource, LANE_TAG)) is not None
            and "RedrivePolicy" in resource["Properties"]
        }

    def dlq_ids(self) -> set[str]:
        """Logical ids of every queue that some queue redrives to."""
        return {
            resource["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
            for resource in self.of_type("AWS::SQS::Queue").values()
            if "RedrivePolicy" in resource["Properties"]
        }

    def iter_arn_refs(self, resources: list[Any]) -> Iterator[str]:
        """The logical ids that statement resources point at (GetAtt X.Arn, or inside a Join)."""
        for resource in resources:
            text = json.dumps(resource)
            for logical_id in self.resources:
                if f'["{logical_id}", "Arn"]' in text:
                    yield logical_id
