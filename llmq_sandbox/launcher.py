"""The embedded sandbox: moto, the real CDK app deployed into it, and a local runner for it.

`Sandbox.start()`:
1. starts a moto server on 127.0.0.1, in a process of its own with the sandbox's fidelity
   patches (llmq_sandbox/moto_process.py; addressed as http://localhost:PORT: CloudFormation
   in moto resolves a path-style TemplateURL only for localhost), and the fake provider;
2. creates an operator allowed everything (llmq_sandbox/iam.py) and deploys, as that operator,
   the CDK app with the sandbox's LlmqConfig through CloudFormation (llmq_sandbox.moto_deploy),
   so every table, queue, mapping, variable and role is the app's own;
3. reads the functions, mappings, schedule and API from the deployed template and moto,
   assumes each function's execution role and turns moto's IAM checks on, then cold-starts
   one execution environment per function with exactly its environment and its role's
   credentials: a wiring mistake in the CDK app stops the sandbox here, naming the function,
   and a missing grant fails the calls that need it, as on AWS;
4. seeds one enterprise and one free tenant, and starts the webhook receiver, the API
   gateway, a poller per event source mapping and a timer per schedule.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from llmq.config import DispatcherEnvironment, LlmqConfig
from llmq_cli.sandbox_state import OperatorCredentials, SandboxState, TenantCredentials
from llmq_sandbox.config import ProviderChoice, RunnerSettings, sandbox_config
from llmq_sandbox.doubles.fake_provider import FakeProviderServer
from llmq_sandbox.doubles.faults import CallFault, FaultSpecError
from llmq_sandbox.doubles.receiver import WebhookReceiver
from llmq_sandbox.event_sources import DeliveryChaos, QueuePoller, ScheduleTimer
from llmq_sandbox.gateway import ApiGateway, GatewayServer, UsagePlans
from llmq_sandbox.iam import (
    UNCHECKED,
    AwsCredentials,
    assume_roles,
    create_operator,
    set_enforcement,
)
from llmq_sandbox.lambda_service import AwsAccess, FunctionStartError, LambdaService
from llmq_sandbox.moto_process import MotoProcess, MotoSettings
from llmq_sandbox.python_runtime import runtime_notice
from llmq_sandbox.settling import Settler
from llmq_sandbox.topology import Topology, TopologyError, read_topology
from stacks.template import StackTemplate

log = logging.getLogger("llmq.sandbox")
REGION = "us-east-1"
# One tenant per tier of the default lanes; ids are fixed so examples can name them.
SEED_TENANTS = (("ten_acme", "Acme Corp", "enterprise"), ("ten_hobby", "Hobby Hacker", "free"))


# The dispatcher's variable naming the API's public address (`DispatcherEnvironment`).
_PUBLIC_API_URL_VAR = str(DispatcherEnvironment.model_fields["public_api_url"].alias)


def _free_port() -> int:
    """A loopback port free now, for a server started a moment later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SandboxStartError(RuntimeError):
    """The sandbox could not start; the message says which part and why."""


