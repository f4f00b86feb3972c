"""The job store: the jobs table (with its tenant-listing and reconciler indexes), the tenants
table, and the bucket for inputs and results too large for an item (DESIGN §3.10)."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from llmq.batch_intake import REQUESTS_PREFIX
from llmq.batch_intake import UPLOADS_PREFIX as UPLOADS_PREFIX
from llmq.job_index import SWEEP_INDEX, TENANT_INDEX
from llmq.offload import PARKED_PREFIX as PARKED_PREFIX

# The attribute names below are the ones llmq.jobs writes.
PARTITION_KEY = "pk"
TTL_ATTRIBUTE = "expires_at"
# What the reconciler reads from the sweep index, so that it needs no GetItem per job.
SWEEP_PROJECTION = ["status", "lane", "delivery_status", "deadline_ms"]
# What GET /v1/jobs reads from the tenant index: the attributes JobRecord.to_job shows, and the
# ones a JobRecord needs to validate (request_hash, expires_at). Never the input (up to the
# item's 350 KB), the lease or the write bookkeeping: a GSI copies every projected attribute
# on every write to the item, so projecting ALL doubled the write cost of each claim,
# heartbeat and completion of a large job. The table's own keys (pk) and the index's keys
# (tenant_id, tenant_created) are always projected.
# https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/GSI.html#GSI.Projections
TENANT_PROJECTION = [
    "status",
    "lane",
    "model",
    "request_hash",
    "metadata",
    "created_ms",
    "started_ms",
    "finished_ms",
    "attempts",
    "cancel_requested",
    "result",
    "result_ref",
    "error",
    "webhook_url",
    "webhook_events",
    "delivery_status",
    "delivery_attempts",
    "delivery_last_status_code",
    "delivered_ms",
    "expires_at",
]
# Where llmq.offload keys a job's payloads in the bucket: the api writes inputs and reads
# results, the worker the other way round, so each role is granted its own prefix only.
INPUTS_PREFIX = "inputs/"
RESULTS_PREFIX = "results/"
# Under INPUTS_PREFIX: a batch's requests as JSON Lines, and the files tenants PUT for batches.
BATCH_REQUESTS_PREFIX = REQUESTS_PREFIX
UPLOAD_RETENTION_DAYS = 2


def grant_item_actions(
    table: dynamodb.ITable, grantee: iam.IGrantable, *actions: str, leading_key_prefix: str | None = None
) -> None:
    """Item actions on the table itself, never on its indexes (CDK's Table.grant adds index/*).

    With `leading_key_prefix`, only on items whose partition key starts with it
    (the `dynamodb:LeadingKeys` condition key).
    """
    conditions = (
        {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [f"{leading_key_prefix}*"]}}
        if leading_key_prefix is not None
        else None
    )
    grantee.grant_principal.add_to_principal_policy(
        iam.PolicyStatement(actions=list(actions), resources=[table.table_arn], conditions=conditions)
    )


def grant_index_query(table: dynamodb.ITable, grantee: iam.IGrantable, index_name: str) -> None:
    """Query on one named index: not on the table, not on its other indexes."""
    grantee.grant_principal.add_to_principal_policy(
        iam.PolicyStatement(actions=["dynamodb:Query"], resources=[f"{table.table_arn}/index/{index_name}"])
    )


def grant_objects(bucket: s3.IBucket, grantee: iam.IGrantable, action: str, prefix: str) -> None:
    """One object action under one key prefix of the bucket: no listing, no deletes."""
    grantee.grant_principal.add_to_principal_policy(
        iam.PolicyStatement(actions=[action], resources=[bucket.arn_for_objects(f"{prefix}*")])
    )


class JobsTableConstruct(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        removal_policy: cdk.RemovalPolicy,
        payloads_removal_policy: cdk.RemovalPolicy,
        deletion_protection: bool,
        payload_days: int,
    ) -> None:
        super().__init__(scope, construct_id)
        self.payloads = s3.Bucket(
            self,
            "Payloads",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            # Payloads live as long as their job (`payload_days`: the table's TTL, the longest a
            # late webhook delivery keeps the item past it, and a day of slack). An upload
            # is read within minutes of its batch's 202 (its validated lines are then kept as
            # the batch's parts): kept two days, so what a PUT URL can store, unused, is bounded
            # in time (and in size: the URL is signed for the Content-Length its upload asked for).
            # A batch's results file is a multipart upload: one a second run started and never
            # completed (the first run's was recorded) is aborted after a day.
            lifecycle_rules=[
                s3.LifecycleRule(
                    expiration=cdk.Duration.days(payload_days),
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(1),
                ),
                s3.LifecycleRule(prefix=UPLOADS_PREFIX, expiration=cdk.Duration.days(UPLOAD_RETENTION_DAYS)),
            ],
            removal_policy=payloads_removal_policy,
        )
        self.jobs = self._build_table("Jobs", removal_policy, deletion_protection, ttl=TTL_ATTRIBUTE)
        self.jobs.add_global_secondary_index(
            index_name=TENANT_INDEX,
            partition_key=dynamodb.Attribute(name="tenant_id", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="tenant_created", type=dynamodb.AttributeType.STRING),
            # GET /v1/jobs shows what the Job shows, without a GetItem per listed job.
            projection_type=dynamodb.ProjectionType.INCLUDE,
            non_key_attributes=TENANT_PROJECTION,
        )
        # Sparse: only jobs that may need the reconciler carry sweep_pk.
        self.jobs.add_global_secondary_index(
            index_name=SWEEP_INDEX,
            partition_key=dynamodb.Attribute(name="sweep_pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sweep_at", type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.INCLUDE,
            non_key_attributes=SWEEP_PROJECTION,
        )
        self.tenants = self._build_table("Tenants", removal_policy, deletion_protection, ttl=None)

    def _build_table(
        self, construct_id: str, removal_policy: cdk.RemovalPolicy, deletion_protection: bool, ttl: str | None
    ) -> dynamodb.Table:
        return dynamodb.Table(
            self,
            construct_id,
            partition_key=dynamodb.Attribute(name=PARTITION_KEY, type=dynamodb.AttributeType.STRING),
            # On demand: nothing to pay at rest but storage.
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            time_to_live_attribute=ttl,
            removal_policy=removal_policy,
            deletion_protection=deletion_protection,
        )
