"""A resolver to inject where llmq.ssrf resolves webhook hosts: answers from a table, records what it was asked."""

from __future__ import annotations

import socket
from collections.abc import Mapping


class FakeDns:
    """`FakeDns({"receiver.test": ["127.0.0.1"]})`, or by keyword with `_` for `.`:
    `FakeDns(hooks_example_com=["93.184.215.14"])`. Unknown names fail as getaddrinfo does."""

    def __init__(self, answers: Mapping[str, list[str]] | None = None, **by_keyword: list[str]) -> None:
        self.answers: dict[str, list[str]] = {
            **dict(answers or {}),
            **{host.replace("_", "."): ips for host, ips in by_keyword.items()},
        }
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.answers[host])
