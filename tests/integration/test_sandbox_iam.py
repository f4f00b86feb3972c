"""moto's IAM enforcement, as the sandbox corrects it (llmq_sandbox/iam.py), allows and refuses what AWS does.

One moto server for the module, holding a table, two queues and a bucket, an operator and a
role that trusts Lambda. The role's one policy names its resources, as the CDK app's do.
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
            "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem", "sqs:SendMessage", "s3:GetObject"],
            "Resource": [
                f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/jobs",
                f"arn:aws:sqs:{REGION}:{ACCOUNT}:lane",
                "arn:aws:s3:::payloads/*",
            ],
        }
    ],
}


@dataclass
class Moto:
    endpoint_url: str
    operator: AwsCredentials
    function: AwsCredentials

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
        role = iam.create_role(RoleName="worker", AssumeRolePolicyDocument=json.dumps(TRUSTS_LAMBDA))["Role"]
        iam.put_role_policy(RoleName="worker", PolicyName="grants", PolicyDocument=json.dumps(ROLE_POLICY))
        sessions = assume_roles(unchecked.client("sts", operator), {"worker": (role["Arn"], "Llmq-Worker")})
        set_enforcement(endpoint, enforced=True)
        yield Moto(endpoint, operator, sessions["worker"])


def _build_resources(moto: Moto) -> None:
    moto.client("dynamodb", moto.operator).create_table(
        TableName="jobs",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    sqs = moto.client("sqs", moto.operator)
    sqs.create_queue(QueueName="lane")
    sqs.create_queue(QueueName="other")
    s3 = moto.client("s3", moto.operator)
    s3.create_bucket(Bucket="payloads")
    s3.put_object(Bucket="payloads", Key="results/job.json", Body=b'{"output": "hi"}')


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
    assert tables == ["jobs"]
