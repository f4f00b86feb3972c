"""`llmq doctor`: will a deploy into this account and region work, and is the stack ready to run?

Each check runs with the operator's own credentials (boto3's default chain) and reports one
line, and for a problem, how to fix it. The exit code is 1 when any check fails, so `make
deploy` stops before CloudFormation half-creates a stack it cannot finish.

- credentials: whom the calls run as;
- region: set, and one that offers every service the stack uses;
- concurrency: the account's Lambda quota leaves room for the stack's reservations;
- bootstrap: `cdk bootstrap` ran here, recently enough for this CDK version;
- provider key: the stack's provider secret holds a real key, not the placeholder the first
  deploy created; before the first deploy, that $LLMQ_PROVIDER_API_KEY holds the key `make
  deploy` stores right after `cdk deploy` (`llmq provider-key set`, `set_provider_key` here);
- alarm email: the template subscribes every address the deployed stack subscribes, so a
  deploy without ALARM_EMAIL does not unsubscribe the on-call address (CloudFormation would
  delete the subscription a template no longer has);
- settings: the template keeps what a deploy must never lower while jobs are in flight
  (`lowered_settings`), unless the operator says the stack is drained (`--drained`).

It reads the stack's reservations from a synthesized template (`cdk.out/<stack>.template.json`)
when there is one, else from `LlmqConfig` in cdk.json. The template is parsed here rather than
through stacks/template.py: the `[cli]` install ships llmq and llmq_cli only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

# Lambda keeps this much of a region's concurrency quota unreserved, for the functions that
# reserve none: a reservation that would leave less is refused ("decreases account's
# UnreservedConcurrentExecution below its minimum value of [100]"). AWS Lambda Developer Guide,
# "Configuring reserved concurrency for a function":
# https://docs.aws.amazon.com/lambda/latest/dg/configuration-concurrency.html, and the API
# reference of PutFunctionConcurrency. New accounts start with a reduced concurrency quota
# ("Lambda quotas": https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html).
# Stack states in which nothing of it is live: a rolled-back first create, a change set under review.
NOT_DEPLOYED_STATUSES = frozenset({"ROLLBACK_COMPLETE", "REVIEW_IN_PROGRESS", "DELETE_COMPLETE"})
UNRESERVED_MINIMUM = 100
# Where `cdk bootstrap` (the default qualifier) records its version, and its stack.
BOOTSTRAP_VERSION_PARAMETER = "/cdk-bootstrap/hnb659fds/version"
BOOTSTRAP_STACK = "CDKToolkit"
# What CDK v2's default synthesizer asks for (the template's CheckBootstrapVersion rule) when
# no synthesized template says otherwise.
DEFAULT_MIN_BOOTSTRAP_VERSION = 6
# The services the stack is made of, by botocore's name.
SERVICES = (
    "lambda",
    "apigateway",
    "dynamodb",
    "sqs",
    "s3",
    "secretsmanager",
    "events",
    "cloudwatch",
    "logs",
    "sns",
    "cloudformation",
    "ssm",
)
PROVIDER_SECRET_OUTPUT = "ProviderSecretArn"
# The stack's output naming its alarm topic (stacks/llmq_stack.py).
ALARM_TOPIC_OUTPUT = "AlarmTopicArn"
# Where `llmq provider-key set` (and so `make deploy`) reads the provider key: never argv, which
# any process on the machine can list and the shell keeps in its history. The sandbox reads the
# same variable for its real-provider mode.
PROVIDER_KEY_ENV = "LLMQ_PROVIDER_API_KEY"


def _broken(status: str) -> bool:
    """A stack CloudFormation will not update: a failed operation, or a first create that rolled
    back. (UPDATE_ROLLBACK_COMPLETE is a stack back at its last good version, and works.)"""
    return status.endswith("_FAILED") or status == "ROLLBACK_COMPLETE"


class Verdict(Enum):
    OK = "ok"
    NOTE = "note"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: Verdict
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class Reservations:
    """What the stack would reserve, by function, and where that was read from."""

    by_function: dict[str, int]
    source: str
    # What the queue consumers' event source mappings can run at once, together
    # (MaximumConcurrency); None when no template says.
    mapped: int | None = None

    @property
    def total(self) -> int:
        return sum(self.by_function.values())


def reservations_from_template(template: dict[str, Any], source: str) -> Reservations:
    """Every function's ReservedConcurrentExecutions, named by its llmq:function tag."""
    found: dict[str, int] = {}
    for logical_id, resource in template.get("Resources", {}).items():
        if resource.get("Type") != "AWS::Lambda::Function":
            continue
        properties = resource.get("Properties", {})
        reserved = properties.get("ReservedConcurrentExecutions")
        if reserved is None:
            continue
        tags = {tag.get("Key"): tag.get("Value") for tag in properties.get("Tags") or []}
        found[str(tags.get("llmq:function") or logical_id)] = int(reserved)
    mapped = sum(
        int(resource.get("Properties", {}).get("ScalingConfig", {}).get("MaximumConcurrency") or 0)
        for resource in template.get("Resources", {}).values()
        if resource.get("Type") == "AWS::Lambda::EventSourceMapping"
    )
    return Reservations(found, source, mapped)


