"""The one test-support package, shared by every suite (and bench/): in-memory doubles of the
stores (stores.py), a resolver to inject (dns.py) and the moto tables made from the stack's own
template (tables.py).

What the sandbox ships, the tests import from there rather than copy: the webhook receiver
(llmq_sandbox.doubles.receiver), the SQS event-source-mapping player
(llmq_sandbox.event_sources: the record, the batchItemFailures settlement, the deletes) and the
template reader (stacks.template)."""
