"""The ``ssh`` driver: an approved shell command over SSH with a one-off CA certificate.

The gateway holds no standing SSH credentials: an allowed command, like an approved one,
runs with the certificate the bot mints for it (:meth:`SshDriver.runs_allowed` is False).

The certificate's ``force-command`` is the approved command, so sshd runs that and nothing
else whatever we send. The host is checked against the target's known host key or host CA;
a target with neither is refused: credentials are never sent to a host we cannot verify.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import asyncssh

from gateway.usecases.driver import Allowed, RunFailed, as_text
from keyturn.classify import Identity
from keyturn.classify.catalog import Catalog
from keyturn.config.targets import SshTarget
from keyturn.errors import ConfigError
from keyturn.masking import Masker
from keyturn.supervise import Loop

KEY_PREFIXES = ("ssh-", "ecdsa-", "sk-")
OUTPUT_LIMIT = 64 * 1024  # characters of stdout (and of stderr) kept


@dataclass(frozen=True)
class ShellResult:
    exit_status: int | None
    stdout: str
    stderr: str
    truncated: bool
    timing: Timing  # when each chunk arrived, for the run's replay (not the agent's answer)

    def as_json(self) -> dict[str, Any]:
        return {
            "exit_status": self.exit_status,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "truncated": self.truncated,
            "timing": [list(chunk) for chunk in self.timing],
        }


def _public_key(text: str) -> asyncssh.SSHKey:
    """A key from ``ssh-ed25519 AAAA…``, a known_hosts line or an ``@cert-authority`` line."""
    words = text.split()
    for i, word in enumerate(words):
        if word.startswith(KEY_PREFIXES):
            return asyncssh.import_public_key(" ".join(words[i : i + 2]))
    raise ConfigError(f"not an SSH public key: {text[:40]!r}")


def known_hosts(target: SshTarget, name: str) -> tuple[list[Any], list[Any], list[Any]]:
    """(trusted host keys, trusted host CAs, revoked keys) for asyncssh."""
    if not target.host_key and not target.host_ca:
        raise ConfigError(
            f"target {name} has no host_key or host_ca: refusing to send credentials to a "
            "host keyturn cannot verify"
        )
    keys = [_public_key(target.host_key)] if target.host_key else []
    cas = [_public_key(target.host_ca)] if target.host_ca else []
    return keys, cas, []


# at most this many chunks' arrival times are kept for a replay (later ones are shown when the
# stream ends); each stream's end is always kept, so offsets scale to what was masked
TIMED_CHUNKS = 2000


Timing = list[tuple[float, str, int]]


async def _read(
    stream: asyncssh.SSHReader[str], limit: int, started: float, timing: Timing, name: str
) -> tuple[str, bool]:
    """Up to ``limit`` characters until EOF; True when there was more. Each chunk's arrival
    (seconds since ``started``, the stream's name, its end offset) is added to ``timing``."""
    chunks: list[str] = []
    size = 0
    while size <= limit:
        data = await stream.read(limit + 1 - size)
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if len(timing) < TIMED_CHUNKS:
            timing.append((asyncio.get_running_loop().time() - started, name, min(size, limit)))
    if size:
        timing.append((asyncio.get_running_loop().time() - started, name, min(size, limit)))
    text = "".join(chunks)
    return text[:limit], len(text) > limit


async def run_ssh(
    target: SshTarget,
    name: str,
    credentials: dict[str, Any],
    command: str,
    *,
    timeout: timedelta,
    output_limit: int,
) -> ShellResult:
    key = asyncssh.import_private_key(credentials["private_key"])
    certificate = asyncssh.import_certificate(credentials["certificate"])
    async with asyncio.timeout(timeout.total_seconds()):
        async with asyncssh.connect(
            target.host,
            target.port,
            username=credentials["principal"],
            client_keys=[(key, certificate)],
            known_hosts=known_hosts(target, name),
            agent_path=None,
            config=None,
            preferred_auth="publickey",
        ) as conn:
            process = await conn.create_process(command, stdin=asyncssh.DEVNULL)
            started, timing = asyncio.get_running_loop().time(), Timing()
            (stdout, cut_out), (stderr, cut_err) = await asyncio.gather(
                _read(process.stdout, output_limit, started, timing, "stdout"),
                _read(process.stderr, output_limit, started, timing, "stderr"),
            )
            truncated = cut_out or cut_err
            if truncated:
                process.close()
            completed = await process.wait(check=False)
    return ShellResult(completed.exit_status, stdout, stderr, truncated, timing)


class SshDriver:
    kind: ClassVar[str] = "ssh"
    description: ClassVar[str] = (
        "host reached over SSH: each shell command runs as its policy allows"
    )

    def __init__(self, targets: dict[str, SshTarget], timeout: timedelta, masker: Masker) -> None:
        self._targets = targets
        self._timeout = timeout
        self._masker = masker

    def canonical(self, target: str, command: str, *, as_http: bool) -> str:
        return as_text(self.kind, target, command, as_http=as_http)

    def runs_allowed(self, target: str) -> bool:
        return False

    async def catalog(self, target: str) -> Catalog | None:
        return None

    async def run_allowed(self, allowed: Allowed) -> dict[str, Any]:
        raise RunFailed("the gateway holds no SSH credentials of its own", final=False)

    async def describe_held(self, target: str, command: str, who: Identity) -> dict[str, Any]:
        return {}

    async def run_approved(
        self, target: str, command: str, credentials: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            shell = await run_ssh(
                self._targets[target],
                target,
                credentials,
                command,
                timeout=self._timeout,
                output_limit=OUTPUT_LIMIT,
            )
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            message = f"target {target} failed: {type(exc).__name__}: {exc}"
            raise RunFailed(self._masker.text(message), final=True) from exc
        return shell.as_json() | {
            "stdout": self._masker.text(shell.stdout),
            "stderr": self._masker.text(shell.stderr),
        }

    def background(self) -> list[Loop]:
        return []

    async def close(self) -> None:
        return None
