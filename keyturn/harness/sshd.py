"""A throwaway OpenSSH ``sshd`` on a free port that trusts one user CA (Vault's SSH CA).

No passwords, no authorized_keys: the only way in is a certificate signed by that CA for
:func:`ssh_principal`. As root, that principal is a dedicated local user created on first use
(``useradd -m -p '*'``: locked for passwords, usable for keys); as anyone else, sshd can only
log in its own user, so the principal is the current user.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import asyncssh

from keyturn.errors import Unavailable
from keyturn.harness.ports import free_port

TEST_USER = "keyturn-ssh"


def find_sshd() -> str:
    found = shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise Unavailable(
            "no OpenSSH server (sshd): install it, e.g. apt-get install -y openssh-server"
        )
    return found


def ssh_principal() -> str:
    if os.geteuid() != 0:
        return getpass.getuser()
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "-m", "-p", "*", "-s", "/bin/sh", TEST_USER],
            check=True,
            capture_output=True,
        )
    return TEST_USER


class SshServer:
    def __init__(self, user_ca_public_key: str) -> None:
        self.binary = find_sshd()
        self.principal = ssh_principal()
        self._ca = user_ca_public_key.strip()
        self.port = 0
        self.host_public_key = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "sshd.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self._dir else ""

    async def run(
        self,
        username: str,
        key: asyncssh.SSHKey,
        certificate: asyncssh.SSHCertificate,
        command: str,
    ) -> str:
        """``command``'s output, logged in as ``username`` with ``key`` and ``certificate``,
        this server's host key pinned (no agent, no ssh config)."""
        async with asyncssh.connect(
            "127.0.0.1",
            self.port,
            username=username,
            client_keys=[(key, certificate)],
            known_hosts=([asyncssh.import_public_key(self.host_public_key)], [], []),
            agent_path=None,
            config=None,
        ) as conn:
            return str((await conn.run(command, check=False)).stdout)

    def _configure(self, root: Path) -> Path:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(root / "host_key")
        (root / "host_key").chmod(0o600)
        self.host_public_key = host_key.export_public_key().decode().strip()
        (root / "user_ca.pub").write_text(self._ca + "\n")
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"HostKey {root / 'host_key'}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"TrustedUserCAKeys {root / 'user_ca.pub'}",
                    "AuthorizedKeysFile none",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin no",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        return config

    def start(self) -> SshServer:
        self._dir = Path(tempfile.mkdtemp(prefix="keyturn-sshd-"))
        config = self._configure(self._dir)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation
        for _ in range(5):
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [self.binary, "-D", "-e", "-f", str(config), "-p", str(self.port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready():
                return self
            self._proc.kill()
            self._proc.wait()
        raise Unavailable(f"sshd did not start: {self.log()[-500:]}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
