"""`.llmq/sandbox.json`: how other tools find a running sandbox (DESIGN §6, Scripting interface).

Its keys are a contract: {"api_url", "aws_endpoint_url", "region", "provider_url",
"receiver_url", "pid", "tenants": [{"id", "name", "tier", "api_key", "webhook_secret", "limits"}]},
and, when the sandbox enforces IAM, "aws_credentials": {"aws_access_key_id",
"aws_secret_access_key"} of an operator allowed everything: moto refuses any other key.
A tenant's "limits" are its effective ones when the file was written: {"max_concurrency" (jobs
running at once in its lane), "max_active_jobs", "max_long_polls", "rate_per_second", "burst"}; `llmq tenants
set-limits` rewrites them, `llmq tenants show` reads them live.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

try:
    import fcntl
except ImportError:  # (no flock: the process's command line alone tells a sandbox)
    fcntl = None  # type: ignore[assignment]

DEFAULT_STATE_FILE = Path(".llmq") / "sandbox.json"
STATE_FILE_VAR = "LLMQ_SANDBOX_STATE"


class EffectiveLimits(BaseModel):
    """A tenant's limits in force (docs/limits.md): its overrides, else its tier's defaults."""

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int
    # Absent from a state file written before batch caps.
    max_batch_concurrency: int | None = None
    max_active_jobs: int
    # Absent from a state file written before long-poll caps.
    max_long_polls: int | None = None
    rate_per_second: float
    burst: int


class TenantCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    tier: str
    api_key: str
    webhook_secret: str
    limits: EffectiveLimits | None = None


class OperatorCredentials(BaseModel):
    """Named as boto3.session.Session's arguments: `Session(**state.aws_credentials.model_dump())`."""

    model_config = ConfigDict(extra="forbid")

    aws_access_key_id: str
    aws_secret_access_key: str


class SandboxState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_url: str
    aws_endpoint_url: str
    region: str
    provider_url: str
    receiver_url: str
    pid: int
    tenants: list[TenantCredentials]
    aws_credentials: OperatorCredentials | None = None

    def tenant(self, selector: str | None = None) -> TenantCredentials:
        """The first tenant, or the one whose tier, id or name is `selector`."""
        if not self.tenants:
            raise LookupError("the sandbox has no tenants")
        if selector is None:
            return self.tenants[0]
        for tenant in self.tenants:
            if selector in (tenant.tier, tenant.id, tenant.name):
                return tenant
        known = ", ".join(f"{tenant.id} ({tenant.tier})" for tenant in self.tenants)
        raise LookupError(f"no tenant {selector!r} in the sandbox; it has {known}")


def state_file(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(STATE_FILE_VAR) or DEFAULT_STATE_FILE)


def read_state(path: Path) -> SandboxState:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: start the sandbox with `llmq sandbox up`")
    return SandboxState.model_validate_json(path.read_text())


def write_state(path: Path, state: SandboxState) -> None:
    """Atomically, readable by the owner only: it holds API keys and webhook secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        # Without IAM the file has no aws_credentials key at all, as DESIGN §6 describes it.
        handle.write(state.model_dump_json(indent=2, exclude_none=True) + "\n")
    os.replace(temporary, path)


def remove_state(path: Path, pid: int | None = None) -> None:
    """Remove the file, but only if it still describes `pid` (when given)."""
    try:
        if pid is not None and read_state(path).pid != pid:
            return
        path.unlink()
    except (FileNotFoundError, ValueError):
        return


def sandbox_alive(pid: int, path: Path | None = None) -> bool:
    """True while `pid` is this user's sandbox, not a process the OS has given the pid of a
    sandbox that died without removing its state file since (hunt 298: `sandbox down` killed
    it, and `sandbox up` refused to start). With the state file's `path`, the sandbox's lock
    (`take_lock`) says so, which the kernel releases however its holder ends (hunt 320: a pid
    given since to `tail -f .llmq/sandbox.log`, or to another sandbox's function environment,
    passed a command line naming llmq). Else, and for a sandbox of a version without the lock,
    its command line (`sandbox up`); without /proc to read, any process of this user."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False  # (gone, or another user's: not a sandbox this user started)
    if path is not None and fcntl is not None and lock_file(path).exists():
        return lock_holder(path) == pid
    try:
        return b"sandbox\x00up" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False


def lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def take_lock(path: Path) -> int | None:
    """The lock of the sandbox whose state file is `path`, held from its start to its end (the
    descriptor returned stays open; closing it, or the process's end, releases it): two `up`s
    never both boot, and a sandbox still starting, with no state file yet, can be found and
    stopped (`lock_holder`). None when another process holds it. The lock file names the
    holder's pid. Always a descriptor where flock is not to be had."""
    lock = lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    if fcntl is None:
        return descriptor
    for attempt in range(3):
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 2:
                os.close(descriptor)
                return None
            time.sleep(0.05)  # (perhaps a `lock_holder` looking, for a moment)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    return descriptor


def lock_holder(path: Path) -> int | None:
    """The pid of the process holding the sandbox's lock (0 when it has not written it yet), or
    None when none holds it."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(lock_file(path), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(descriptor, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def state_pid(path: Path) -> int | None:
    """The pid a state file names, read as plain JSON: one this version cannot validate (another
    llmq version's, hunt 320) still says which sandbox to stop."""
    try:
        pid = json.loads(path.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def pid_alive(pid: int, *, or_group: bool = False) -> bool:
    """True while `pid` exists or, with `or_group`, any process of the group it leads (a detached
    sandbox's children outlive their leader for a moment)."""
    for probe in (os.kill, os.killpg) if or_group else (os.kill,):
        try:
            probe(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            return True  # it exists, owned by someone else
        return True
    return False
