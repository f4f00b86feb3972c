"""What the deployed template says runs where: functions, event source mappings, the schedule
and the REST API, read from the CloudFormation template and from moto.

The runner plays the Lambda service, API Gateway and EventBridge from this description
only, so the sandbox runs what the CDK app declares and nothing else: a mapping, a route or
an environment variable missing from the template is missing in the sandbox too.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacks.template import FUNCTION_TAG, LANE_TAG, StackTemplate

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = ROOT / "functions"
LLMQ_LAYER_DIR = ROOT / "layers" / "llmq" / "python"


class TopologyError(RuntimeError):
    """The template describes something the sandbox cannot run; the message says what."""


@dataclass(frozen=True)
class FunctionSpec:
    name: str  # the llmq:function tag: api, authorizer, worker, ...
    logical_id: str
    physical_name: str
    arn: str
    handler: str  # "handler.handler": module.function inside the code directory
    code_dir: Path
    timeout_seconds: float
    memory_mb: int
    reserved_concurrency: int | None
    environment: dict[str, str] = field(repr=False)
    runtime: str = "python3"
    role_arn: str = ""  # its execution role, whose session the function's environments get
    # Provisioned concurrency on its aliases: environments initialised before any request.
    provisioned_environments: int = 0


@dataclass(frozen=True)
class QueueSpec:
    logical_id: str
    url: str
    arn: str
    lane: str | None

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class MappingSpec:
    """An AWS::Lambda::EventSourceMapping on an SQS queue."""

    logical_id: str
    function: str  # FunctionSpec.name
    queue: QueueSpec
    batch_size: int
    batching_window_seconds: float
    max_concurrency: int | None
    report_batch_item_failures: bool
    enabled: bool


@dataclass(frozen=True)
class ScheduleSpec:
    logical_id: str
    name: str
    arn: str
    expression: str
    function: str
    enabled: bool
    # Where Lambda sends a failed run's record (the function's EventInvokeConfig OnFailure).
    on_failure_url: str | None = None

    @property
    def rate_seconds(self) -> float:
        match = re.fullmatch(r"rate\((\d+)\s+(minute|minutes|hour|hours|day|days)\)", self.expression.strip())
        if not match:
            raise TopologyError(
                f"schedule {self.logical_id}: only rate() expressions run here: {self.expression}"
            )
        unit = {"minute": 60, "hour": 3600, "day": 86_400}[match.group(2).rstrip("s")]
        return int(match.group(1)) * unit


@dataclass(frozen=True)
class RouteSpec:
    """One method on one resource of the REST API, integrated with a function (AWS_PROXY)."""

    resource_path: str  # "/v1/{proxy+}"
    resource_id: str
    http_method: str  # "GET", ..., or "ANY"
    function: str
    authorizer: str | None  # logical id of an AWS::ApiGateway::Authorizer, None for NONE
    # The method needs an API key of a usage plan on the stage (ApiKeyRequired).
    api_key_required: bool = False

    def matches(self, path: str) -> dict[str, str] | None:
        """Path parameters when `path` fits this resource, else None."""
        pattern = ""
        names: list[str] = []
        for part in self.resource_path.strip("/").split("/"):
            if not part:
                continue
            greedy = re.fullmatch(r"\{(\w+)\+\}", part)
            single = re.fullmatch(r"\{(\w+)\}", part)
            if greedy:
                names.append(greedy.group(1))
                pattern += r"/(.+)"
            elif single:
                names.append(single.group(1))
                pattern += r"/([^/]+)"
            else:
                pattern += "/" + re.escape(part)
        found = re.fullmatch(pattern or "/", path.rstrip("/") if path != "/" else path)
        if not found:
            return None
        return dict(zip(names, found.groups(), strict=True))

    @property
    def specificity(self) -> tuple[int, int]:
        # API Gateway prefers literal path parts over variables, and variables over greedy ones.
        parts = self.resource_path.strip("/").split("/")
        greedy = sum(part.endswith("+}") for part in parts)
        literal = sum(not part.startswith("{") for part in parts)
        return (-greedy, literal)


@dataclass(frozen=True)
class AuthorizerSpec:
    logical_id: str
    function: str
    type: str  # REQUEST or TOKEN
    identity_sources: list[str]  # header names from method.request.header.X
    ttl_seconds: int


@dataclass(frozen=True)
class GatewayResponseSpec:
    response_type: str
    status_code: int | None
    headers: dict[str, str]
    templates: dict[str, str]


@dataclass(frozen=True)
class ThrottleSpec:
    """A stage's throttling target for the methods a MethodSetting names (token bucket)."""

    resource_path: str  # "/*" for every resource, else the resource's path: "/v1/{proxy+}"
    http_method: str  # "*" for every method, else "GET", ..., "ANY"
    rate_per_second: float
    burst: int

    def covers(self, route: RouteSpec) -> bool:
        # "*" in a setting's path is a wildcard: "/*" names every resource.
        return fnmatch.fnmatchcase(route.resource_path, self.resource_path) and self.http_method in (
            "*",
            route.http_method,
        )


