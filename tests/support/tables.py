"""The llmq tables, created in moto from the stack's own template: keys, indexes and TTL as deployed."""

from __future__ import annotations

import functools
from typing import Any

from stacks.template import StackTemplate

# What CreateTable takes from an AWS::DynamoDB::Table, under the same names.
_CREATE_TABLE_PROPERTIES = ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes", "BillingMode")


@functools.cache
def default_app_template() -> StackTemplate:
    """The template of the app with the default LlmqConfig, synthesized once per process (and,
    with LLMQ_SYNTH_CACHE set as the Makefile does, once per change of the app)."""
    import tempfile

    from llmq.config import LlmqConfig
    from stacks.synthesis import synthesize

    with tempfile.TemporaryDirectory(prefix="llmq-cdk-") as outdir:
        # The tables only: the placeholder dependencies layer is enough (never for a deploy).
        context = {"llmq:allow_placeholder_deps_layer": True}
        return StackTemplate(synthesize(LlmqConfig(), context, outdir=outdir).template())


def create_table(ddb: Any, template: StackTemplate, output: str, table_name: str) -> None:
    """Create the table that the stack output `output` names, as `table_name`."""
    _, resource = template.output_resource(output)
    properties = resource["Properties"]
    ddb.create_table(
        TableName=table_name,
        **{name: properties[name] for name in _CREATE_TABLE_PROPERTIES if name in properties},
    )
    ttl = properties.get("TimeToLiveSpecification")
    if ttl:
        ddb.update_time_to_live(
            TableName=table_name,
            TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": ttl["Enabled"]},
        )
