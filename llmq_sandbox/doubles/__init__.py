"""Test doubles the sandbox and the tests share: the fake LLM provider, the webhook receiver and
the fault hooks. They import neither the emulator nor the CLI."""
