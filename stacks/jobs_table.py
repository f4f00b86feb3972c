"""The job store: the jobs table (with its tenant-listing and reconciler indexes), the tenants
table, and the bucket for inputs and results too large for an item (DESIGN §3.10)."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_s3 as s3
from constructs import Construct

from llmq.job_index import SWEEP_INDEX, TENANT_INDEX

# The attribute names below are the ones llmq.jobs writes.
PARTITION_KEY = "pk"
TTL_ATTRIBUTE = "expires_at"
# What the reconciler reads from the sweep index, so that it needs no GetItem per job.
SWEEP_PROJECTION = ["status", "lane", "delivery_status", "deadline_ms"]


class JobsTableConstruct(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        removal_policy: cdk.RemovalPolicy,
        deletion_protection: bool,
        retention_days: int,
    ) -> None:
        super().__init__(scope, construct_id)
        self.payloads = s3.Bucket(
            self,
            "Payloads",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            # Payloads live as long as their job: the table's TTL plus a day of slack.
            lifecycle_rules=[s3.LifecycleRule(expiration=cdk.Duration.days(retention_days + 1))],
            removal_policy=removal_policy,
        )
        self.jobs = self._build_table("Jobs", removal_policy, deletion_protection, ttl=TTL_ATTRIBUTE)
        self.jobs.add_global_secondary_index(
            index_name=TENANT_INDEX,
            partition_key=dynamodb.Attribute(name="tenant_id", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="tenant_created", type=dynamodb.AttributeType.STRING),
            # GET /v1/jobs returns whole jobs; projecting ALL avoids a GetItem per listed job.
            projection_type=dynamodb.ProjectionType.ALL,
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