def min_bootstrap_version(template: dict[str, Any] | None) -> int:
    """The version the template's CheckBootstrapVersion rule asks for: one past the versions it refuses."""
    try:
        assertion = template["Rules"]["CheckBootstrapVersion"]["Assertions"][0]["Assert"]  # type: ignore[index]
        refused = assertion["Fn::Not"][0]["Fn::Contains"][0]
        return max(int(version) for version in refused) + 1
    except (KeyError, IndexError, TypeError, ValueError):
        return DEFAULT_MIN_BOOTSTRAP_VERSION


def bootstrap_version_parameter(template: dict[str, Any] | None) -> str:
    """Where the template reads the bootstrap's version (its BootstrapVersion parameter: a
    qualifier other than the default one names another), else the default qualifier's."""
    try:
        name = template["Parameters"]["BootstrapVersion"]["Default"]  # type: ignore[index]
    except (KeyError, TypeError):
        return BOOTSTRAP_VERSION_PARAMETER
    return name if isinstance(name, str) and name.startswith("/") else BOOTSTRAP_VERSION_PARAMETER


def alarm_emails_in_template(template: dict[str, Any] | None) -> frozenset[str] | None:
    """The addresses the template subscribes to its alarm topic; None without a template."""
    if template is None:
        return None
    return frozenset(
        str(resource["Properties"]["Endpoint"])
        for resource in template.get("Resources", {}).values()
        if resource.get("Type") == "AWS::SNS::Subscription"
        and resource.get("Properties", {}).get("Protocol") == "email"
        and isinstance(resource["Properties"].get("Endpoint"), str)
    )


def stage_logs_through_account_role(template: dict[str, Any] | None) -> bool:
    """Whether the template's API stage logs to CloudWatch (access logs, or execution logs at a
    level) through the region's API Gateway CloudWatch role, which it does not set itself."""
    if template is None:
        return False
    resources = template.get("Resources", {}).values()
    if any(resource.get("Type") == "AWS::ApiGateway::Account" for resource in resources):
        return False
    for resource in resources:
        if resource.get("Type") != "AWS::ApiGateway::Stage":
            continue
        properties = resource.get("Properties", {})
        if properties.get("AccessLogSetting"):
            return True
        for setting in properties.get("MethodSettings") or []:
            if str(setting.get("LoggingLevel", "OFF")).upper() != "OFF" or setting.get("DataTraceEnabled"):
                return True
    return False


def in_flight_settings_in_template(template: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the template's stack runs of the settings a deploy must never lower while jobs are
    in flight (`LlmqConfig.in_flight_settings`): as its Metadata records them; for a template
    of a version before that record, read from its functions' LLMQ_CONFIG, what it leaves out
    taken as this version's defaults. None without a template, or one with no function (no
    llmq stack yet); ValueError when the template says them in no way this version reads."""
    from llmq.config import CONFIG_ENV_VAR, IN_FLIGHT_SETTINGS_METADATA, LlmqConfig

    if template is None:
        return None
    recorded = (template.get("Metadata") or {}).get(IN_FLIGHT_SETTINGS_METADATA)
    if recorded is not None:
        return _settings(recorded)
    for resource in template.get("Resources", {}).values():
        if resource.get("Type") != "AWS::Lambda::Function":
            continue
        raw = resource.get("Properties", {}).get("Environment", {}).get("Variables", {}).get(CONFIG_ENV_VAR)
        if not isinstance(raw, str):
            continue
        # (only what is compared: a setting an older version had and this one dropped is no
        # reason not to read these three)
        written = json.loads(raw)
        defaults = LlmqConfig().in_flight_settings()
        try:
            return _settings(
                {
                    "reconciler.sweep_shards": written.get("reconciler", {}).get(
                        "sweep_shards", defaults["reconciler.sweep_shards"]
                    ),
                    "batches.count_shards": written.get("batches", {}).get(
                        "count_shards", defaults["batches.count_shards"]
                    ),
                    "lanes": [lane["name"] for lane in written["lanes"]]
                    if "lanes" in written
                    else defaults["lanes"],
                }
            )
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"its {CONFIG_ENV_VAR} does not say them ({exc!r})") from exc
    return None


def _settings(recorded: Any) -> dict[str, Any]:
    try:
        return {
            "reconciler.sweep_shards": int(recorded["reconciler.sweep_shards"]),
            "batches.count_shards": int(recorded["batches.count_shards"]),
            "lanes": sorted(str(lane) for lane in recorded["lanes"]),
        }
    except (KeyError, TypeError) as exc:
        raise ValueError(f"unreadable settings {recorded!r}") from exc


def lowered_settings(deployed: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What `new` lowers of the settings a deploy must never lower while jobs are in flight
    (docs/operations.md): what sits on the part dropped is never read again."""
    lowered = []
    shards = "reconciler.sweep_shards"
    if new[shards] < deployed[shards]:
        lowered.append(
            f"{shards} from {deployed[shards]} to {new[shards]} (the reconciler would never again "
            "look at a job whose entry sits in a dropped shard: a crashed worker's slot held, a "
            "lost message never sent again, a job never retired)"
        )
    counts = "batches.count_shards"
    if new[counts] < deployed[counts]:
        lowered.append(
            f"{counts} from {deployed[counts]} to {new[counts]} (a running batch's items counted "
            "on a dropped shard would be lost to its counts, and it would never end)"
        )
    removed = sorted(set(deployed["lanes"]) - set(new["lanes"]))
    if removed:
        lowered.append(
            f"the lane{'s' if len(removed) > 1 else ''} {', '.join(removed)} removed (a job or "
            "batch still in it would wait for good)"
        )
    return lowered


