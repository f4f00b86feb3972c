"""The local emulator: the CDK app deployed into moto, an API Gateway, Lambda execution
environments, event-source pollers and IAM, all on loopback (`llmq sandbox up`, `make demo`).
Its test doubles live in `llmq_sandbox.doubles`."""
