"""`llmq doctor` against moto: a low concurrency quota, a missing bootstrap, an unset provider key,
and an account that is ready. The reservations and the provider secret come from the real app's
synthesized template.

Lambda's GetAccountSettings is the one call answered by botocore's Stubber: moto 5.2 answers it
with a 404 "Not yet implemented", so the quota cannot be set there. Every other call is moto's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from llmq_cli import main as cli
from llmq_cli.doctor import (
    BOOTSTRAP_VERSION_PARAMETER,
    PROVIDER_SECRET_OUTPUT,
    Doctor,
    Finding,
    Verdict,
    exit_code,
    min_bootstrap_version,
    render,
    reservations_from_template,
)
from tests.conftest import REGION
from tests.support.tables import default_app_template

STACK = "Llmq"
DEFAULT_QUOTA = 1000


class Account:
    """A moto account, and what Lambda says about its concurrency."""

    def __init__(self) -> None:
        self.quota = DEFAULT_QUOTA
        self.unreserved = DEFAULT_QUOTA
        self.template = default_app_template().template
        self._session = boto3.session.Session(region_name=REGION)
        # Bound now, so the CLI test can patch Session.client to come here.
        self._make_client = self._session.client

    def client(self, service: str) -> Any:
        client = self._make_client(service)  # type: ignore[call-overload]
        if service == "lambda":
            stubber = Stubber(client)
            limits = {"ConcurrentExecutions": self.quota, "UnreservedConcurrentExecutions": self.unreserved}
            stubber.add_response("get_account_settings", {"AccountLimit": limits, "AccountUsage": {}})
            stubber.activate()
        return client

    def bootstrap(self, version: int = 28) -> None:
        """What `cdk bootstrap` leaves: the CDKToolkit stack, which writes its version parameter."""
        template = {
            "Resources": {
                "CdkBootstrapVersion": {
                    "Type": "AWS::SSM::Parameter",
                    "Properties": {
                        "Name": BOOTSTRAP_VERSION_PARAMETER,
                        "Type": "String",
                        "Value": str(version),
                    },
                }
            }
        }
        self.client("cloudformation").create_stack(StackName="CDKToolkit", TemplateBody=json.dumps(template))

    def deploy(self) -> str:
        """The stack and its provider secret, holding the placeholder the app's template generates,
        with the output that names it. Returns its ARN.

        moto's CloudFormation does not create AWS::SecretsManager::Secret, so the secret is
        created here as CloudFormation would: one version, a random string drawn with the
        template's own GenerateSecretString settings."""
        logical_id = self.template["Outputs"][PROVIDER_SECRET_OUTPUT]["Value"]["Ref"]
        properties = self.template["Resources"][logical_id]["Properties"]
        generate = properties["GenerateSecretString"]
        secrets = self.client("secretsmanager")
        placeholder = secrets.get_random_password(
            PasswordLength=generate["PasswordLength"], ExcludePunctuation=generate["ExcludePunctuation"]
        )["RandomPassword"]
        arn = str(secrets.create_secret(Name="LlmqProviderApiKey", SecretString=placeholder)["ARN"])
        template = {
            "Resources": {"Placeholder": {"Type": "AWS::CloudFormation::WaitConditionHandle"}},
            "Outputs": {PROVIDER_SECRET_OUTPUT: {"Value": arn}},
        }
        self.client("cloudformation").create_stack(StackName=STACK, TemplateBody=json.dumps(template))
        return arn

    def doctor(self, region: str | None = REGION) -> tuple[list[Finding], str, int]:
        doctor = Doctor(
            client=self.client,
            region=region,
            available_regions=self._session.get_available_regions,
            stack=STACK,
            reservations=reservations_from_template(self.template, "the test's template"),
            min_bootstrap=min_bootstrap_version(self.template),
        )
        findings = doctor.run()
        return findings, render(findings, "llmq doctor"), exit_code(findings)


@pytest.fixture
def account() -> Iterator[Account]:
    with mock_aws():
        yield Account()


def _verdicts(findings: list[Finding]) -> dict[str, Verdict]:
    return {finding.check: finding.verdict for finding in findings}


def _reserved_total(account: Account) -> int:
    return reservations_from_template(account.template, "").total


def test_an_account_that_is_ready_passes_every_check(account: Account) -> None:
    # Given a bootstrapped account with the default quota and a deployed stack whose key is set
    account.bootstrap()
    secret = account.deploy()
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    # When the operator runs the doctor
    findings, report, code = account.doctor()
    # Then every check passes, and the deploy may go ahead
    assert set(_verdicts(findings).values()) == {Verdict.OK}
    assert code == 0
    assert report.splitlines()[-1] == "ready to deploy"
    assert f"quota 1000, unreserved 1000; the stack reserves {_reserved_total(account)}" in report
    assert "account 123456789012" in report


def test_a_low_concurrency_quota_fails_with_its_two_fixes(account: Account) -> None:
    # Given a new account whose Lambda quota is 50 (the stack reserves more than it has)
    account.bootstrap()
    account.quota = account.unreserved = 50
    # When the operator runs the doctor
    findings, report, code = account.doctor()
    # Then the concurrency check fails, names the minimum Lambda keeps unreserved, and gives both fixes
    assert _verdicts(findings)["concurrency"] is Verdict.FAIL
    assert code == 1
    line = next(line for line in report.splitlines() if "concurrency:" in line)
    assert line.startswith("  FAIL  concurrency: quota 50, unreserved 50")
    assert "Lambda keeps 100 unreserved, so only 0 can be reserved" in line
    fix = report.splitlines()[report.splitlines().index(line) + 1]
    assert f"ask for a quota of at least {_reserved_total(account) + 100}" in fix
    assert '"concurrency": {"reserve": false}' in fix


