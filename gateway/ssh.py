"""Running an approved shell command over SSH with a one-off CA certificate.

The certificate's ``force-command`` is the approved command, so sshd runs that and nothing
else whatever we send. The host is checked against the target's known host key or host CA;
a target with neither is refused: credentials are never sent to a host we cannot verify.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncssh

from keyturn.errors import ConfigError
from keyturn.policy import SshTarget

KEY_PREFIXES = ("ssh-", "ecdsa-", "sk-")


@dataclass(frozen=True)
class ShellResult:
    exit_status: int | None
    stdout: str
    stderr: str
    truncated: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "exit_status": self.exit_status,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "truncated": self.truncated,
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


async def _read(stream: asyncssh.SSHReader[str], limit: int) -> tuple[str, bool]:
    """Up to ``limit`` characters until EOF; True when there was more."""
    chunks: list[str] = []
    size = 0
    while size <= limit:
        data = await stream.read(limit + 1 - size)
        if not data:
            break
        chunks.append(data)
        size += len(data)
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
            (stdout, cut_out), (stderr, cut_err) = await asyncio.gather(
                _read(process.stdout, output_limit), _read(process.stderr, output_limit)
            )
            truncated = cut_out or cut_err
            if truncated:
                process.close()
            completed = await process.wait(check=False)
    return ShellResult(completed.exit_status, stdout, stderr, truncated)
