"""The llmq CDK app: one construct per concern, composed by `llmq_stack.LlmqStack`."""