@dataclass(frozen=True)
class ApiSpec:
    rest_api_id: str
    stage: str
    routes: list[RouteSpec]
    authorizers: dict[str, AuthorizerSpec]
    gateway_responses: dict[str, GatewayResponseSpec]
    # The RestApi's BinaryMediaTypes ("image/png", "image/*", "*/*"); none: every body is text.
    binary_media_types: list[str] = field(default_factory=list)
    # The stage's MethodSettings that throttle, the most specific first; none: unthrottled.
    throttles: list[ThrottleSpec] = field(default_factory=list)
    # Where a method that requires an API key finds it: the x-api-key header (HEADER) or the
    # authorizer's usageIdentifierKey (AUTHORIZER). The usage plans themselves are read from
    # API Gateway (moto) while requests run, so an operator's change shows, as on AWS.
    api_key_source: str = "HEADER"

    def throttle_for(self, route: RouteSpec) -> ThrottleSpec | None:
        return next((throttle for throttle in self.throttles if throttle.covers(route)), None)


@dataclass(frozen=True)
class Topology:
    account: str
    region: str
    functions: dict[str, FunctionSpec]
    mappings: list[MappingSpec]
    schedules: list[ScheduleSpec]
    api: ApiSpec

    def function(self, name: str) -> FunctionSpec:
        try:
            return self.functions[name]
        except KeyError:
            raise TopologyError(f"the template has no function tagged {FUNCTION_TAG}={name}") from None


# ---- reading the template -------------------------------------------------------------------


