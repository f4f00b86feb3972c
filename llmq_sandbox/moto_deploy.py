"""Deploy the llmq stack into a moto server through CloudFormation, as `cdk deploy` would.

The sandbox and tests/infra share this. It synthesizes the app in sandbox mode (no
bootstrap-version rule, disposable stateful resources, placeholder deps layer), publishes
the file assets to the bootstrap bucket the template names, and calls CreateStack with a
TemplateURL on the moto server. Moto quirks it works around (TOOLCHAIN.md):
- the endpoint must be `http://localhost:PORT`: moto parses a path-style TemplateURL only there;
- CreateStack directly, never a change set (moto's change sets ignore DependsOn);
- resource types moto does not model (API Gateway Stage/Authorizer/Account, queue and topic
  policies, alarms) are skipped by moto. A Ref to a skipped resource resolves to nothing, which
  breaks an IAM policy that names it, so the one such resource llmq refers to, the provider
  secret, is created here with boto3 first and its Refs are replaced by its ARN;
- moto's CloudFormation has no AWS::ApiGateway::UsagePlan either, though its API Gateway API
  has usage plans and keys: each plan is created here with boto3 (name, description,
  throttle) before the stack, its Refs (the UsagePlanIds output) replaced by its id, and
  attached to the stack's API stage once the stack exists, as the template's ApiStages say.
  The sandbox's gateway plays them (llmq_sandbox.gateway).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3

from llmq.config import LlmqConfig
from stacks.context import CONTEXT_SANDBOX
from stacks.synthesis import synthesize
from stacks.template import StackTemplate

BOOTSTRAP_QUALIFIER = "hnb659fds"
BOOTSTRAP_VERSION_PARAMETER = f"/cdk-bootstrap/{BOOTSTRAP_QUALIFIER}/version"
BOOTSTRAP_VERSION = "30"
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"]
# Moto accepts any credentials unless it enforces IAM; these never leave the process.
MOTO_ACCESS_KEY_ID = "testing"
MOTO_SECRET_ACCESS_KEY = "testing"


def moto_session(region: str) -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id=MOTO_ACCESS_KEY_ID, aws_secret_access_key=MOTO_SECRET_ACCESS_KEY, region_name=region
    )


class MotoDeployError(RuntimeError):
    pass


@dataclass(frozen=True)
class MotoDeployment:
    stack_name: str
    stack_id: str
    region: str
    endpoint_url: str
    # CfnOutputs: ApiUrl, JobsTableName, TenantsTableName, LaneQueueUrls (JSON), WebhookQueueUrl, ...
    outputs: dict[str, str]
    # Logical id -> physical id of every resource moto created.
    physical_ids: dict[str, str]
    template: dict[str, Any] = field(repr=False)
    assembly_dir: str = ""

    def function_names(self) -> dict[str, str]:
        """{"api": physical name, "worker": ..., ...} from the FunctionNames output."""
        names: dict[str, str] = json.loads(self.outputs["FunctionNames"])
        return names

    def lane_queue_urls(self) -> dict[str, str]:
        urls: dict[str, str] = json.loads(self.outputs["LaneQueueUrls"])
        return urls


def check_endpoint(endpoint_url: str) -> None:
    host = urlsplit(endpoint_url).hostname
    if host != "localhost":
        raise MotoDeployError(
            f"use http://localhost:PORT, not {endpoint_url}: moto resolves a path-style "
            "TemplateURL only for a localhost endpoint"
        )


def deploy_to_moto(
    endpoint_url: str,
    config: LlmqConfig | None = None,
    region: str = "us-east-1",
    *,
    context: Mapping[str, Any] | None = None,
    outdir: str | None = None,
    session: boto3.session.Session | None = None,
    run_values: Mapping[str, str] | None = None,
) -> MotoDeployment:
    """Synthesize llmq in sandbox mode and create its stack on the moto server at `endpoint_url`.

    `session`: whose credentials deploy it, when moto checks them (the sandbox's operator).
    `run_values`: strings of the config that are this run's only (stacks.synthesis.synthesize).
    """
    check_endpoint(endpoint_url)
    synthesized = synthesize(
        config, {**(context or {}), CONTEXT_SANDBOX: True}, outdir, run_values=run_values
    )
    clients = _Clients(session or moto_session(region), endpoint_url)
    account = clients.get("sts").get_caller_identity()["Account"]
    template_url = publish_assets(
        clients, synthesized.assets_manifest, account, region, endpoint_url, synthesized.template_file
    )
    template = synthesized.template()
    moto_template = fill_moto_gaps(clients, template, synthesized.stack_name)
    if moto_template != template:
        template_url = _upload_template(clients, template_url, moto_template)
    _put_bootstrap_version(clients)
    stack_id = _create_stack(clients, synthesized.stack_name, template_url)
    physical_ids = _physical_ids(clients, synthesized.stack_name)
    plan_ids = _created_usage_plans(template, moto_template)
    _attach_usage_plans(clients, template, plan_ids, physical_ids)
    return MotoDeployment(
        stack_name=synthesized.stack_name,
        stack_id=stack_id,
        region=region,
        endpoint_url=endpoint_url,
        outputs=_outputs(clients, synthesized.stack_name),
        physical_ids={**physical_ids, **plan_ids},
        template=template,
        assembly_dir=str(synthesized.directory),
    )


class _Clients:
    def __init__(self, session: boto3.session.Session, endpoint_url: str) -> None:
        self._session = session
        self._endpoint_url = endpoint_url
        self._clients: dict[str, Any] = {}

    def get(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(
                service,  # type: ignore[call-overload]
                endpoint_url=self._endpoint_url,
            )
        return self._clients[service]


def publish_assets(
    clients: _Clients,
    manifest_path: Path,
    account: str,
    region: str,
    endpoint_url: str,
    template_file: str,
) -> str:
    """Upload every file asset where the template expects it; returns the template's URL."""
    manifest = json.loads(manifest_path.read_text())
    s3 = clients.get("s3")
    created: set[str] = set()
    template_url = ""
    for asset in manifest.get("files", {}).values():
        source_path = manifest_path.parent / asset["source"]["path"]
        body = (
            _zip_directory(source_path)
            if asset["source"].get("packaging") == "zip"
            else source_path.read_bytes()
        )
        for destination in asset["destinations"].values():
            bucket = _substitute(destination["bucketName"], account, region)
            key = destination["objectKey"]
            if bucket not in created:
                _ensure_bucket(s3, bucket, region)
                created.add(bucket)
            s3.put_object(Bucket=bucket, Key=key, Body=body)
            if asset["source"]["path"] == template_file:
                template_url = f"{endpoint_url.rstrip('/')}/{bucket}/{key}"
    if not template_url:
        raise MotoDeployError(f"the asset manifest {manifest_path} does not publish {template_file}")
    return template_url


USAGE_PLAN = "AWS::ApiGateway::UsagePlan"
# Where fill_moto_gaps notes, in the template it returns, the usage plans it created.
_CREATED_PLANS = "LlmqSandboxUsagePlans"


def fill_moto_gaps(clients: _Clients, template: dict[str, Any], stack_name: str) -> dict[str, Any]:
    """A copy of `template` in which the secrets and usage plans moto cannot create from
    CloudFormation exist already."""
    resources = dict(template["Resources"])
    replacements: dict[str, Any] = {}
    # moto's CloudFormation does not model AWS::Lambda::Alias (the api's, under SnapStart):
    # whatever names an alias names its function instead, whose code the sandbox runs either way.
    for logical_id, resource in StackTemplate(template).of_type("AWS::Lambda::Alias").items():
        replacements[logical_id] = resource["Properties"]["FunctionName"]
        del resources[logical_id]
    apigateway = clients.get("apigateway")
    for logical_id, resource in StackTemplate(template).of_type(USAGE_PLAN).items():
        properties = resource.get("Properties", {})
        throttle = properties.get("Throttle") or {}
        plan = apigateway.create_usage_plan(
            name=str(properties.get("UsagePlanName") or f"{stack_name}-{logical_id}"),
            description=str(properties.get("Description") or ""),
            throttle={
                key: value
                for key, value in (
                    ("rateLimit", throttle.get("RateLimit")),
                    ("burstLimit", throttle.get("BurstLimit")),
                )
                if value is not None
            },
        )
        replacements[logical_id] = plan["id"]
        del resources[logical_id]
    secrets = clients.get("secretsmanager")
    for logical_id, resource in StackTemplate(template).of_type("AWS::SecretsManager::Secret").items():
        properties = resource.get("Properties", {})
        response = secrets.create_secret(
            Name=properties.get("Name", f"{stack_name}-{logical_id}"),
            Description=properties.get("Description", ""),
            # Never a real key: the sandbox's worker gets its provider key from its own config.
            SecretString="sandbox-placeholder",
        )
        replacements[logical_id] = response["ARN"]
        del resources[logical_id]
    if not replacements:
        return template
    plans = {
        logical_id: replacements[logical_id] for logical_id in StackTemplate(template).of_type(USAGE_PLAN)
    }
    metadata = {**template.get("Metadata", {}), _CREATED_PLANS: plans}
    return {
        **_replace_refs(template, replacements),
        "Resources": _replace_refs(resources, replacements),
        "Metadata": metadata,
    }


def _created_usage_plans(template: dict[str, Any], moto_template: dict[str, Any]) -> dict[str, str]:
    plans: dict[str, str] = (moto_template.get("Metadata") or {}).get(_CREATED_PLANS) or {}
    return dict(plans)


def _attach_usage_plans(
    clients: _Clients, template: dict[str, Any], plan_ids: Mapping[str, str], physical_ids: Mapping[str, str]
) -> None:
    """Each plan on the API stages its template names, now that the RestApi exists.

    moto does not create the Stage either; the stage is named by its StageName.
    """
    reader = StackTemplate(template)
    stages = reader.of_type("AWS::ApiGateway::Stage")
    apigateway = clients.get("apigateway")
    for logical_id, plan_id in plan_ids.items():
        properties = template["Resources"][logical_id].get("Properties", {})
        operations = []
        for stage in properties.get("ApiStages") or []:
            api_id = physical_ids.get(str((stage.get("ApiId") or {}).get("Ref", "")))
            stage_ref = stage.get("Stage")
            stage_name = (
                stages.get(str(stage_ref.get("Ref")), {}).get("Properties", {}).get("StageName")
                if isinstance(stage_ref, dict)
                else stage_ref
            )
            if not api_id or not stage_name:
                raise MotoDeployError(f"usage plan {logical_id}: cannot resolve its API stage {stage}")
            operations.append({"op": "add", "path": "/apiStages", "value": f"{api_id}:{stage_name}"})
        if operations:
            apigateway.update_usage_plan(usagePlanId=plan_id, patchOperations=operations)


def _replace_refs(node: Any, replacements: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"Ref"} and node["Ref"] in replacements:
            return replacements[node["Ref"]]
        return {key: _replace_refs(value, replacements) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_refs(item, replacements) for item in node]
    return node


def _upload_template(clients: _Clients, template_url: str, template: dict[str, Any]) -> str:
    bucket, key = urlsplit(template_url).path.lstrip("/").split("/", 1)
    moto_key = key.replace(".json", ".moto.json")
    clients.get("s3").put_object(Bucket=bucket, Key=moto_key, Body=json.dumps(template).encode())
    return template_url.replace(key, moto_key)


def _substitute(value: str, account: str, region: str) -> str:
    return (
        value.replace("${AWS::AccountId}", account)
        .replace("${AWS::Region}", region)
        .replace("${AWS::Partition}", "aws")
    )


def _ensure_bucket(s3: Any, bucket: str, region: str) -> None:
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(**kwargs)


def _zip_directory(path: Path) -> bytes:
    """A deterministic zip of a directory asset, laid out as the CDK CLI would publish it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root, name)
                info = zipfile.ZipInfo(str(full.relative_to(path)), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                archive.writestr(info, full.read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _put_bootstrap_version(clients: _Clients) -> None:
    # Only read when the template keeps the bootstrap-version rule; harmless otherwise.
    clients.get("ssm").put_parameter(
        Name=BOOTSTRAP_VERSION_PARAMETER, Value=BOOTSTRAP_VERSION, Type="String", Overwrite=True
    )


def _create_stack(clients: _Clients, stack_name: str, template_url: str) -> str:
    cloudformation = clients.get("cloudformation")
    response = cloudformation.create_stack(
        StackName=stack_name, TemplateURL=template_url, Capabilities=CAPABILITIES
    )
    stack_id: str = response["StackId"]
    status = cloudformation.describe_stacks(StackName=stack_id)["Stacks"][0]["StackStatus"]
    if status != "CREATE_COMPLETE":
        events = cloudformation.describe_stack_events(StackName=stack_id)["StackEvents"]
        reasons = [e.get("ResourceStatusReason") for e in events if e.get("ResourceStatusReason")]
        raise MotoDeployError(f"stack {stack_name} is {status}: {reasons[:5]}")
    return stack_id


def _outputs(clients: _Clients, stack_name: str) -> dict[str, str]:
    stack = clients.get("cloudformation").describe_stacks(StackName=stack_name)["Stacks"][0]
    return {output["OutputKey"]: str(output.get("OutputValue", "")) for output in stack.get("Outputs", [])}


def _physical_ids(clients: _Clients, stack_name: str) -> dict[str, str]:
    paginator = clients.get("cloudformation").get_paginator("list_stack_resources")
    physical: dict[str, str] = {}
    for page in paginator.paginate(StackName=stack_name):
        for resource in page["StackResourceSummaries"]:
            physical[resource["LogicalResourceId"]] = resource.get("PhysicalResourceId", "")
    return physical