def test_a_quota_that_just_fits_passes(account: Account) -> None:
    # Given a quota that leaves exactly 100 unreserved after the stack's reservations
    account.bootstrap()
    account.quota = account.unreserved = _reserved_total(account) + 100
    findings, _, _ = account.doctor()
    assert _verdicts(findings)["concurrency"] is Verdict.OK
    # And one less fails
    account.quota = account.unreserved = _reserved_total(account) + 99
    findings, _, _ = account.doctor()
    assert _verdicts(findings)["concurrency"] is Verdict.FAIL


def test_a_missing_bootstrap_fails_with_the_command_that_fixes_it(account: Account) -> None:
    # Given an account where `cdk bootstrap` never ran
    findings, report, code = account.doctor()
    # Then the bootstrap check fails and names the command for this account and region
    assert _verdicts(findings)["bootstrap"] is Verdict.FAIL
    assert code == 1
    assert "  FAIL  bootstrap: aws://123456789012/us-east-1 is not bootstrapped for the CDK" in report
    assert "        fix: run `npx cdk bootstrap aws://123456789012/us-east-1`" in report


def test_an_old_bootstrap_fails(account: Account) -> None:
    # Given a bootstrap older than the template's CheckBootstrapVersion rule accepts
    account.bootstrap(version=min_bootstrap_version(account.template) - 1)
    findings, report, code = account.doctor()
    assert _verdicts(findings)["bootstrap"] is Verdict.FAIL
    assert code == 1
    assert f"this app needs {min_bootstrap_version(account.template)} or later" in report


def test_an_unset_provider_key_fails_until_the_operator_sets_it(account: Account) -> None:
    # Given a deployed stack whose provider secret still holds the generated placeholder
    account.bootstrap()
    secret = account.deploy()
    # When the operator runs the doctor
    findings, report, code = account.doctor()
    # Then the provider key check fails and shows the command that sets it
    assert _verdicts(findings)["provider key"] is Verdict.FAIL
    assert code == 1
    assert "  FAIL  provider key: the provider secret still holds the placeholder" in report
    assert f"put-secret-value --secret-id {secret} --secret-string" in report
    # And once the key is set, it passes
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    findings, _, code = account.doctor()
    assert _verdicts(findings)["provider key"] is Verdict.OK
    assert code == 0


def test_a_stack_not_deployed_yet_is_a_note_on_setting_the_key_after_the_deploy(account: Account) -> None:
    account.bootstrap()
    findings, report, code = account.doctor()
    assert _verdicts(findings)["provider key"] is Verdict.NOTE
    assert code == 0
    assert "  note  provider key: stack Llmq is not deployed yet" in report
    assert "right after the deploy, before creating tenants" in report


def test_no_region_fails_before_any_call(account: Account) -> None:
    findings, report, code = account.doctor(region=None)
    assert [finding.check for finding in findings] == ["region"]
    assert code == 1
    assert "fix: set one: `export AWS_REGION=eu-west-1`" in report


def test_a_region_that_lacks_a_service_fails(account: Account) -> None:
    findings, report, code = account.doctor(region="xx-nowhere-1")
    assert _verdicts(findings) == {"region": Verdict.FAIL}
    assert "xx-nowhere-1 does not offer lambda" in report
    assert code == 1


def test_the_cli_prints_the_report_and_exits_non_zero(
    account: Account, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    # Given `llmq doctor` run in a checkout whose synthesized template is there, with a low quota
    account.quota = account.unreserved = 50
    template = tmp_path / "Llmq.template.json"
    template.write_text(json.dumps(account.template))
    monkeypatch.setattr(boto3.session.Session, "client", lambda _self, service, **_: account.client(service))
    # When it runs
    code = cli.main(["doctor", "--template", str(template)])
    # Then it prints one line per check and exits 1
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[0] == "llmq doctor: stack Llmq in us-east-1"
    assert "  FAIL  concurrency: quota 50" in out
    assert "  FAIL  bootstrap:" in out
    assert out.splitlines()[-1] == "2 problems found"


def test_with_reservations_off_even_a_quota_below_100_passes(account: Account) -> None:
    # Given an account whose whole quota is 10, and a template that reserves nothing
    account.bootstrap()
    account.quota = account.unreserved = 10
    template = json.loads(json.dumps(account.template))
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Lambda::Function":
            resource["Properties"].pop("ReservedConcurrentExecutions", None)
    account.template = template
    # When the operator runs the doctor
    findings, report, _ = account.doctor()
    # Then the concurrency check passes: nothing needs room, however small the quota
    assert _verdicts(findings)["concurrency"] is Verdict.OK, report
    assert "the stack reserves 0" in report


def test_a_first_create_that_rolled_back_counts_as_not_deployed(account: Account) -> None:
    # Given a stack whose first create failed and rolled back: it exists, with no outputs
    from moto.cloudformation.models import cloudformation_backends

    account.bootstrap()
    account.client("cloudformation").create_stack(
        StackName=STACK,
        TemplateBody=json.dumps({"Resources": {"H": {"Type": "AWS::CloudFormation::WaitConditionHandle"}}}),
    )
    for stack in cloudformation_backends["123456789012"][REGION].stacks.values():
        if stack.name == STACK:
            stack.status = "ROLLBACK_COMPLETE"
    # When the operator runs the doctor before deploying again
    findings, report, code = account.doctor()
    # Then the key check is a note (cdk deploy replaces such a stack), and the deploy may go ahead
    assert _verdicts(findings)["provider key"] is Verdict.NOTE, report
    assert code == 0
