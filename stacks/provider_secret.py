"""The provider's API key, kept in Secrets Manager and read by the worker at cold start."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct


class ProviderSecretConstruct(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, removal_policy: cdk.RemovalPolicy) -> None:
        super().__init__(scope, construct_id)
        # Created with a random placeholder value; the operator puts the real key in after the
        # first deploy (README: `aws secretsmanager put-secret-value`), so it never sits in a template.
        self.secret = secretsmanager.Secret(
            self,
            "ApiKey",
            description="llmq: API key of the OpenAI-compatible provider (plain string)",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                exclude_punctuation=True, password_length=32
            ),
            removal_policy=removal_policy,
        )
