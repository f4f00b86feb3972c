"""The llmq stack: every concern's construct, wired together, plus the outputs the sandbox reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from llmq.batch_results import RESULTS_FILE_PREFIX
from llmq.config import IN_FLIGHT_SETTINGS_METADATA, ApiEnvironment, LlmqConfig
from llmq.telemetry import stack_service_name
from stacks.api import STAGE_NAME, ApiConstruct, ApiLogging
from stacks.bytecode import runtime_interpreter
from stacks.functions import FunctionDefaults, env_var
from stacks.jobs_table import (
    BATCH_REQUESTS_PREFIX,
    INPUTS_PREFIX,
    PARKED_PREFIX,
    RESULTS_PREFIX,
    UPLOADS_PREFIX,
    JobsTableConstruct,
    grant_objects,
)
from stacks.lanes import LanesConstruct, pascal
from stacks.layers import LayersConstruct
from stacks.monitoring import MonitoringConstruct
from stacks.nag_acknowledgments import acknowledge_findings
from stacks.provider_secret import ProviderSecretConstruct
from stacks.reconciler import ReconcilerConstruct
from stacks.webhooks import WebhooksConstruct
from stacks.worker import WorkerConstruct


@dataclass(frozen=True)
class DeploymentSettings:
    """What differs between deployments of the same LlmqConfig (all from CDK context)."""

    stack_name: str = "Llmq"
    # Each is subscribed to the alarm topic by e-mail (and must confirm it within 48 hours).
    alarm_emails: tuple[str, ...] = ()
    # The sandbox deploys into moto: no bootstrap-version rule, stateful resources are disposable,
    # and the dependencies layer is a placeholder (moto never runs Lambda code).
    sandbox: bool = False
    log_level: str = "INFO"
    # Tests only: without it a synth that is not the sandbox's fails unless layers/deps is
    # built and current.
    allow_placeholder_deps_layer: bool = False
    # Off unless opted in: logging needs the account-level API Gateway CloudWatch role.
    api_logging: ApiLogging = field(default_factory=ApiLogging)
    log_retention: logs.RetentionDays = logs.RetentionDays.ONE_MONTH
    # Ship bytecode where a Python of the runtime's version is at hand (stacks/bytecode.py).
    bytecode: bool = True


class LlmqStack(cdk.Stack):
    """One stack, stateful and stateless together; the reason is in stacks/README.md."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: LlmqConfig,
        settings: DeploymentSettings,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="llmq: asynchronous job gateway for long-running LLM requests",
            **kwargs,
        )
        # What the next deploy's preflight must not see lowered, as this one runs it.
        self.template_options.metadata = {IN_FLIGHT_SETTINGS_METADATA: config.in_flight_settings()}
        # The stateful resources outlive the stack. The bucket and the secret are removed when
        # the create that made them rolls back (RetainExceptOnCreate), so a failed first deploy
        # leaves nothing behind; the tables are kept even then, because their deletion
        # protection would make CloudFormation's delete, and so the rollback, fail.
        kept = cdk.RemovalPolicy.DESTROY if settings.sandbox else cdk.RemovalPolicy.RETAIN
        kept_once_created = (
            cdk.RemovalPolicy.DESTROY if settings.sandbox else cdk.RemovalPolicy.RETAIN_ON_UPDATE_OR_DELETE
        )
        self.tables = JobsTableConstruct(
            self,
            "Tables",
            removal_policy=kept,
            payloads_removal_policy=kept_once_created,
            deletion_protection=not settings.sandbox,
            # A job's payloads outlive its item: the retention, and the longest a terminal event's
            # delivery may keep the item past it (a round whose receiver asks the longest
            # Retry-After at each attempt, near the end), and a day.
            payload_days=config.retention_days + math.ceil(config.delivery_keep_seconds / 86_400) + 1,
        )
        self.provider_secret = ProviderSecretConstruct(self, "Provider", removal_policy=kept_once_created)
        self.lanes = LanesConstruct(self, "Lanes", config=config)
        # The sandbox runs the handlers from their sources; a deployment ships bytecode when
        # this machine has a Python of the runtime's version (stacks/bytecode.py).
        bytecode_python = runtime_interpreter() if settings.bytecode and not settings.sandbox else None
        layers = LayersConstruct(
            self,
            "Layers",
            use_placeholder_deps=settings.sandbox,
            require_deps=not (settings.sandbox or settings.allow_placeholder_deps_layer),
            bytecode_python=bytecode_python,
        )
        defaults = FunctionDefaults(
            config=config,
            service=stack_service_name(self.stack_name),
            layers=layers.all,
            log_level=settings.log_level,
            log_retention=settings.log_retention,
            bytecode_python=bytecode_python,
        )
        jobs, tenants = self.tables.jobs, self.tables.tenants
        self.webhooks = WebhooksConstruct(
            self, "Webhooks", config=config, defaults=defaults, jobs_table=jobs, tenants_table=tenants
        )
        self.worker = WorkerConstruct(
            self,
            "Worker",
            config=config,
            defaults=defaults,
            jobs_table=jobs,
            lanes=self.lanes,
            webhook_queue=self.webhooks.queue,
            provider_secret=self.provider_secret.secret,
        )
        self.api = ApiConstruct(
            self,
            "Api",
            config=config,
            defaults=defaults,
            jobs_table=jobs,
            tenants_table=tenants,
            lanes=self.lanes,
            webhook_queue=self.webhooks.queue,
            logging=settings.api_logging,
        )
        self.webhooks.link_public_api(self.api.url)
        # A deploy updates the webhook dispatcher before the functions that store jobs and
        # batches (the api, the worker's batch items): records whose webhook-ids hold their
        # creation (`ids_by_creation`) are then only ever signed by a dispatcher that reads the
        # flag. Updated together, a dispatcher of the release before signed a first attempt
        # under the old id, and the new one its retry under the new: one delivery under two
        # webhook-ids, which a receiver de-duplicating by id acts on twice (hunt 326).
        for function in (self.api.function, self.worker.worker):
            function.node.add_dependency(self.webhooks.dispatcher)
        self.reconciler = ReconcilerConstruct(
            self,
            "Reconciler",
            config=config,
            defaults=defaults,
            jobs_table=jobs,
            lanes=self.lanes,
            webhook_queue=self.webhooks.queue,
        )
        self._link_payloads()
        self.monitoring = MonitoringConstruct(
            self,
            "Monitoring",
            config=config,
            lanes=self.lanes,
            webhook_queue=self.webhooks.queue,
            webhook_dlq=self.webhooks.dlq,
            functions=self.functions,
            alarm_emails=settings.alarm_emails,
            api_name=self.api.rest_api.rest_api_name,
            stage_name=STAGE_NAME,
            tables={"jobs": jobs, "tenants": tenants},
        )
        self._add_outputs()
        acknowledge_findings(self)

    def _link_payloads(self) -> None:
        """The api stores large inputs and reads results; the worker reads inputs, stores results;
        what ends a job without a worker reads a result one parked."""
        bucket = self.tables.payloads
        for function in (self.api.function, self.worker.worker):
            function.add_environment(env_var(ApiEnvironment, "payload_bucket"), bucket.bucket_name)
        # Object reads and writes only, each under its own prefix: no listing, no deletes (the
        # lifecycle rule expires them).
        grant_objects(bucket, self.api.function, "s3:PutObject", INPUTS_PREFIX)
        grant_objects(bucket, self.api.function, "s3:GetObject", RESULTS_PREFIX)
        # A batch's stored requests name the items not written yet in its results.
        grant_objects(bucket, self.api.function, "s3:GetObject", BATCH_REQUESTS_PREFIX)
        # The batch upload form: the api signs PUT URLs under inputs/ (its PutObject above) and
        # reads an upload's size and ETag (HeadObject needs GetObject); the worker validates
        # the file (its GetObject on inputs/) and stores it in parts for the expansion.
        grant_objects(bucket, self.api.function, "s3:GetObject", UPLOADS_PREFIX)
        grant_objects(bucket, self.worker.worker, "s3:GetObject", INPUTS_PREFIX)
        grant_objects(bucket, self.worker.worker, "s3:PutObject", RESULTS_PREFIX)
        grant_objects(bucket, self.worker.worker, "s3:PutObject", BATCH_REQUESTS_PREFIX)
        # A batch's results file is a multipart upload (PutObject); the worker looks whether it
        # was completed (HeadObject needs GetObject) when its upload is gone.
        grant_objects(bucket, self.worker.worker, "s3:GetObject", RESULTS_FILE_PREFIX)
        # A paid result whose write to its job failed waits under results/parked/ (its PutObject
        # is under results/ above) for the job's next attempt, which reads it (llmq.offload).
        grant_objects(bucket, self.worker.worker, "s3:GetObject", PARKED_PREFIX)
        # The reconciler and the dead-letter function end jobs no worker will run again; one
        # whose result an earlier attempt parked is recorded with it instead (llmq.offload).
        for function in (self.reconciler.function, self.worker.dead_letter):
            function.add_environment(env_var(ApiEnvironment, "payload_bucket"), bucket.bucket_name)
            grant_objects(bucket, function, "s3:GetObject", PARKED_PREFIX)

    @property
    def functions(self) -> dict[str, lambda_.Function]:
        return {
            "api": self.api.function,
            "authorizer": self.api.authorizer_function,
            "worker": self.worker.worker,
            "dead_letter": self.worker.dead_letter,
            "webhook_dispatcher": self.webhooks.dispatcher,
            "reconciler": self.reconciler.function,
        }

    def _add_outputs(self) -> None:
        # Our own URL output replaces the RestApi's, which refers to the Stage resource.
        self.api.rest_api.node.try_remove_child("Endpoint")
        outputs: dict[str, str] = {
            "ApiUrl": self.api.url,
            "JobsTableName": self.tables.jobs.table_name,
            "PayloadBucketName": self.tables.payloads.bucket_name,
            "TenantsTableName": self.tables.tenants.table_name,
            "LaneQueueUrls": self.lanes.queue_urls_json(),
            "WebhookQueueUrl": self.webhooks.queue.queue_url,
            "WebhookDlqUrl": self.webhooks.dlq.queue_url,
            "PoisonQueueUrl": self.lanes.poison.queue_url,
            # (failed sweeps' events and errors, for an operator: `llmq dlq list`)
            "ReconcilerFailuresUrl": self.reconciler.failures.queue_url,
            "ProviderSecretArn": self.provider_secret.secret.secret_arn,
            "AlarmTopicArn": self.monitoring.topic.topic_arn,
            "FunctionNames": self.to_json_string(
                {name: function.function_name for name, function in self.functions.items()}
            ),
        }
        for name, lane in self.lanes.lanes.items():
            outputs[f"LaneQueueUrl{pascal(name)}"] = lane.queue.queue_url
            outputs[f"LaneDlqUrl{pascal(name)}"] = lane.dlq.queue_url
        for output_id, value in outputs.items():
            cdk.CfnOutput(self, output_id, value=value)
