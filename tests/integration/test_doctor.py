"""`llmq doctor` and `llmq provider-key set` against moto: a low concurrency quota, a missing
bootstrap, an unset provider key, and an account that is ready. The reservations and the provider
secret come from the real app's synthesized template.

Lambda's GetAccountSettings is the one call answered by botocore's Stubber: moto 5.2 answers it
with a 404 "Not yet implemented", so the quota cannot be set there. Every other call is moto's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from llmq.config import IN_FLIGHT_SETTINGS_METADATA, LlmqConfig
from llmq_cli import main as cli
from llmq_cli.doctor import (
    ALARM_TOPIC_OUTPUT,
    BOOTSTRAP_VERSION_PARAMETER,
    PROVIDER_KEY_ENV,
    PROVIDER_SECRET_OUTPUT,
    Doctor,
    Finding,
    Verdict,
    alarm_emails_in_template,
    bootstrap_version_parameter,
    exit_code,
    in_flight_settings_in_template,
    load_reservations,
    min_bootstrap_version,
    render,
    reservations_from_template,
    stage_logs_through_account_role,
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

    def bootstrap(
        self, version: int = 28, parameter: str = BOOTSTRAP_VERSION_PARAMETER, stack: str = "CDKToolkit"
    ) -> None:
        """What `cdk bootstrap` leaves: the CDKToolkit stack (or `--toolkit-stack-name`'s), which
        writes its version parameter (under its `--qualifier`)."""
        template = {
            "Resources": {
                "CdkBootstrapVersion": {
                    "Type": "AWS::SSM::Parameter",
                    "Properties": {"Name": parameter, "Type": "String", "Value": str(version)},
                }
            }
        }
        self.client("cloudformation").create_stack(StackName=stack, TemplateBody=json.dumps(template))

    def deploy(
        self,
        resources: dict[str, Any] | None = None,
        alarm_topic: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
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
            **({"Metadata": metadata} if metadata else {}),
            "Resources": {
                "Placeholder": {"Type": "AWS::CloudFormation::WaitConditionHandle"},
                **(resources or {}),
            },
            "Outputs": {
                PROVIDER_SECRET_OUTPUT: {"Value": arn},
                **({ALARM_TOPIC_OUTPUT: {"Value": alarm_topic}} if alarm_topic else {}),
            },
        }
        self.client("cloudformation").create_stack(StackName=STACK, TemplateBody=json.dumps(template))
        return arn

    def doctor(
        self, region: str | None = REGION, template: dict[str, Any] | None = None, drained: bool = False
    ) -> tuple[list[Finding], str, int]:
        template_resources = (template or {}).get("Resources", {})
        doctor = Doctor(
            client=self.client,
            region=region,
            available_regions=self._session.get_available_regions,
            stack=STACK,
            reservations=reservations_from_template(self.template, "the test's template"),
            min_bootstrap=min_bootstrap_version(self.template),
            alarm_emails=alarm_emails_in_template(template),
            bootstrap_parameter=bootstrap_version_parameter(self.template),
            stage_logs_through_account_role=stage_logs_through_account_role(
                {"Resources": template_resources}
            ),
            settings=in_flight_settings_in_template(template),
            drained=drained,
        )
        findings = doctor.run()
        return findings, render(findings, "llmq doctor"), exit_code(findings)


@pytest.fixture
def account(monkeypatch: pytest.MonkeyPatch) -> Iterator[Account]:
    # The operator's shell may hold a key: each test says whether there is one.
    monkeypatch.delenv(PROVIDER_KEY_ENV, raising=False)
    with mock_aws():
        yield Account()


def _versions(account: Account, secret: str) -> list[dict[str, Any]]:
    return list(
        account.client("secretsmanager").list_secret_version_ids(SecretId=secret, IncludeDeprecated=True)[
            "Versions"
        ]
    )


def _set_key(account: Account, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """`llmq provider-key set` as the operator runs it, its AWS calls going to moto."""
    monkeypatch.setattr(boto3.session.Session, "client", lambda _self, service, **_: account.client(service))
    return cli.main(["provider-key", "set", *argv])


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


def test_a_bootstrap_of_another_qualifier_or_toolkit_name_is_the_one_checked(account: Account) -> None:
    # Given an app whose cdk.json sets another bootstrap qualifier (its template reads that
    # qualifier's version parameter), and an account bootstrapped with that qualifier under
    # another toolkit stack name, beside an old default bootstrap of another team
    parameter = "/cdk-bootstrap/team42/version"
    account.template = copy.deepcopy(account.template)
    account.template["Parameters"]["BootstrapVersion"]["Default"] = parameter
    account.bootstrap(version=min_bootstrap_version(account.template) - 1)
    account.bootstrap(parameter=parameter, stack="Team42Toolkit")
    # Then the doctor checks the version the deploy will check, and passes
    findings, report, _ = account.doctor()
    assert _verdicts(findings)["bootstrap"] is Verdict.OK, report
    assert parameter in report
    # And with only the default qualifier's bootstrap there, it says the app's is missing, and
    # the fix bootstraps that qualifier (a plain `cdk bootstrap` writes the default one's only)
    account.template["Parameters"]["BootstrapVersion"]["Default"] = "/cdk-bootstrap/other/version"
    findings, report, _ = account.doctor()
    assert _verdicts(findings)["bootstrap"] is Verdict.FAIL
    assert "is not bootstrapped for the CDK" in report
    # into a toolkit stack of its own, never CDKToolkit (another team's, re-qualified, would
    # break every app bootstrapped by it)
    assert (
        "npx cdk bootstrap aws://123456789012/us-east-1 --qualifier other --toolkit-stack-name CDKToolkit-other`"
        in report
    )


def test_the_upgrade_of_another_qualifiers_bootstrap_never_names_cdktoolkit(account: Account) -> None:
    # Given team42's bootstrap, too old for this app, under a toolkit stack of its own, beside
    # another team's CDKToolkit
    parameter = "/cdk-bootstrap/team42/version"
    account.template = copy.deepcopy(account.template)
    account.template["Parameters"]["BootstrapVersion"]["Default"] = parameter
    account.bootstrap()
    account.bootstrap(
        version=min_bootstrap_version(account.template) - 1, parameter=parameter, stack="Team42Toolkit"
    )
    findings, report, _ = account.doctor()
    # Then the upgrade it prints goes to the stack that holds team42's bootstrap (moto cannot
    # name it: said so), never into CDKToolkit, which the qualifier would re-qualify
    assert _verdicts(findings)["bootstrap"] is Verdict.FAIL
    fix = next(line for line in report.splitlines() if "npx cdk bootstrap" in line)
    assert (
        "--qualifier team42 --toolkit-stack-name <the stack that holds /cdk-bootstrap/team42/version>" in fix
    )
    assert "--toolkit-stack-name CDKToolkit" not in fix


def test_an_old_bootstrap_fails(account: Account) -> None:
    # Given a bootstrap older than the template's CheckBootstrapVersion rule accepts
    account.bootstrap(version=min_bootstrap_version(account.template) - 1)
    findings, report, code = account.doctor()
    assert _verdicts(findings)["bootstrap"] is Verdict.FAIL
    assert code == 1
    assert f"this app needs {min_bootstrap_version(account.template)} or later" in report


def test_an_unset_provider_key_fails_until_the_operator_sets_it(
    account: Account, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a deployed stack whose provider secret still holds the generated placeholder
    account.bootstrap()
    secret = account.deploy()
    # When the operator runs the doctor
    findings, report, code = account.doctor()
    # Then the provider key check fails and shows the command that sets it
    assert _verdicts(findings)["provider key"] is Verdict.FAIL
    assert code == 1
    assert "  FAIL  provider key: the provider secret still holds the placeholder" in report
    assert "fix: set the key: `LLMQ_PROVIDER_API_KEY=... llmq provider-key set --stack Llmq`" in report
    # When the operator runs that command with the key in the environment
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real-key")
    assert _set_key(account, monkeypatch, "--stack", STACK) == 0
    # Then the secret holds the key as a second version, and nothing printed the key
    assert len(_versions(account, secret)) == 2
    value = account.client("secretsmanager").get_secret_value(SecretId=secret)["SecretString"]
    assert value == "sk-real-key"
    out, err = capsys.readouterr()
    assert f"provider key stored in {secret}" in out
    assert "sk-real-key" not in out + err
    # And the doctor passes, with or without the variable
    monkeypatch.delenv(PROVIDER_KEY_ENV)
    findings, _, code = account.doctor()
    assert _verdicts(findings)["provider key"] is Verdict.OK
    assert code == 0


def test_setting_the_key_without_the_variable_is_a_clear_error_and_writes_nothing(
    account: Account, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a deployed stack on its placeholder, and no LLMQ_PROVIDER_API_KEY (or an empty one)
    secret = account.deploy()
    for environment in (None, "  "):
        if environment is not None:
            monkeypatch.setenv(PROVIDER_KEY_ENV, environment)
        # When the operator runs the command
        code = _set_key(account, monkeypatch, "--stack", STACK)
        # Then it fails naming the variable, and the secret is untouched
        assert code == 1
        err = capsys.readouterr().err
        assert err.startswith("llmq: $LLMQ_PROVIDER_API_KEY is not set (or empty)")
        assert "never taken from the command line" in err
        assert len(_versions(account, secret)) == 1


@pytest.mark.parametrize(
    "pasted", ["sk-proj-abc123\u200bdef456", "\u201csk-proj-abc123def456\u201d", "sk-proj-abc123 def456"]
)
def test_a_key_no_header_can_carry_is_refused_unstored_and_the_doctor_fails_it(
    account: Account, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], pasted: str
) -> None:
    # Given a key pasted with a zero-width space, curly quotes, or wrapped over two lines
    monkeypatch.setenv(PROVIDER_KEY_ENV, pasted)
    # Then a first deploy's preflight fails it (the worker would refuse to send it: hunt 298)
    account.bootstrap()
    findings, _, _ = account.doctor()
    assert _verdicts(findings)["provider key"] is Verdict.FAIL
    # And when the stack is deployed, setting it fails, never naming it, and stores nothing
    secret = account.deploy()
    assert _set_key(account, monkeypatch, "--stack", STACK) == 1
    err = capsys.readouterr().err
    assert "no HTTP header can carry" in err and pasted.strip() not in err
    assert len(_versions(account, secret)) == 1


def test_setting_the_key_of_a_stack_that_is_not_there_is_a_clear_error(
    account: Account, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real-key")
    # Given no stack of that name
    assert _set_key(account, monkeypatch, "--stack", "Elsewhere") == 1
    assert "llmq: stack Elsewhere is not deployed in this account and region" in capsys.readouterr().err
    # Given a stack without the provider secret's output
    account.client("cloudformation").create_stack(
        StackName="NotLlmq",
        TemplateBody=json.dumps({"Resources": {"H": {"Type": "AWS::CloudFormation::WaitConditionHandle"}}}),
    )
    assert _set_key(account, monkeypatch, "--stack", "NotLlmq") == 1
    err = capsys.readouterr().err
    assert f"llmq: stack NotLlmq has no {PROVIDER_SECRET_OUTPUT} output" in err
    assert "sk-real-key" not in err
    assert account.client("secretsmanager").list_secrets()["SecretList"] == []


def test_a_stack_not_deployed_yet_fails_unless_the_key_is_in_the_environment(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a bootstrapped account where the stack was never deployed, and no key in the environment
    account.bootstrap()
    findings, report, code = account.doctor()
    # Then the doctor refuses: the stack would go live with the placeholder
    assert _verdicts(findings)["provider key"] is Verdict.FAIL
    assert code == 1
    assert (
        "  FAIL  provider key: stack Llmq is not deployed yet and $LLMQ_PROVIDER_API_KEY is not set" in report
    )
    assert "fix: export LLMQ_PROVIDER_API_KEY" in report
    assert "run `make deploy` again: it sets the key right after `cdk deploy`" in report
    # Given the key in the environment
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real-key")
    findings, report, code = account.doctor()
    # Then the deploy may go ahead: make deploy sets the key right after it
    assert _verdicts(findings)["provider key"] is Verdict.OK
    assert code == 0
    assert "the key will be set right after the deploy" in report
    assert "sk-real-key" not in report


def test_a_deployed_placeholder_with_the_key_in_the_environment_lets_make_deploy_set_it(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a deployed stack on its placeholder, and the key in the environment
    account.bootstrap()
    account.deploy()
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real-key")
    findings, report, code = account.doctor()
    # Then the doctor notes it rather than stopping `make deploy`, which sets it after the deploy
    assert _verdicts(findings)["provider key"] is Verdict.NOTE
    assert code == 0
    assert "`make deploy` sets it right after the deploy" in report


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
    assert "  FAIL  provider key: stack Llmq is not deployed yet" in out
    assert out.splitlines()[-1] == "3 problems found"


def _reserving_nothing(account: Account, quota: int) -> dict[str, Any]:
    """The account's whole quota is `quota`, and its template reserves nothing."""
    account.bootstrap()
    account.quota = account.unreserved = quota
    template = json.loads(json.dumps(account.template))
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Lambda::Function":
            resource["Properties"].pop("ReservedConcurrentExecutions", None)
    account.template = template
    return template


def test_with_reservations_off_a_quota_below_the_mappings_deploys_with_a_note(account: Account) -> None:
    # Given an account whose whole quota is 10, and a template that reserves nothing
    template = _reserving_nothing(account, 10)
    # When the operator runs the doctor
    findings, report, _ = account.doctor()
    # Then the deploy is not held back (nothing needs room, however small the quota), but the
    # doctor says that the queue consumers alone can take the whole pool under a backlog
    mapped = sum(
        resource["Properties"]["ScalingConfig"]["MaximumConcurrency"]
        for resource in template["Resources"].values()
        if resource["Type"] == "AWS::Lambda::EventSourceMapping"
    )
    assert mapped >= 10
    assert _verdicts(findings)["concurrency"] is Verdict.NOTE, report
    assert "the stack reserves 0" in report
    assert f"can run {mapped} at once, and the account's pool is 10" in report
    assert "100 stay" not in report


def test_with_reservations_off_a_pool_larger_than_the_mappings_passes(account: Account) -> None:
    # Given an account whose pool is larger than the queue consumers' mappings together
    _reserving_nothing(account, 1000)
    # When the operator runs the doctor, then the concurrency check passes
    findings, report, _ = account.doctor()
    assert _verdicts(findings)["concurrency"] is Verdict.OK, report
    assert "all 1000 stay shared" in report


def test_before_a_synth_reservations_off_in_an_account_of_10_gets_the_note_from_the_config(
    account: Account, tmp_path: Path
) -> None:
    # Given an account whose whole quota is 10, a cdk.json that turns the reservations off,
    # and no synthesized template yet (the doctor run on its own, before `make synth`)
    account.bootstrap()
    account.quota = account.unreserved = 10
    cdk_json = tmp_path / "cdk.json"
    cdk_json.write_text(json.dumps({"context": {"llmq": {"concurrency": {"reserve": False}}}}))
    reservations, template = load_reservations(STACK, tmp_path / "missing.template.json", cdk_json)
    assert template is None
    # When the doctor checks the concurrency
    doctor = Doctor(
        client=account.client,
        region=REGION,
        available_regions=lambda service: [REGION],
        stack=STACK,
        reservations=reservations,
    )
    finding = doctor.check_concurrency(deployed=False)
    # Then it says, as from a template, what the config's mappings can take of the pool
    assert finding.verdict is Verdict.NOTE, finding.message
    assert f"can run {LlmqConfig().mapped_concurrency} at once" in finding.message


def test_a_first_create_that_rolled_back_counts_as_not_deployed(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    # When the operator runs the doctor before deploying again, with the key in the environment
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real-key")
    findings, report, code = account.doctor()
    # Then it is checked as a stack to create (cdk deploy replaces it), and the deploy may go ahead
    assert _verdicts(findings)["provider key"] is Verdict.OK, report
    assert "is not deployed yet" in report
    assert code == 0


def _subscribing(*addresses: str) -> dict[str, Any]:
    """A template that subscribes `addresses` to its alarm topic, as `-c alarm_email=` makes it."""
    return {
        "Resources": {
            f"Subscription{index}": {
                "Type": "AWS::SNS::Subscription",
                "Properties": {
                    "Protocol": "email",
                    "Endpoint": address,
                    "TopicArn": "arn:aws:sns:us-east-1:123456789012:llmq-alarms",
                },
            }
            for index, address in enumerate(addresses)
        }
    }


def test_a_deploy_that_would_unsubscribe_the_on_call_address_fails_naming_it(account: Account) -> None:
    # Given a deployed stack that e-mails its alarms to the on-call address, its key set
    # (moto's CloudFormation keeps the template, though it makes no subscription of it)
    account.bootstrap()
    secret = account.deploy(resources=_subscribing("OnCall@example.com")["Resources"])
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    # When the operator deploys again without ALARM_EMAIL (a template with no subscription),
    # or with the address spelt otherwise (another logical id: another subscription)
    for template in (_subscribing(), _subscribing("oncall@example.com")):
        findings, report, code = account.doctor(template=template)
        # Then the preflight stops the deploy, naming the address as deployed, and how to keep it
        assert _verdicts(findings)["alarm email"] is Verdict.FAIL, report
        assert "would unsubscribe OnCall@example.com" in report
        assert "ALARM_EMAIL=OnCall@example.com" in report
        assert code == 1
    # And with the address passed again, the deploy may go ahead
    findings, report, code = account.doctor(template=_subscribing("OnCall@example.com"))
    assert _verdicts(findings)["alarm email"] is Verdict.OK, report
    assert code == 0


def test_an_address_subscribed_by_hand_never_stops_a_deploy(account: Account) -> None:
    # Given a deployed stack that subscribes the on-call address, and a second address an
    # operator subscribed by hand (`aws sns subscribe`, as docs/operations.md shows)
    account.bootstrap()
    sns = account.client("sns")
    topic = sns.create_topic(Name="llmq-alarms")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="email", Endpoint="you@example.com")
    secret = account.deploy(resources=_subscribing("oncall@example.com")["Resources"])
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    # When the operator deploys with the stack's address, then nothing stops it: no deploy
    # removes a subscription the stack did not make
    findings, report, code = account.doctor(template=_subscribing("oncall@example.com"))
    assert _verdicts(findings)["alarm email"] is Verdict.OK, report
    assert code == 0


def test_a_stack_nobody_is_subscribed_to_deploys_with_a_note(account: Account) -> None:
    # Given a deployed stack that subscribes nobody, and a template with nobody
    account.bootstrap()
    secret = account.deploy()
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    # When the operator runs the doctor, then it goes ahead, saying that nobody hears the alarms
    findings, report, code = account.doctor(template=_subscribing())
    assert _verdicts(findings)["alarm email"] is Verdict.NOTE, report
    assert "subscribes nobody to the alarms" in report
    assert code == 0


def _stack_is(name: str, status: str) -> None:
    from moto.cloudformation.models import cloudformation_backends

    for stack in cloudformation_backends["123456789012"][REGION].stacks.values():
        if stack.name == name:
            stack.status = status


def test_a_bootstrap_whose_upgrade_rolled_back_still_works_and_passes(account: Account) -> None:
    # Given a CDKToolkit whose upgrade failed and rolled back to its working version
    account.bootstrap()
    _stack_is("CDKToolkit", "UPDATE_ROLLBACK_COMPLETE")
    secret = account.deploy()
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    # Then the doctor lets the deploy go ahead
    findings, report, code = account.doctor()
    assert _verdicts(findings)["bootstrap"] is Verdict.OK, report
    assert code == 0


@pytest.mark.parametrize(
    ("status", "fix"),
    [("UPDATE_ROLLBACK_FAILED", "continue-update-rollback"), ("UPDATE_IN_PROGRESS", "wait until it ends")],
)
def test_a_stack_cloudformation_will_not_update_fails_before_the_deploy(
    account: Account, status: str, fix: str
) -> None:
    # Given a deployed stack stuck in a state CloudFormation refuses to update
    account.bootstrap()
    secret = account.deploy()
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    _stack_is(STACK, status)
    # Then the doctor says so, with what to do, instead of "ready to deploy"
    findings, report, code = account.doctor()
    assert _verdicts(findings)["stack"] is Verdict.FAIL, report
    assert status in report and fix in report
    assert code != 0


def test_a_change_set_never_run_counts_as_not_deployed(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a first deploy cut short after its change set was made (`cdk deploy --no-execute`):
    # the stack sits in REVIEW_IN_PROGRESS, which never ends by itself
    account.bootstrap()
    account.client("cloudformation").create_change_set(
        StackName=STACK,
        ChangeSetName="cdk-deploy-change-set",
        ChangeSetType="CREATE",
        TemplateBody=json.dumps({"Resources": {"H": {"Type": "AWS::CloudFormation::WaitConditionHandle"}}}),
    )
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real-key")
    # Then the doctor lets `cdk deploy` create it from there
    findings, report, code = account.doctor()
    assert _verdicts(findings)["stack"] is Verdict.OK, report
    assert code == 0, report


def _deployed_with_topic(account: Account, *addresses: str) -> str:
    """A deployed stack, its key set, whose template subscribes `addresses` to its alarm topic,
    with the topic's output. moto's CloudFormation makes no subscription of the template's:
    SNS holds none until the test makes one. Returns the topic's ARN."""
    account.bootstrap()
    topic = str(account.client("sns").create_topic(Name="Llmq-MonitoringAlarmTopic")["TopicArn"])
    secret = account.deploy(resources=_subscribing(*addresses)["Resources"], alarm_topic=topic)
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    return topic


def test_an_address_sns_no_longer_holds_fails_with_the_command_that_subscribes_it(account: Account) -> None:
    # Given a deployed stack whose template subscribes the on-call address, and SNS holds no
    # subscription of it (the confirmation mail was not clicked within 48 hours, so SNS deleted
    # it; the stack still lists it, so a deploy of the same address never makes it again)
    topic = _deployed_with_topic(account, "oncall@example.com")
    # When the operator runs the preflight of the next deploy, with the same address
    findings, report, code = account.doctor(template=_subscribing("oncall@example.com"))
    # Then it stops the deploy: the alarms reach nobody, and it says how to subscribe again
    assert _verdicts(findings)["alarm email"] is Verdict.FAIL, report
    assert "SNS holds no subscription of oncall@example.com" in report
    assert (
        f"aws sns subscribe --topic-arn {topic} --protocol email --notification-endpoint oncall@example.com"
        in report
    )
    assert code == 1
    # And once the address is subscribed again (moto confirms at once), the deploy may go ahead
    account.client("sns").subscribe(TopicArn=topic, Protocol="email", Endpoint="oncall@example.com")
    findings, report, code = account.doctor(template=_subscribing("oncall@example.com"))
    assert _verdicts(findings)["alarm email"] is Verdict.OK, report
    assert code == 0


def _listed_as(account: Account, state: str) -> None:
    """SNS's listing of the alarm topic's subscriptions rewritten to `state` ("PendingConfirmation"
    before a confirmation, "Deleted" for days after an unsubscribe): moto confirms every
    subscription at once and deletes an unsubscribed one outright."""
    sns = account.client("sns")

    def rewritten(parsed: dict[str, Any], **_: Any) -> None:
        for subscription in parsed.get("Subscriptions", []):
            subscription["SubscriptionArn"] = state

    sns.meta.events.register("after-call.sns.ListSubscriptionsByTopic", rewritten)
    account.client = lambda service: sns if service == "sns" else Account.client(account, service)  # type: ignore[method-assign]


def test_an_address_yet_to_confirm_deploys_with_a_note_of_the_48_hours(account: Account) -> None:
    # Given a deployed stack whose on-call address has not clicked its confirmation mail
    topic = _deployed_with_topic(account, "oncall@example.com")
    account.client("sns").subscribe(TopicArn=topic, Protocol="email", Endpoint="oncall@example.com")
    _listed_as(account, "PendingConfirmation")
    # When the operator runs the preflight
    findings, report, code = account.doctor(template=_subscribing("oncall@example.com"))
    # Then the deploy may go ahead, and the report says the alarms reach nobody until it is confirmed
    assert _verdicts(findings)["alarm email"] is Verdict.NOTE, report
    assert "oncall@example.com has not confirmed its subscription" in report
    assert "48 hours" in report
    assert code == 0


def test_an_address_that_unsubscribed_fails_as_one_sns_no_longer_holds(account: Account) -> None:
    # Given a deployed stack whose on-call address unsubscribed (a mail scanner followed the link
    # in an alarm mail): SNS lists the subscription as "Deleted" for days
    topic = _deployed_with_topic(account, "oncall@example.com")
    account.client("sns").subscribe(TopicArn=topic, Protocol="email", Endpoint="oncall@example.com")
    _listed_as(account, "Deleted")
    # When the operator runs the preflight, then it stops the deploy: the alarms reach nobody there
    findings, report, code = account.doctor(template=_subscribing("oncall@example.com"))
    assert _verdicts(findings)["alarm email"] is Verdict.FAIL, report
    assert "SNS holds no subscription of oncall@example.com" in report
    assert code == 1


def test_a_first_deploy_that_subscribes_nobody_gets_the_note(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a fresh account, the key in the environment, and a template without ALARM_EMAIL
    account.bootstrap()
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real")
    # When the operator runs the preflight of the first deploy
    findings, report, code = account.doctor(template=_subscribing())
    # Then it says, as of any deploy of such a template, that nobody hears the alarms
    assert _verdicts(findings)["alarm email"] is Verdict.NOTE, report
    assert "subscribes nobody to the alarms" in report
    assert code == 0
    # And a first deploy with an address is told to confirm its mail
    findings, report, code = account.doctor(template=_subscribing("oncall@example.com"))
    assert _verdicts(findings)["alarm email"] is Verdict.OK, report
    assert "within 48 hours" in report


def _logging_stage() -> dict[str, Any]:
    """A stage that logs as `-c llmq:apigw_logging=true` synthesizes it (tests/infra checks the
    synthesized one): access logs and ERROR execution logs, through the region's role."""
    return {
        "Stage": {
            "Type": "AWS::ApiGateway::Stage",
            "Properties": {
                "AccessLogSetting": {"DestinationArn": "arn:aws:logs:us-east-1:123456789012:log-group:x"},
                "MethodSettings": [{"HttpMethod": "*", "ResourcePath": "/*", "LoggingLevel": "ERROR"}],
            },
        }
    }


def test_a_stage_that_logs_fails_the_preflight_where_api_gateway_has_no_cloudwatch_role(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a fresh account whose API Gateway names no CloudWatch role (the stage's create would
    # fail "CloudWatch Logs role ARN must be set in account settings to enable logging", and the
    # first create roll back), the key in the environment, and a template whose stage logs
    account.bootstrap()
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-real")
    template = {"Resources": {**_subscribing("oncall@example.com")["Resources"], **_logging_stage()}}
    # When the operator runs the preflight
    findings, report, code = account.doctor(template=template)
    # Then it stops the deploy, naming both ways to give the region its role
    assert _verdicts(findings)["api logging"] is Verdict.FAIL, report
    assert "aws apigateway update-account" in report
    assert "-c llmq:apigw_cloudwatch_role=true" in report
    assert code == 1
    # And once the region has its role, the deploy may go ahead
    role = "arn:aws:iam::123456789012:role/apigateway-cloudwatch"
    account.client("apigateway").update_account(
        patchOperations=[{"op": "replace", "path": "/cloudwatchRoleArn", "value": role}]
    )
    findings, report, code = account.doctor(template=template)
    assert _verdicts(findings)["api logging"] is Verdict.OK, report
    assert code == 0


def test_a_stage_that_sets_the_role_itself_or_does_not_log_asks_nothing_of_api_gateway(
    account: Account,
) -> None:
    # Given a region with no API Gateway CloudWatch role
    account.bootstrap()
    secret = account.deploy()
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    sets_it = {**_logging_stage(), "Account": {"Type": "AWS::ApiGateway::Account", "Properties": {}}}
    quiet = {"Stage": {"Type": "AWS::ApiGateway::Stage", "Properties": {}}}
    for resources in (sets_it, quiet):
        # When the template's stage logs through a role it sets itself, or does not log
        findings, report, code = account.doctor(template={"Resources": resources})
        # Then nothing is checked of API Gateway's settings, and nothing stops the deploy
        assert "api logging" not in _verdicts(findings), report
        assert code == 0


def test_a_redeploy_whose_own_reservations_cannot_be_read_names_the_permission(account: Account) -> None:
    # Given a deployed stack whose reservations already came out of the account's pool (a quota
    # that fits exactly once they are counted back), and an identity refused
    # cloudformation:ListStackResources (so what the stack holds cannot be read)
    account.bootstrap()
    secret = account.deploy()
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    account.quota = _reserved_total(account) + 100
    account.unreserved = 100
    cloudformation = account.client("cloudformation")

    def refused(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "AccessDenied", "Message": "not authorized to perform ListStackResources"}},
            "ListStackResources",
        )

    cloudformation.meta.events.register("before-call.cloudformation.ListStackResources", refused)
    account.client = lambda service: (  # type: ignore[method-assign]
        cloudformation if service == "cloudformation" else Account.client(account, service)
    )
    # When the operator runs the preflight of the redeploy
    findings, report, code = account.doctor()
    # Then it fails, but says why it cannot tell, and which permissions it needs: not a quota to ask for
    assert _verdicts(findings)["concurrency"] is Verdict.FAIL, report
    assert "what the deployed stack reserves now could not be read" in report
    assert "lambda:GetFunctionConcurrency and cloudformation:ListStackResources" in report
    assert "ask for a quota" not in report
    assert code == 1


def _running(config: LlmqConfig, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """A template whose function runs with `config`, as the app writes it (its LLMQ_CONFIG), and
    the role moto's CloudFormation needs to make the function; `recorded`: the in-flight
    settings its Metadata records, as this version's app writes them (none: an older version's)."""
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
    metadata = {} if recorded is None else {"Metadata": {IN_FLIGHT_SETTINGS_METADATA: recorded}}
    return {
        **metadata,
        "Resources": {
            "WorkerRole": {"Type": "AWS::IAM::Role", "Properties": {"AssumeRolePolicyDocument": trust}},
            "Worker": {
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "Runtime": "python3.12",
                    "Handler": "handler.handler",
                    "Role": {"Fn::GetAtt": ["WorkerRole", "Arn"]},
                    "Code": {"ZipFile": "def handler(event, context): pass"},
                    "Environment": {"Variables": {"LLMQ_CONFIG": config.to_env()}},
                },
            },
        },
    }


def _with(**settings: Any) -> LlmqConfig:
    return LlmqConfig.model_validate(settings)


def test_a_deploy_that_lowers_what_jobs_in_flight_rely_on_fails_unless_the_stack_is_drained(
    account: Account,
) -> None:
    # Given a deployed stack running 16 sweep shards, 16 count shards and a lane of its own
    two_lanes = [
        {"name": "high", "tiers": ["enterprise"], "max_concurrency": 4},
        {"name": "low", "tiers": ["free"], "max_concurrency": 2},
    ]
    deployed = _with(lanes=[*two_lanes, {"name": "eu", "tiers": ["eu"], "max_concurrency": 2}])
    account.bootstrap()
    secret = account.deploy(resources=_running(deployed)["Resources"])
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    lowered = {
        "reconciler.sweep_shards from 16 to 8": _with(
            lanes=deployed.model_dump()["lanes"], reconciler={"sweep_shards": 8}
        ),
        "batches.count_shards from 16 to 4": _with(
            lanes=deployed.model_dump()["lanes"], batches={"count_shards": 4}
        ),
        "the lane eu removed": _with(lanes=two_lanes),
    }
    for what, config in lowered.items():
        # When the operator's next deploy lowers one of them
        findings, report, code = account.doctor(template=_running(config))
        # Then the preflight stops it, naming what and how to go ahead
        assert _verdicts(findings)["settings"] is Verdict.FAIL, report
        assert f"this deploy lowers {what}" in report
        assert "make deploy DRAINED=1" in report
        assert code == 1
        # And once the operator says the stack is drained, the deploy goes ahead with a note
        findings, report, code = account.doctor(template=_running(config), drained=True)
        assert _verdicts(findings)["settings"] is Verdict.NOTE, report
        assert code == 0
    # And a deploy that keeps or raises them goes ahead
    raised = _with(lanes=deployed.model_dump()["lanes"], reconciler={"sweep_shards": 32})
    for config in (deployed, raised):
        findings, report, code = account.doctor(template=_running(config))
        assert _verdicts(findings)["settings"] is Verdict.OK, report
        assert code == 0


def test_the_cli_passes_drained_on_to_the_settings_check(
    account: Account, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    # Given a deployed stack of 16 sweep shards, and a synthesized template of 4
    account.bootstrap()
    secret = account.deploy(resources=_running(LlmqConfig())["Resources"])
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")
    template = tmp_path / "Llmq.template.json"
    template.write_text(json.dumps(_running(_with(reconciler={"sweep_shards": 4}))))
    monkeypatch.setattr(boto3.session.Session, "client", lambda _self, service, **_: account.client(service))
    # When `llmq doctor` runs on it, as `make deploy` does, and again with --drained (DRAINED=1)
    code = cli.main(["doctor", "--template", str(template)])
    refused = capsys.readouterr().out
    drained = cli.main(["doctor", "--template", str(template), "--drained"])
    noted = capsys.readouterr().out
    # Then the first stops the deploy, the second lets it go with a note
    assert (code, drained) == (1, 0), refused + noted
    assert "  FAIL  settings: this deploy lowers reconciler.sweep_shards from 16 to 4" in refused
    assert "  note  settings: this deploy lowers reconciler.sweep_shards from 16 to 4" in noted


def _deployed(account: Account, template: dict[str, Any]) -> None:
    account.bootstrap()
    secret = account.deploy(resources=template["Resources"], metadata=template.get("Metadata"))
    account.client("secretsmanager").put_secret_value(SecretId=secret, SecretString="sk-real")


def test_the_settings_a_template_records_are_compared_not_two_versions_defaults(account: Account) -> None:
    # Given a stack deployed by a version whose default was 32 sweep shards, for an operator on
    # defaults: its LLMQ_CONFIG says nothing of them, its Metadata records 32
    recorded = {**LlmqConfig().in_flight_settings(), "reconciler.sweep_shards": 32}
    _deployed(account, _running(LlmqConfig(), recorded=recorded))
    # When this version (16 by default) is deployed on defaults
    findings, report, code = account.doctor(
        template=_running(LlmqConfig(), recorded=LlmqConfig().in_flight_settings())
    )
    # Then the preflight sees 32 lowered to 16 (review 255: it compared 16 with 16)
    assert _verdicts(findings)["settings"] is Verdict.FAIL, report
    assert "reconciler.sweep_shards from 32 to 16" in report
    assert code == 1


def test_an_older_deployed_config_is_read_for_its_settings_whatever_else_it_holds(account: Account) -> None:
    # Given a stack an older version deployed (no recorded settings) with 32 sweep shards and
    # a setting this version no longer has
    deployed = _running(_with(reconciler={"sweep_shards": 32}))
    variables = deployed["Resources"]["Worker"]["Properties"]["Environment"]["Variables"]
    config = json.loads(variables["LLMQ_CONFIG"])
    config["reconciler"]["sweep_batch_size"] = 25
    variables["LLMQ_CONFIG"] = json.dumps(config)
    _deployed(account, deployed)
    # When this version lowers them to 4
    lowering = _running(_with(reconciler={"sweep_shards": 4}))
    _, report, code = account.doctor(template=lowering)
    # Then the preflight stops it (review 255: a config it could not validate was only a note)
    assert "this deploy lowers reconciler.sweep_shards from 32 to 4" in report
    assert code == 1


def test_a_deployed_template_whose_settings_cannot_be_read_stops_the_deploy_unless_drained(
    account: Account,
) -> None:
    # Given a deployed stack whose function's LLMQ_CONFIG is not JSON this version reads
    deployed = _running(LlmqConfig())
    deployed["Resources"]["Worker"]["Properties"]["Environment"]["Variables"]["LLMQ_CONFIG"] = '{"lanes": 7}'
    _deployed(account, deployed)
    # When the preflight runs, then it cannot say nothing is lowered: the deploy waits for a drain
    findings, report, code = account.doctor(template=_running(LlmqConfig()))
    assert _verdicts(findings)["settings"] is Verdict.FAIL, report
    assert "could not be read" in report
    findings, report, code = account.doctor(template=_running(LlmqConfig()), drained=True)
    assert (_verdicts(findings)["settings"], code) == (Verdict.NOTE, 0), report
