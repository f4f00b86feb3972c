"""The synthesized stack deploys into a moto server through CloudFormation, as the sandbox does it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from llmq.config import ApiSizing, LlmqConfig
from llmq_sandbox.event_sources import ScheduleTimer
from llmq_sandbox.lambda_service import InvocationLog, InvocationResult, Outcome
from llmq_sandbox.moto_deploy import MotoDeployError, MotoDeployment, deploy_to_moto, moto_session
from llmq_sandbox.topology import Topology, read_topology
from stacks.functions import FUNCTION_NAMES
from stacks.template import StackTemplate
from tests.infra.synthesis import ENV_MODELS

REGION = "us-east-1"
# Moto skips the resource types it does not model (alarms, policies, API Gateway stages); expected.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse .* not supported by moto:UserWarning")
CONFIG = LlmqConfig()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    try:
        yield f"http://localhost:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def deployment(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> MotoDeployment:
    outdir = str(tmp_path_factory.mktemp("cdk-sandbox"))
    return deploy_to_moto(moto_endpoint, CONFIG, region=REGION, outdir=outdir)


@pytest.fixture(scope="module")
def aws(moto_endpoint: str) -> Any:
    session = moto_session(REGION)
    return lambda service: session.client(service, endpoint_url=moto_endpoint)


def _queue_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def test_the_endpoint_must_be_localhost():
    with pytest.raises(MotoDeployError, match="localhost"):
        deploy_to_moto("http://127.0.0.1:5000", CONFIG)


def test_the_stack_is_created_and_its_outputs_name_what_exists(deployment, aws):
    stack = aws("cloudformation").describe_stacks(StackName=deployment.stack_name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    tables = set(aws("dynamodb").list_tables()["TableNames"])
    assert {deployment.outputs["JobsTableName"], deployment.outputs["TenantsTableName"]} <= tables
    assert deployment.outputs["ApiUrl"].startswith("https://")
    assert set(deployment.function_names()) == set(FUNCTION_NAMES)


def test_the_sandbox_template_has_no_bootstrap_rule_and_disposable_state(deployment):
    assert "Rules" not in deployment.template
    assert "BootstrapVersion" not in deployment.template.get("Parameters", {})
    tables = StackTemplate(deployment.template).of_type("AWS::DynamoDB::Table")
    assert tables
    for resource in tables.values():
        assert resource["DeletionPolicy"] == "Delete"


def test_lane_queues_exist_with_their_redrive_to_their_own_dlq(deployment, aws):
    sqs = aws("sqs")
    existing = {_queue_name(url): url for url in sqs.list_queues()["QueueUrls"]}
    dlq_arns = []
    for lane in CONFIG.lanes:
        url = existing[_queue_name(deployment.lane_queue_urls()[lane.name])]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        redrive = json.loads(attributes["RedrivePolicy"])
        assert int(redrive["maxReceiveCount"]) == CONFIG.max_receive_count
        assert int(attributes["VisibilityTimeout"]) == CONFIG.lane_visibility_timeout_seconds
        dlq_name = redrive["deadLetterTargetArn"].rsplit(":", 1)[-1]
        assert dlq_name == _queue_name(deployment.outputs[f"LaneDlqUrl{lane.name.capitalize()}"])
        assert dlq_name in existing
        dlq_arns.append(redrive["deadLetterTargetArn"])
    assert len(set(dlq_arns)) == len(CONFIG.lanes)


def test_jobs_table_exists_with_both_indexes(deployment, aws):
    table = aws("dynamodb").describe_table(TableName=deployment.outputs["JobsTableName"])["Table"]
    assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert {index["IndexName"] for index in table["GlobalSecondaryIndexes"]} == {"by_tenant", "by_sweep"}


@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_each_function_exists_with_an_environment_its_handler_accepts(deployment, aws, name):
    # Given the function as moto holds it, with every CloudFormation token resolved
    function = aws("lambda").get_function(FunctionName=deployment.function_names()[name])
    environ = function["Configuration"]["Environment"]["Variables"]

    # When its handler would load the environment at cold start
    loaded = ENV_MODELS[name].load(environ, function_name=name)

    # Then it validates and names resources that exist
    assert loaded.config == CONFIG
    queue_names = {_queue_name(url) for url in aws("sqs").list_queues()["QueueUrls"]}
    for variable in ("lane_queue_urls",):
        for url in getattr(loaded, variable, {}).values():
            assert _queue_name(url) in queue_names
    if hasattr(loaded, "webhook_queue_url"):
        assert _queue_name(loaded.webhook_queue_url) in queue_names
    if hasattr(loaded, "jobs_table"):
        assert loaded.jobs_table == deployment.outputs["JobsTableName"]


def test_worker_mappings_carry_each_lanes_maximum_concurrency(deployment, aws):
    worker = deployment.function_names()["worker"]
    mappings = aws("lambda").list_event_source_mappings(FunctionName=worker)["EventSourceMappings"]
    by_queue = {mapping["EventSourceArn"].rsplit(":", 1)[-1]: mapping for mapping in mappings}
    for lane in CONFIG.lanes:
        mapping = by_queue[_queue_name(deployment.lane_queue_urls()[lane.name])]
        assert mapping["ScalingConfig"]["MaximumConcurrency"] == lane.max_concurrency
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert len(mappings) == len(CONFIG.lanes)


def _sandbox_topology(deployment: MotoDeployment, aws: Any, region: str = REGION) -> Topology:
    """The topology `sandbox up` reads from a deployed stack."""
    functions = StackTemplate(deployment.template).of_type("AWS::Lambda::Function")
    deployed = {
        logical_id: aws("lambda").get_function_configuration(FunctionName=physical_id)
        for logical_id, physical_id in deployment.physical_ids.items()
        if logical_id in functions
    }
    account = aws("sts").get_caller_identity()["Account"]
    return read_topology(deployment.template, deployment.physical_ids, deployed, account, region)


def test_the_sandbox_plays_every_mapping_with_its_template_maximum_concurrency(deployment, aws):
    # Given the stack deployed into moto, When the sandbox reads its topology as `sandbox up` does
    template = StackTemplate(deployment.template)
    topology = _sandbox_topology(deployment, aws)

    # Then every poller gets the mapping's own bound, the dispatcher's from the webhook config
    by_id = {mapping.logical_id: mapping for mapping in topology.mappings}
    for logical_id, resource in template.of_type("AWS::Lambda::EventSourceMapping").items():
        scaling = resource["Properties"]["ScalingConfig"]
        assert by_id[logical_id].max_concurrency == scaling["MaximumConcurrency"], logical_id
    (dispatcher,) = [m for m in topology.mappings if m.function == "webhook_dispatcher"]
    assert dispatcher.max_concurrency == CONFIG.webhooks.max_concurrency


class _FailingRuns:
    """The sandbox's Lambda service, as far as a schedule uses it, whose every run raises."""

    def __init__(self) -> None:
        self.invocations = InvocationLog()

    def invoke(self, function: str, event: dict[str, Any]) -> InvocationResult:
        error = {"errorMessage": "sweep failed", "errorType": "RuntimeError"}
        return InvocationResult(function=function, request_id="req-1", outcome=Outcome.ERROR, error=error)


