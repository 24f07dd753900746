"""Real HTTP APIs nobody here wrote, as HTTP targets for the tests: httpbin (PyPI, served by
waitress) and json-server (npm, from ``tests/node``'s committed lock).

Each runs as its own process on a free loopback port and is waited for until it answers; a
missing program is :class:`~keyturn.errors.Unavailable` with how to install it (the tests
that need one fail, never skip).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from keyturn.errors import Unavailable
from keyturn.harness.ports import free_port

START_TIMEOUT = 30.0


class _Process:
    """A server process on a free port, up once ``probe`` answers below 500."""

    probe = "/"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)

    def command(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                if httpx.get(self.url + self.probe, timeout=1.0).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self._log.seek(0)
        said = self._log.read().decode(errors="replace")[-2000:]
        self.__exit__(None, None, None)
        raise Unavailable(f"{self.command()[0]} did not start on {self.url}: {said}")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
        self.cleanup()

    def cleanup(self) -> None:
        """What a server leaves behind besides its process (nothing, unless it says)."""


class Httpbin(_Process):
    """httpbin under waitress: ``/anything`` echoes what reached the wire."""

    probe = "/get"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "waitress",
            f"--listen=127.0.0.1:{self.port}",
            "--threads=8",
            "httpbin:app",
        ]


class JsonServer(_Process):
    """json-server over a copy of ``data``: GET, POST, PATCH, PUT, DELETE on its collections."""

    def __init__(self, node_dir: Path, data: dict[str, Any]) -> None:
        binary = node_dir / "node_modules" / ".bin" / "json-server"
        if not binary.exists() or shutil.which("node") is None:
            raise Unavailable(
                f"json-server is not installed in {node_dir}: run scripts/test (npm ci there; "
                "Node.js from the distribution's nodejs and npm packages)"
            )
        super().__init__()
        self._binary = binary
        self._dir = tempfile.TemporaryDirectory(prefix="keyturn-json-server-")
        self.db = Path(self._dir.name) / "db.json"
        self.db.write_text(json.dumps(data))
        self.probe = "/" + next(iter(data))

    def command(self) -> list[str]:
        return [str(self._binary), "--port", str(self.port), "--host", "127.0.0.1", str(self.db)]

    def cleanup(self) -> None:
        self._dir.cleanup()