def load_reservations(
    stack: str, template_path: Path | None, cdk_json: Path
) -> tuple[Reservations, dict[str, Any] | None]:
    """(reservations, the synthesized template or None)."""
    path = template_path or Path("cdk.out") / f"{stack}.template.json"
    if path.is_file():
        template = json.loads(path.read_text())
        return reservations_from_template(template, f"the synthesized template {path}"), template
    from llmq.config import LlmqConfig

    context: dict[str, Any] = {}
    source = "LlmqConfig defaults (no cdk.json here)"
    if cdk_json.is_file():
        context = json.loads(cdk_json.read_text()).get("context", {}).get("llmq") or {}
        source = f"the `llmq` context in {cdk_json} (run `make synth` to count from the template)"
    config = LlmqConfig.model_validate(context)
    return Reservations(dict(config.reserved_concurrency), source, config.mapped_concurrency), None


_NOBODY_HEARS = Finding(
    "alarm email",
    Verdict.NOTE,
    "the template subscribes nobody to the alarms: every alarm notifies nobody",
    "`make deploy ALARM_EMAIL=oncall@example.com` (docs/operations.md)",
)


class Doctor:
    def __init__(
        self,
        client: Callable[[str], Any],
        region: str | None,
        available_regions: Callable[[str], list[str]],
        stack: str,
        reservations: Reservations,
        min_bootstrap: int = DEFAULT_MIN_BOOTSTRAP_VERSION,
        environ: Mapping[str, str] | None = None,
        alarm_emails: frozenset[str] | None = None,
        bootstrap_parameter: str = BOOTSTRAP_VERSION_PARAMETER,
        stage_logs_through_account_role: bool = False,
        settings: dict[str, Any] | None = None,
        drained: bool = False,
    ) -> None:
        self._client = client
        self._environ = os.environ if environ is None else environ
        self.region = region
        self._available_regions = available_regions
        self.stack = stack
        self.reservations = reservations
        self.min_bootstrap = min_bootstrap
        # The SSM parameter the template's CheckBootstrapVersion rule reads (its qualifier's).
        self.bootstrap_parameter = bootstrap_parameter
        # What the template about to be deployed subscribes (None: no template to compare).
        self.alarm_emails = alarm_emails
        # The template's stage logs to CloudWatch, and it does not set the region's role itself.
        self.stage_logs_through_account_role = stage_logs_through_account_role
        # The in-flight settings of the template about to be deployed (None: no template to
        # compare), and whether the operator says nothing is in flight (no job queued or
        # running, no webhook pending, no batch open): then what it lowers is only noted.
        self.settings = settings
        self.drained = drained
        self.account: str | None = None

    def run(self) -> list[Finding]:
        region = self.check_region()
        if region.verdict is Verdict.FAIL:
            return [region]
        credentials = self.check_credentials()
        if credentials.verdict is Verdict.FAIL:
            return [region, credentials]
        try:
            outputs = self._stack_outputs()
        except (ClientError, BotoCoreError) as exc:
            stack = Finding(
                "stack",
                Verdict.FAIL,
                f"could not describe stack {self.stack}: {_reason(exc)}",
                "allow cloudformation:DescribeStacks to the deploying identity",
            )
            return [region, credentials, stack]
        try:
            bootstrap = self.check_bootstrap()
        except (ClientError, BotoCoreError) as exc:
            bootstrap = Finding(
                "bootstrap", Verdict.FAIL, f"could not describe {BOOTSTRAP_STACK}: {_reason(exc)}"
            )
        try:
            state = self.check_stack_state()
        except (ClientError, BotoCoreError) as exc:
            state = Finding("stack", Verdict.FAIL, f"could not describe stack {self.stack}: {_reason(exc)}")
        return [
            region,
            credentials,
            state,
            self.check_concurrency(outputs is not None),
            bootstrap,
            self.check_provider_key(outputs),
            self.check_alarm_email(outputs),
            *[finding for finding in [self.check_api_logging(), self.check_settings(outputs)] if finding],
        ]

    # ---- checks -------------------------------------------------------------------------

    def check_region(self) -> Finding:
        if not self.region:
            return Finding(
                "region",
                Verdict.FAIL,
                "no region is set, so the deploy would not know where to go",
                "set one: `export AWS_REGION=eu-west-1`, `aws configure set region eu-west-1`, or --region",
            )
        missing = [service for service in SERVICES if self.region not in self._available_regions(service)]
        if missing:
            return Finding(
                "region",
                Verdict.FAIL,
                f"{self.region} does not offer {', '.join(missing)}, which the stack uses",
                "pick a commercial region that offers them all, e.g. us-east-1 or eu-west-1",
            )
        return Finding("region", Verdict.OK, f"{self.region} offers every service the stack uses")

    def check_credentials(self) -> Finding:
        try:
            identity = self._client("sts").get_caller_identity()
        except (NoCredentialsError, ClientError, BotoCoreError) as exc:
            return Finding(
                "credentials",
                Verdict.FAIL,
                f"AWS did not accept the credentials: {_reason(exc)}",
                "configure credentials for the target account: `aws configure`, `aws sso login`, or AWS_PROFILE",
            )
        self.account = str(identity["Account"])
        return Finding("credentials", Verdict.OK, f"account {self.account} as {identity['Arn']}")

    def check_concurrency(self, deployed: bool) -> Finding:
        try:
            limits = self._client("lambda").get_account_settings()["AccountLimit"]
        except (ClientError, BotoCoreError) as exc:
            return Finding(
                "concurrency",
                Verdict.FAIL,
                f"could not read the Lambda account settings: {_reason(exc)}",
                "allow lambda:GetAccountSettings to the deploying identity, or check the quota by hand",
            )
        quota = int(limits["ConcurrentExecutions"])
        unreserved = int(limits["UnreservedConcurrentExecutions"])
        need = self.reservations.total
        # On a redeploy the stack's own reservations are already taken out of `unreserved`.
        unread = None
        try:
            held = self._held_by_stack() if deployed else 0
        except (ClientError, BotoCoreError) as exc:
            held = 0  # unreadable: count as if the stack held none, which can only err on the safe side
            unread = _reason(exc)
        room = unreserved + held - UNRESERVED_MINIMUM
        summary = (
            f"quota {quota}, unreserved {unreserved}; the stack reserves {need} "
            f"({_shares(self.reservations.by_function)}; from {self.reservations.source})"
        )
        if need == 0:
            return self._unreserved_pool(summary, unreserved + held)
        if need <= room:
            return Finding("concurrency", Verdict.OK, f"{summary}; {UNRESERVED_MINIMUM} stay unreserved")
        if unread is not None:
            # The deployed stack's own reservations come back to the pool as it is updated: not
            # counted, a redeploy that fits can look like one that does not.
            return Finding(
                "concurrency",
                Verdict.FAIL,
                f"{summary}: what the deployed stack reserves now could not be read ({unread}), and "
                f"without it only {max(room, 0)} can be reserved",
                "allow lambda:GetFunctionConcurrency and cloudformation:ListStackResources to the "
                "deploying identity, and run the doctor again: the stack's own reservations count "
                "towards what a redeploy may reserve",
            )
        return Finding(
            "concurrency",
            Verdict.FAIL,
            f"{summary}: Lambda keeps {UNRESERVED_MINIMUM} unreserved, so only {max(room, 0)} can be "
            f'reserved and the deploy would fail with "UnreservedConcurrentExecution below its minimum"',
            f"ask for a quota of at least {need + UNRESERVED_MINIMUM + (quota - unreserved - held)} "
            "(Service Quotas > AWS Lambda > Concurrent executions), or turn "
            'the reservations off: `"llmq": {"concurrency": {"reserve": false}}` in cdk.json. Without '
            "them the queue consumers stay bounded by their mappings' MaximumConcurrency, but the api "
            "and the authorizer share the account's pool, and a flood of long-polls can throttle "
            "every other function in the account",
        )

    def _unreserved_pool(self, summary: str, pool: int) -> Finding:
        """Nothing reserved (`reserve: false`) deploys however small the quota, but every
        function then shares the account's pool: queue consumers that can take all of it
        under a backlog leave the api and the authorizer throttled, and a lane message Lambda
        throttles comes back after the queue's visibility timeout with a receive spent."""
        mapped = self.reservations.mapped
        if mapped is None or mapped < pool:
            return Finding("concurrency", Verdict.OK, f"{summary}; all {pool} stay shared")
        return Finding(
            "concurrency",
            Verdict.NOTE,
            f"{summary}; the queue consumers' mappings can run {mapped} at once, and the "
            f"account's pool is {pool}: under a backlog they take all of it, the api and the "
            "authorizer are throttled (the gateway answers 5xx), and lane messages Lambda "
            "throttles come back a visibility timeout later with a receive spent, toward the DLQ",
            f"ask for a quota of at least {mapped + UNRESERVED_MINIMUM} (Service Quotas > AWS Lambda > "
            "Concurrent executions), or lower the lanes' and webhooks' `max_concurrency` in cdk.json",
        )

    def check_bootstrap(self) -> Finding:
        where = f"aws://{self.account or '<account>'}/{self.region}"
        # (`/cdk-bootstrap/<qualifier>/version`: another qualifier is bootstrapped by name, into
        # a toolkit stack of its own: `cdk bootstrap --qualifier` alone would re-qualify
        # CDKToolkit, which may be another team's, and break every app bootstrapped by it)
        parts = self.bootstrap_parameter.split("/")
        qualifier = parts[2] if len(parts) == 4 and parts[1] == "cdk-bootstrap" else None
        own = qualifier is not None and self.bootstrap_parameter != BOOTSTRAP_VERSION_PARAMETER
        # (a new bootstrap of the qualifier goes into a stack named for it)
        named = f" --qualifier {qualifier} --toolkit-stack-name CDKToolkit-{qualifier}" if own else ""
        fix = f"run `npx cdk bootstrap {where}{named}` (once per account and region)"
        try:
            version = int(
                self._client("ssm").get_parameter(Name=self.bootstrap_parameter)["Parameter"]["Value"]
            )
        except ClientError as exc:
            if _code(exc) == "ParameterNotFound":
                return Finding("bootstrap", Verdict.FAIL, f"{where} is not bootstrapped for the CDK", fix)
            return Finding(
                "bootstrap",
                Verdict.FAIL,
                f"could not read {self.bootstrap_parameter}: {_reason(exc)}",
                # (the bootstrap may well be there: a new one beside it would collide)
                f"allow ssm:GetParameter on {self.bootstrap_parameter} to the deploying identity, then run "
                "`llmq doctor` again",
            )
        if version < self.min_bootstrap:
            if own:
                # (an upgrade goes into the stack that holds the qualifier's bootstrap)
                holder = self._toolkit_stack()
                upgrade = (
                    f"`npx cdk bootstrap {where} --qualifier {qualifier} --toolkit-stack-name {holder}`"
                    if holder
                    else f"`npx cdk bootstrap {where} --qualifier {qualifier} --toolkit-stack-name <the stack "
                    f"that holds {self.bootstrap_parameter}>`"
                )
            else:
                upgrade = fix.removeprefix("run ")
            return Finding(
                "bootstrap",
                Verdict.FAIL,
                f"the CDK bootstrap is version {version}; this app needs {self.min_bootstrap} or later",
                f"upgrade it: {upgrade}",
            )
        # (the default toolkit stack is looked at only for the default qualifier: another
        # qualifier's bootstrap has a stack of its own name, and CDKToolkit may be another team's)
        default = self.bootstrap_parameter == BOOTSTRAP_VERSION_PARAMETER
        status = self._stack_status(BOOTSTRAP_STACK) if default else None
        if status is None:
            # (or bootstrapped under another toolkit stack name: the version is what the deploy checks)
            return Finding("bootstrap", Verdict.OK, f"version {version} ({self.bootstrap_parameter})")
        if _broken(status):
            return Finding("bootstrap", Verdict.FAIL, f"the {BOOTSTRAP_STACK} stack is {status}", fix)
        return Finding("bootstrap", Verdict.OK, f"version {version} ({BOOTSTRAP_STACK} {status})")

    def _toolkit_stack(self) -> str | None:
        """The live toolkit stack that holds the qualifier's version parameter, if CloudFormation
        can say (a deleted stack's resources are listed for a while: never those)."""
        try:
            found = self._client("cloudformation").describe_stack_resources(
                PhysicalResourceId=self.bootstrap_parameter
            )["StackResources"]
        except (ClientError, BotoCoreError):
            return None
        live = [
            resource for resource in found if not str(resource.get("ResourceStatus", "")).startswith("DELETE")
        ]
        return str(live[0]["StackName"]) if live else None

    def check_stack_state(self) -> Finding:
        """The deployed stack, if any, in a state CloudFormation will update (a first create
        that rolled back is replaced by `cdk deploy`, and counts as not deployed)."""
        status = self._stack_status(self.stack)
        # (REVIEW_IN_PROGRESS: a change set made and never run, by `cdk deploy --no-execute` or a
        # deploy cut short; it never ends by itself, and `cdk deploy` creates the stack from it)
        if status is None or status in ("ROLLBACK_COMPLETE", "REVIEW_IN_PROGRESS"):
            return Finding("stack", Verdict.OK, f"{self.stack} is not deployed yet")
        if status.endswith("_IN_PROGRESS"):
            return Finding(
                "stack",
                Verdict.FAIL,
                f"{self.stack} is {status}: CloudFormation is changing it now",
                "wait until it ends (`aws cloudformation describe-stacks --stack-name "
                f"{self.stack}`), then deploy",
            )
        if status == "UPDATE_ROLLBACK_FAILED":
            return Finding(
                "stack",
                Verdict.FAIL,
                f"{self.stack} is {status}: CloudFormation refuses every update until its rollback ends",
                f"`aws cloudformation continue-update-rollback --stack-name {self.stack}` (see its events "
                "for the resource that failed), then deploy",
            )
        if _broken(status):
            return Finding(
                "stack",
                Verdict.FAIL,
                f"{self.stack} is {status}: CloudFormation will not update it",
                "see the stack's events for the resource that failed",
            )
        return Finding("stack", Verdict.OK, f"{self.stack} is {status}")

    def check_provider_key(self, outputs: dict[str, str] | None) -> Finding:
        set_key = f"`{PROVIDER_KEY_ENV}=... llmq provider-key set --stack {self.stack}`"
        if outputs is None:
            # The stack goes live with a random placeholder as the key: `make deploy` replaces it
            # right after `cdk deploy`, from the environment, so only with the variable set.
            from llmq.providers import key_fits_a_header

            pending = self._environ.get(PROVIDER_KEY_ENV, "").strip()
            if pending and not key_fits_a_header(pending):
                return Finding(
                    "provider key", Verdict.FAIL, _UNSENDABLE_KEY, f"export {PROVIDER_KEY_ENV} again"
                )
            if pending:
                return Finding(
                    "provider key",
                    Verdict.OK,
                    f"stack {self.stack} is not deployed yet; ${PROVIDER_KEY_ENV} is set, so the key "
                    "will be set right after the deploy",
                )
            return Finding(
                "provider key",
                Verdict.FAIL,
                f"stack {self.stack} is not deployed yet and ${PROVIDER_KEY_ENV} is not set: the "
                "stack would go live with a random placeholder as the provider key, and every job "
                "would meet a 401",
                f"export {PROVIDER_KEY_ENV} (e.g. `read -rs {PROVIDER_KEY_ENV} && export "
                f"{PROVIDER_KEY_ENV}`) and run `make deploy` again: it sets the key right after "
                f"`cdk deploy`. After a plain `cdk deploy`, run {set_key} yourself",
            )
        secret = outputs.get(PROVIDER_SECRET_OUTPUT)
        if not secret:
            return Finding(
                "provider key",
                Verdict.FAIL,
                f"stack {self.stack} has no {PROVIDER_SECRET_OUTPUT} output",
                "redeploy the stack",
            )
        try:
            versions = self._client("secretsmanager").list_secret_version_ids(
                SecretId=secret, IncludeDeprecated=True
            )["Versions"]
        except (ClientError, BotoCoreError) as exc:
            return Finding(
                "provider key",
                Verdict.FAIL,
                f"could not read the provider secret's versions: {_reason(exc)}",
                "allow secretsmanager:ListSecretVersionIds on it to the deploying identity",
            )
        # CloudFormation wrote the placeholder as the secret's first version; any
        # put-secret-value adds a second (the first stays, labelled AWSPREVIOUS).
        if len(versions) <= 1:
            if self._environ.get(PROVIDER_KEY_ENV, "").strip():
                # `make deploy` stores it after `cdk deploy`: a FAIL here would stop it first.
                return Finding(
                    "provider key",
                    Verdict.NOTE,
                    "the provider secret still holds the placeholder the first deploy generated; "
                    f"${PROVIDER_KEY_ENV} is set, so `make deploy` sets it right after the deploy",
                    f"or set it now: `llmq provider-key set --stack {self.stack}`",
                )
            return Finding(
                "provider key",
                Verdict.FAIL,
                "the provider secret still holds the placeholder the first deploy generated: every job "
                "would meet a 401 and fail as retries_exhausted",
                f"set the key: {set_key}",
            )
        return Finding(
            "provider key", Verdict.OK, f"set ({len(versions)} versions of {secret.rsplit(':', 1)[-1]})"
        )

    def check_alarm_email(self, outputs: dict[str, str] | None) -> Finding:
        if self.alarm_emails is None:
            return Finding("alarm email", Verdict.OK, "no template to read")
        if outputs is None:
            if not self.alarm_emails:
                return _NOBODY_HEARS
            return Finding(
                "alarm email",
                Verdict.OK,
                f"{', '.join(sorted(self.alarm_emails))} (confirm the mail SNS sends within 48 hours, "
                "or SNS deletes the subscription)",
            )
        try:
            deployed = alarm_emails_in_template(self._deployed_template())
        except (ClientError, BotoCoreError, ValueError) as exc:
            return Finding(
                "alarm email",
                Verdict.FAIL,
                f"could not read the deployed template: {_reason(exc)}",
                "allow cloudformation:GetTemplate on the stack to the deploying identity",
            )
        # Only the stack's own subscriptions: one added by hand (`aws sns subscribe`) is no
        # resource of the stack, and no deploy removes it. Compared as written: the address is
        # the subscription's logical id, so another spelling is another subscription.
        dropped = sorted((deployed or frozenset()) - self.alarm_emails)
        if dropped:
            return Finding(
                "alarm email",
                Verdict.FAIL,
                f"this deploy would unsubscribe {', '.join(dropped)} from the alarms (the template "
                "subscribes no such address): every alarm would then notify nobody it notifies now",
                f"deploy with the address: `make deploy ALARM_EMAIL={dropped[0]}`, or set "
                "`alarm_email` in cdk.json once",
            )
        if not self.alarm_emails:
            return _NOBODY_HEARS
        held = self._subscriptions_held(
            outputs.get(ALARM_TOPIC_OUTPUT), self.alarm_emails & (deployed or set())
        )
        return held or Finding("alarm email", Verdict.OK, ", ".join(sorted(self.alarm_emails)))

    def _subscriptions_held(self, topic: str | None, addresses: frozenset[str]) -> Finding | None:
        """What SNS holds of the deployed subscriptions this deploy keeps. The stack lists a
        subscription as its resource whatever SNS did with it: SNS deletes an e-mail
        subscription not confirmed within 48 hours, and a mail scanner that follows the
        unsubscribe link ends one. A deploy of the same address never makes it again."""
        if topic is None or not addresses:
            return None
        try:
            # Every entry of each address: a subscription is listed by its ARN once confirmed,
            # as "PendingConfirmation" before, and as "Deleted" for days after an unsubscribe.
            found: dict[str, set[str]] = {}
            paginator = self._client("sns").get_paginator("list_subscriptions_by_topic")
            for page in paginator.paginate(TopicArn=topic):
                for subscription in page.get("Subscriptions", []):
                    if subscription.get("Protocol") == "email":
                        arn = str(subscription.get("SubscriptionArn"))
                        found.setdefault(str(subscription.get("Endpoint")), set()).add(arn)
        except (ClientError, BotoCoreError) as exc:
            return Finding(
                "alarm email",
                Verdict.NOTE,
                f"could not list the alarm topic's subscriptions: {_reason(exc)}",
                "allow sns:ListSubscriptionsByTopic on the alarm topic to see whether anyone hears the alarms",
            )
        held = {address for address, arns in found.items() if any(arn.startswith("arn:") for arn in arns)}
        pending = sorted(
            address for address in addresses - held if "PendingConfirmation" in found.get(address, ())
        )
        gone = sorted(addresses - held - set(pending))
        if gone:
            return Finding(
                "alarm email",
                Verdict.FAIL,
                f"SNS holds no subscription of {', '.join(gone)} to the alarm topic, which the stack "
                "still lists (a confirmation mail not clicked within 48 hours, or an unsubscribe): "
                "no deploy makes it again, and the alarms reach nobody there",
                f"`aws sns subscribe --topic-arn {topic} --protocol email --notification-endpoint "
                f"{gone[0]}` and confirm the mail (docs/operations.md, First deploy; SNS may refuse "
                "it for a few days after an unsubscribe)",
            )
        if pending:
            return Finding(
                "alarm email",
                Verdict.NOTE,
                f"{', '.join(pending)} has not confirmed its subscription: no alarm reaches it, and SNS "
                "deletes the subscription 48 hours after its mail was sent",
                'click the link in "AWS Notification - Subscription Confirmation"',
            )
        return None

    def check_api_logging(self) -> Finding | None:
        """A stage that logs to CloudWatch needs the region's API Gateway CloudWatch role: without
        it the stage's create fails and the first deploy rolls back."""
        if not self.stage_logs_through_account_role:
            return None
        try:
            role = self._client("apigateway").get_account().get("cloudwatchRoleArn")
        except (ClientError, BotoCoreError) as exc:
            return Finding(
                "api logging",
                Verdict.NOTE,
                f"could not read API Gateway's account settings: {_reason(exc)}",
                "allow apigateway:GET on /account, or check `aws apigateway get-account` names a cloudwatchRoleArn",
            )
        if not role:
            return Finding(
                "api logging",
                Verdict.FAIL,
                "the stage logs to CloudWatch (llmq:apigw_logging), and API Gateway in this region has "
                "no CloudWatch role: the stage's create would fail (\"CloudWatch Logs role ARN must be "
                'set in account settings to enable logging") and the deploy roll back',
                "set the region's role once (`aws apigateway update-account`), or deploy with "
                "`-c llmq:apigw_cloudwatch_role=true` (it replaces any role the region has: README)",
            )
        return Finding("api logging", Verdict.OK, f"API Gateway's CloudWatch role: {role}")

    def check_settings(self, outputs: dict[str, str] | None) -> Finding | None:
        """The deploy keeps what must never be lowered while jobs are in flight (`lowered_settings`):
        CloudFormation would apply it, and the jobs on what it drops would wait for good."""
        if self.settings is None or outputs is None:
            return None
        try:
            deployed = in_flight_settings_in_template(self._deployed_template())
        except (ClientError, BotoCoreError) as exc:
            return Finding(
                "settings",
                Verdict.FAIL,
                f"could not read the deployed template: {_reason(exc)}",
                "allow cloudformation:GetTemplate on the stack to the deploying identity",
            )
        except ValueError as exc:
            lowered = [
                "what it may (the deployed template's reconciler.sweep_shards, batches.count_shards "
                f"and lanes could not be read: {str(exc).splitlines()[0]})"
            ]
        else:
            lowered = lowered_settings(deployed, self.settings) if deployed is not None else []
        if not lowered:
            return Finding("settings", Verdict.OK, "nothing lowered that jobs in flight rely on")
        what = "; ".join(lowered)
        if self.drained:
            return Finding(
                "settings",
                Verdict.NOTE,
                f"this deploy lowers {what}: deployed as the operator says the stack is drained",
                "submit nothing until the deploy is over",
            )
        return Finding(
            "settings",
            Verdict.FAIL,
            f"this deploy lowers {what}",
            "keep the deployed value, or drain the stack first (no job queued or running, no "
            "webhook pending, no batch open) and deploy with `make deploy DRAINED=1` "
            "(docs/operations.md, Settings a deploy must never lower)",
        )

    # ---- helpers ------------------------------------------------------------------------

    def _deployed_template(self) -> dict[str, Any]:
        body = self._client("cloudformation").get_template(StackName=self.stack)["TemplateBody"]
        return body if isinstance(body, dict) else dict(json.loads(body))

    def _stack_outputs(self) -> dict[str, str] | None:
        return deployed_stack_outputs(self._client("cloudformation"), self.stack)

    def _stack_status(self, name: str) -> str | None:
        try:
            return str(
                self._client("cloudformation").describe_stacks(StackName=name)["Stacks"][0]["StackStatus"]
            )
        except ClientError as exc:
            if "does not exist" in _reason(exc):
                return None
            raise

    def _held_by_stack(self) -> int:
        """What the deployed stack's functions reserve now (it is freed and taken again on update)."""
        held = 0
        lambda_client = self._client("lambda")
        paginator = self._client("cloudformation").get_paginator("list_stack_resources")
        for page in paginator.paginate(StackName=self.stack):
            for resource in page["StackResourceSummaries"]:
                if resource["ResourceType"] != "AWS::Lambda::Function":
                    continue
                with_reserved = lambda_client.get_function_concurrency(
                    FunctionName=resource["PhysicalResourceId"]
                )
                held += int(with_reserved.get("ReservedConcurrentExecutions") or 0)
        return held


