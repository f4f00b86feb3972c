"""The operator CLI, `llmq`: jobs, tenants, dead letters, webhook checks and cost, against a
deployed stack or the local sandbox. It imports the emulator (llmq_sandbox) only for
`llmq sandbox up` and `llmq demo`."""