def test_a_failed_reconciler_run_sends_lambdas_on_failure_record_to_its_failures_queue(deployment, aws):
    # Given the sandbox's schedule of the reconciler, as `sandbox up` reads it
    topology = _sandbox_topology(deployment, aws)
    (schedule,) = topology.schedules
    assert schedule.on_failure_url == deployment.outputs["ReconcilerFailuresUrl"]
    # When a run fails
    timer = ScheduleTimer(schedule, _FailingRuns(), topology.account, REGION, 3600, sqs=aws("sqs"))  # type: ignore[arg-type]
    timer.run_once()
    # Then its record waits in the failures queue, as Lambda sends it there, where `llmq dlq
    # list --peek` shows it (review 272: the sandbox never filled it)
    (message,) = aws("sqs").receive_message(QueueUrl=schedule.on_failure_url, WaitTimeSeconds=1)["Messages"]
    record = json.loads(message["Body"])
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["requestPayload"]["detail-type"] == "Scheduled Event"
    assert record["responsePayload"]["errorType"] == "RuntimeError"


def test_an_on_failure_record_sqs_refuses_is_dropped_and_the_schedule_goes_on(deployment, aws):
    # Given an OnFailure queue SQS refuses (it no longer exists)
    topology = _sandbox_topology(deployment, aws)
    (schedule,) = topology.schedules
    gone = dataclasses.replace(schedule, on_failure_url=f"{schedule.on_failure_url}-gone")
    runs = _FailingRuns()
    timer = ScheduleTimer(gone, runs, topology.account, REGION, 3600, sqs=aws("sqs"))  # type: ignore[arg-type]
    # When a run fails, then the tick ends (its thread would have died, and the schedule with it)
    # with the run recorded, as Lambda drops a record it cannot deliver
    assert timer.run_once().outcome is Outcome.ERROR
    assert [record.outcome for record in runs.invocations.records()] == ["error"]


@pytest.mark.parametrize(
    ("api", "region"),
    [(ApiSizing(snap_start=True), "eu-west-1"), (ApiSizing(provisioned_environments=2), "eu-west-2")],
    ids=["snap-start", "provisioned"],
)
def test_with_snap_start_or_provisioned_environments_the_api_is_invoked_through_its_alias_and_the_sandbox_still_routes_to_it(
    tmp_path: Any, api: ApiSizing, region: str
) -> None:
    # Given the api under SnapStart, or the front door provisioned, deployed as the sandbox
    # deploys (in a region of its own: moto servers of one process share their backends)
    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = f"http://localhost:{port}"
        deployment = deploy_to_moto(endpoint, LlmqConfig(api=api), region=region, outdir=str(tmp_path))
        session = moto_session(region)
        # When the sandbox reads its topology
        topology = _sandbox_topology(
            deployment, lambda service: session.client(service, endpoint_url=endpoint), region
        )
    finally:
        server.stop()
    template = StackTemplate(deployment.template)
    # Then every API route still runs the api function, reached through its alias
    assert {route.function for route in topology.api.routes} == {"api"}
    api_id, _ = template.function("api")
    for method in template.of_type("AWS::ApiGateway::Method").values():
        uri = method["Properties"]["Integration"]["Uri"]
        assert template.referenced(uri, "AWS::Lambda::Alias") is not None
        assert template.invoked_function(uri) == api_id
    # And the authorizer runs its function (through its alias when provisioned), with the
    # template's provisioned environments, which the sandbox starts with it
    assert {authorizer.function for authorizer in topology.api.authorizers.values()} == {"authorizer"}
    provisioned = {name: spec.provisioned_environments for name, spec in topology.functions.items()}
    expected = api.provisioned_environments
    assert provisioned == {name: expected if name in ("api", "authorizer") else 0 for name in provisioned}