class TemplateReader(StackTemplate):
    """The template, with its references resolved by the physical ids moto created."""

    def __init__(self, template: dict[str, Any], physical_ids: dict[str, str], account: str, region: str):
        super().__init__(template)
        self.physical_ids = physical_ids
        self.account = account
        self.region = region

    def properties_of_type(self, resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for logical_id, resource in self.of_type(resource_type).items():
            yield logical_id, resource.get("Properties", {})

    def physical(self, logical_id: str) -> str:
        physical = self.physical_ids.get(logical_id)
        if not physical:
            raise TopologyError(f"{logical_id} was not created in moto")
        return physical

    # ---- functions ----

    def function_names(self) -> dict[str, str]:
        """logical id -> llmq:function tag, for every function the app tags."""
        names: dict[str, str] = {}
        for logical_id, resource in self.of_type("AWS::Lambda::Function").items():
            name = self.tag(resource, FUNCTION_TAG)
            if name is None:
                raise TopologyError(f"function {logical_id} has no {FUNCTION_TAG} tag: which code runs it?")
            names[logical_id] = name
        return names

    def function_spec(self, logical_id: str, name: str, deployed: dict[str, Any]) -> FunctionSpec:
        """`deployed` is moto's GetFunctionConfiguration: the environment as CloudFormation resolved it."""
        properties = self.resources[logical_id]["Properties"]
        handler = str(properties.get("Handler") or deployed.get("Handler") or "")
        code_dir = FUNCTIONS_DIR / name
        module = handler.rsplit(".", 1)[0].replace(".", "/")
        if "." not in handler or not (code_dir / f"{module}.py").is_file():
            raise TopologyError(
                f"function {name} ({logical_id}): no {module}.py in {code_dir} for {handler!r}"
            )
        reserved = properties.get("ReservedConcurrentExecutions")
        provisioned = sum(
            int(
                (alias["Properties"].get("ProvisionedConcurrencyConfig") or {}).get(
                    "ProvisionedConcurrentExecutions"
                )
                or 0
            )
            for alias in self.of_type("AWS::Lambda::Alias").values()
            if self.invoked_function(alias["Properties"]["FunctionName"]) == logical_id
        )
        return FunctionSpec(
            name=name,
            logical_id=logical_id,
            physical_name=str(deployed["FunctionName"]),
            arn=str(deployed["FunctionArn"]),
            handler=handler,
            code_dir=code_dir,
            timeout_seconds=float(deployed.get("Timeout") or properties.get("Timeout") or 3),
            memory_mb=int(deployed.get("MemorySize") or properties.get("MemorySize") or 128),
            reserved_concurrency=int(reserved) if reserved is not None else None,
            environment=dict((deployed.get("Environment") or {}).get("Variables") or {}),
            runtime=str(properties.get("Runtime") or "python3"),
            role_arn=str(deployed.get("Role") or ""),
            provisioned_environments=provisioned,
        )

    # ---- queues and mappings ----

    def queue(self, logical_id: str) -> QueueSpec:
        url = self.physical(logical_id)
        name = url.rstrip("/").rsplit("/", 1)[-1]
        return QueueSpec(
            logical_id=logical_id,
            url=url,
            arn=f"arn:aws:sqs:{self.region}:{self.account}:{name}",
            lane=self.tag(self.resources[logical_id], LANE_TAG),
        )

    def mappings(self, names: dict[str, str]) -> list[MappingSpec]:
        found: list[MappingSpec] = []
        for logical_id, properties in self.properties_of_type("AWS::Lambda::EventSourceMapping"):
            queue_id = self.referenced(properties.get("EventSourceArn"), "AWS::SQS::Queue")
            function_id = self.referenced(properties.get("FunctionName"), "AWS::Lambda::Function")
            if queue_id is None or function_id is None:
                raise TopologyError(
                    f"event source mapping {logical_id}: only SQS -> function mappings run here"
                )
            scaling = properties.get("ScalingConfig") or {}
            found.append(
                MappingSpec(
                    logical_id=logical_id,
                    function=names[function_id],
                    queue=self.queue(queue_id),
                    batch_size=int(properties.get("BatchSize") or 10),
                    batching_window_seconds=float(properties.get("MaximumBatchingWindowInSeconds") or 0),
                    max_concurrency=int(scaling["MaximumConcurrency"])
                    if "MaximumConcurrency" in scaling
                    else None,
                    report_batch_item_failures="ReportBatchItemFailures"
                    in (properties.get("FunctionResponseTypes") or []),
                    enabled=bool(properties.get("Enabled", True)),
                )
            )
        return found

    # ---- schedules ----

    def on_failure_urls(self) -> dict[str, str]:
        """Function logical id -> the queue Lambda sends a failed asynchronous invocation's record
        to (its EventInvokeConfig's OnFailure destination)."""
        found: dict[str, str] = {}
        for _, properties in self.properties_of_type("AWS::Lambda::EventInvokeConfig"):
            function_id = self.referenced(properties.get("FunctionName"), "AWS::Lambda::Function")
            on_failure = ((properties.get("DestinationConfig") or {}).get("OnFailure") or {}).get(
                "Destination"
            )
            queue_id = self.referenced(on_failure, "AWS::SQS::Queue")
            if function_id is not None and queue_id is not None:
                found[function_id] = self.queue(queue_id).url
        return found

    def schedules(self, names: dict[str, str]) -> list[ScheduleSpec]:
        found: list[ScheduleSpec] = []
        on_failure = self.on_failure_urls()
        for logical_id, properties in self.properties_of_type("AWS::Events::Rule"):
            expression = properties.get("ScheduleExpression")
            if not expression:
                continue
            for target in properties.get("Targets") or []:
                function_id = self.referenced(target.get("Arn"), "AWS::Lambda::Function")
                if function_id is None:
                    continue
                name = self.physical(logical_id)
                found.append(
                    ScheduleSpec(
                        logical_id=logical_id,
                        name=name,
                        arn=f"arn:aws:events:{self.region}:{self.account}:rule/{name}",
                        expression=str(expression),
                        function=names[function_id],
                        enabled=properties.get("State", "ENABLED") == "ENABLED",
                        on_failure_url=on_failure.get(function_id),
                    )
                )
        return found

    # ---- the REST API ----

    def api(self, names: dict[str, str]) -> ApiSpec:
        apis = list(self.properties_of_type("AWS::ApiGateway::RestApi"))
        if len(apis) != 1:
            raise TopologyError(f"expected one REST API in the template, found {len(apis)}")
        api_id, api_properties = apis[0]
        stages = list(self.properties_of_type("AWS::ApiGateway::Stage"))
        if len(stages) > 1:
            raise TopologyError(f"expected at most one API stage in the template, found {len(stages)}")
        stage = stages[0][1] if stages else {}
        paths = self._resource_paths()
        authorizers = {
            logical_id: self._authorizer(logical_id, properties, names)
            for logical_id, properties in self.properties_of_type("AWS::ApiGateway::Authorizer")
        }
        routes = [
            self._route(logical_id, properties, paths, names)
            for logical_id, properties in self.properties_of_type("AWS::ApiGateway::Method")
        ]
        responses = {
            str(properties["ResponseType"]): GatewayResponseSpec(
                response_type=str(properties["ResponseType"]),
                status_code=int(properties["StatusCode"]) if properties.get("StatusCode") else None,
                headers={
                    key.removeprefix("gatewayresponse.header."): str(value).strip("'")
                    for key, value in (properties.get("ResponseParameters") or {}).items()
                    if key.startswith("gatewayresponse.header.")
                },
                templates=dict(properties.get("ResponseTemplates") or {}),
            )
            for _, properties in self.properties_of_type("AWS::ApiGateway::GatewayResponse")
        }
        return ApiSpec(
            rest_api_id=self.physical(api_id),
            stage=str(stage.get("StageName") or "prod"),
            routes=sorted(routes, key=lambda route: route.specificity, reverse=True),
            authorizers=authorizers,
            gateway_responses=responses,
            # CloudFormation writes the slash of a media type as "~1" (image~1png).
            binary_media_types=[
                str(media_type).replace("~1", "/")
                for media_type in api_properties.get("BinaryMediaTypes") or []
            ],
            throttles=self._throttles(stage),
            api_key_source=str(api_properties.get("ApiKeySourceType") or "HEADER"),
        )

    @staticmethod
    def _throttles(stage: dict[str, Any]) -> list[ThrottleSpec]:
        """The stage's MethodSettings that set a throttle; a named method before `/*` and `*`."""
        throttles = []
        for setting in stage.get("MethodSettings") or []:
            if "ThrottlingRateLimit" not in setting and "ThrottlingBurstLimit" not in setting:
                continue
            # "/~1v1~1{proxy+}" names the resource /v1/{proxy+}; "/*" every resource.
            path = str(setting.get("ResourcePath") or "/*")
            resource_path = path if path == "/*" else path.removeprefix("/").replace("~1", "/") or "/"
            throttles.append(
                ThrottleSpec(
                    resource_path=resource_path,
                    http_method=str(setting.get("HttpMethod") or "*").upper(),
                    # An unset limit is the account's (10,000 requests per second, burst 5,000).
                    rate_per_second=float(setting.get("ThrottlingRateLimit", 10_000)),
                    burst=int(setting.get("ThrottlingBurstLimit", 5_000)),
                )
            )
        return sorted(
            throttles, key=lambda throttle: ("*" in throttle.resource_path, throttle.http_method == "*")
        )

    def _resource_paths(self) -> dict[str, str]:
        """logical id of every AWS::ApiGateway::Resource -> its full path."""
        resources = dict(self.properties_of_type("AWS::ApiGateway::Resource"))
        paths: dict[str, str] = {}

        def path_of(logical_id: str, seen: frozenset[str] = frozenset()) -> str:
            if logical_id in paths:
                return paths[logical_id]
            if logical_id in seen:
                raise TopologyError(f"API resource {logical_id} is its own ancestor")
            properties = resources[logical_id]
            parent = self.referenced(properties.get("ParentId"), "AWS::ApiGateway::Resource")
            prefix = path_of(parent, seen | {logical_id}) if parent else ""
            paths[logical_id] = f"{prefix}/{properties['PathPart']}"
            return paths[logical_id]

        for logical_id in resources:
            path_of(logical_id)
        return paths

    def _route(
        self, logical_id: str, properties: dict[str, Any], paths: dict[str, str], names: dict[str, str]
    ) -> RouteSpec:
        integration = properties.get("Integration") or {}
        function_id = self.invoked_function(integration.get("Uri"))
        if integration.get("Type") != "AWS_PROXY" or function_id is None:
            raise TopologyError(f"API method {logical_id}: only Lambda proxy integrations run here")
        resource_id = self.referenced(properties.get("ResourceId"), "AWS::ApiGateway::Resource")
        path = paths[resource_id] if resource_id else "/"
        authorizer = None
        if properties.get("AuthorizationType") == "CUSTOM":
            authorizer = self.referenced(properties.get("AuthorizerId"), "AWS::ApiGateway::Authorizer")
            if authorizer is None:
                raise TopologyError(f"API method {logical_id}: CUSTOM authorization without an authorizer")
        elif properties.get("AuthorizationType", "NONE") != "NONE":
            raise TopologyError(f"API method {logical_id}: {properties['AuthorizationType']} is not emulated")
        return RouteSpec(
            resource_path=path,
            resource_id=self.physical_ids.get(resource_id or "", "") or "root",
            http_method=str(properties["HttpMethod"]).upper(),
            function=names[function_id],
            authorizer=authorizer,
            api_key_required=bool(properties.get("ApiKeyRequired", False)),
        )

    def _authorizer(
        self, logical_id: str, properties: dict[str, Any], names: dict[str, str]
    ) -> AuthorizerSpec:
        function_id = self.invoked_function(properties.get("AuthorizerUri"))
        if function_id is None:
            raise TopologyError(f"authorizer {logical_id} names no function")
        sources = [
            source.strip().removeprefix("method.request.header.")
            for source in str(properties.get("IdentitySource") or "").split(",")
            if source.strip().startswith("method.request.header.")
        ]
        return AuthorizerSpec(
            logical_id=logical_id,
            function=names[function_id],
            type=str(properties.get("Type") or "TOKEN"),
            identity_sources=sources,
            ttl_seconds=int(properties.get("AuthorizerResultTtlInSeconds", 300)),
        )


def read_topology(
    template: dict[str, Any],
    physical_ids: dict[str, str],
    deployed_functions: dict[str, dict[str, Any]],
    account: str,
    region: str,
) -> Topology:
    """`deployed_functions`: logical id -> moto's GetFunctionConfiguration of that function."""
    reader = TemplateReader(template, physical_ids, account, region)
    names = reader.function_names()
    functions = {
        name: reader.function_spec(logical_id, name, deployed_functions[logical_id])
        for logical_id, name in names.items()
    }
    return Topology(
        account=account,
        region=region,
        functions=functions,
        mappings=reader.mappings(names),
        schedules=reader.schedules(names),
        api=reader.api(names),
    )