def deployed_stack_outputs(cloudformation: Any, stack: str) -> dict[str, str] | None:
    """The stack's outputs, or None when nothing of it is live."""
    try:
        stacks = cloudformation.describe_stacks(StackName=stack)["Stacks"]
    except ClientError as exc:
        if "does not exist" in _reason(exc):
            return None
        raise
    # A first create that failed and rolled back leaves the stack behind with no outputs;
    # `cdk deploy` deletes and recreates it, so for the preflight it is not deployed.
    if stacks[0].get("StackStatus") in NOT_DEPLOYED_STATUSES:
        return None
    return {output["OutputKey"]: output["OutputValue"] for output in stacks[0].get("Outputs", [])}


class ProviderKeyError(Exception):
    """Why `llmq provider-key set` stored nothing."""


@dataclass(frozen=True)
class StoredKey:
    secret_arn: str
    version_id: str


# (never the key itself)
_UNSENDABLE_KEY = (
    f"${PROVIDER_KEY_ENV} holds whitespace or a character no HTTP header can carry (a paste's "
    "curly quotes or zero-width space, a key wrapped over two lines?): it is not stored"
)


def set_provider_key(client: Callable[[str], Any], stack: str, environ: Mapping[str, str]) -> StoredKey:
    """Store $LLMQ_PROVIDER_API_KEY as the current version of the stack's provider secret.

    The key comes from the environment only and appears in no message. Everything that can be
    missing is checked before the one write, so an error writes nothing.
    """
    key = environ.get(PROVIDER_KEY_ENV, "").strip()
    if not key:
        raise ProviderKeyError(
            f"${PROVIDER_KEY_ENV} is not set (or empty): export the provider's API key in it "
            f"(e.g. `read -rs {PROVIDER_KEY_ENV} && export {PROVIDER_KEY_ENV}`); it is never "
            "taken from the command line"
        )
    from llmq.providers import key_fits_a_header

    if not key_fits_a_header(key):
        # (the worker refuses to send such a key: every job would fail; hunt 298)
        raise ProviderKeyError(_UNSENDABLE_KEY)
    try:
        outputs = deployed_stack_outputs(client("cloudformation"), stack)
    except (ClientError, BotoCoreError) as exc:
        raise ProviderKeyError(f"could not describe stack {stack}: {_reason(exc)}") from exc
    if outputs is None:
        raise ProviderKeyError(
            f"stack {stack} is not deployed in this account and region: deploy it first "
            "(`make deploy` sets the key right after), or pass --stack / --region"
        )
    secret = outputs.get(PROVIDER_SECRET_OUTPUT)
    if not secret:
        raise ProviderKeyError(
            f"stack {stack} has no {PROVIDER_SECRET_OUTPUT} output: it is not an llmq stack, or "
            "an old one (redeploy it)"
        )
    try:
        stored = client("secretsmanager").put_secret_value(SecretId=secret, SecretString=key)
    except (ClientError, BotoCoreError) as exc:
        raise ProviderKeyError(f"could not store the key in {secret}: {_reason(exc)}") from exc
    return StoredKey(secret_arn=str(stored["ARN"]), version_id=str(stored["VersionId"]))


def render(findings: list[Finding], header: str) -> str:
    lines = [header]
    for finding in findings:
        lines.append(f"  {finding.verdict.value:<5} {finding.check}: {finding.message}")
        if finding.fix and finding.verdict is not Verdict.OK:
            label = "next" if finding.verdict is Verdict.NOTE else "fix"
            lines.append(f"        {label}: {finding.fix}")
    failed = sum(finding.verdict is Verdict.FAIL for finding in findings)
    lines.append(f"{failed} problem{'s' if failed != 1 else ''} found" if failed else "ready to deploy")
    return "\n".join(lines)


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(finding.verdict is Verdict.FAIL for finding in findings) else 0


def _shares(by_function: dict[str, int]) -> str:
    if not by_function:
        return "reservations off"
    return ", ".join(f"{name} {count}" for name, count in sorted(by_function.items()))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _reason(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ")
    return str(exc) or type(exc).__name__
