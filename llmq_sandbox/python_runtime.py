"""Which Python runs the functions in the sandbox, and what running another one hides.

Lambda runs llmq on `python3.14` (stacks/runtime.py). The sandbox runs the functions on the
interpreter it was started with: no registry this project may install from ships a CPython
build (uv and pbs-installer download theirs from GitHub, and Debian 12 packages stop at 3.11),
so on most development machines that is an older Python. The sandbox says so at startup,
with what the difference can hide, instead of letting a green run pretend to be Lambda.

The hidden differences are of two kinds:
- code that uses something newer than the local Python fails here and works on Lambda: loud,
  and harmless;
- code that uses something Lambda's Python removed works here and fails on Lambda: silent.
  `removed_since` lists the removals that matter to a handler, and the unit suite checks the
  shipped code against it (tests/unit/test_python_runtime.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from stacks.runtime import LAMBDA_PYTHON_VERSION

# Standard-library modules removed in a release, by the release (What's New in Python 3.12,
# 3.13 and 3.14, "Removed").
REMOVED_MODULES: dict[tuple[int, int], tuple[str, ...]] = {
    (3, 12): ("asynchat", "asyncore", "distutils", "imp", "smtpd"),
    (3, 13): (
        "aifc",
        "audioop",
        "cgi",
        "cgitb",
        "chunk",
        "crypt",
        "imghdr",
        "mailcap",
        "msilib",
        "nis",
        "nntplib",
        "ossaudiodev",
        "pipes",
        "sndhdr",
        "spwd",
        "sunau",
        "telnetlib",
        "uu",
        "xdrlib",
        "lib2to3",
    ),
    (3, 14): (),
}
# Behaviour that changed under the same name: nothing fails at import, so it is only said.
CHANGED_BEHAVIOUR: dict[tuple[int, int], tuple[str, ...]] = {
    (3, 12): ("datetime.utcnow() and utcfromtimestamp() are deprecated",),
    (3, 14): (
        "asyncio.get_event_loop() raises RuntimeError when no event loop is set",
        "annotations are evaluated lazily (PEP 649), which changes what reads __annotations__ sees",
        "ast.Num, ast.Str, ast.Bytes, ast.NameConstant and ast.Ellipsis are removed",
        "pkgutil.find_loader() and pkgutil.get_loader() are removed",
        "multiprocessing starts processes with forkserver, not fork, on Linux",
    ),
}


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def lambda_python() -> tuple[int, int]:
    return _version(LAMBDA_PYTHON_VERSION)


def removed_since(local: tuple[int, int], target: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Standard-library modules the target (Lambda's) Python no longer has but `local` still does."""
    target = target or lambda_python()
    return tuple(
        module
        for release, modules in REMOVED_MODULES.items()
        if local < release <= target
        for module in modules
    )


@dataclass(frozen=True)
class RuntimeNotice:
    local: tuple[int, int]
    target: tuple[int, int]

    @property
    def matches(self) -> bool:
        return self.local == self.target

    def lines(self) -> list[str]:
        local = ".".join(map(str, self.local))
        target = ".".join(map(str, self.target))
        if self.matches:
            return [f"functions run on Python {local}, as on Lambda (python{target})"]
        if self.local > self.target:
            return [
                f"functions run on Python {local}, newer than Lambda's python{target}: "
                f"code that needs {local} passes here and fails on Lambda"
            ]
        changed = [
            change
            for release, changes in CHANGED_BEHAVIOUR.items()
            if self.local < release <= self.target
            for change in changes
        ]
        lines = [
            f"functions run on Python {local}, not Lambda's python{target} "
            f"(no package registry this machine reaches ships Python {target})",
            f"  code that needs Python {target} fails here and works on Lambda;",
            "  these work here and fail on Lambda: the modules "
            + ", ".join(removed_since(self.local, self.target))
            + " (the unit suite checks that llmq imports none of them)",
        ]
        lines += [f"  and behaves differently there: {change}" for change in changed]
        return lines


def runtime_notice(local: tuple[int, int] | None = None) -> RuntimeNotice:
    return RuntimeNotice(
        local=local or (sys.version_info.major, sys.version_info.minor), target=lambda_python()
    )
