"""IAM in the sandbox's moto: each function acts with its own execution role (DESIGN §6).

How the sandbox turns it on (llmq_sandbox/launcher.py):
1. while moto authenticates nothing yet, it creates the operator: an IAM user with an inline
   `*:*` policy and an access key. The deploy, the runner's own calls (pollers, the
   receiver's secrets) and the tools and tests (through `aws_credentials` in
   `.llmq/sandbox.json`) use that key;
2. after the deploy it assumes each function's execution role, as the Lambda service does,
   and gives the function's environments those credentials;
3. then moto enforces (`POST /moto-api/reset-auth 0`): every request must be signed with a
   key moto issued, and its action allowed by the caller's policies, so a grant missing
   from the CDK app fails here as it would on AWS.

moto checks actions, and resource ARNs only for SQS, S3 and AssumeRole. It differs from IAM
in a few places that would deny what AWS allows, allow what AWS denies, or crash;
`make_moto_authorize_like_iam()` corrects them:
- elsewhere (Secrets Manager...) moto matches statements against the resource "*", which no
  resource-scoped Allow matches. Here an Allow matches a request whose resource moto does
  not know: the check is by action, and tests/infra checks the template's resources.
- moto reads each Action and Resource pattern as a regular expression with `*` made `.*`,
  case-sensitively, and ignores NotResource: a `.` in a bucket or table name matched any
  character, an Allow with NotResource allowed the very resources it names, while `?` and
  an action in another case refused what IAM allows. Here `*` is any run of characters, `?`
  any one, everything else itself, action names match in any case, and a NotResource
  statement applies to every resource but those it names.
- moto checks a batch or a transaction as an action of its own (sqs:SendMessageBatch,
  dynamodb:TransactWriteItems); IAM checks the actions of its entries.
- moto passes no condition values to an identity policy, so `dynamodb:LeadingKeys` (the
  authorizer may read only key# items of the tenants table, the webhook dispatcher only
  tenant# ones) was never checked. Here a DynamoDB request is checked on its table's ARN
  (its index's for a Query or Scan of one) with the partition key values it touches
  (`evaluations`: Key, Item, a Query's key condition; each entry of a batch or a
  transaction with its own table, action and key; a Scan touches none), and conditions on
  that key are decided as IAM decides them (`condition_holds`: String(Not)Equals,
  String(Not)Like, their ForAllValues:, ForAnyValue: and ...IfExists forms). Other condition
  keys and operators are left to moto, which ignores every operator but StringEquals and
  every key but sts:ExternalId (a condition on them holds). The partition key of a Query of
  a global secondary index is taken to be the index's; the app has no such condition.
- moto answers DENIED for a statement whose condition fails, an Allow's too. In IAM such a
  statement does not apply: here it is neutral, so another statement may still allow.
- moto reads the signature of every request from its Authorization header, so a presigned
  S3 URL (signature in the query) raised KeyError, a 500. It is authorized here as its
  signer's request, by action, once its signature is checked as S3 checks it
  (`_check_presigned_signature`: method, path, query and signed headers; a missing query
  parameter, an unsigned x-amz-* header or a chunked body refused as S3 refuses them). Its
  expiry is checked too: past X-Amz-Date + X-Amz-Expires, S3 answers 403 AccessDenied
  "Request has expired".
- moto never expires an assumed-role session. Here a request signed with a session's
  credentials after their Expiration is refused as AWS refuses it: S3 with 400 ExpiredToken,
  a presigned URL included, since a URL signed with temporary credentials stops working when
  they expire whatever its ExpiresIn ("Download and upload objects with presigned URLs", S3
  user guide); other services with 403 ExpiredToken(Exception). `expire_session` ends a
  session early, for tests.
- moto hashes the payload of a request without a body (a GET or DELETE of a REST API such as
  API Gateway's GetUsagePlans) as if its body were its headers, so its signature never
  matched (SignatureDoesNotMatch). An empty body is hashed as empty here.
- moto answers a denial in the XML of the query protocol whatever the service, so boto3
  saw DynamoDB's as error code "403". Services of the JSON protocols answer here as AWS's
  do: AccessDeniedException, naming the principal, the action, the resource where it is
  known (DynamoDB's) and whether an explicit Deny refused it.
One more, handled by the order above: moto's trust-policy check crashes on a role that
trusts a service principal (`principal in None`, TypeError in
moto/iam/access_control.py `_check_principal`), so roles are assumed before enforcement.
The functions' sessions are assumed for `SESSION_SECONDS` (12 hours, the most a role session
may last); Lambda renews a function's credentials and the sandbox does not, so the launcher
makes them outlive the sandbox (`outlive`), and only a test ends one (`expire_session`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import json
import re
import threading
import types
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

OPERATOR_USER = "llmq-sandbox-operator"
# How long the functions' role sessions last: AssumeRole's maximum (DurationSeconds).
SESSION_SECONDS = 43_200
_ADMINISTRATOR_ACCESS = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
# What moto checks a request against when it cannot tell which resource the request is for.
_UNKNOWN_RESOURCE = "*"
# The IAM action AWS evaluates for each entry of a batch call (DynamoDB's: `evaluations`).
_ENTRY_ACTIONS = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}
_TRANSACT_WRITE_ACTIONS = {
    "Put": "dynamodb:PutItem",
    "Update": "dynamodb:UpdateItem",
    "Delete": "dynamodb:DeleteItem",
    "ConditionCheck": "dynamodb:ConditionCheckItem",
}


@dataclass(frozen=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    # When a session's credentials stop working (STS's Expiration, UTC); None for a user's key.
    expiration: datetime.datetime | None = None

    def environment(self) -> dict[str, str]:
        """As Lambda passes them to a function: the variables botocore reads. Like Lambda's,
        they do not say when the credentials expire."""
        variables = {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}
        if self.session_token:
            variables["AWS_SESSION_TOKEN"] = self.session_token
        return variables


# Any key does while moto checks nothing (IAM off, or before enforcement begins).
UNCHECKED = AwsCredentials("testing", "testing")


def set_enforcement(endpoint_url: str, enforced: bool) -> None:
    """From the next request on, moto authenticates and authorizes every request, or none.

    moto's INITIAL_NO_AUTH_ACTION_COUNT (read from the environment at import) lets that many
    requests through before it starts checking; reset-auth sets it and restarts the count.
    """
    request = urllib.request.Request(
        f"{endpoint_url.rstrip('/')}/moto-api/reset-auth",
        data=b"0" if enforced else b"inf",
        # Not urllib's default form type: moto reads the number from the raw body.
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):  # raises unless 2xx
        pass


def create_operator(iam: Any) -> AwsCredentials:
    """An IAM user allowed everything, and its access key; `iam` must be able to create it."""
    iam.create_user(UserName=OPERATOR_USER)
    iam.put_user_policy(
        UserName=OPERATOR_USER,
        PolicyName="AdministratorAccess",
        PolicyDocument=json.dumps(_ADMINISTRATOR_ACCESS),
    )
    key = iam.create_access_key(UserName=OPERATOR_USER)["AccessKey"]
    return AwsCredentials(key["AccessKeyId"], key["SecretAccessKey"])


def assume_roles(
    sts: Any, roles: Mapping[str, tuple[str, str]], duration_seconds: int = SESSION_SECONDS
) -> dict[str, AwsCredentials]:
    """{function: (role ARN, session name)} -> the credentials of a session of each role.

    Lambda names the session after the function. Call it before enforcement begins (see the
    module's docstring).
    """
    assumed = {}
    for function, (role_arn, session_name) in roles.items():
        credentials = sts.assume_role(
            RoleArn=role_arn, RoleSessionName=session_name[:64], DurationSeconds=duration_seconds
        )["Credentials"]
        assumed[function] = AwsCredentials(
            credentials["AccessKeyId"],
            credentials["SecretAccessKey"],
            credentials["SessionToken"],
            expiration=credentials["Expiration"],
        )
    return assumed


def expire_session(access_key_id: str, at: datetime.datetime | None = None) -> datetime.datetime:
    """End an assumed-role session of this process's moto (at once, or `at`, UTC): from then
    on moto refuses its credentials with ExpiredToken, presigned URLs they signed included.
    Returns the new expiry. Tests use it to play credentials that expire."""
    from moto.core.utils import utcnow

    # moto keeps a session's Expiration as a naive UTC datetime.
    when = utcnow() if at is None else at.astimezone(datetime.UTC).replace(tzinfo=None) if at.tzinfo else at
    role = _assumed_role(access_key_id)
    if role is None:
        raise KeyError(f"no assumed-role session with access key {access_key_id}")
    role.expiration = when
    return when


def outlive(access_key_ids: Iterable[str], years: int = 10) -> None:
    """Keep these assumed-role sessions valid while the sandbox runs.

    Lambda hands a function fresh credentials before its old ones expire; the sandbox assumes
    each role once and does not rotate them, so without this a sandbox left up past the
    12-hour session limit would see every call refused. Tests still end a session early
    with `expire_session`. Runs where moto runs (the sandbox asks its moto process:
    `llmq_sandbox/moto_process.py`).
    """
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365 * years)
    for access_key_id in access_key_ids:
        expire_session(access_key_id, at=later)


def _assumed_role(access_key_id: str) -> Any:
    from moto.sts.models import sts_backends

    for partitions in list(sts_backends.values()):
        for backend in list(partitions.values()):
            for role in backend.assumed_roles:
                if role.access_key_id == access_key_id:
                    return role
    return None


# ---- where moto's authorization differs from IAM -------------------------------------------

_patch_lock = threading.Lock()
_patched = False


def make_moto_authorize_like_iam() -> None:
    """Idempotent; changes nothing while moto does not enforce (see the module's docstring)."""
    global _patched
    with _patch_lock:
        if _patched:
            return
        from moto.core.authorization import ActionAuthenticatorMixin
        from moto.iam import access_control
        from moto.iam.access_control import IAMPolicyStatement, IAMRequest, IAMRequestBase, PermissionResult

        _match_elements_as_iam(IAMPolicyStatement, PermissionResult)
        _evaluate_conditions_as_iam(IAMPolicyStatement, PermissionResult)
        _check_entry_actions(IAMRequestBase)
        _authorize_presigned_urls(ActionAuthenticatorMixin)
        _deny_in_the_services_protocol(IAMRequest)
        _refuse_expired_sessions(access_control)
        _sign_empty_bodies_as_empty(IAMRequestBase)
        _patched = True


def _sign_empty_bodies_as_empty(request_class: Any) -> None:
    create_aws_request = request_class._create_aws_request

    def create(self: Any) -> Any:
        request = create_aws_request(self)
        if not self._body and self._method in ("GET", "HEAD", "DELETE"):
            request.data = b""
        return request

    request_class._create_aws_request = create


def _match_elements_as_iam(statement_class: Any, permission_result: Any) -> None:
    """Actions and resources matched as IAM matches them (moto reads each pattern as a regular
    expression with `*` made `.*`, case-sensitively, and ignores NotResource), and an Allow
    matched to a resource moto does not know (the module's docstring)."""

    def element_matches(self: Any, element: str, value: str) -> bool:
        if value == _UNKNOWN_RESOURCE and element in ("Resource", "NotResource"):
            return element == "Resource" and self._statement.get("Effect") == "Allow"
        patterns = self._statement[element]
        patterns = patterns if isinstance(patterns, list) else [patterns]
        if element in ("Action", "NotAction"):
            # Action names are case-insensitive ("sqs:sendmessage" is sqs:SendMessage).
            return any(_like(str(pattern).lower(), value.lower()) for pattern in patterns)
        return any(_like(str(pattern), value) for pattern in patterns)

    statement_class._check_element_matches = element_matches
    is_action_permitted = statement_class.is_action_permitted

    def permitted(self: Any, action: str, resource: str = "*", *args: Any, **kwargs: Any) -> Any:
        if "NotResource" not in self._statement:
            return is_action_permitted(self, action, resource, *args, **kwargs)
        # NotResource: the statement applies to every resource but those it names (moto, with
        # no Resource, applied it to all of them, the named ones too).
        if self._check_element_matches("NotResource", resource):
            return permission_result.NEUTRAL
        rest = {name: part for name, part in self._statement.items() if name != "NotResource"}
        return is_action_permitted(
            statement_class({**rest, "Resource": "*"}), action, resource, *args, **kwargs
        )

    statement_class.is_action_permitted = permitted


def evaluated_actions(action: str) -> list[str]:
    """The IAM action AWS evaluates for a call that moto sees as `action` ("service:Operation"),
    other than DynamoDB's (see `evaluations`)."""
    return [_ENTRY_ACTIONS.get(action, action)]


# ---- DynamoDB: the resource and the dynamodb:LeadingKeys of each entry of a request ----------

# Condition keys the sandbox puts in a request's context: {key (lower case): values}. A key
# absent from the mapping is absent from the request, as IAM tells the two apart.
RequestContext = Mapping[str, tuple[str, ...]]
_LEADING_KEYS = "dynamodb:leadingkeys"
_NO_CONTEXT: RequestContext = types.MappingProxyType({})
_request_context: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "llmq_iam_request_context", default=_NO_CONTEXT
)
# Whether the request being checked met a Deny statement that applies (for the denial's text).
_explicit_deny: contextvars.ContextVar[bool] = contextvars.ContextVar("llmq_iam_explicit_deny", default=False)
# DynamoDB's item operations and where each names its items' keys.
_ITEM_KEY = {
    "dynamodb:GetItem": "Key",
    "dynamodb:UpdateItem": "Key",
    "dynamodb:DeleteItem": "Key",
    "dynamodb:PutItem": "Item",
}
_TRANSACT_KEY = {"Put": "Item", "Update": "Key", "Delete": "Key", "ConditionCheck": "Key", "Get": "Key"}
_BATCH_WRITE_KEY = {"PutRequest": "Item", "DeleteRequest": "Key"}


@dataclass(frozen=True)
class Evaluation:
    """One authorization IAM makes for a request: an action, on a resource, in a context."""

    action: str
    resource: str
    context: RequestContext = dataclasses.field(default_factory=dict)


def evaluations(
    action: str, body: bytes | str | None, account_id: str, region: str, resource: str = _UNKNOWN_RESOURCE
) -> list[Evaluation]:
    """What IAM authorizes for a call that moto sees as `action` ("service:Operation").

    A DynamoDB call is authorized on its table's ARN (its index's, for a Query or Scan of an
    index), with `dynamodb:LeadingKeys` the partition key values it touches; a batch or a
    transaction entry by entry, each with its own table, action and key. The partition key's
    name comes from the table's key schema in moto's backend for the caller's account and
    region; a call whose key cannot be told (an unknown table) has no leading keys. Other calls
    keep moto's resource.
    """
    if action.startswith("sqs:") and resource == _UNKNOWN_RESOURCE:
        resource = _queue_arn(body, account_id, region) or resource
    if action == "s3:GetObject" and (bucket := _bucket_of_missing_object(resource, account_id)):
        # S3 tells a missing key apart (404 NoSuchKey) only to a caller who may list the
        # bucket; anyone else is answered 403 AccessDenied, as for an object they may not read
        # (hunt 268: the sandbox answered 404 to a role with no s3:ListBucket).
        return [Evaluation(action, resource), Evaluation("s3:ListBucket", bucket)]
    if not action.startswith("dynamodb:"):
        return [Evaluation(entry, resource) for entry in evaluated_actions(action)]
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return [Evaluation(action, resource)]
    tables = _Tables(account_id, region)
    found = _dynamodb_evaluations(action, request, tables)
    if found is None:
        name = request.get("TableName")
        return [Evaluation(action, tables.arn(name) if isinstance(name, str) else resource)]
    return found or [Evaluation(action, resource)]


def _bucket_of_missing_object(resource: str, account_id: str) -> str | None:
    """The bucket's ARN, for an object ARN whose object moto's S3 does not hold; else None."""
    prefix = "arn:aws:s3:::"
    bucket, _, key = resource.removeprefix(prefix).partition("/")
    if not resource.startswith(prefix) or not bucket or not key or "*" in bucket:
        return None
    from moto.s3.models import s3_backends

    try:
        found = s3_backends[account_id]["aws"].get_object(bucket, key)
    except Exception:  # (no such bucket: S3 answers NoSuchBucket, whatever the grants)
        return None
    return None if found is not None else prefix + bucket


def _queue_arn(body: bytes | str | None, account_id: str, region: str) -> str | None:
    """The ARN of the queue an SQS request names, for one moto finds no queue for: a
    GetQueueUrl names it by QueueName (moto read the queue from the path, and found none), and
    a queue that does not exist has an ARN all the same. IAM authorizes either on that ARN, so
    a grant on other queues refuses it (hunt 268: any Allow of the action let it through)."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body or ""
    try:
        request = json.loads(text)
    except ValueError:
        request = {name: values[0] for name, values in urllib.parse.parse_qs(text).items()}
    if not isinstance(request, dict):
        return None
    name, owner = request.get("QueueName"), request.get("QueueOwnerAWSAccountId") or account_id
    url = request.get("QueueUrl")
    if isinstance(url, str) and url:
        parts = urllib.parse.urlsplit(url).path.strip("/").split("/") if "://" in url else [url]
        name = parts[-1]
        owner = parts[0] if len(parts) == 2 else owner
    if not isinstance(name, str) or not name or not isinstance(owner, str):
        return None
    return f"arn:aws:sqs:{region}:{owner}:{name}"


def _dynamodb_evaluations(action: str, request: dict[str, Any], tables: _Tables) -> list[Evaluation] | None:
    """None for an operation on no items (DescribeTable, ListTables...)."""
    if action in _ITEM_KEY:
        return [tables.item(action, request.get("TableName"), request.get(_ITEM_KEY[action]))]
    if action in ("dynamodb:Query", "dynamodb:Scan"):
        name, index = request.get("TableName"), request.get("IndexName")
        leading = (
            _query_partition_value(request, tables.partition_key(name, index))
            if action.endswith("Query")
            else None
        )
        return [Evaluation(action, tables.arn(name, index), _leading_keys(leading))]
    if action in ("dynamodb:TransactWriteItems", "dynamodb:TransactGetItems"):
        entries = []
        for item in request.get("TransactItems") or []:
            for kind, operation in item.items():
                if kind in _TRANSACT_KEY and isinstance(operation, dict):
                    entry_action = "dynamodb:GetItem" if kind == "Get" else _TRANSACT_WRITE_ACTIONS[kind]
                    entries.append(
                        tables.item(
                            entry_action, operation.get("TableName"), operation.get(_TRANSACT_KEY[kind])
                        )
                    )
        return entries
    if action == "dynamodb:BatchGetItem":
        return [
            tables.item(action, name, key)
            for name, wanted in (request.get("RequestItems") or {}).items()
            for key in (wanted or {}).get("Keys") or []
        ]
    if action == "dynamodb:BatchWriteItem":
        return [
            tables.item(action, name, operation.get(_BATCH_WRITE_KEY[kind]))
            for name, writes in (request.get("RequestItems") or {}).items()
            for write in writes or []
            for kind, operation in write.items()
            if kind in _BATCH_WRITE_KEY and isinstance(operation, dict)
        ]
    return None


def _leading_keys(value: str | None) -> RequestContext:
    return {} if value is None else {_LEADING_KEYS: (value,)}


def _attribute_text(value: Any) -> str | None:
    """An attribute value's text, as a condition compares it: {"S": "a"} -> "a"."""
    if isinstance(value, dict):
        for kind in ("S", "N", "B"):
            if isinstance(value.get(kind), str):
                return str(value[kind])
    return None


# `name = :value` or `:value = name` in a key condition (not <=, >=).
_EQUALITY = re.compile(r"([#:\w.-]+)\s*(?<![<>])=\s*([#:\w.-]+)")


def _query_partition_value(request: Mapping[str, Any], partition_key: str | None) -> str | None:
    """The partition key value a Query reads: its key condition's equality on the partition key."""
    if partition_key is None:
        return None
    names = request.get("ExpressionAttributeNames") or {}
    values = request.get("ExpressionAttributeValues") or {}
    for left, right in _EQUALITY.findall(request.get("KeyConditionExpression") or ""):
        for name, placeholder in ((left, right), (right, left)):
            if names.get(name, name) == partition_key and placeholder.startswith(":"):
                return _attribute_text(values.get(placeholder))
    legacy = (request.get("KeyConditions") or {}).get(partition_key) or {}
    if legacy.get("ComparisonOperator") == "EQ" and legacy.get("AttributeValueList"):
        return _attribute_text(legacy["AttributeValueList"][0])
    return None


class _Tables:
    """The tables of moto's DynamoDB backend for one account and region."""

    def __init__(self, account_id: str, region: str) -> None:
        self.account_id, self.region = account_id, region

    @staticmethod
    def name(table: str) -> str:
        # TableName may be the table's ARN.
        return table.split(":table/", 1)[1].split("/", 1)[0] if ":table/" in table else table

    def arn(self, table: Any, index: Any = None) -> str:
        if not isinstance(table, str):
            return _UNKNOWN_RESOURCE
        from moto.utilities.utils import get_partition

        arn = (
            table
            if table.startswith("arn:")
            else f"arn:{get_partition(self.region)}:dynamodb:{self.region}:{self.account_id}:table/{table}"
        )
        return f"{arn}/index/{index}" if isinstance(index, str) else arn

    def partition_key(self, table: Any, index: Any = None) -> str | None:
        """The table's partition key attribute, or its index's (the key a Query of it fixes)."""
        if not isinstance(table, str):
            return None
        from moto.dynamodb.models import dynamodb_backends

        try:
            found = dynamodb_backends[self.account_id][self.region].tables.get(self.name(table))
        except KeyError:
            return None
        if found is None:
            return None
        if not isinstance(index, str):
            return str(found.hash_key_attr) or None
        for candidate in [*found.indexes, *found.global_indexes]:
            if candidate.name == index:
                return next(
                    (key["AttributeName"] for key in candidate.schema if key["KeyType"] == "HASH"), None
                )
        return None

    def item(self, action: str, table: Any, key: Any) -> Evaluation:
        """An item operation: on its table, with its item's partition key value as the leading key."""
        partition_key = self.partition_key(table)
        value = _attribute_text(key.get(partition_key)) if isinstance(key, dict) and partition_key else None
        return Evaluation(action, self.arn(table), _leading_keys(value))


# ---- conditions, evaluated as IAM evaluates them --------------------------------------------

_NEUTRAL_WHEN_ABSENT = ("StringNotEquals", "StringNotLike")


def condition_holds(operator: str, key: str, expected: Any, context: RequestContext) -> bool | None:
    """Whether one condition (operator, key, values) holds in the request's context; None for
    a key the sandbox does not put in the context or an operator it does not evaluate.

    As IAM's policy reference states: a key absent from the request matches no value, so the
    condition is false, except for a negated operator (true) and ...IfExists (true)
    (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition_operators.html);
    ForAllValues holds when every value of the key matches one of the condition's, and also
    when the key is absent or empty; ForAnyValue when at least one does
    (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_condition_examples-multi-valued-context-keys.html).
    Key names are case-insensitive, values are compared case-sensitively.
    """
    if key.lower() != _LEADING_KEYS:
        return None
    qualifier, _, base = operator.rpartition(":")
    if_exists = base.endswith("IfExists")
    base = base.removesuffix("IfExists")
    if qualifier not in ("", "ForAllValues", "ForAnyValue") or base not in (
        "StringEquals",
        "StringLike",
        *_NEUTRAL_WHEN_ABSENT,
    ):
        return None
    patterns = [str(value) for value in (expected if isinstance(expected, list) else [expected])]
    like = base in ("StringLike", "StringNotLike")
    negated = base in _NEUTRAL_WHEN_ABSENT

    def matches(value: str) -> bool:
        found = any(_like(pattern, value) if like else pattern == value for pattern in patterns)
        return found != negated

    values = context.get(_LEADING_KEYS) or ()
    if qualifier == "ForAllValues":
        return all(matches(value) for value in values)
    if qualifier == "ForAnyValue":
        return any(matches(value) for value in values)
    if not values:
        return if_exists or negated
    # A single-valued operator: each entry of a DynamoDB request has one leading key.
    return all(matches(value) for value in values)


def _like(pattern: str, value: str) -> bool:
    """StringLike: `*` any run of characters, `?` any one; nothing else is special."""
    regex = "".join(".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _evaluate_conditions_as_iam(statement_class: Any, permission_result: Any) -> None:
    """A statement applies only where its conditions hold: one whose condition fails is neutral,
    an Allow as much as a Deny (moto answered DENIED for either). The conditions on
    `dynamodb:LeadingKeys` are decided by `condition_holds`; the others as moto decides them."""
    is_action_permitted = statement_class.is_action_permitted

    def permitted(
        self: Any,
        action: str,
        resource: str = "*",
        principal: str | None = None,
        incoming_condition_values: dict[str, str] | None = None,
    ) -> Any:
        conditions = self._statement.get("Condition")
        if not isinstance(conditions, dict) or not conditions:
            return is_action_permitted(self, action, resource, principal, incoming_condition_values)
        context = _request_context.get()
        left_to_moto: dict[str, dict[str, Any]] = {}
        for operator, keys in conditions.items():
            for key, expected in (keys or {}).items():
                holds = condition_holds(operator, key, expected, context)
                if holds is None:
                    left_to_moto.setdefault(operator, {})[key] = expected
                elif not holds:
                    return permission_result.NEUTRAL
        if left_to_moto and not statement_class({"Condition": left_to_moto})._check_conditions(
            incoming_condition_values
        ):
            return permission_result.NEUTRAL
        unconditioned = statement_class(
            {name: part for name, part in self._statement.items() if name != "Condition"}
        )
        return is_action_permitted(unconditioned, action, resource, principal, incoming_condition_values)

    def permitted_or_denied(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = permitted(self, *args, **kwargs)
        if result == permission_result.DENIED and self._statement.get("Effect") == "Deny":
            _explicit_deny.set(True)
        return result

    statement_class.is_action_permitted = permitted_or_denied


def _check_entry_actions(request_class: Any) -> None:
    check_action_permitted = request_class.check_action_permitted

    def check_each_entry(self: Any, resource: str) -> None:
        for entry in evaluations(self._action, self._body, self.account_id, self._region, resource):
            # The denial names the entry's action and resource, as AWS's does.
            self._action, self._llmq_resource = entry.action, entry.resource
            context, denied = _request_context.set(entry.context), _explicit_deny.set(False)
            try:
                check_action_permitted(self, entry.resource)
            finally:
                _request_context.reset(context)
                _explicit_deny.reset(denied)

    request_class.check_action_permitted = check_each_entry


def _presigned_credential(query: Mapping[str, Iterable[str]]) -> tuple[str, str | None] | None:
    credential = next(iter(query.get("X-Amz-Credential") or []), None)
    if credential is None:
        return None
    return credential, next(iter(query.get("X-Amz-Security-Token") or []), None)


def _authorize_presigned_urls(mixin: Any) -> None:
    authenticate_and_authorize = mixin._authenticate_and_authorize_action

    def authorize(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        from moto import settings

        enforcing = mixin.request_count >= settings.INITIAL_NO_AUTH_ACTION_COUNT
        presigned = _presigned_credential(getattr(self, "querystring", {}) or {})
        if not enforcing or "Authorization" in self.headers or presigned is None:
            authenticate_and_authorize(self, iam_request_cls, resource)
            return
        credential, token = presigned
        _refuse_an_expired_url(getattr(self, "querystring", {}) or {})
        # moto reads the caller's key from an Authorization header: give it the query's.
        headers = {**dict(self.headers), "Authorization": f"AWS4-HMAC-SHA256 Credential={credential}, "}
        if token is not None:
            headers["X-Amz-Security-Token"] = token
        request = iam_request_cls(
            account_id=self.current_account,
            method=self.method,
            path=self.raw_path,
            data=self.data,
            body=self.raw_body,
            headers=headers,
            action=self._get_action(),
        )
        _check_presigned_signature(self, request._access_key.create_credentials())
        request.check_action_permitted(resource)

    mixin._authenticate_and_authorize_action = authorize


# What S3 requires of a presigned URL's query (SigV4 query authentication).
_PRESIGNED_PARAMETERS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)


def _s3_error(code: str, message: str, status: int) -> Exception:
    """An S3 error with its status. moto derives an S3 error's status from its code
    (AccessDenied and SignatureDoesNotMatch 403, others 400); a 5xx needs moto's REST error,
    which carries its own."""
    if status >= 500:
        from moto.core.exceptions import _RESTError

        failure = _RESTError(code, message)
        failure.code = status
        return failure
    from moto.s3.exceptions import S3ClientError

    return S3ClientError(code, message)


def _check_presigned_signature(response: Any, credentials: Any) -> None:
    """S3 checks a presigned URL's signature against the request as it arrives: its method,
    path, query and the headers it signed, with their values. A PUT of another Content-Length
    than the URL was signed for (an upload's, `PayloadStore.presigned_put`) is refused
    SignatureDoesNotMatch (403), as are a tampered query or a GET to a PUT's URL; so are a
    query missing one of its parameters (400), an x-amz-* header it did not sign (403) and a
    chunked body (501: S3 takes a presigned PUT's length from Content-Length only)."""
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest

    query = getattr(response, "querystring", {}) or {}
    values = {name: next(iter(query.get(name) or []), None) for name in _PRESIGNED_PARAMETERS}
    scope = (values["X-Amz-Credential"] or "").split("/")
    missing = [name for name, value in values.items() if not value]
    if missing or len(scope) != 5:
        raise _s3_error(
            "AuthorizationQueryParametersError",
            f"Query-string authentication version 4 requires the {', '.join(_PRESIGNED_PARAMETERS)} "
            "parameters, and a credential of the form <key>/<date>/<region>/<service>/aws4_request.",
            400,
        )
    signed = str(values["X-Amz-SignedHeaders"]).split(";")
    incoming = {key.lower(): value for key, value in response.headers.items()}
    if "transfer-encoding" in incoming:
        raise _s3_error(
            "NotImplemented", "A header you provided implies functionality that is not implemented", 501
        )
    unsigned = sorted(name for name in incoming if name.startswith("x-amz-") and name not in signed)
    if unsigned:
        raise _s3_error(
            "AccessDenied",
            f"There were headers present in the request which were not signed: {unsigned}",
            403,
        )
    url = urlsplit(response.uri)
    unsigned_query = "&".join(
        part for part in url.query.split("&") if part and not part.startswith("X-Amz-Signature=")
    )
    request = AWSRequest(
        method=response.method,
        url=f"{url.scheme}://{incoming.get('host', url.netloc)}{url.path}?{unsigned_query}",
        headers={name: incoming[name] for name in signed if name != "host" and name in incoming},
    )
    request.context["timestamp"] = values["X-Amz-Date"]
    auth = S3SigV4QueryAuth(credentials, scope[3], scope[2])
    canonical = auth.canonical_request(request)
    if auth.signature(auth.string_to_sign(request, canonical), request) != values["X-Amz-Signature"]:
        raise _s3_error(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
            403,
        )


def _refuse_an_expired_url(query: Mapping[str, Iterable[str]]) -> None:
    """S3 refuses a presigned URL past X-Amz-Date + X-Amz-Expires: 403 AccessDenied."""
    signed = next(iter(query.get("X-Amz-Date") or []), None)
    expires = next(iter(query.get("X-Amz-Expires") or []), None)
    if signed is None or expires is None:
        return
    try:
        start = datetime.datetime.strptime(signed, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        end = start + datetime.timedelta(seconds=int(expires))
    except ValueError:
        return
    if datetime.datetime.now(datetime.UTC) > end:
        raise _s3_error("AccessDenied", "Request has expired", 403)


_EXPIRED = "ExpiredToken"


def _refuse_expired_sessions(access_control: Any) -> None:
    """A session's credentials past their Expiration are refused, as AWS refuses them."""
    create_access_key = access_control.create_access_key

    def create(account_id: str, partition: str, access_key_id: str, headers: dict[str, str]) -> Any:
        from moto.core.utils import utcnow

        key = create_access_key(account_id, partition, access_key_id, headers)
        if isinstance(key, access_control.AssumedRoleAccessKey):
            role = _assumed_role(access_key_id)
            if role is not None and role.expiration <= utcnow():
                raise access_control.CreateAccessKeyFailure(reason=_EXPIRED)
        return key

    access_control.create_access_key = create
    for request_class in (access_control.S3IAMRequest, access_control.IAMRequest):
        _raise_expired_token(request_class)


def _raise_expired_token(request_class: Any) -> None:
    raise_invalid_access_key = request_class._raise_invalid_access_key

    def raise_invalid(self: Any, reason: str) -> None:
        if reason != _EXPIRED:
            raise_invalid_access_key(self, reason)
            return
        if self._service == "s3":
            from moto.s3.exceptions import S3ClientError

            raise S3ClientError("ExpiredToken", "The provided token has expired.")
        from moto.core.exceptions import JsonRESTError, _RESTError

        if _speaks_json(self._service):
            error: _RESTError = JsonRESTError(
                "ExpiredTokenException", "The security token included in the request is expired"
            )
        else:
            error = _RESTError("ExpiredToken", "The security token included in the request is expired")
        error.code = 403
        raise error

    request_class._raise_invalid_access_key = raise_invalid


@functools.cache
def _speaks_json(signing_name: str) -> bool:
    """Whether the service signed as `signing_name` answers errors in JSON (botocore's model)."""
    import botocore.session
    from botocore.exceptions import UnknownServiceError

    try:
        protocol = botocore.session.get_session().get_service_model(signing_name).protocol
    except UnknownServiceError:
        return False
    return protocol in ("json", "rest-json")


def _deny_in_the_services_protocol(request_class: Any) -> None:
    raise_access_denied = request_class._raise_access_denied

    def deny(self: Any) -> None:
        if not _speaks_json(self._service):
            raise_access_denied(self)
            return
        from moto.core.exceptions import JsonRESTError

        resource = getattr(self, "_llmq_resource", _UNKNOWN_RESOURCE)
        on = "" if resource == _UNKNOWN_RESOURCE else f" on resource: {resource}"
        why = (
            "with an explicit deny in an identity-based policy"
            if _explicit_deny.get()
            else f"because no identity-based policy allows the {self._action} action"
        )
        raise JsonRESTError(
            "AccessDeniedException",
            f"User: {self._access_key.arn} is not authorized to perform: {self._action}{on} {why}",
        )

    request_class._raise_access_denied = deny
