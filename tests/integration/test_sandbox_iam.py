"""moto's IAM enforcement, as the sandbox corrects it (llmq_sandbox/iam.py), allows and refuses what AWS does.

One moto server for the module, holding two tables, two queues and a bucket, an operator and
roles that trust Lambda. Each role's policies name their resources, as the CDK app's do; two
restrict the tenants table's items by partition key (`dynamodb:LeadingKeys`), as the CDK app
restricts the authorizer and the webhook dispatcher.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from llmq_sandbox.iam import (
    UNCHECKED,
    AwsCredentials,
    assume_roles,
    create_operator,
    set_enforcement,
)
from tests.support.aws_sessions import TRUSTS_LAMBDA, client_as, iam_checking_moto_server

REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "dynamodb:GetItem",
                "dynamodb:UpdateItem",
                "sqs:SendMessage",
                "sqs:GetQueueUrl",
                "s3:GetObject",
            ],
            "Resource": [
                f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/jobs",
                f"arn:aws:sqs:{REGION}:{ACCOUNT}:lane",
                "arn:aws:s3:::payloads/*",
            ],
        }
    ],
}
TENANTS_ARN = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/tenants"
# As stacks/jobs_table.py `grant_item_actions(..., leading_key_prefix="key#")` writes it.
KEYS_ONLY = {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["key#*"]}}
KEY_READER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:BatchGetItem",
                "dynamodb:Query",
            ],
            "Resource": TENANTS_ARN,
            "Condition": KEYS_ONLY,
        }
    ],
}
# Two grants on the tenants table, one restricted to key# items and one not, and a Deny of
# the secret# items: each in a policy of its own, as separate constructs would add them.
GUARDED_POLICIES = {
    "keys": {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TENANTS_ARN, "Condition": KEYS_ONLY}
        ],
    },
    "everything": {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TENANTS_ARN}],
    },
    "no-secrets": {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Action": "dynamodb:GetItem",
                "Resource": TENANTS_ARN,
                "Condition": {"StringLike": {"dynamodb:LeadingKeys": ["secret#*"]}},
            }
        ],
    },
}
# Patterns as IAM reads them: `?` one character, `.` a dot, actions in any case; and a
# NotResource grant, which covers every object but those it names.
PATTERNED_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "sqs:sendmessage", "Resource": f"arn:aws:sqs:{REGION}:{ACCOUNT}:lan?"},
        {
            "Effect": "Allow",
            "Action": "dynamodb:GetItem",
            "Resource": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/job.",
        },
        {"Effect": "Allow", "Action": "s3:GetObject", "NotResource": "arn:aws:s3:::payloads/results/*"},
    ],
}


@dataclass
class Moto:
    endpoint_url: str
    operator: AwsCredentials
    function: AwsCredentials
    key_reader: AwsCredentials = UNCHECKED
    guarded: AwsCredentials = UNCHECKED
    patterned: AwsCredentials = UNCHECKED

    def client(self, service: str, credentials: AwsCredentials, **kwargs: Any) -> Any:
        return client_as(credentials, service, self.endpoint_url, **kwargs)

    def queue_url(self, name: str) -> str:
        return f"{self.endpoint_url}/{ACCOUNT}/{name}"


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with iam_checking_moto_server() as endpoint:
        unchecked = Moto(endpoint, UNCHECKED, UNCHECKED)
        operator = create_operator(unchecked.client("iam", UNCHECKED))
        _build_resources(Moto(endpoint, operator, UNCHECKED))
        iam = unchecked.client("iam", operator)
        roles = {}
        for name, policies in (
            ("worker", {"grants": ROLE_POLICY}),
            ("key-reader", {"grants": KEY_READER_POLICY}),
            ("guarded", GUARDED_POLICIES),
            ("patterned", {"grants": PATTERNED_POLICY}),
        ):
            role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUSTS_LAMBDA))["Role"]
            for policy_name, policy in policies.items():
                iam.put_role_policy(RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(policy))
            roles[name] = (role["Arn"], f"Llmq-{name.title()}")
        sessions = assume_roles(unchecked.client("sts", operator), roles)
        set_enforcement(endpoint, enforced=True)
        yield Moto(
            endpoint,
            operator,
            sessions["worker"],
            sessions["key-reader"],
            sessions["guarded"],
            sessions["patterned"],
        )


def _build_resources(moto: Moto) -> None:
    moto.client("dynamodb", moto.operator).create_table(
        TableName="jobs",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    # The partition key is not named pk: the sandbox reads it from the table's key schema.
    ddb = moto.client("dynamodb", moto.operator)
    ddb.create_table(
        TableName="tenants",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}, {"AttributeName": "part", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "id", "AttributeType": "S"},
            {"AttributeName": "part", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    for item_id in ("key#abc", "tenant#abc", "secret#abc"):
        ddb.put_item(
            TableName="tenants", Item={"id": {"S": item_id}, "part": {"S": "0"}, "holder": {"S": "acme"}}
        )
    ddb.put_item(TableName="jobs", Item={"pk": {"S": "key#abc"}})
    sqs = moto.client("sqs", moto.operator)
    sqs.create_queue(QueueName="lane")
    sqs.create_queue(QueueName="other")
    s3 = moto.client("s3", moto.operator)
    s3.create_bucket(Bucket="payloads")
    s3.put_object(Bucket="payloads", Key="results/job.json", Body=b'{"output": "hi"}')
    s3.put_object(Bucket="payloads", Key="inputs/job.json", Body=b'{"prompt": "hi"}')


def _update(item: str) -> dict[str, Any]:
    return {
        "TableName": "jobs",
        "Key": {"pk": {"S": item}},
        "UpdateExpression": "SET claimed = :yes",
        "ExpressionAttributeValues": {":yes": {"BOOL": True}},
    }


def _refusal(call: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as refused:
        call()
    return dict(refused.value.response["Error"])


def test_a_grant_that_names_its_table_allows_the_action_and_nothing_else(moto: Moto) -> None:
    ddb = moto.client("dynamodb", moto.function)
    # When the role does what it was granted on the table it names
    ddb.update_item(**_update("job_1"))
    # Then it is allowed; and what it was not granted is refused as DynamoDB refuses it
    error = _refusal(lambda: ddb.put_item(TableName="jobs", Item={"pk": {"S": "job_2"}}))
    assert error["Code"] == "AccessDeniedException"
    assert "assumed-role/worker/Llmq-Worker" in error["Message"]
    assert "dynamodb:PutItem" in error["Message"]


def test_a_transaction_needs_the_action_of_each_of_its_entries(moto: Moto) -> None:
    ddb = moto.client("dynamodb", moto.function)
    # When the role writes a transaction of updates only, then one with a put
    ddb.transact_write_items(TransactItems=[{"Update": _update("job_3")}])
    put = {"Put": {"TableName": "jobs", "Item": {"pk": {"S": "job_4"}}}}
    error = _refusal(lambda: ddb.transact_write_items(TransactItems=[{"Update": _update("job_5")}, put]))
    # Then the first is allowed, and the second refused for the put, as IAM evaluates them
    assert (error["Code"], "dynamodb:PutItem" in error["Message"]) == ("AccessDeniedException", True)


def test_sqs_checks_the_queue_and_a_batch_as_its_single_action(moto: Moto) -> None:
    sqs = moto.client("sqs", moto.function)
    # When the role sends to its queue, one message and a batch, and to a queue it was not granted
    sqs.send_message(QueueUrl=moto.queue_url("lane"), MessageBody="one")
    sent = sqs.send_message_batch(
        QueueUrl=moto.queue_url("lane"), Entries=[{"Id": "1", "MessageBody": "two"}]
    )
    error = _refusal(lambda: sqs.send_message(QueueUrl=moto.queue_url("other"), MessageBody="three"))
    # Then both sends to its queue pass (sqs:SendMessage covers the batch), the other is refused
    assert [entry["Id"] for entry in sent["Successful"]] == ["1"]
    assert "sqs:SendMessage" in error["Message"]


def test_a_queue_named_by_its_name_or_one_that_does_not_exist_is_checked_on_its_arn(moto: Moto) -> None:
    sqs = moto.client("sqs", moto.function)
    # When the role asks for its queue's URL, another's, and a missing queue's
    assert sqs.get_queue_url(QueueName="lane")["QueueUrl"].endswith("/lane")
    other = _refusal(lambda: sqs.get_queue_url(QueueName="other"))
    missing = _refusal(lambda: sqs.send_message(QueueUrl=moto.queue_url("gone"), MessageBody="x"))
    # Then only its own is answered: IAM authorizes each on the ARN it names, before SQS looks
    # for the queue (moto found no queue from the path, and any Allow of the action passed)
    assert f"arn:aws:sqs:{REGION}:{ACCOUNT}:other" in other["Message"], other
    assert f"arn:aws:sqs:{REGION}:{ACCOUNT}:gone" in missing["Message"], missing


def test_a_missing_object_is_404_only_to_a_caller_who_may_list_its_bucket(moto: Moto) -> None:
    # When the role (s3:GetObject on payloads/*, no s3:ListBucket) and the operator (who may
    # list it) look at an object that is not there, and the role at one that is
    role, operator = moto.client("s3", moto.function), moto.client("s3", moto.operator)
    hidden = _refusal(lambda: role.head_object(Bucket="payloads", Key="results/none.json"))
    read = _refusal(lambda: role.get_object(Bucket="payloads", Key="results/none.json"))
    missing = _refusal(lambda: operator.head_object(Bucket="payloads", Key="results/none.json"))
    # Then S3 tells the role nothing it may not list (403), and the operator that it is missing
    assert (hidden["Code"], read["Code"], missing["Code"]) == ("403", "AccessDenied", "404")
    assert role.head_object(Bucket="payloads", Key="results/job.json")["ContentLength"] > 0


def test_a_presigned_url_is_authorized_as_its_signer(moto: Moto) -> None:
    # Given a presigned GET by the role (granted s3:GetObject), and one by an unknown key
    def presigned(credentials: AwsCredentials) -> str:
        s3 = moto.client("s3", credentials, config=Config(signature_version="s3v4"))
        url: str = s3.generate_presigned_url(
            "get_object", Params={"Bucket": "payloads", "Key": "results/job.json"}, ExpiresIn=60
        )
        return url

    # When anyone fetches them without credentials
    granted = httpx.get(presigned(moto.function))
    stranger = httpx.get(presigned(AwsCredentials("AKIANOTAKEY", "secret")))
    # Then the role's URL serves the object and the stranger's is refused
    assert (granted.status_code, granted.json()) == (200, {"output": "hi"})
    assert stranger.status_code == 403


def test_an_unknown_key_is_refused_and_the_operator_may_do_anything(moto: Moto) -> None:
    # When a key moto never issued lists the tables, and the operator does
    error = _refusal(lambda: moto.client("dynamodb", UNCHECKED).list_tables())
    tables = moto.client("dynamodb", moto.operator).list_tables()["TableNames"]
    # Then the stranger is refused and the operator is not
    assert "InvalidClientTokenId" in error["Message"]
    assert tables == ["jobs", "tenants"]


def _tenant_key(item_id: str) -> dict[str, Any]:
    return {"id": {"S": item_id}, "part": {"S": "0"}}


def _get_tenant(ddb: Any, item_id: str) -> dict[str, Any]:
    return dict(ddb.get_item(TableName="tenants", Key=_tenant_key(item_id))["Item"])


def test_a_leading_keys_grant_reads_its_own_items_only(moto: Moto) -> None:
    ddb = moto.client("dynamodb", moto.key_reader)
    # When the role, granted the key# items of the tenants table, reads one, then a tenant# item
    item = _get_tenant(ddb, "key#abc")
    error = _refusal(lambda: _get_tenant(ddb, "tenant#abc"))
    # Then the first is read and the second refused, naming the action and the table, as AWS does
    assert item["holder"] == {"S": "acme"}
    assert error["Code"] == "AccessDeniedException"
    assert f"dynamodb:GetItem on resource: {TENANTS_ARN} because" in error["Message"]


def test_a_grant_on_one_table_does_not_reach_another(moto: Moto) -> None:
    ddb = moto.client("dynamodb", moto.key_reader)
    # When the role reads a key# item of the jobs table, which its grant does not name
    error = _refusal(lambda: ddb.get_item(TableName="jobs", Key={"pk": {"S": "key#abc"}}))
    # Then it is refused on that table
    assert error["Code"] == "AccessDeniedException"
    assert "table/jobs because" in error["Message"]


def test_a_transaction_or_a_batch_with_one_forbidden_key_is_refused_whole(moto: Moto) -> None:
    ddb = moto.client("dynamodb", moto.key_reader)
    put = {"Put": {"TableName": "tenants", "Item": {**_tenant_key("key#new"), "holder": {"S": "acme"}}}}
    update = {
        "Update": {
            "TableName": "tenants",
            "Key": _tenant_key("tenant#abc"),
            "UpdateExpression": "SET holder = :who",
            "ExpressionAttributeValues": {":who": {"S": "mallory"}},
        }
    }
    # When the role writes a transaction of a put of a key# item and an update of a tenant#
    # item, and reads a batch of one of each
    written = _refusal(lambda: ddb.transact_write_items(TransactItems=[put, update]))
    keys = [_tenant_key("key#abc"), _tenant_key("tenant#abc")]
    read = _refusal(lambda: ddb.batch_get_item(RequestItems={"tenants": {"Keys": keys}}))
    alone = ddb.batch_get_item(RequestItems={"tenants": {"Keys": keys[:1]}})["Responses"]["tenants"]
    # Then both are refused for the tenant# entry, nothing was written, and a batch of key# items passes
    assert (written["Code"], "dynamodb:UpdateItem" in written["Message"]) == ("AccessDeniedException", True)
    assert (read["Code"], "dynamodb:BatchGetItem" in read["Message"]) == ("AccessDeniedException", True)
    operator = moto.client("dynamodb", moto.operator)
    assert "Item" not in operator.get_item(TableName="tenants", Key=_tenant_key("key#new"))
    assert _get_tenant(operator, "tenant#abc")["holder"] == {"S": "acme"}
    assert [found["id"]["S"] for found in alone] == ["key#abc"]


def test_a_query_is_checked_on_the_partition_it_reads(moto: Moto) -> None:
    ddb = moto.client("dynamodb", moto.key_reader)

    def query(item_id: str) -> list[dict[str, Any]]:
        found = ddb.query(
            TableName="tenants",
            KeyConditionExpression="#id = :id AND part >= :zero",
            ExpressionAttributeNames={"#id": "id"},
            ExpressionAttributeValues={":id": {"S": item_id}, ":zero": {"S": "0"}},
        )
        return list(found["Items"])

    # When the role queries a key# partition, then a tenant# one
    items = query("key#abc")
    error = _refusal(lambda: query("tenant#abc"))
    # Then the first returns its items and the second is refused
    assert [item["id"]["S"] for item in items] == ["key#abc"]
    assert (error["Code"], "dynamodb:Query" in error["Message"]) == ("AccessDeniedException", True)


def test_a_deny_applies_where_its_condition_holds_and_a_failed_condition_is_neutral(moto: Moto) -> None:
    ddb = moto.client("dynamodb", moto.guarded)
    # When the role (an Allow of key# items, an Allow of every item, a Deny of secret# items)
    # reads a key# item, a tenant# item and a secret# item
    key, tenant = _get_tenant(ddb, "key#abc"), _get_tenant(ddb, "tenant#abc")
    error = _refusal(lambda: _get_tenant(ddb, "secret#abc"))
    # Then the Deny refuses the secret# item only, and the key# grant's condition failing on the
    # tenant# item does not refuse what the other grant allows
    assert (key["id"]["S"], tenant["id"]["S"]) == ("key#abc", "tenant#abc")
    assert error["Code"] == "AccessDeniedException"
    assert "with an explicit deny in an identity-based policy" in error["Message"]


def test_action_and_resource_patterns_match_as_iam_matches_them(moto: Moto) -> None:
    sqs, ddb = moto.client("sqs", moto.patterned), moto.client("dynamodb", moto.patterned)
    # When the role (sqs:sendmessage on lan?, dynamodb:GetItem on table/job.) sends to "lane"
    # and to "other", and reads the table "jobs"
    sqs.send_message(QueueUrl=moto.queue_url("lane"), MessageBody="one")
    other = _refusal(lambda: sqs.send_message(QueueUrl=moto.queue_url("other"), MessageBody="two"))
    jobs = _refusal(lambda: ddb.get_item(TableName="jobs", Key={"pk": {"S": "key#abc"}}))
    # Then the action matches whatever its case and `?` any one character; but a `.` is a dot,
    # so the grant on "job." does not reach "jobs"
    assert "sqs:SendMessage" in other["Message"]
    assert (jobs["Code"], "dynamodb:GetItem" in jobs["Message"]) == ("AccessDeniedException", True)


def test_a_not_resource_grant_allows_all_but_what_it_names(moto: Moto) -> None:
    s3 = moto.client("s3", moto.patterned)
    # When the role (s3:GetObject on everything but payloads/results/*) reads an input and a result
    body = s3.get_object(Bucket="payloads", Key="inputs/job.json")["Body"].read()
    error = _refusal(lambda: s3.get_object(Bucket="payloads", Key="results/job.json"))
    # Then the input is read and the result refused
    assert body == b'{"prompt": "hi"}'
    assert error["Code"] == "AccessDenied"