def prepare_process() -> None:
    """What jsii and the CDK need in this process: node 22 from the venv, no telemetry."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(venv_bin) / "node").exists() and not path.startswith(venv_bin + os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + path
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
    os.environ.setdefault("CDK_DISABLE_CLI_TELEMETRY", "true")
    # moto's own warnings and logs are quieted in its process (llmq_sandbox/moto_process.py).
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("botocore").setLevel(logging.WARNING)


@dataclass
class _Running:
    moto: MotoProcess
    endpoint_url: str
    provider: FakeProviderServer | None = None
    functions: LambdaService | None = None
    receiver: WebhookReceiver | None = None
    gateway: GatewayServer | None = None
    pollers: list[QueuePoller] | None = None
    timers: list[ScheduleTimer] | None = None
    settler: Settler | None = None
    cdk_outdir: str | None = None


class Sandbox:
    def __init__(
        self,
        log_dir: Path,
        settings: RunnerSettings | None = None,
        provider: ProviderChoice | None = None,
        config_overrides: dict[str, Any] | None = None,
        region: str = REGION,
    ) -> None:
        self.log_dir = log_dir
        self.settings = settings or RunnerSettings.from_environment()
        self.provider_choice = provider or ProviderChoice.from_environment()
        self._overrides = config_overrides
        self.region = region
        self.config: LlmqConfig | None = None
        self.topology: Topology | None = None
        self.outputs: dict[str, str] = {}
        self.state: SandboxState | None = None
        self._running: _Running | None = None
        self._secrets_cache: tuple[float, dict[str, list[str]]] = (0.0, {})
        self._secrets_lock = threading.Lock()
        self._secrets_client: Any = None
        # Who the sandbox itself acts as in moto: the operator once IAM is on, anyone before.
        self._operator: AwsCredentials = UNCHECKED

    # ---- start ----

    def start(self, pid: int | None = None) -> SandboxState:
        prepare_process()
        try:
            return self._start(pid or os.getpid())
        except Exception:
            self.stop()
            raise

    def _start(self, pid: int) -> SandboxState:
        moto = MotoProcess(
            MotoSettings(
                index_lag_seconds=self.settings.index_lag_seconds,
                # Lane messages carry their tenant as MessageGroupId: deliver them as a fair
                # queue would.
                fair_queues=self.settings.fair_queues,
                enforce_iam=self.settings.enforce_iam,
            )
        )
        running = self._running = _Running(moto=moto, endpoint_url=moto.start())
        # Unchecked until the functions' roles are assumed, whatever INITIAL_NO_AUTH_ACTION_COUNT
        # the environment sets (moto's process inherits this one's).
        set_enforcement(running.endpoint_url, enforced=False)
        if self.settings.enforce_iam:
            self._operator = create_operator(self.client("iam"))
        if self.provider_choice.is_fake:
            running.provider = FakeProviderServer().start()
        provider_url = running.provider.base_url if running.provider else str(self.provider_choice.base_url)
        self.config = sandbox_config(provider_url, self.provider_choice, self._overrides)
        notice = runtime_notice()
        for line in notice.lines():
            (log.info if notice.matches else log.warning)("%s", line)
        log.info("synthesizing the CDK app and deploying it into moto at %s", running.endpoint_url)
        began = time.monotonic()
        deployment = self._deploy(running)
        log.info("stack %s deployed in %.1fs", deployment.stack_name, time.monotonic() - began)
        self.outputs = deployment.outputs
        self._put_provider_key()
        self._disable_moto_mappings()
        self.topology = self._read_topology(deployment)
        role_credentials = self._enforce_iam(self.topology) if self.settings.enforce_iam else None
        # The links in webhook bodies name the API where its clients reach it: the gateway's
        # address, not the execute-api host moto made up, which does not resolve (hunt 296:
        # every batch webhook's results_url, and a large result's result_url, led nowhere).
        gateway_port = _free_port()
        public_api_url = f"http://127.0.0.1:{gateway_port}/{self.topology.api.stage}/"
        for spec in self.topology.functions.values():
            if _PUBLIC_API_URL_VAR in spec.environment:
                spec.environment[_PUBLIC_API_URL_VAR] = public_api_url
        began = time.monotonic()
        running.functions = self._start_functions(self.topology, role_credentials)
        log.info("%d functions cold-started in %.1fs", len(self.topology.functions), time.monotonic() - began)
        tenants = self._seed_tenants()
        running.receiver = WebhookReceiver(self._tenant_secrets).start()
        usage_plans = UsagePlans(
            lambda: self.client("apigateway"), self.topology.api.rest_api_id, self.topology.api.stage
        )
        # With the seeded tenants' keys in their plans.
        usage_plans.read_now()
        gateway = ApiGateway(
            self.topology.api,
            running.functions,
            self.topology.account,
            self.region,
            self.settings,
            usage_plans=usage_plans,
        )
        running.gateway = GatewayServer(gateway, self._introspect, port=gateway_port).start()
        running.pollers = self._start_pollers(self.topology, running.functions)
        running.timers = self._start_timers(self.topology, running.functions)
        # The synthesized app and the runner live as long as the sandbox (llmq_sandbox/settling.py).
        running.settler = Settler().start()
        self.state = SandboxState(
            # As on AWS, the API lives under its stage: https://{id}.execute-api.../prod
            api_url=f"{running.gateway.url}/{self.topology.api.stage}",
            aws_endpoint_url=running.endpoint_url,
            region=self.region,
            provider_url=provider_url,
            receiver_url=running.receiver.base_url,
            pid=pid,
            tenants=tenants,
            aws_credentials=self._operator_credentials(),
        )
        return self.state

    def _enforce_iam(self, topology: Topology) -> dict[str, AwsCredentials]:
        """Each function's session of its role, then IAM checks on every request from now on."""
        assert self._running is not None
        roles = {}
        for name, spec in topology.functions.items():
            if not spec.role_arn:
                raise SandboxStartError(f"function {name} ({spec.physical_name}) has no execution role")
            roles[name] = (spec.role_arn, spec.physical_name)
        # The Lambda service assumes them, not the operator (whom the roles do not trust).
        credentials = assume_roles(self.client("sts"), roles)
        self._running.moto.outlive(
            (session.access_key_id for session in credentials.values() if session.session_token), years=10
        )
        set_enforcement(self._running.endpoint_url, enforced=True)
        log.info(
            "IAM enforced: each function acts with its own role; the operator with %s",
            self._operator.access_key_id,
        )
        return credentials

    def _operator_credentials(self) -> OperatorCredentials | None:
        if self._operator is UNCHECKED:
            return None
        return OperatorCredentials(
            aws_access_key_id=self._operator.access_key_id,
            aws_secret_access_key=self._operator.secret_access_key,
        )

    def _deploy(self, running: _Running) -> Any:
        from llmq_sandbox.moto_deploy import MotoDeployError, deploy_to_moto

        running.cdk_outdir = tempfile.mkdtemp(prefix="llmq-sandbox-cdk-")
        try:
            return deploy_to_moto(
                running.endpoint_url,
                self.config,
                self.region,
                outdir=running.cdk_outdir,
                session=self._session(),
                # Its port is new each boot; the synth cache keeps a placeholder for it.
                run_values={"fake_provider_url": running.provider.base_url} if running.provider else None,
            )
        except MotoDeployError as exc:
            raise SandboxStartError(f"the CDK app did not deploy into moto: {exc}") from exc
        except RuntimeError as exc:  # jsii: a synth error, or cdk-nag's ValidationFailed
            raise SandboxStartError(f"the CDK app did not synthesize: {exc}") from exc

    def _session(self) -> boto3.session.Session:
        return boto3.session.Session(
            region_name=self.region,
            aws_access_key_id=self._operator.access_key_id,
            aws_secret_access_key=self._operator.secret_access_key,
        )

    def client(self, service: str) -> Any:
        """A client acting as the sandbox's operator (the runner plays AWS's own services)."""
        if self._running is None:
            raise RuntimeError("the sandbox is not running")
        return self._session().client(service, endpoint_url=self._running.endpoint_url)  # type: ignore[call-overload]

    def _put_provider_key(self) -> None:
        # The worker reads its provider key from the stack's secret, as deployed; put it there.
        if self.provider_choice.api_key and "ProviderSecretArn" in self.outputs:
            self.client("secretsmanager").put_secret_value(
                SecretId=self.outputs["ProviderSecretArn"], SecretString=self.provider_choice.api_key
            )

    def _disable_moto_mappings(self) -> None:
        """moto consumes a message itself (and tries to run the function in Docker) on every
        SendMessage to a queue with an enabled mapping; the runner's pollers play the mappings."""
        lambda_client = self.client("lambda")
        for page in lambda_client.get_paginator("list_event_source_mappings").paginate():
            for mapping in page["EventSourceMappings"]:
                lambda_client.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)

    def _read_topology(self, deployment: Any) -> Topology:
        lambda_client = self.client("lambda")
        account = self.client("sts").get_caller_identity()["Account"]
        functions = StackTemplate(deployment.template).of_type("AWS::Lambda::Function")
        deployed = {
            logical_id: lambda_client.get_function_configuration(FunctionName=physical_id)
            for logical_id, physical_id in deployment.physical_ids.items()
            if logical_id in functions
        }
        try:
            return read_topology(deployment.template, deployment.physical_ids, deployed, account, self.region)
        except TopologyError as exc:
            raise SandboxStartError(f"the deployed template cannot run here: {exc}") from exc

    def _start_functions(
        self, topology: Topology, role_credentials: dict[str, AwsCredentials] | None
    ) -> LambdaService:
        assert self._running is not None
        functions = LambdaService(
            topology.functions,
            AwsAccess(self._running.endpoint_url, self.region, role_credentials),
            self.log_dir,
            self.settings.default_function_concurrency,
        )
        self._running.functions = functions
        try:
            functions.warm_up()
        except FunctionStartError as exc:
            raise SandboxStartError(f"{exc} (function logs: {self.log_dir})") from exc
        return functions

    def _seed_tenants(self) -> list[TenantCredentials]:
        """As `llmq tenants create` does: each tenant with its key in its tier's usage plan."""
        from llmq.long_polls import LongPolls
        from llmq.shares import ShareRepository
        from llmq.tenants import TenantRepository
        from llmq.usage_plans import ApiGatewayUsagePlans
        from llmq_cli.tenant_limits import TenantLimits

        assert self._running is not None and self.config is not None
        usage_plans = ApiGatewayUsagePlans(
            self.client("apigateway"), json.loads(self.outputs["UsagePlanIds"])
        )
        repository = TenantRepository(
            self.outputs["TenantsTableName"], dynamodb=self.client("dynamodb"), usage_keys=usage_plans
        )
        limits = TenantLimits(
            tenants=repository,
            shares=ShareRepository(self.outputs["JobsTableName"], dynamodb=self.client("dynamodb")),
            polls=LongPolls(self.outputs["JobsTableName"], dynamodb=self.client("dynamodb")),
            usage_plans=usage_plans,
            config=self.config,
        )
        seeded = []
        for tenant_id, name, tier in SEED_TENANTS:
            created = repository.create(name, tier, tenant_id=tenant_id)
            seeded.append(
                TenantCredentials(
                    id=created.tenant.id,
                    name=name,
                    tier=tier,
                    api_key=created.api_key,
                    webhook_secret=created.tenant.webhook_secrets[0],
                    limits=limits.effective(created.tenant.id),
                )
            )
        return seeded

    def _tenant_secrets(self) -> dict[str, list[str]]:
        """Every tenant's current secrets (a rotation or a new tenant shows within a second)."""
        with self._secrets_lock:
            fetched_at, secrets = self._secrets_cache
            if time.monotonic() - fetched_at < 1.0:
                return secrets
            if self._secrets_client is None:  # one client, not a session a second
                self._secrets_client = self.client("dynamodb")
            paginator = self._secrets_client.get_paginator("scan")
            secrets = {}
            for page in paginator.paginate(
                TableName=self.outputs["TenantsTableName"],
                FilterExpression="begins_with(pk, :tenant)",
                ExpressionAttributeValues={":tenant": {"S": "tenant#"}},
            ):
                for item in page["Items"]:
                    secrets[item["pk"]["S"].removeprefix("tenant#")] = [
                        entry["S"] for entry in item.get("webhook_secrets", {}).get("L", [])
                    ]
            self._secrets_cache = (time.monotonic(), secrets)
            return secrets

    def _start_pollers(self, topology: Topology, functions: LambdaService) -> list[QueuePoller]:
        pollers = []
        # The pollers are the Lambda service, so they act as the operator; on AWS the mapping
        # also needs receive, delete and ChangeMessageVisibility in the function's role, which
        # tests/infra checks in the template.
        sqs = self.client("sqs")
        settings = self.settings
        if settings.at_least_once_chaos:
            log.info(
                "at-least-once chaos: duplicates, reordering, partial batches (seed %d)", settings.chaos_seed
            )
        for mapping in topology.mappings:
            if not mapping.enabled:
                continue
            # MaximumConcurrency caps a mapping; without it, it starts at five and scales up.
            # Either way the function's own concurrency throttles it (event_sources.py).
            poller = QueuePoller(
                mapping,
                functions,
                sqs,
                self.region,
                mapping.max_concurrency or settings.default_mapping_concurrency,
                scale_per_minute=0 if mapping.max_concurrency else settings.mapping_scale_per_minute,
                concurrency_limit=mapping.max_concurrency or settings.mapping_concurrency_limit,
                chaos=DeliveryChaos.seeded(settings.chaos_seed, mapping.queue.name)
                if settings.at_least_once_chaos
                else None,
            )
            poller.start()
            pollers.append(poller)
        return pollers

    def _start_timers(self, topology: Topology, functions: LambdaService) -> list[ScheduleTimer]:
        timers = []
        for schedule in topology.schedules:
            if not schedule.enabled:
                continue
            every = self.settings.reconciler_every_seconds or schedule.rate_seconds
            # (as the Lambda service, it sends a failed run's record to its OnFailure queue)
            timer = ScheduleTimer(
                schedule, functions, topology.account, self.region, every, sqs=self.client("sqs")
            )
            timer.start()
            timers.append(timer)
        return timers

    # ---- while running ----

    @property
    def functions(self) -> LambdaService:
        if self._running is None or self._running.functions is None:
            raise RuntimeError("the sandbox is not running")
        return self._running.functions

    @property
    def provider(self) -> FakeProviderServer | None:
        return self._running.provider if self._running else None

    @property
    def receiver(self) -> WebhookReceiver | None:
        return self._running.receiver if self._running else None

    def _introspect(
        self, path: str, query: dict[str, str], method: str = "GET", body: bytes = b""
    ) -> tuple[int, Any] | None:
        if path == "/_sandbox/faults":
            return self._faults_endpoint(method, body)
        if path == "/_sandbox/mappings":
            return self._mappings_endpoint(method, body)
        if path == "/_sandbox/health":
            down = self.down_part()
            if down is not None:
                return 503, {"status": down}
            return 200, {"status": "ok"}
        if path == "/_sandbox/invocations":
            records = self.functions.invocations.records(
                lambda record: (
                    all(
                        query.get(key) in (None, value)
                        for key, value in (
                            ("function", record.function),
                            ("lane", record.lane),
                            ("outcome", record.outcome),
                        )
                    )
                    and (query.get("job_id") is None or query["job_id"] in record.job_ids)
                )
            )
            return 200, {"data": [record.as_dict() for record in records]}
        if path == "/_sandbox/topology" and self.topology is not None:
            return 200, self.describe()
        if path == "/_sandbox/config" and self.config is not None:
            return 200, self.config.model_dump(mode="json")
        return None

    def _faults_endpoint(self, method: str, body: bytes) -> tuple[int, Any]:
        """GET lists the armed call faults, POST arms one, DELETE disarms them all."""
        book = self.functions.faults
        if method == "POST":
            try:
                fault = CallFault.from_request(json.loads(body or b"{}"), set(self.functions.pools))
            except (ValueError, FaultSpecError) as exc:
                return 400, {"message": str(exc)}
            return 201, book.add(fault).as_dict()
        if method == "DELETE":
            book.clear()
        return 200, {"data": book.describe()}

    def _mappings_endpoint(self, method: str, body: bytes) -> tuple[int, Any]:
        """GET lists the SQS event source mappings; POST `{"function", "lane" or "queue",
        "enabled"}` pauses or resumes one's poller, as UpdateEventSourceMapping(Enabled=...)
        does: a test can then queue several messages and have them received as one batch."""
        if method == "POST":
            try:
                request = json.loads(body or b"{}")
                selected = [poller for poller in self.pollers if _names_mapping(request, poller)]
                enabled = request["enabled"]
            except (ValueError, KeyError, TypeError, AttributeError):
                return 400, {"message": 'expected {"function", "lane" or "queue", "enabled": true|false}'}
            if len(selected) != 1 or not isinstance(enabled, bool):
                return 400, {"message": "name exactly one mapping, and enabled as a boolean"}
            if enabled:
                selected[0].resume()
            else:
                selected[0].pause()
        return 200, {
            "data": [
                {
                    "function": poller.mapping.function,
                    "queue": poller.mapping.queue.name,
                    "lane": poller.mapping.queue.lane,
                    "enabled": not poller.paused,
                }
                for poller in self.pollers
            ]
        }

    @property
    def pollers(self) -> list[QueuePoller]:
        return list(self._running.pollers or []) if self._running else []

    def describe(self) -> dict[str, Any]:
        assert self.topology is not None
        return {
            "functions": {
                name: {
                    "physical_name": spec.physical_name,
                    "handler": spec.handler,
                    "code": str(spec.code_dir),
                    "timeout_seconds": spec.timeout_seconds,
                    "reserved_concurrency": spec.reserved_concurrency,
                    "provisioned_environments": spec.provisioned_environments,
                    "environment": sorted(spec.environment),
                }
                for name, spec in self.topology.functions.items()
            },
            "event_source_mappings": [
                {
                    "function": mapping.function,
                    "queue": mapping.queue.name,
                    "lane": mapping.queue.lane,
                    "batch_size": mapping.batch_size,
                    "batching_window_seconds": mapping.batching_window_seconds,
                    "max_concurrency": mapping.max_concurrency,
                    "report_batch_item_failures": mapping.report_batch_item_failures,
                }
                for mapping in self.topology.mappings
            ],
            "schedules": [
                {
                    "function": schedule.function,
                    "expression": schedule.expression,
                    "sandbox_every_seconds": self.settings.reconciler_every_seconds or schedule.rate_seconds,
                }
                for schedule in self.topology.schedules
            ],
            "routes": [
                {
                    "resource": route.resource_path,
                    "method": route.http_method,
                    "function": route.function,
                    "authorizer": route.authorizer is not None,
                }
                for route in self.topology.api.routes
            ],
            "stage": self.topology.api.stage,
            "python": runtime_notice().lines(),
        }

    @property
    def aws_alive(self) -> bool:
        """moto's process is up (everything the sandbox holds lives there), and the Lambda
        service's runtime, without which no function can run (hunt 320: its fork server gone,
        the sandbox answered every request with an error behind a healthy gateway)."""
        return self.down_part() is None

    def down_part(self) -> str | None:
        """What of the sandbox's own processes has exited, or None."""
        running = self._running  # stop() may clear it meanwhile
        if running is None or not running.moto.alive:
            return "the sandbox's moto process exited"
        if running.functions is not None and not running.functions.alive:
            return "the Lambda service's runtime (its fork server) exited"
        return None

    # ---- stop ----

    def stop(self) -> None:
        """Idempotent; leaves no child process and no server thread behind."""
        running, self._running = self._running, None
        if running is None:
            return
        # Everything is asked to stop first, then waited for, so the stop takes one poll
        # interval rather than one per poller.
        waiting: list[QueuePoller | ScheduleTimer] = [*(running.timers or []), *(running.pollers or [])]
        for each in waiting:
            each.request_stop()
        if running.gateway is not None:
            running.gateway.stop()
        for each in waiting:
            each.stop()
        if running.functions is not None:
            running.functions.close()
        for server in (running.receiver, running.provider):
            if server is not None:
                server.stop()
        if running.settler is not None:
            running.settler.stop()
        running.moto.stop()
        if running.cdk_outdir:
            shutil.rmtree(running.cdk_outdir, ignore_errors=True)


def _names_mapping(request: dict[str, Any], poller: QueuePoller) -> bool:
    """`queue`, `lane` and `function` each narrow the choice (a lane's DLQ has its lane too)."""
    mapping = poller.mapping
    named = {"queue": mapping.queue.name, "lane": mapping.queue.lane, "function": mapping.function}
    return all(request[key] == value for key, value in named.items() if key in request)
